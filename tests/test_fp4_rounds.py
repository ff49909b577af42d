"""The round schedules on FP4 grids (issue 28): depth-parallel and coordinated runs write FP4
checkpoints that verify, whose fused linears share one NVFP4 global scale, the same bytes for any
number of workers; depth-parallel ends on the sequential schedule's bytes; a coordinated run
stopped inside a round resumes into the same bytes (the global scale travels with the commit)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from admmq_dist.quant.grid import Grid, GridSpec, fit_grid
from admmq_dist.recipe import Recipe, override
from admmq_dist.run.backends import LocalBackend
from admmq_dist.run.coordinated_worker import CoordinatedWorker
from admmq_dist.run.job import quantize_model
from admmq_dist.run.workdir import load_segment_round, save_segment_round

from checkpoints import read_all
from runs import SETTINGS, digest
from tiny import tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Three blocks whose k_proj is 2**12 times smaller than q_proj: under q/k/v's shared NVFP4
    global scale many of its scales are E4M3 subnormals, which scales snapped under its own
    global scale are not (the writer refuses them), so sharing one is the schedules' doing."""
    src = tiny_model_dir(tmp_path_factory.mktemp("src"), "llama", num_hidden_layers=3)
    weights = src / "model.safetensors"
    tensors = load_file(weights)
    for name in tensors:
        if name.endswith("k_proj.weight"):
            tensors[name] = tensors[name] * 2.0**-12
            tensors[name][:, :16] *= 2.0**-4  # and groups of it smaller still
    save_file(tensors, weights, metadata={"format": "pt"})
    return src


def run(model_dir, out, kind, schedule, backend=None, resume=False, **solver_keys):
    solver = {**SETTINGS["solver"], "schedule": schedule, **solver_keys}
    solver.update({"depth-parallel": {"rounds": 3, "segments": 3},
                   "coordinated": {"coordinated_rounds": 3}}.get(schedule, {}))
    recipe = override(Recipe(), {**SETTINGS, "grid": {"kind": kind}, "solver": solver})
    return quantize_model(str(model_dir), out, recipe, device=torch.device("cpu"),
                          progress=False, threads=1, backend=backend, resume=resume)


def global_scales(folder) -> dict[tuple[str, str], set[float]]:
    tensors = read_all(folder)
    families = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
                "up_proj": "gate_up"}
    out: dict[tuple[str, str], set[float]] = {}
    for name, value in tensors.items():
        if name.endswith(".weight_global_scale"):
            parent, _, leaf = name.removesuffix(".weight_global_scale").rpartition(".")
            out.setdefault((parent, families.get(leaf, leaf)), set()).add(float(value))
    return out


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
def test_depth_parallel_fp4_ends_on_the_sequential_bytes_for_any_worker_count(model_dir,
                                                                              tmp_path, kind):
    from admmq_dist.checkpoint.verify import verify_checkpoint

    sequential = run(model_dir, tmp_path / "seq", kind, "sequential")
    two = run(model_dir, tmp_path / "two", kind, "depth-parallel", LocalBackend(2))
    assert verify_checkpoint(tmp_path / "two") == []
    assert [(r["round"], r["segments_solved"]) for r in two["rounds"]] == [(0, 3), (1, 2), (2, 1)]
    assert digest(tmp_path / "two") == digest(tmp_path / "seq")
    assert two["mean_loss"] == pytest.approx(sequential["mean_loss"], rel=1e-12)
    scales = global_scales(tmp_path / "two")
    assert bool(scales) == (kind == "nvfp4")
    assert all(len(s) == 1 for s in scales.values()), scales


@pytest.mark.parametrize("kind, start", [("nvfp4", "sequential"), ("nvfp4", "float"),
                                         ("mxfp4", "sequential")])
def test_coordinated_fp4_verifies_and_writes_the_same_bytes_for_any_worker_count(
        model_dir, tmp_path, kind, start):
    from admmq_dist.checkpoint.verify import verify_checkpoint

    one = run(model_dir, tmp_path / "one", kind, "coordinated", coordinated_start=start)
    two = run(model_dir, tmp_path / "two", kind, "coordinated", LocalBackend(2),
              coordinated_start=start)
    assert verify_checkpoint(tmp_path / "one") == []
    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    assert [h["changed"] for h in one["rounds"]] == [h["changed"] for h in two["rounds"]]
    assert one["schedule"] == "coordinated" and one["layers"] == 21
    assert all(len(s) == 1 for s in global_scales(tmp_path / "one").values())


def test_a_coordinated_nvfp4_run_stopped_inside_a_round_resumes_into_the_same_bytes(
        model_dir, tmp_path, monkeypatch):
    whole = run(model_dir, tmp_path / "whole", "nvfp4", "coordinated")
    calls = []
    original = CoordinatedWorker.iterate

    def iterate(self, rho, *args):
        calls.append(rho)
        if len(calls) == 3:  # "dies" in round 2 with rounds 0 and 1 committed
            raise KeyboardInterrupt
        return original(self, rho, *args)

    monkeypatch.setattr(CoordinatedWorker, "iterate", iterate)
    with pytest.raises(KeyboardInterrupt):
        run(model_dir, tmp_path / "out", "nvfp4", "coordinated")
    monkeypatch.setattr(CoordinatedWorker, "iterate", original)
    resumed = run(model_dir, tmp_path / "out", "nvfp4", "coordinated", resume=True)
    assert [h["mean_loss"] for h in resumed["rounds"]] == [h["mean_loss"] for h in whole["rounds"]]
    assert digest(tmp_path / "out") == digest(tmp_path / "whole")


def test_a_round_commit_keeps_the_nvfp4_global_scale_its_scales_cannot_give_back(tmp_path):
    """A fused set's shared global scale is smaller than a small member's own (headroom for the
    largest member): the commit keeps it, so refits after a resume snap under the same one."""
    spec = GridSpec(bits=4, group_size=16, symmetric=True, kind="nvfp4")
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    shared = 2.0 ** -4
    grid = fit_grid(weight, spec, shared)
    assert Grid.from_parts(spec, 32, grid.scale, grid.zero).global_scale != shared
    state = {"codes": grid.codes(weight), "grid": grid, "duals": [None], "last": None}
    save_segment_round(tmp_path, 0, 0, {(0, "q_proj"): state}, [])
    _, states = load_segment_round(tmp_path, 0, 0, {(0, "q_proj"): (8, 32)}, 0, lambda rows: 1,
                                   torch.device("cpu"))
    codes, scale, zero, _, _, global_scale = states[(0, "q_proj")]
    assert global_scale == shared
    assert torch.equal(scale, grid.scale) and torch.equal(codes, state["codes"])
