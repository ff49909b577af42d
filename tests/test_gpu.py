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


def test_cuda_run_is_deterministic():
    w, h, _ = synthetic_layer(128, 256, 4096, seed=4)
    dev = torch.device("cuda")
    grid = fit_grid(w.to(dev), GridSpec(bits=4, group_size=64))
    a = admmq(w.to(dev), h.to(dev), grid)
    b = admmq(w.to(dev), h.to(dev), grid)
    assert torch.equal(a.codes, b.codes)
