"""run/ray_backend.py: Ray actors write the in-process bytes; a killed actor is restarted and its
block redone. (Worker-count independence itself is tested in-process: test_backends.py.)"""

import os
import signal

import pytest

from admmq_dist.run.workdir import work_dir_for

from runs import digest, quantize
from tiny import tiny_model_dir

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("src"), "llama", num_hidden_layers=3)


def _kill_worker_1_after_block_0(monkeypatch):
    """Patch RayBackend.start to remember the backend; returns ``(on_block, killed)``: the hook
    that kills worker 1's actor after block 0 (not a polite shutdown: the actor's process dies,
    as on a lost node), and the blocks after which it did."""
    import ray

    from admmq_dist.run.ray_backend import RayBackend

    backends, killed = [], []
    original_start = RayBackend.start

    def start(self, *args):
        original_start(self, *args)
        backends.append(self)

    def kill_after(b):
        if b == 0 and not killed:
            ray.kill(backends[0].actors[1], no_restart=False)
            killed.append(b)

    monkeypatch.setattr(RayBackend, "start", start)
    return kill_after, killed


@pytest.mark.ray
def test_one_and_two_ray_workers_write_the_in_process_bytes(model_dir, tmp_path):
    local = quantize(model_dir, tmp_path / "local")
    one = quantize(model_dir, tmp_path / "one", workers=1)
    two = quantize(model_dir, tmp_path / "two", workers=2)
    assert two["workers"] == 2 and one["workers"] == 1 and local["workers"] == 1
    assert digest(tmp_path / "local") == digest(tmp_path / "one") == digest(tmp_path / "two")
    # Both workers did solver work (row blocks were spread), and the loss is a real ADMM-Q loss.
    assert all(s["solve"] > 0 for s in two["worker_busy_seconds"])
    assert 0 < local["mean_loss"] < 0.2
    assert not work_dir_for(tmp_path / "two").exists()


@pytest.mark.ray
def test_asymmetric_calibration_writes_the_same_bytes_on_two_ray_workers(model_dir, tmp_path):
    """The float model's activations stay on the worker that holds their batches; only the
    cross-term partial sums move, merged in the same canonical tree as the Hessians."""
    local = quantize(model_dir, tmp_path / "local", asymmetric=0.25)
    two = quantize(model_dir, tmp_path / "two", workers=2, asymmetric=0.25)
    plain = quantize(model_dir, tmp_path / "plain")
    assert digest(tmp_path / "local") == digest(tmp_path / "two") != digest(tmp_path / "plain")
    assert two["workers"] == 2 and 0 < local["mean_loss"] < 0.2 and plain["mean_loss"] > 0


@pytest.mark.ray
def test_a_killed_worker_is_restarted_and_its_block_redone(model_dir, tmp_path, monkeypatch):
    reference = quantize(model_dir, tmp_path / "ref")
    kill_after, killed = _kill_worker_1_after_block_0(monkeypatch)
    summary = quantize(model_dir, tmp_path / "out", workers=2, on_block=kill_after)
    assert killed == [0]
    assert [f["restarted_workers"] for f in summary["faults"]] == [[1]]
    assert summary["layers"] == reference["layers"] == 21
    assert digest(tmp_path / "out") == digest(tmp_path / "ref")


@pytest.mark.ray
@pytest.mark.parametrize("schedule,method,nth", [("sequential", "capture", 3),
                                                 ("depth-parallel", "run_round", 2),
                                                 ("coordinated", "iterate", 2)])
def test_a_ray_worker_killed_mid_run_costs_time_not_bytes(model_dir, tmp_path, monkeypatch,
                                                          schedule, method, nth):
    """The Ray subset of tests/test_faults.py: worker 1's process is killed just before its
    n-th call of ``method``; Ray rebuilds it, the schedule recovers (redoes the block, or
    continues from the last committed round) and the bytes are the in-process run's."""
    import ray
    import torch

    from admmq_dist.recipe import Recipe, override
    from admmq_dist.run.job import quantize_model
    from admmq_dist.run.ray_backend import RayBackend

    from runs import SETTINGS

    recipe = override(Recipe(), {**SETTINGS, "solver": {
        **SETTINGS["solver"], "admm": {"iterations": 10}, "schedule": schedule, "segments": 3,
        "rounds": 2, "coordinated_rounds": 3}})

    def quantize_with(out, **kw):
        return quantize_model(str(model_dir), out, recipe, device=torch.device("cpu"),
                              progress=False, threads=1, **kw)

    quantize_with(tmp_path / "local")
    original, calls = RayBackend.call, []

    def call(self, w, name, *args):
        if w == 1 and name == method:
            calls.append(name)
            if len(calls) == nth:  # the process dies, as on a lost node
                ray.kill(self.actors[1], no_restart=False)
        return original(self, w, name, *args)

    monkeypatch.setattr(RayBackend, "call", call)
    summary = quantize_with(tmp_path / "ray", workers=2)
    assert len(calls) >= nth
    assert [f["restarted_workers"] for f in summary["faults"]] == [[1]]
    assert digest(tmp_path / "ray") == digest(tmp_path / "local")


@pytest.mark.ray
def test_a_killed_worker_whose_shard_lives_in_the_object_store_is_restarted(model_dir, tmp_path,
                                                                            monkeypatch):
    """A real calibration shard is past Ray's 100 KiB inline limit, so it reaches the actor's
    constructor through the object store; a restart reads it again from there, which works only
    while the driver still holds it (Ray's reference counting frees it otherwise, and the
    rebuilt worker fails with ReferenceCountingAssertionError)."""
    import torch

    from admmq_dist.recipe import Recipe, override
    from admmq_dist.run.job import quantize_model

    from runs import SETTINGS

    # 256 windows of 128 tokens as int64: 128 KiB per worker of two.
    recipe = override(Recipe(), {**SETTINGS, "calibration": {
        **SETTINGS["calibration"], "num_samples": 256, "seq_len": 128, "batch_size": 32}})
    kill_after, killed = _kill_worker_1_after_block_0(monkeypatch)
    summary = quantize_model(str(model_dir), tmp_path / "out", recipe, device=torch.device("cpu"),
                             progress=False, threads=1, workers=2, on_block=kill_after)
    assert killed == [0]
    assert [f["restarted_workers"] for f in summary["faults"]] == [[1]]


@pytest.mark.ray
def test_another_runs_private_ray_instance_is_not_joined(monkeypatch):
    """A run with no --address on a machine where another run holds a private Ray instance starts
    its own: joining the other one (Ray's "auto" finds it among the processes) would end this run
    when that one finishes. A cluster named by RAY_ADDRESS (or `ray start`) is still joined."""
    import subprocess
    import sys

    import ray

    from admmq_dist.run.ray_backend import RayBackend

    from runs import private_ray_env

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    other = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys, time; ray.init(address='local', num_cpus=1, "
         "resources={'other_run': 1}, include_dashboard=False); print(ray.get_runtime_context()"
         ".gcs_address, flush=True); time.sleep(600)"],
        env=private_ray_env(), stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        other_address = other.stdout.readline().strip()
        assert other_address, "the other run's Ray instance did not start"
        backend = RayBackend(1)
        try:
            assert "other_run" not in ray.cluster_resources()
        finally:
            backend.shutdown()
        monkeypatch.setenv("RAY_ADDRESS", other_address)
        backend = RayBackend(1)
        try:
            assert ray.cluster_resources().get("other_run") == 1
        finally:
            backend.shutdown()
    finally:
        os.killpg(other.pid, signal.SIGKILL)
        other.wait()
