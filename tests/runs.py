"""Small whole runs shared by the schedule, resume and Ray tests: a 3-block tiny Llama quantized
with small row blocks (every layer cut into several, spread over workers), and a digest of what
a run wrote."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import torch

from admmq_dist.recipe import Recipe, override
from admmq_dist.run.job import quantize_model

SETTINGS = {"grid": {"bits": 3, "group_size": 32},
            "solver": {"row_block": 24, "admm": {"iterations": 40}},
            # The plain objective unless a test asks for asymmetric calibration (the default,
            # "auto", is exercised by test_recipe.py, test_worker.py and the CLI tests).
            "calibration": {"dataset": None, "num_samples": 8, "seq_len": 48, "batch_size": 2,
                            "asymmetric": 0.0}}


def digest(folder):
    """Hash of every tensor file and of the per-layer report (not the timings)."""
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        h.update(path.name.encode() + path.read_bytes())
    for line in (folder / "report.jsonl").read_text().splitlines():
        row = json.loads(line)
        h.update(json.dumps([row["layer"], row["loss"], row["tokens"]]).encode())
    return h.hexdigest()


def quantize(model_dir, out, asymmetric=0.0, **kw):
    recipe = override(Recipe(), {**SETTINGS, "calibration": {**SETTINGS["calibration"],
                                                             "asymmetric": asymmetric}})
    return quantize_model(str(model_dir), out, recipe, device=torch.device("cpu"),
                          progress=False, threads=1, **kw)


def wait_for_http(url: str, process: subprocess.Popen, seconds: float, poll: float = 1.0) -> bool:
    """Poll ``url`` until it answers (True), or until ``process`` exits or ``seconds`` pass
    (False): a server started in the background is up."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(poll)


def stop_group(process: subprocess.Popen, sig: int, seconds: float) -> bool:
    """Send ``sig`` to ``process``'s process group (started with ``start_new_session``) and wait
    ``seconds``; SIGKILL the group after that. True when it stopped without the SIGKILL."""
    os.killpg(process.pid, sig)
    try:
        process.wait(seconds)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return False


def free_ports(n: int) -> list[int]:
    """``n`` ports free on this machine now (for a private Ray head, its dashboard, ...)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def private_ray_env(**extra: str) -> dict:
    """The environment of a subprocess that runs its own private Ray cluster: offline, no token
    authentication (a token in ~/.ray would turn it on for the dashboard but not for the
    client), no RAY_ADDRESS to attach elsewhere, and the tests' helpers importable."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", **extra,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                       os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    return env
