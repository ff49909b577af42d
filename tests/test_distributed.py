"""Workers: the same bytes for the in-process run, one Ray worker and two; a killed worker is
restarted and its work redone; an interrupted run resumes into the same bytes."""

import hashlib
import json

import pytest
import torch

from admmq_dist.coordinator import ResumeError, assign, shard_batches, work_dir_for
from admmq_dist.pipeline import quantize_model
from admmq_dist.quant.solvers.rows import row_blocks
from admmq_dist.recipe import Recipe, override

from tiny import tiny_model_dir

# Small row blocks so that every layer is cut into several, spread over both workers.
SETTINGS = {"grid": {"bits": 3, "group_size": 32},
            "solver": {"row_block": 24, "admm": {"iterations": 40}},
            "calibration": {"dataset": None, "num_samples": 8, "seq_len": 48, "batch_size": 2}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("src"), "llama", num_hidden_layers=3)


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


def test_row_blocks_and_assignment_do_not_depend_on_the_worker_count():
    assert row_blocks(576, 512) == [(0, 288), (288, 576)]
    assert row_blocks(100, 24) == [(0, 20), (20, 40), (40, 60), (60, 80), (80, 100)]
    assert row_blocks(7, 512) == [(0, 7)]
    units = [("q", (0, 288), 288 * 576), ("q", (288, 576), 288 * 576),
             ("k", (0, 192), 192 * 576), ("v", (0, 192), 192 * 576)]
    two = assign(units, 2)
    assert [u[0] for u in two[0]] == ["q", "k"] and [u[0] for u in two[1]] == ["q", "v"]
    assert sum(len(v) for v in assign(units, 3).values()) == 4
    batches = [torch.full((1, 4), i) for i in range(5)]
    shards = shard_batches(batches, 2)
    assert [sorted(s) for s in shards] == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match="batches"):
        shard_batches(batches, 6)


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
def test_a_killed_worker_is_restarted_and_its_block_redone(model_dir, tmp_path):
    import ray

    from admmq_dist.cluster import RayBackend

    reference = quantize(model_dir, tmp_path / "ref")
    killed = []
    original_start = RayBackend.start

    def start(self, *args):
        original_start(self, *args)
        backends.append(self)

    backends = []

    def kill_after(b):
        if b == 0 and not killed:
            # Not a polite shutdown: the actor's process dies, as on a lost node.
            ray.kill(backends[0].actors[1], no_restart=False)
            killed.append(b)

    RayBackend.start = start
    try:
        summary = quantize(model_dir, tmp_path / "out", workers=2, on_block=kill_after)
    finally:
        RayBackend.start = original_start
    assert killed == [0]
    assert summary["layers"] == reference["layers"] == 21
    assert digest(tmp_path / "out") == digest(tmp_path / "ref")


def test_an_interrupted_run_resumes_into_the_same_bytes(model_dir, tmp_path):
    quantize(model_dir, tmp_path / "ref")

    def interrupt(b):
        if b == 1:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantize(model_dir, out, on_block=interrupt)
    work = work_dir_for(out)
    assert not out.exists() and sorted(p.name for p in work.glob("block-*")) == [
        "block-00000.safetensors", "block-00001.safetensors"]
    with pytest.raises(ResumeError, match="--resume"):
        quantize(model_dir, out)
    changed = override(Recipe(), {**SETTINGS, "grid": {"bits": 4, "group_size": 32}})
    with pytest.raises(ResumeError, match="recipe changed"):
        quantize_model(str(model_dir), out, changed, device=torch.device("cpu"), progress=False,
                       resume=True)
    summary = quantize(model_dir, out, resume=True)
    assert summary["resumed_blocks"] == 2
    assert digest(out) == digest(tmp_path / "ref")
    assert not work.exists()


def test_a_resumed_asymmetric_run_rebuilds_the_float_stream(model_dir, tmp_path):
    """Replaying committed blocks must carry the float model's activations forward too."""
    quantize(model_dir, tmp_path / "ref", asymmetric=0.5)

    def interrupt(b):
        if b == 1:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantize(model_dir, out, asymmetric=0.5, on_block=interrupt)
    summary = quantize(model_dir, out, asymmetric=0.5, resume=True)
    assert summary["resumed_blocks"] == 2 and digest(out) == digest(tmp_path / "ref")


def test_kill_9_then_resume_from_the_command_line(model_dir, tmp_path):
    """SIGKILL the CLI once a block is committed (no cleanup runs), then --resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    common = ["--bits", "3", "--group-size", "32", "--num-samples", "8", "--seq-len", "48",
              "--batch-size", "2", "--iterations", "150", "--threads", "1"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    cli = [sys.executable, "-m", "admmq_dist.cli", "quantize", str(model_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(cli + ["-o", str(ref)] + common, check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cli + ["-o", str(out)] + common, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = work_dir_for(out)
    deadline = time.monotonic() + 300
    while not (work / "block-00000.safetensors").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():
        pytest.skip("the run finished before it could be killed")
    # The killed run left its work folder and a half-written checkpoint folder beside the output.
    assert (work / "manifest.json").is_file()
    result = subprocess.run(cli + ["-o", str(out), "--resume", "--json"] + common, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["resumed_blocks"] >= 1
    assert digest(out) == digest(ref)
    assert not work.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert leftovers == []


@pytest.mark.ray
def test_depth_parallel_rounds_write_the_same_bytes_for_any_worker_count(model_dir, tmp_path):
    settings = {"solver": {**SETTINGS["solver"], "schedule": "depth-parallel", "rounds": 3,
                           "segments": 3}}
    recipe = override(Recipe(), {**SETTINGS, **settings})
    local = quantize_model(str(model_dir), tmp_path / "local", recipe,
                           device=torch.device("cpu"), progress=False, threads=1,
                           round_checkpoints=True)
    two = quantize_model(str(model_dir), tmp_path / "two", recipe,
                         device=torch.device("cpu"), progress=False, threads=1, workers=2)
    assert digest(tmp_path / "local") == digest(tmp_path / "two")

    def tensors(folder):
        return hashlib.sha256(b"".join(p.read_bytes()
                                       for p in sorted(folder.glob("*.safetensors")))).hexdigest()

    # The model as each round left it: the last round's is the output; earlier ones differ.
    rounds = [tensors(tmp_path / f"local.round-{r}") for r in range(3)]
    assert rounds[2] == tensors(tmp_path / "local") and len(set(rounds)) == 3
    # Three segments: round r re-solves segments r.. on new inputs; after round 2 the last one
    # was solved on final inputs, so round 3 has nothing to do.
    for run in (local, two):
        assert [(r["round"], r["segments_solved"]) for r in run["rounds"]] == [(0, 3), (1, 2), (2, 1)]
    assert local["rounds"][0]["changed"] == 1.0
    assert 0 < local["rounds"][2]["changed"] < 0.5 and 0 < local["rounds"][1]["changed"] < 0.5
    assert local["layers"] == 21
    # Each round solves the segment whose inputs just became final with the full schedule, so
    # after segments - 1 rounds the result is the sequential schedule's, byte for byte.
    sequential = quantize(model_dir, tmp_path / "seq")
    assert digest(tmp_path / "local") == digest(tmp_path / "seq")
    assert local["mean_loss"] == pytest.approx(sequential["mean_loss"], rel=1e-12)


def test_one_depth_parallel_segment_is_the_sequential_schedule(model_dir, tmp_path):
    """A single segment is quantized block by block from the embeddings: the sequential
    protocol, byte for byte (the Hessians merge canonically, row blocks are fixed)."""
    recipe = override(Recipe(), {**SETTINGS, "solver": {**SETTINGS["solver"],
                                                        "schedule": "depth-parallel",
                                                        "segments": 1}})
    one = quantize_model(str(model_dir), tmp_path / "one", recipe, device=torch.device("cpu"),
                         progress=False, threads=1)
    sequential = quantize(model_dir, tmp_path / "seq")
    assert [r["round"] for r in one["rounds"]] == [0]
    assert digest(tmp_path / "one") == digest(tmp_path / "seq")
    assert one["mean_loss"] == pytest.approx(sequential["mean_loss"], rel=1e-12)


def test_depth_parallel_needs_admmq_and_resumes_between_rounds(model_dir, tmp_path, monkeypatch):
    from admmq_dist.worker import ShardWorker

    with pytest.raises(ValueError, match="admmq"):
        override(Recipe(), {"solver": {"schedule": "depth-parallel", "method": "gptq"}})
    recipe = override(Recipe(), {**SETTINGS, "solver": {**SETTINGS["solver"],
                                                        "schedule": "depth-parallel", "rounds": 2,
                                                        "segments": 3}})

    def run(out, **kw):
        return quantize_model(str(model_dir), out, recipe, device=torch.device("cpu"),
                              progress=False, threads=1, **kw)

    reference = run(tmp_path / "ref")
    calls = []
    original = ShardWorker.run_round

    def run_round(self, r, warm, segments, cold=()):
        calls.append(r)
        if r == 2:  # the process "dies" in round 2 with rounds 0 and 1 committed
            raise KeyboardInterrupt
        return original(self, r, warm, segments, cold)

    monkeypatch.setattr(ShardWorker, "run_round", run_round)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "out")
    monkeypatch.setattr(ShardWorker, "run_round", original)
    assert sorted(p.name for p in work_dir_for(tmp_path / "out").glob("round-*.done")) == [
        "round-000.done", "round-001.done"]
    resumed = run(tmp_path / "out", resume=True)

    def figures(summary):
        return [(h["round"], h["changed"], h["mean_loss"], h["iterations"])
                for h in summary["rounds"]]

    assert [h["round"] for h in resumed["rounds"]] == [0, 1, 2]
    assert figures(resumed) == figures(reference)
    assert digest(tmp_path / "out") == digest(tmp_path / "ref")
