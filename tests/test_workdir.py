"""run/workdir.py: an interrupted run resumes into the same bytes — after an exception, after
kill -9, in either schedule — and refuses to resume what changed."""

import json

import pytest
import torch

from admmq_dist.recipe import Recipe, override
from admmq_dist.run.job import quantize_model
from admmq_dist.run.workdir import ResumeError, work_dir_for

from runs import SETTINGS, digest, quantize
from tiny import tiny_model_dir

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("src"), "llama", num_hidden_layers=3)



def interrupt_at(block):
    """An ``on_block`` that stops the run (as Ctrl-C would) once ``block`` is written."""
    def interrupt(b):
        if b == block:
            raise KeyboardInterrupt
    return interrupt


def test_an_interrupted_run_resumes_into_the_same_bytes(model_dir, tmp_path):
    quantize(model_dir, tmp_path / "ref")

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantize(model_dir, out, on_block=interrupt_at(1))
    work = work_dir_for(out)
    assert not out.exists() and sorted(p.name for p in work.glob("block-*")) == [
        "block-00000.safetensors", "block-00001.safetensors"]
    with pytest.raises(ResumeError, match="--resume"):
        quantize(model_dir, out)
    changed = override(Recipe(), {**SETTINGS, "grid": {"bits": 4, "group_size": 32}})
    with pytest.raises(ResumeError, match="the recipe"):
        quantize_model(str(model_dir), out, changed, device=torch.device("cpu"), progress=False,
                       threads=1, resume=True)
    summary = quantize(model_dir, out, resume=True)
    assert summary["resumed_blocks"] == 2
    assert digest(out) == digest(tmp_path / "ref")
    assert not work.exists()


def test_resume_refuses_another_model_of_the_same_shape_and_other_threads(model_dir, tmp_path):
    """The model is fingerprinted by content, tensor by tensor: a fine-tuned model of the same
    shape and config is refused, naming the tensor that differs; so is a different number of
    threads per worker (float sums change with it). The hashes are cached per file."""
    import shutil

    from safetensors.torch import load_file, save_file

    from admmq_dist.run.fingerprint import model_hashes

    src = tmp_path / "src"
    shutil.copytree(model_dir, src)

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantize(src, out, on_block=interrupt_at(1))
    with pytest.raises(ResumeError, match="threads_per_worker 1 -> 2"):
        quantize_model(str(src), out, override(Recipe(), SETTINGS), device=torch.device("cpu"),
                       progress=False, threads=2, resume=True)
    path = next(src.glob("*.safetensors"))
    tensors = load_file(path)
    name = "model.layers.2.mlp.down_proj.weight"
    tensors[name] = tensors[name] * 1.01  # "fine-tuned": same names, shapes and config
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ResumeError, match=r"model's tensors \(1 differ: " + name.replace(".", r"\.")):
        quantize(src, out, resume=True)
    cache = tmp_path / "cache.json"
    first = model_hashes(src, cache)
    assert json.loads(cache.read_text()) and model_hashes(src, cache) == first
    assert len(first) == len(tensors) and first[name] != model_hashes(model_dir, cache)[name]


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


# The CLI, paused for good at one phase of the run, so SIGKILL lands there and nowhere else: after
# block 0's commit (before any worker propagates it), inside block 1's solve, and while the
# output's shards are renamed into place (every block committed).
PAUSED_CLI = """
import sys, time
import admmq_dist.run.sequential as sequential
import admmq_dist.run.worker as worker
import admmq_dist.checkpoint.writer as writer
import admmq_dist.run.coordinated_worker as coordinated
phase = sys.argv.pop(1)
owner, name, when, after = {
    "commit": (sequential, "commit_block", lambda a: a[1] == 0, True),
    "solve": (worker.Worker, "solve", lambda a: a[1] == 1, False),
    "write": (writer.CheckpointWriter, "_write_shards_and_index", lambda a: True, False),
    "round": (coordinated.CoordinatedWorker, "iterate", lambda a: a[1] > 0.2, False)}[phase]
original = getattr(owner, name)
def paused(*args, **kwargs):
    if when(args):
        if after:
            original(*args, **kwargs)
        print("paused", flush=True)
        time.sleep(3600)
    return original(*args, **kwargs)
setattr(owner, name, paused)
from admmq_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


# The commit and write phases are the fault matrix's (benchmarks/fault_matrix.py; marker
# "matrix"), to keep CI within its time: the suite keeps the solve (the default's longest phase)
# and a round schedule's round.
@pytest.mark.parametrize("phase", [pytest.param("commit", marks=pytest.mark.matrix), "solve",
                                   pytest.param("write", marks=pytest.mark.matrix), "round"])
def test_kill_9_at_any_phase_then_resume_from_the_command_line(model_dir, tmp_path, phase):
    """SIGKILL the CLI (no cleanup runs) at a phase it is held at, then --resume: the same bytes,
    nothing left beside the output. The run cannot finish first: it waits to be killed."""
    import os
    import signal
    import subprocess
    import sys

    common = ["--bits", "3", "--group-size", "32", "--num-samples", "8", "--seq-len", "48",
              "--batch-size", "2", "--iterations", "40", "--threads", "1"]
    if phase == "round":  # the coordinated schedule, killed inside round 1's iterations
        common += ["--schedule", "coordinated", "--coordinated-rounds", "3"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    cli = [sys.executable, "-m", "admmq_dist.cli", "quantize", str(model_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(cli + ["-o", str(ref)] + common, check=True, env=env, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_CLI, phase, "quantize", str(model_dir),
                             "-o", str(out)] + common, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "paused"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    work = work_dir_for(out)
    assert (work / "manifest.json").is_file()
    result = subprocess.run(cli + ["-o", str(out), "--resume", "--json"] + common, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["resumed_blocks"] == {"commit": 1, "solve": 1, "write": 3, "round": 0}[phase]
    if phase == "round":  # round 0 was committed and is not run again
        assert [h["round"] for h in summary["rounds"]] == [0, 1, 2, "polish"]
    assert digest(out) == digest(ref)
    assert not work.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert leftovers == []


def test_depth_parallel_needs_admmq_and_resumes_between_rounds(model_dir, tmp_path, monkeypatch):
    from admmq_dist.run.segment_worker import SegmentWorker

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
    original = SegmentWorker.run_round

    def run_round(self, warm, segments, cold=()):
        calls.append(cold)
        if cold == [2]:  # the process "dies" in round 2 with rounds 0 and 1 committed
            raise KeyboardInterrupt
        return original(self, warm, segments, cold)

    monkeypatch.setattr(SegmentWorker, "run_round", run_round)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "out")
    monkeypatch.setattr(SegmentWorker, "run_round", original)
    assert sorted(p.name for p in work_dir_for(tmp_path / "out").glob("round-*.done")) == [
        "round-000.done", "round-001.done"]
    resumed = run(tmp_path / "out", resume=True)

    def figures(summary):
        return [(h["round"], h["changed"], h["mean_loss"], h["iterations"])
                for h in summary["rounds"]]

    assert [h["round"] for h in resumed["rounds"]] == [0, 1, 2]
    assert figures(resumed) == figures(reference)
    assert digest(tmp_path / "out") == digest(tmp_path / "ref")


def test_round_commits_keep_each_segments_last_two_rounds(tmp_path):
    """Depth-parallel segment j is re-solved in rounds 0…j only: after round 2 of four segments,
    segment 0 keeps round 0 (its only one), the others their newest two; older markers and the
    coordinated start's files go."""
    from admmq_dist.run.workdir import prune_rounds, round_files

    for r in range(3):
        (tmp_path / f"round-{r:03d}.done").write_text("{}")
        for s in range(4):
            if s >= r:
                (tmp_path / f"round-{r:03d}-segment-{s:05d}.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "start-segment-00000.safetensors").write_bytes(b"x")
    kept, _ = round_files(tmp_path)
    prune_rounds(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "round-000-segment-00000.safetensors", "round-000-segment-00001.safetensors",
        "round-001-segment-00001.safetensors", "round-001-segment-00002.safetensors",
        "round-001-segment-00003.safetensors", "round-001.done",
        "round-002-segment-00002.safetensors", "round-002-segment-00003.safetensors",
        "round-002.done"]
    assert kept == 7 * 10


def test_resuming_depth_parallel_with_other_workers_names_the_segments(model_dir, tmp_path,
                                                                       monkeypatch):
    """Segments follow the worker count unless --segments is given: a resume on another count
    is refused in one line that says so, not as an unreadable commit."""
    from admmq_dist.run.backends import LocalBackend
    from admmq_dist.run.segment_worker import SegmentWorker

    recipe = override(Recipe(), {**SETTINGS, "solver": {
        **SETTINGS["solver"], "schedule": "depth-parallel", "rounds": 2}})
    original, calls = SegmentWorker.run_round, []

    def run_round(self, *args):
        calls.append(1)
        if len(calls) == 3:  # round 1, with round 0 committed
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(SegmentWorker, "run_round", run_round)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantize_model(str(model_dir), out, recipe, device=torch.device("cpu"), progress=False,
                       threads=1, backend=LocalBackend(2))
    monkeypatch.undo()
    with pytest.raises(ResumeError, match=r"segments \(2 -> 3.*--workers 2 or --segments 2"):
        quantize_model(str(model_dir), out, recipe, device=torch.device("cpu"), progress=False,
                       threads=1, backend=LocalBackend(3), resume=True)
