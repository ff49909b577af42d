"""run/depth_parallel.py: rounds are deterministic whatever the number of workers, exact after
segments - 1 rounds, and one segment is the sequential schedule."""

import hashlib

import pytest
import torch

from admmq_dist.recipe import Recipe, override
from admmq_dist.run.job import quantize_model
from admmq_dist.run.backends import LocalBackend

from runs import SETTINGS, digest, quantize
from tiny import tiny_model_dir

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("src"), "llama", num_hidden_layers=3)



def test_depth_parallel_rounds_write_the_same_bytes_for_any_worker_count(model_dir, tmp_path):
    settings = {"solver": {**SETTINGS["solver"], "schedule": "depth-parallel", "rounds": 3,
                           "segments": 3}}
    recipe = override(Recipe(), {**SETTINGS, **settings})
    local = quantize_model(str(model_dir), tmp_path / "local", recipe,
                           device=torch.device("cpu"), progress=False, threads=1,
                           round_checkpoints=True)
    two = quantize_model(str(model_dir), tmp_path / "two", recipe,
                         device=torch.device("cpu"), progress=False, threads=1,
                         backend=LocalBackend(2))
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


def asymmetric_depth_parallel(model_dir, out, segments, backend=None, resume=False):
    recipe = override(Recipe(), {
        **SETTINGS, "solver": {**SETTINGS["solver"], "schedule": "depth-parallel", "rounds": 3,
                               "segments": segments},
        "calibration": {**SETTINGS["calibration"], "asymmetric": 0.25}})
    return quantize_model(str(model_dir), out, recipe, device=torch.device("cpu"),
                          progress=False, threads=1, backend=backend, resume=resume)


def test_asymmetric_segments_end_as_the_sequential_asymmetric_run(model_dir, tmp_path):
    """Each segment keeps the float model's input from round 0 and runs the float stream beside
    the quantized one: after segments - 1 rounds the bytes are the sequential asymmetric run's,
    for any worker count — and not the plain run's, so the cross terms were used."""
    asym = quantize(model_dir, tmp_path / "seq-asym", asymmetric=0.25)
    plain = quantize(model_dir, tmp_path / "seq")
    assert digest(tmp_path / "seq-asym") != digest(tmp_path / "seq")
    for name, segments, n in (("one", 1, 1), ("three", 3, 2)):
        run = asymmetric_depth_parallel(model_dir, tmp_path / name, segments, LocalBackend(n))
        assert digest(tmp_path / name) == digest(tmp_path / "seq-asym")
        assert run["mean_loss"] == pytest.approx(asym["mean_loss"], rel=1e-12)
    assert asym["mean_loss"] != pytest.approx(plain["mean_loss"], rel=1e-6)


def test_an_asymmetric_depth_parallel_run_resumes_into_the_same_bytes(model_dir, tmp_path,
                                                                      monkeypatch):
    """The float inputs are not committed: a resumed run recomputes them before the committed
    weights go in place, so it ends as the uninterrupted run does."""
    from admmq_dist.run.segment_worker import SegmentWorker

    asymmetric_depth_parallel(model_dir, tmp_path / "whole", 3)
    original, calls = SegmentWorker.run_round, []

    def run_round(self, *args):
        calls.append(args)
        if len(calls) == 2:  # dies in round 1, with round 0 committed
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(SegmentWorker, "run_round", run_round)
    with pytest.raises(KeyboardInterrupt):
        asymmetric_depth_parallel(model_dir, tmp_path / "out", 3)
    monkeypatch.setattr(SegmentWorker, "run_round", original)
    asymmetric_depth_parallel(model_dir, tmp_path / "out", 3, resume=True)
    assert digest(tmp_path / "out") == digest(tmp_path / "whole")


def test_asymmetric_grid_weight_fits_every_grid_to_the_float_weights(model_dir, tmp_path,
                                                                    monkeypatch):
    """``calibration.asymmetric_grid: weight`` fits the grid to W, not to the moved target: every
    grid of the run is fitted to one of the model's float weights (with "target", the blocks
    past the first, whose inputs the quantized model moved, fit theirs elsewhere), and the
    depth-parallel schedule honours it as the sequential one does (same bytes)."""
    from safetensors.torch import load_file

    import admmq_dist.run.layer as layer

    floats = [t.float() for f in sorted(model_dir.glob("*.safetensors"))
              for t in load_file(f).values() if t.dim() == 2]
    fitted, original = [], layer.fit_grid

    def recording(weight, spec):
        fitted.append(weight.detach().clone())
        return original(weight, spec)

    monkeypatch.setattr(layer, "fit_grid", recording)

    def from_float_weights():
        out = [any(w.shape == f.shape and torch.equal(w, f) for f in floats) for w in fitted]
        fitted.clear()
        return out

    def recipe(grid, schedule="sequential"):
        return override(Recipe(), {
            **SETTINGS, "solver": {**SETTINGS["solver"], "schedule": schedule, "rounds": 3,
                                   "segments": 3},
            "calibration": {**SETTINGS["calibration"], "asymmetric": 0.25,
                            "asymmetric_grid": grid}})

    def run(name, grid, schedule="sequential", backend=None):
        return quantize_model(str(model_dir), tmp_path / name, recipe(grid, schedule),
                              device=torch.device("cpu"), progress=False, threads=1,
                              backend=backend)

    run("target", "target")
    on_float = from_float_weights()
    assert any(on_float) and not all(on_float)  # block 0's inputs are the float model's
    run("weight", "weight")
    assert all(from_float_weights())
    assert digest(tmp_path / "weight") != digest(tmp_path / "target")
    run("weight-dp", "weight", "depth-parallel", LocalBackend(2))
    assert all(from_float_weights())
    assert digest(tmp_path / "weight-dp") == digest(tmp_path / "weight")


def test_warm_rounds_go_on_from_the_grid_their_codes_were_solved_on(model_dir, tmp_path,
                                                                   monkeypatch):
    """Round 1 solves segment 1 cold and segment 2 warm: the warm layers start on the (refitted)
    grid of their round-0 codes, not a fresh fit, and the codes that moved are counted on one
    grid — the previous weights as the new grid codes them."""
    import admmq_dist.run.segment_worker as segment_worker

    recipe = override(Recipe(), {**SETTINGS, "solver": {
        **SETTINGS["solver"], "schedule": "depth-parallel", "rounds": 1, "segments": 3}})
    solved_on, original_rows = [], segment_worker.solve_rows
    monkeypatch.setattr(segment_worker, "solve_rows", lambda weight, hessian, grid, *a, **k: (
        solved_on.append(grid), original_rows(weight, hessian, grid, *a, **k))[1])
    original, seen = segment_worker.SegmentWorker._solve_layer, []

    def solve_layer(self, b, name, group, hessian, factors, tokens, warm, cold, *rest):
        before = self.layer_states.get((b, name))
        row = original(self, b, name, group, hessian, factors, tokens, warm, cold, *rest)
        seen.append((before, cold is None, solved_on[-1], self.layer_states[(b, name)], row))
        return row

    monkeypatch.setattr(segment_worker.SegmentWorker, "_solve_layer", solve_layer)
    quantize_model(str(model_dir), tmp_path / "out", recipe, device=torch.device("cpu"),
                   progress=False, threads=1)
    warm = [s for s in seen if s[0] is not None and s[1]]
    cold = [s for s in seen if s[0] is not None and not s[1]]
    assert len(warm) == 7 and len(cold) == 7  # block 2's linears warm, block 1's cold
    for before, _, grid, after, row in warm:
        assert torch.equal(grid.scale, before["grid"].scale)
        assert torch.equal(grid.zero, before["grid"].zero)
    # The refit moves scales, so counting raw codes across grids would differ from one grid.
    assert any(not torch.equal(after["grid"].scale, before["grid"].scale)
               for before, _, _, after, _ in warm)
    for before, _, _, after, row in warm + cold:
        on_one_grid = after["grid"].codes(before["grid"].dequantize(before["codes"]))
        assert row["changed"] == float((after["codes"] != on_one_grid).float().mean())
    assert all(s[4]["changed"] < 0.5 for s in warm)
