"""run/layer.py: one layer's solve as both schedules run it — the merge of partial Hessians is
exact whatever the order, row blocks cross processes without their solver state, and the report
row has one schema."""

import pytest
import torch

from admmq_dist.quant.grid import GridSpec, fit_grid
from admmq_dist.quant.hessian import HessianAccumulator
from admmq_dist.quant.solvers.rows import combine, row_blocks
from admmq_dist.quant.solvers.solve import SolverSettings
from admmq_dist.run.layer import merge_parts, portable, report_row, solve_rows

from conftest import synthetic_layer


def partial_sums(x: torch.Tensor, batches: int, shards: list[list[int]]) -> list[dict]:
    """Each shard's partial sums over its global batch indices."""
    chunks = torch.chunk(x, batches)
    parts = []
    for shard in shards:
        acc = HessianAccumulator(x.shape[1])
        for i in shard:
            acc.add(chunks[i].unsqueeze(0), i)
        parts.append(acc.state())
    return parts


def test_partial_hessians_merge_to_the_same_bytes_in_any_order_and_sharding():
    _, _, x = synthetic_layer(16, 48, 512, seed=3)
    whole = merge_parts(partial_sums(x, 8, [list(range(8))]), torch.device("cpu"))
    for shards in ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0], [1, 2], [3, 4, 5, 6, 7]]):
        parts = partial_sums(x, 8, shards)
        for ordered in (parts, parts[::-1]):
            hessian, tokens, cross = merge_parts(ordered, torch.device("cpu"))
            assert torch.equal(hessian, whole[0]) and tokens == whole[1] == 512
            assert cross is None


def test_row_blocks_solved_apart_cross_processes_lean_and_report_in_one_schema():
    weight, hessian, _ = synthetic_layer(40, 64, 1024, seed=1)
    grid = fit_grid(weight, GridSpec(bits=3, group_size=32))
    settings = SolverSettings()
    blocks = solve_rows(weight, hessian, grid, settings, row_blocks(40, 16))
    assert [(b.start, b.stop) for b in blocks] == row_blocks(40, 16)
    assert any(b.state for b in blocks)  # ADMM-Q's duals: warm-start state, not for the wire
    light = portable(blocks)
    assert all(b.state == {} and b.codes.device.type == "cpu" for b in light)
    assert all(set(b.history) <= {"residual", "dual_residual", "rho", "weight_norm"}
               for b in light)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(blocks, light))
    result = combine(light, grid)
    row = report_row("model.layers.0.mlp.up_proj", 0, result, light, solved=True,
                     calibration="dense", tokens=1024, group=["up_proj"], changed=0.5)
    assert list(row)[:11] == ["layer", "block", "method", "shape", "loss", "target_loss",
                              "iterations", "seconds", "calibration", "tokens", "group"]
    assert row["shape"] == [40, 64] and 0 < row["loss"] < 0.2 and row["changed"] == 0.5
    assert row["target_loss"] is None  # no asymmetric calibration: one objective
    assert len(row["residual"]) == len(row["dual_residual"]) == row["iterations"] and row["rho"]
    assert report_row("x", 0, result, light, solved=False, calibration="rtn", tokens=0,
                      group=["x"])["loss"] is None


def test_one_factorization_per_hessian_per_worker(tmp_path):
    """q/k/v share a Hessian, a layer is solved in several row blocks: the eigendecomposition,
    GPTQ's factor and the asymmetric target's factor are computed once per Hessian on the worker that solves it — and sharing them
    changes no byte (tests/test_golden.py)."""
    from admmq_dist.recipe import Recipe, override
    from admmq_dist.run.backends import LocalBackend
    from admmq_dist.run.job import quantize_model

    from tiny import tiny_model_dir

    src = tiny_model_dir(tmp_path / "src", "llama")
    settings = {"grid": {"bits": 3, "group_size": 32}, "report": {"html": False},
                "solver": {"row_block": 24, "admm": {"iterations": 20}},
                "calibration": {"dataset": None, "num_samples": 8, "seq_len": 32,
                                "batch_size": 2}}
    for workers in (1, 2):
        summary = quantize_model(str(src), tmp_path / f"w{workers}", override(Recipe(), settings),
                                 device=torch.device("cpu"), progress=False,
                                 backend=LocalBackend(workers))
        counts = summary["factorizations"]
        # Per block: q/k/v, o, gate/up, down — four Hessians; 2 blocks; each worker that solves
        # row blocks of a Hessian factorizes it once (eigh for ADMM-Q, Cholesky for its start).
        layer_inputs = 2 * 4
        assert layer_inputs <= counts["hessians"] <= layer_inputs * workers
        assert counts["eigh"] == counts["cholesky"] == counts["hessians"]
        # Asymmetric calibration (on by default) moves each linear's target with one float64
        # factor per Hessian, shared by q/k/v and gate/up, not one per linear.
        assert counts["asymmetric"] == counts["hessians"]
        if workers == 1:
            assert counts["eigh"] == layer_inputs


@pytest.mark.parametrize("fmt,dtype,scale_dtype", [("compressed-tensors", "bfloat16",
                                                    torch.bfloat16),
                                                   ("gptq", "float32", torch.float16)])
def test_layers_are_solved_on_the_scales_the_checkpoint_stores(tmp_path, monkeypatch, fmt, dtype,
                                                                scale_dtype):
    """Scales are rounded to the stored dtype (the checkpoint's; GPTQ's float16) before the
    codes are solved and before later blocks see the weights: what is calibrated is what is
    served. Every grid a layer was solved on is exactly its stored scales."""
    from safetensors.torch import load_file

    import admmq_dist.run.worker as worker
    from admmq_dist.recipe import Recipe, override
    from admmq_dist.run.job import quantize_model
    from tiny import tiny_model_dir

    src = tiny_model_dir(tmp_path / "src", "llama")
    used = {}
    original = worker.solve_rows

    def solve_rows_spy(weight, hessian, grid, *args, **kwargs):
        used.setdefault(tuple(weight.shape), []).append(grid.scale.clone())
        return original(weight, hessian, grid, *args, **kwargs)

    monkeypatch.setattr(worker, "solve_rows", solve_rows_spy)
    recipe = override(Recipe(), {"grid": {"bits": 4, "group_size": 32, "symmetric": True},
                                 "output": {"format": fmt, "dtype": dtype},
                                 "calibration": {"dataset": None, "num_samples": 4,
                                                 "seq_len": 32, "batch_size": 2},
                                 "solver": {"admm": {"iterations": 5}, "scale_refits": 0}})
    quantize_model(str(src), tmp_path / "out", recipe, device=torch.device("cpu"),
                   progress=False, threads=1)
    scales = [s for grids in used.values() for s in grids]
    assert scales and all(torch.equal(s, s.to(scale_dtype).float()) for s in scales)
    stored = load_file(next((tmp_path / "out").glob("*.safetensors")))
    suffix = ".scales" if fmt == "gptq" else ".weight_scale"
    kept = [v.float().T if fmt == "gptq" else v.float() for k, v in stored.items()
            if k.endswith(suffix)]
    assert len(kept) == 14 and all(v.dtype == torch.float32 for v in kept)
    assert all(stored[k].dtype == scale_dtype for k in stored if k.endswith(suffix))
    # Each stored scale is one a layer was solved on, bit for bit.
    assert all(any(torch.equal(v, s) for s in scales) for v in kept)
    # Refitted scales (ADMM-Q's default) are rounded as they are stored, so the weights later
    # blocks were calibrated on are the served ones; they are not the fitted grids' any more.
    used.clear()
    refit = override(recipe, {"solver": {"scale_refits": 2}})
    quantize_model(str(src), tmp_path / "refit", refit, device=torch.device("cpu"),
                   progress=False, threads=1)
    stored = load_file(next((tmp_path / "refit").glob("*.safetensors")))
    refitted = [v.float().T if fmt == "gptq" else v.float() for k, v in stored.items()
                if k.endswith(suffix)]
    fitted = [s for grids in used.values() for s in grids]
    assert sum(not any(torch.equal(v, s) for s in fitted) for v in refitted) >= 7
