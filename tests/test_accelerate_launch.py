"""`accelerate launch -m admmq_dist.cli quantize …`: the launched processes form a Ray cluster
(rank 0 starts the head, the other ranks join it as nodes), rank 0 drives the job with one worker
per process and writes the in-process bytes; every rank exits with rank 0's status. Misuse and a
rank that cannot reach the head end with one line before anything starts.

Two processes are launched on this CPU machine with ``--multi_gpu`` (torchrun: one process per
rank, whatever the device; ``--cpu`` would start a single process) and CUDA hidden, so each node
offers one CPU. Each process's node is private (its own temp folder and ports) and stopped by it."""

import json
import re
import subprocess
import sys
import time

import pytest
import yaml

from admmq_dist.cli import main
from admmq_dist.run import launched

from runs import SETTINGS, digest, free_ports, private_ray_env, quantize
from tiny import tiny_model_dir


@pytest.mark.ray
@pytest.mark.slow
def test_two_launched_processes_write_the_in_process_bytes(tmp_path):
    model = tiny_model_dir(tmp_path / "src", "llama", num_hidden_layers=3)
    quantize(model, tmp_path / "ref")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(SETTINGS))
    master, ray_port = free_ports(2)
    env = private_ray_env(CUDA_VISIBLE_DEVICES="")  # CPU processes: --multi_gpu on no GPU
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(master),
               "-m", "admmq_dist.cli", "quantize", str(model), "-o", str(tmp_path / "out"),
               "--recipe", str(recipe), "--threads", "1", "--ray-port", str(ray_port), "--json"]
    started = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=480)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    summaries = [json.loads(x) for x in run.stdout.splitlines() if x.startswith("{")]
    assert len(summaries) == 1  # rank 0 reports; the other rank only lends its node
    assert summaries[0]["workers"] == 2 and summaries[0]["nodes"] == 2
    assert summaries[0]["threads_per_worker"] == 1
    assert digest(tmp_path / "out") == digest(tmp_path / "ref")
    print(f"launched run: {time.monotonic() - started:.0f} s")
    _no_head_left(ray_port)

    # Rank 0 refuses (the output exists): one line, and both ranks exit with its status.
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 1
    errors = [x for x in again.stderr.splitlines() if x.startswith("admmq: error:")]
    assert len(errors) == 1 and "--overwrite" in errors[0], again.stderr[-3000:]
    exits = re.findall(r"exitcode\s*:\s*(-?\d+)", again.stderr)
    assert exits and set(exits) == {"1"}, again.stderr[-3000:]  # rank 1 too, not killed
    assert digest(tmp_path / "out") == digest(tmp_path / "ref")
    _no_head_left(ray_port)


def _no_head_left(port: int) -> None:
    leftovers = subprocess.run(["pgrep", "-f", "--", f"--port {port}"], capture_output=True)
    assert leftovers.returncode == 1, "the launched Ray head outlived the job"


def _launched(monkeypatch, rank: int, port: int, world: int = 2) -> None:
    for key, value in {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world,
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}.items():
        monkeypatch.setenv(key, str(value))


def test_a_launched_job_refuses_what_it_cannot_mean_before_starting_anything(monkeypatch, capsys,
                                                                             tmp_path):
    _launched(monkeypatch, rank=0, port=free_ports(1)[0])
    base = ["quantize", str(tmp_path / "m"), "-o", str(tmp_path / "out")]
    assert main([*base, "--address", "auto"]) == 1
    assert "form their own Ray cluster" in capsys.readouterr().err
    assert main([*base, "--workers", "3"]) == 1
    err = capsys.readouterr().err
    assert "accelerate launch started 2 processes" in err and len(err.splitlines()) == 1
    monkeypatch.setenv("RANK", "one")
    assert main(base) == 1
    assert "RANK='one'" in capsys.readouterr().err
    monkeypatch.delenv("MASTER_ADDR")
    assert main(base) == 1
    assert "MASTER_ADDR is not" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_one_process_is_a_plain_run():
    assert launched.from_environment(env={}) is None
    assert launched.from_environment(env={"WORLD_SIZE": "1", "RANK": "0"}) is None
    launch = launched.from_environment(env={"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1",
                                            "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"})
    assert launch == launched.Launch(3, 4, 1, "127.0.0.1", 29501)
    assert launched.from_environment(7000, env={"WORLD_SIZE": "2", "RANK": "0",
                                                "MASTER_ADDR": "127.0.0.1",
                                                "MASTER_PORT": "29500"}).port == 7000


def test_a_rank_that_cannot_reach_the_head_fails_with_one_line(monkeypatch, capsys):
    port = free_ports(1)[0]
    _launched(monkeypatch, rank=1, port=port - 1)
    monkeypatch.setattr(launched, "JOIN_SECONDS", 2.0)
    monkeypatch.setattr(launched, "exit_on_sigterm", lambda: None)  # pytest's handler stays
    started = time.monotonic()
    assert main(["quantize", "-o", "/nonexistent/out"]) == 1
    err = capsys.readouterr().err
    assert time.monotonic() - started < 30
    assert err.count("\n") == 1 and "rank 1: could not reach the Ray head of rank 0 at " \
        f"127.0.0.1:{port}" in err and "--ray-port" in err, err
