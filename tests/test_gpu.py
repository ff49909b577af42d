"""Solver checks on a CUDA device (run by benchmarks/gpu_check.sh on a machine with a GPU)."""

import pytest
import torch

from admmq_dist.quant.grid import GridSpec, fit_grid
from admmq_dist.quant.solvers import admmq, gptq, local_search

from conftest import synthetic_layer

pytestmark = pytest.mark.gpu


def test_solvers_on_cuda_match_cpu_quality():
    w, h, _ = synthetic_layer(256, 384, 8192, seed=3, outliers=8)
    grid = fit_grid(w, GridSpec(bits=3, group_size=64))
    cpu = admmq(w, h, grid)
    dev = torch.device("cuda")
    gpu_grid = grid.to(dev)
    wg, hg = w.to(dev), h.to(dev)
    g = gptq(wg, hg, gpu_grid)
    a = admmq(wg, hg, gpu_grid)
    assert a.codes.device.type == "cuda"
    assert a.loss <= 0.95 * g.loss
    assert a.loss == pytest.approx(cpu.loss, rel=0.05)
    polished = local_search(wg, hg, gpu_grid, a.codes, sweeps=2)
    assert polished.loss <= a.loss + 1e-9


def test_tf32_products_change_the_run_and_keep_its_loss():
    """products="tf32" runs the iterations on the tensor cores: other bytes (not a no-op), the
    loss near float32's. Emulated on a CPU (gemm_precision.md) the loss moves +0.16% if the
    hardware rounds the operands to nearest and +2.7% if it truncates them: the ratio printed
    here says which, and decides whether TF32 becomes the GPU default (within 0.5%)."""
    from admmq_dist.quant.solvers import ADMMSettings

    w, h, _ = synthetic_layer(256, 384, 8192, seed=3, outliers=8)
    dev = torch.device("cuda")
    grid = fit_grid(w.to(dev), GridSpec(bits=3, group_size=64))
    full = admmq(w.to(dev), h.to(dev), grid, ADMMSettings(products="float32"))
    tf32 = admmq(w.to(dev), h.to(dev), grid, ADMMSettings(products="tf32"))
    assert not torch.equal(full.codes, tf32.codes)
    print(f"TF32 / float32 loss on CUDA: {tf32.loss / full.loss:.5f}")
    assert tf32.loss <= 1.05 * full.loss


def test_cuda_run_is_deterministic():
    w, h, _ = synthetic_layer(128, 256, 4096, seed=4)
    dev = torch.device("cuda")
    grid = fit_grid(w.to(dev), GridSpec(bits=4, group_size=64))
    a = admmq(w.to(dev), h.to(dev), grid)
    b = admmq(w.to(dev), h.to(dev), grid)
    assert torch.equal(a.codes, b.codes)


def test_in_place_factorizations_on_cuda_are_the_out_of_place_bytes_in_their_memory():
    """GPTQ's factor and the asymmetric factor computed in place on a GPU: the bytes of the
    out-of-place chains, in their result's memory (GPTQ's: plus the copy cuSOLVER's inverse
    makes of the factor, and the permutation's row blocks)."""
    from admmq_dist.quant.factors import PERMUTE_ROWS, HessianFactors
    from admmq_dist.quant.hessian import asymmetric_factor, dead_inputs

    from test_factors import hessian, out_of_place_gptq

    n, dev = 2048, torch.device("cuda")
    h = hessian(n).to(dev)
    ref = out_of_place_gptq(h, True, 0.01, 10.0, 4)[1]
    factors = HessianFactors(h)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _, U = factors.gptq(True, 0.01, 10.0, 4)
    peak = torch.cuda.max_memory_allocated() - before
    assert torch.equal(U, ref)
    assert peak <= 8 * n * n + 2 * PERMUTE_ROWS * n * 4 + 2**20
    expected = h.double()
    d = dead_inputs(h)
    expected[d, d] = 1.0
    expected.diagonal().add_(0.01 * torch.diagonal(expected).mean())
    expected = torch.linalg.cholesky(expected)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    factor = asymmetric_factor(h.cpu(), 0.01, dev)  # H waiting on the host
    peak = torch.cuda.max_memory_allocated() - before
    assert torch.equal(factor, expected) and peak <= 8 * n * n + 2**20


def test_a_merge_through_the_host_stash_is_the_bytes_of_one_on_the_device():
    """Folding single-batch parts into an owner (the 405B-on-64-GPUs case): with the waiting
    nodes on the host the device holds the owner's node and two more at most, and every
    statistic has the bytes of the merge that kept them all on the device."""
    from admmq_dist.quant.accumulator import HessianAccumulator

    n, dev = 1024, torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, n, generator=g) for _ in range(16)]
    refs = [x + 0.1 * torch.randn(64, n, generator=g) for x in xs]
    parts = []
    for i, (x, r) in enumerate(zip(xs, refs)):
        acc = HessianAccumulator(n, "cpu", cross=True)
        acc.add(x, i, r)
        parts.append(acc.state())
    results = {}
    for stash in (None, torch.device("cpu")):
        owner = HessianAccumulator(n, dev, cross=True)
        owner.add(xs[15].to(dev), 15, refs[15].to(dev))
        owner.stash = stash
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for part in parts[:15]:
            owner.merge_state(part)
        peak = torch.cuda.max_memory_allocated() - before
        results[stash] = [owner.take(s) for s in ("deviation", "cross", "hessian")]
        if stash is not None:
            assert peak <= 2 * 4 * n * n + 2**20
    assert all(torch.equal(a, b) for a, b in zip(results[None], results[torch.device("cpu")]))


def test_the_sequential_schedule_on_cuda_writes_the_same_bytes_for_one_and_two_workers(
        tmp_path):
    """On a GPU the handed partial sums stay on the host, merges stash waiting nodes there and
    the Hessian and cross term wait there while the asymmetric targets move: one and two
    in-process workers write the same checkpoint and report the same losses."""
    import hashlib
    import json

    from admmq_dist.recipe import Recipe, override
    from admmq_dist.run.backends import LocalBackend
    from admmq_dist.run.job import quantize_model

    from tiny import tiny_model_dir

    src = tiny_model_dir(tmp_path / "src", "llama", dtype=torch.bfloat16)
    recipe = override(Recipe(), {
        "grid": {"group_size": 32}, "report": {"html": False},
        "calibration": {"dataset": None, "num_samples": 12, "seq_len": 32, "batch_size": 2,
                        "asymmetric": 0.25},
        "solver": {"row_block": 24, "admm": {"iterations": 10}}})
    out = {}
    for workers in (1, 2):
        folder = tmp_path / f"w{workers}"
        quantize_model(str(src), folder, recipe, device=torch.device("cuda"), progress=False,
                       backend=LocalBackend(workers))
        digest = hashlib.sha256(b"".join(p.read_bytes()
                                         for p in sorted(folder.glob("*.safetensors"))))
        losses = [json.loads(line).get("loss")
                  for line in (folder / "report.jsonl").read_text().splitlines()]
        out[workers] = (digest.hexdigest(), losses)
    assert out[1] == out[2]
