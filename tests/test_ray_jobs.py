"""Batch jobs: `ray job submit -- admmq quantize …` against a running local cluster (a head started
with `ray start --head` and its dashboard, which serves the Job API), stopped part way with `ray
job stop` and resubmitted with --resume, writes the in-process bytes.

The Job API needs the dashboard, which needs Ray's "default" extras (aiohttp, aiohttp_cors, grpcio,
opencensus, prometheus_client …; `pip install "ray[default]"`): without them the test is skipped.
The cluster is private (its own --temp-dir, ports and session) and torn down at the end."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from runs import (SETTINGS, digest, free_ports, private_ray_env, quantize, stop_group,
                  wait_for_http)
from tiny import tiny_model_dir

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = Path(sys.executable).parent


def _ray(*args, check=True, timeout=120):
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True,
                          env=private_ray_env(), check=check, timeout=timeout)


@pytest.fixture(scope="module")
def job_cluster():
    probe = subprocess.run([sys.executable, "-c", "import aiohttp, aiohttp_cors, grpc, opencensus,"
                            " prometheus_client, colorful"], env=private_ray_env(),
                           capture_output=True)
    if probe.returncode:
        pytest.skip('the Ray Job API needs the dashboard: pip install "ray[default]"')
    gcs, dashboard, client, agent, metrics = free_ports(5)
    temp = tempfile.mkdtemp(prefix="rq", dir="/tmp")  # short: Unix socket paths are limited
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
         "--port", str(gcs), "--dashboard-port", str(dashboard), "--include-dashboard", "true",
         "--dashboard-host", "127.0.0.1", "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent), "--metrics-export-port", str(metrics),
         "--temp-dir", temp, "--disable-usage-stats"],
        env=private_ray_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, cwd=temp)  # the workers import the installed package, not whatever is in this folder
    address = f"http://127.0.0.1:{dashboard}"
    try:
        if not wait_for_http(f"{address}/api/version", head, 90):
            pytest.fail(f"the Ray head did not start its dashboard (rc {head.poll()})")
        yield address
    finally:
        stop_group(head, signal.SIGTERM, 10)
        _kill_leftovers(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _kill_leftovers(temp: str) -> None:
    """Ray processes of this cluster still running (found by its private temp dir)."""
    found = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True).stdout.split()
    for pid in map(int, found):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _api(address: str, path: str, method: str = "GET") -> dict:
    request = urllib.request.Request(f"{address}/api/jobs/{path}", method=method)
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def _status(address: str, job: str) -> str:
    return _api(address, job)["status"]


def _wait(address: str, job: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _status(address, job)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    raise AssertionError(f"job {job} still {status} after {timeout:g} s")


def test_a_submitted_job_stopped_part_way_resumes_into_the_in_process_bytes(job_cluster,
                                                                           tmp_path):
    address = job_cluster
    model = tiny_model_dir(tmp_path / "src", "llama", num_hidden_layers=6)
    quantize(model, tmp_path / "ref")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(SETTINGS))
    out = tmp_path / "out"
    command = [str(BIN / "admmq"), "quantize", str(model), "-o", str(out), "--recipe",
               str(recipe), "--device", "cpu", "--workers", "2", "--threads", "1",
               "--worker-device", "cpu", "--json"]

    # The first job is stopped as soon as it has committed a block.
    _ray("job", "submit", "--address", address, "--submission-id", "first", "--no-wait", "--",
         *command)
    work = out.parent / f".{out.name}.admmq-work"
    deadline = time.monotonic() + 120
    while not any(work.glob("block-*.safetensors")):
        assert _status(address, "first") in ("PENDING", "RUNNING"), \
            _ray("job", "logs", "--address", address, "first", check=False).stdout[-3000:]
        assert time.monotonic() < deadline, "the first job committed no block in 2 minutes"
        time.sleep(0.2)
    _api(address, "first/stop", "POST")  # what `ray job stop` does, without its start-up time
    assert _wait(address, "first") == "STOPPED"
    assert not out.exists()
    committed = len(list(work.glob("block-*.safetensors")))
    assert 1 <= committed < 6

    # Resubmitted with --resume: continues from the committed blocks, into the same bytes.
    done = _ray("job", "submit", "--address", address, "--submission-id", "again", "--",
                *command, "--resume", check=False, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(next(line for line in reversed(done.stdout.splitlines())
                              if line.startswith("{")))
    assert summary["workers"] == 2 and summary["resumed_blocks"] == committed
    assert digest(out) == digest(tmp_path / "ref")
