"""run/memory.py: a worker's memory for one decoder block, planned from the shapes before any of
the block's work, and the refusal when the device cannot hold it."""

import pytest
import torch

from admmq_dist.recipe import Recipe, override
from admmq_dist.run import memory, round_memory
from admmq_dist.run.job import quantize_model
from admmq_dist.run.memory import dyadic_pieces, plan_block
from admmq_dist.run.plan import llama_block, tokens_per_worker

from memory_cells import FP4_CELLS, TEST_CELLS, measure_cell_apart
from tiny import tiny_model_dir


def test_partial_sums_follow_the_canonical_tree():
    assert [dyadic_pieces(0, n) for n in (1, 2, 3, 4, 5, 8, 16)] == [1, 1, 2, 1, 2, 1, 1]
    assert dyadic_pieces(3, 11) == 4  # [3], [4-7], [8-9], [10]


def test_llama_70b_block_with_the_exact_update_everywhere():
    """Llama-3-70B, 128 x 2048 calibration tokens, bfloat16, plain objective, the exact W-update
    at every width: down_proj's 28672-wide Hessian with GPTQ's and the eigendecomposition's kept
    factors (16 B per entry) and the eigh's 8 B transient dominate; 1 and 8 workers both fit an
    80 GB H100's usable memory; the hidden states shrink with the workers, the factors do not."""
    block = llama_block(8192, 28672, heads=64, kv_heads=8)
    n2 = 28672**2
    plans = {}
    for workers in (1, 8):
        tokens, batches = tokens_per_worker(128, 2048, 8, workers)
        plans[workers] = plan_block(block, hidden=8192, tokens=tokens, batch_range=batches,
                                    act_bytes=2, row_block=512, asymmetric=False,
                                    workers=workers)
        assert plans[workers].worst_stage == "mlp.down_proj"
        assert plans[workers].items["Hessians and factorizations"] == (
            4 + memory.CHOLESKY_KEPT + memory.EIGH_KEPT) * n2
        assert plans[workers].items["row-block solve"] == memory.EIGH_TRANSIENT * n2
        assert plans[workers].peak < memory.usable(80 * 2**30)
    assert plans[1].items["hidden states"] == 8 * plans[8].items["hidden states"]


def test_the_default_cg_update_at_70b_widths_plans_no_eigendecomposition():
    """The default ``w_update="auto"`` solves down_proj (28672 wide) with CG: no eigh
    (8 B transient + 8 B kept per entry) in the plan; GPTQ's start factor remains. An exact
    update everywhere plans it."""
    from admmq_dist.quant.solvers.solve import SolverSettings

    block = llama_block(8192, 28672, heads=64, kv_heads=8)
    tokens, batches = tokens_per_worker(128, 2048, 8, 1)

    def plan(settings):
        return plan_block(block, hidden=8192, tokens=tokens, batch_range=batches, act_bytes=2,
                          row_block=512, asymmetric=False, eigh_for=settings.uses_eigh)

    auto, exact = plan(SolverSettings()), plan(override(Recipe(), {
        "solver": {"admm": {"w_update": "exact"}}}).solver)
    n2 = 28672**2
    assert (exact.items["Hessians and factorizations"] - auto.items["Hessians and factorizations"]
            == memory.EIGH_KEPT * n2)
    assert exact.items["row-block solve"] == memory.EIGH_TRANSIENT * n2
    # GPTQ's factor is computed in place: beyond the factor it keeps, only the copy cuSOLVER's
    # inverse makes of it on a GPU (4 B per entry).
    assert 4 * n2 <= auto.items["row-block solve"] < 5 * n2
    assert not SolverSettings().uses_eigh(28672) and SolverSettings().uses_eigh(8192)
    assert not override(Recipe(), {"solver": {"method": "gptq"}}).solver.uses_eigh(4096)


def test_llama_405b_on_64_workers_of_80_gib_with_asymmetric_calibration():
    """Llama-3.1-405B, 128 x 2048 tokens in batches of 2 (one per worker), asymmetric
    calibration, defaults, GPU workers: down_proj (53248 wide, 10.6 GiB per float32 [n, n])
    fits 80 GB. Its worst moment is moving the asymmetric target — the float64 factor and the
    copy cholesky_solve makes of it (16 B per entry) — with the Hessian and cross term waiting on
    the host; the owner's merge (its three statistics, the node arriving, a sibling back from
    the host) comes next. On a CPU (no separate host) the same worker would not fit."""
    from admmq_dist.quant.solvers.solve import SolverSettings

    block = llama_block(16384, 53248, heads=128, kv_heads=8)
    tokens, batches = tokens_per_worker(128, 2048, 2, 64)
    assert batches[1] - batches[0] == 1

    def plan(host):
        return plan_block(block, hidden=16384, tokens=tokens, batch_range=batches, act_bytes=2,
                          row_block=512, asymmetric=True, workers=64, host=host,
                          eigh_for=SolverSettings().uses_eigh, batch_tokens=2 * 2048,
                          embeddings=2 * 2 * 16384 * 128256)

    gpu, cpu = plan(True), plan(False)
    n2 = 53248**2
    assert gpu.worst_stage == "mlp.down_proj" and gpu.peak < memory.usable(80 * 2**30)
    held = sum(v for k, v in gpu.items.items() if k not in (
        "Hessians and factorizations", "partial sums", "row-block solve", "forward pass"))
    # Kept: Hessian and cross term, GPTQ's factor, the float32 target.
    assert gpu.items["Hessians and factorizations"] == 12 * n2 + 16384 * 53248 * 4
    assert gpu.peak == held + gpu.items["Hessians and factorizations"] + gpu.items[
        "row-block solve"]
    assert gpu.items["partial sums"] == (3 + 2) * 4 * n2  # the owner's merge
    assert cpu.peak - gpu.peak >= 8 * n2 and cpu.peak > memory.usable(80 * 2**30)
    # What waits on the host meanwhile, at most (the owner's): partial sums handed over, the
    # merged copy handed to the other solvers, and per statistic up to 8 nodes waiting for a
    # sibling (64 batches merged: 7 levels, and its own piece). A CPU worker parks nothing.
    assert gpu.host == (3 + 2 + 3 * 8) * 4 * n2 and cpu.host == 0
    # Left to the default, act_bytes 2 means a GPU.
    assert plan(None).peak == gpu.peak


def test_a_worker_adding_many_batches_holds_their_canonical_pieces():
    """One worker adding 16 batches holds up to 4 partial sums per statistic (before batch 15:
    [0-7], [8-11], [12-13], [14]) and the new product while it captures: at 70B's down_proj,
    (3 x 4 + 1) float32 [n, n] under asymmetric calibration."""
    block = llama_block(8192, 28672, heads=64, kv_heads=8)
    tokens, batches = tokens_per_worker(128, 2048, 8, 1)
    p = plan_block(block, hidden=8192, tokens=tokens, batch_range=batches, act_bytes=2,
                   row_block=512, asymmetric=True)
    assert p.phases["capture mlp.down_proj"][2] >= 13 * 4 * 28672**2


def test_a_block_the_device_cannot_hold_is_refused_before_its_work(tmp_path, monkeypatch):
    src = tiny_model_dir(tmp_path / "src", "llama")
    recipe = override(Recipe(), {"grid": {"group_size": 32},
                                 "calibration": {"dataset": None, "num_samples": 4,
                                                 "seq_len": 32, "batch_size": 2}})
    solved = []
    monkeypatch.setattr(memory, "device_capacity", lambda device: 200_000)
    from admmq_dist.run.worker import Worker

    original = Worker.solve
    monkeypatch.setattr(Worker, "solve", lambda *a, **k: solved.append(1) or original(*a, **k))
    with pytest.raises(MemoryError, match=r"model.layers.0 needs about .* GiB"):
        quantize_model(str(src), tmp_path / "out", recipe, device=torch.device("cpu"),
                       progress=False)
    assert solved == [] and not (tmp_path / "out").exists()
    monkeypatch.undo()
    summary = quantize_model(str(src), tmp_path / "ok", recipe, device=torch.device("cpu"),
                             progress=False)
    planned = summary["memory_plan"]
    assert planned["peak_bytes"] > 0 and planned["worst"].startswith("model.layers.")


def test_a_70b_depth_parallel_segment_holds_its_blocks_for_the_whole_run():
    """A depth-parallel worker keeps every owned block's weights, float copies, codes and duals
    (14 B per weight in bfloat16) and its segments' inputs and outputs: one 70B block per
    worker fits an 80 GB H100, ten (70B on 8 workers) do not."""
    from admmq_dist.quant.solvers.solve import SolverSettings

    block = llama_block(8192, 28672, heads=64, kv_heads=8)
    weights = sum(rows * cols for stage in block for _, rows, cols, *_ in stage)

    def plan(blocks):
        return round_memory.plan_segments([block] * blocks, hidden=8192, tokens=128 * 2048,
                                          num_batches=64, act_bytes=2, row_block=512,
                                          segments=1, eigh_for=SolverSettings().uses_eigh)

    one, ten = plan(1), plan(10)
    assert ten.items["segment weights, codes and duals"] == 10 * 14 * weights
    assert ten.peak - one.peak == 9 * 14 * weights
    assert one.worst_stage == "mlp.down_proj"
    assert one.peak < 80e9 < ten.peak


def test_a_depth_parallel_run_the_device_cannot_hold_is_refused_before_round_0(
        tmp_path, monkeypatch):
    from admmq_dist.run.segment_worker import SegmentWorker

    src = tiny_model_dir(tmp_path / "src", "llama")
    recipe = override(Recipe(), {"grid": {"group_size": 32},
                                 "solver": {"schedule": "depth-parallel", "rounds": 1},
                                 "calibration": {"dataset": None, "num_samples": 4,
                                                 "seq_len": 32, "batch_size": 2}})
    forwarded = []
    original = SegmentWorker.forward_shard
    monkeypatch.setattr(SegmentWorker, "forward_shard",
                        lambda *a, **k: forwarded.append(1) or original(*a, **k))
    monkeypatch.setattr(memory, "device_capacity", lambda device: 200_000)
    with pytest.raises(MemoryError, match=r"the segments of worker 0 need about .* GiB"):
        quantize_model(str(src), tmp_path / "out", recipe, device=torch.device("cpu"),
                       progress=False)
    assert forwarded == [] and not (tmp_path / "out").exists()
    monkeypatch.setattr(memory, "device_capacity", lambda device: 2**40)
    summary = quantize_model(str(src), tmp_path / "ok", recipe, device=torch.device("cpu"),
                             progress=False)
    planned = summary["memory_plan"]
    held = planned["items"]["segment weights, codes and duals"]
    assert planned["peak_bytes"] > held > 0 and forwarded


def test_a_70b_coordinated_worker_holds_every_owned_hessian_while_capturing():
    """The coordinated schedule captures every owned layer input's Hessian in one pass, each as
    one running sum (every batch arrives in order): per 70B block ~4.1 GB of float32 Hessians
    (q/k/v, o and gate/up at 8192, down at 28672), three times under asymmetric calibration (the
    cross terms and deviations); with 18 B per weight held, three blocks per worker fit an 80 GB H100, four do not."""
    from admmq_dist.quant.solvers.solve import SolverSettings

    block = llama_block(8192, 28672, heads=64, kv_heads=8)
    weights = sum(rows * cols for stage in block for _, rows, cols, *_ in stage)
    hessians = (3 * 8192 ** 2 + 28672 ** 2) * 4

    def plan(blocks, asymmetric=False):
        return round_memory.plan_coordinated([block] * blocks, hidden=8192,
                                             tokens=128 * 2048, num_batches=16,
                                             batch_tokens=8 * 2048, act_bytes=2, row_block=512,
                                             asymmetric=asymmetric,
                                             eigh_for=SolverSettings().uses_eigh)

    one, three, four = plan(1), plan(3), plan(4)
    assert one.items["blocks' weights, codes and duals"] == 18 * weights
    assert one.items["every owned Hessian while capturing"] == hessians
    assert plan(1, asymmetric=True).items["every owned Hessian while capturing"] == 3 * hessians
    assert three.peak < 80e9 < four.peak


def test_a_coordinated_run_the_device_cannot_hold_is_refused_before_round_0(tmp_path,
                                                                            monkeypatch):
    from admmq_dist.run.coordinated_worker import CoordinatedWorker

    src = tiny_model_dir(tmp_path / "src", "llama")
    recipe = override(Recipe(), {"grid": {"group_size": 32},
                                 "solver": {"schedule": "coordinated", "coordinated_rounds": 1},
                                 "calibration": {"dataset": None, "num_samples": 4,
                                                 "seq_len": 32, "batch_size": 2}})
    captured = []
    original = CoordinatedWorker.capture_batch
    monkeypatch.setattr(CoordinatedWorker, "capture_batch",
                        lambda *a, **k: captured.append(1) or original(*a, **k))
    monkeypatch.setattr(memory, "device_capacity", lambda device: 200_000)
    with pytest.raises(MemoryError, match=r"worker 0 need about .* GiB"):
        quantize_model(str(src), tmp_path / "out", recipe, device=torch.device("cpu"),
                       progress=False)
    assert captured == [] and not (tmp_path / "out").exists()
    monkeypatch.setattr(memory, "device_capacity", lambda device: 2**40)
    summary = quantize_model(str(src), tmp_path / "ok", recipe, device=torch.device("cpu"),
                             progress=False)
    assert summary["memory_plan"]["items"]["every owned Hessian while capturing"] > 0
    assert captured


@pytest.mark.parametrize("rows,cols,group_size", [(256, 1024, 128), (512, 2048, 64), (512, 2048, 32),
                                                  (512, 4096, 128), (128, 2048, None), (128, 4096, 16)])
def test_the_refit_holds_what_the_plan_says_and_no_rows_by_groups_by_cols_array(rows, cols,
                                                                                group_size):
    """The scale refit's peak beyond its inputs, measured by torch's allocator (tests/alloc.py),
    lies within [1/1.3, 1] of memory.refit_bytes at every shape, and grows with rows·cols, not
    rows·G·cols: the [rows, G, cols] arrays it once built were 6.8 GiB at cols = 8192 (the
    benchmark: benchmarks/results/refit_memory.md has cols = 28672)."""
    from alloc import peak_allocated

    from admmq_dist.quant.grid import GridSpec, fit_grid
    from admmq_dist.quant.solvers.scales import refit_scales

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=g)
    x = torch.randn(cols, 64, generator=g)
    hessian = x @ x.T + torch.eye(cols)
    grid = fit_grid(weight, GridSpec(bits=3, group_size=group_size))
    codes = grid.codes(weight)
    _, peak = peak_allocated(lambda: refit_scales(weight, hessian, grid, codes, torch.bfloat16))
    planned = memory.refit_bytes(rows, cols, grid.num_groups)
    assert peak <= planned <= 1.3 * peak, (peak, planned)
    # One [rows, G, cols] float64 array alone would be more than the whole measured peak.
    assert grid.num_groups == 1 or peak < 8 * rows * grid.num_groups * cols


@pytest.mark.slow
@pytest.mark.parametrize("hidden,asymmetric,workers,w_update,schedule,model_type",
                         [(*cell, "llama")[:6] for cell in TEST_CELLS])
def test_the_plan_holds_the_measured_peak_of_real_blocks(tmp_path, hidden, asymmetric, workers,
                                                         w_update, schedule, model_type):
    """The whole run of each schedule — loading, float pass, captures, merges, factorizations,
    solves, refits, propagation or rounds (the coordinated sequential start included), the
    driver's hand-offs and results and the writer — on real (tiny) Llama blocks at three widths,
    1 and 2 in-process workers, plain and asymmetric calibration, exact and CG W-updates, and a
    Qwen3-MoE block (its routed experts on the plain objective): the peak
    of live tensor bytes torch's allocator counts (tests/alloc.py) lies within [1/1.3, 1] of the
    plan (every worker's phases added up as they share the process, plus the driver's)."""
    measured, planned = measure_cell_apart(tmp_path, hidden, asymmetric, workers, w_update,
                                           schedule, model_type)
    assert measured <= planned <= 1.3 * measured, (measured, planned, planned / measured)


@pytest.mark.slow
@pytest.mark.parametrize("cell", FP4_CELLS, ids=lambda cell: "-".join(map(str, cell)))
def test_the_plan_holds_the_measured_peak_on_fp4_grids(tmp_path, cell):
    """As above, on NVFP4 and MXFP4 grids: their projection, scales and codes included."""
    measured, planned = measure_cell_apart(tmp_path, *cell)
    assert measured <= planned <= 1.3 * measured, (measured, planned, planned / measured)
