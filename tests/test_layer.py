"""run/layer.py: one layer's solve as both schedules run it — the merge of partial Hessians is
exact whatever the order, row blocks cross processes without their solver state, and the report
row has one schema."""

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
    assert all(set(b.history) <= {"residual", "rho", "weight_norm"} for b in light)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(blocks, light))
    result = combine(light, grid)
    row = report_row("model.layers.0.mlp.up_proj", 0, result, light, solved=True,
                     calibration="dense", tokens=1024, group=["up_proj"], changed=0.5)
    assert list(row)[:10] == ["layer", "block", "method", "shape", "loss", "iterations",
                              "seconds", "calibration", "tokens", "group"]
    assert row["shape"] == [40, 64] and 0 < row["loss"] < 0.2 and row["changed"] == 0.5
    assert len(row["residual"]) == row["iterations"] and row["rho"]
    assert report_row("x", 0, result, light, solved=False, calibration="rtn", tokens=0,
                      group=["x"])["loss"] is None


def test_one_factorization_per_hessian_per_worker(tmp_path):
    """q/k/v share a Hessian, a layer is solved in several row blocks: the eigendecomposition and
    GPTQ's factor are computed once per Hessian on the worker that solves it — and sharing them
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
        if workers == 1:
            assert counts["eigh"] == layer_inputs
