"""Refitting a grid's scales to fixed codes (quant/solvers/scales.py)."""

import pytest
import torch

from admmq_dist.quant.grid import GridSpec, fit_grid
from admmq_dist.quant.hessian import relative_loss
from admmq_dist.quant.solvers import GPTQSettings, gptq, local_search
from admmq_dist.quant.solvers.scales import refit_scales, row_losses

from conftest import synthetic_layer


@pytest.mark.parametrize("group_size, cols", [(32, 96), (32, 80), (None, 64)])
def test_refit_recovers_the_scales_codes_were_made_with(group_size, cols):
    """Weights that are exactly ``s* (codes − zero)``: from a wrong scale, the refit finds ``s*``
    (loss 0), with ragged last groups and per-channel grids alike."""
    g = torch.Generator().manual_seed(0)
    spec = GridSpec(bits=3, group_size=group_size)
    w0 = torch.randn(12, cols, generator=g)
    grid = fit_grid(w0, spec)
    codes = grid.codes(w0)
    w = grid.dequantize(codes)  # on the grid: the true scales are grid.scale
    x = torch.randn(400, cols, generator=g)
    h = x.T @ x / 400
    wrong = type(grid)(grid.bits, grid.group_size, grid.cols, grid.symmetric,
                       grid.scale * 1.3, grid.zero)
    assert relative_loss(wrong.dequantize(codes), w, h) > 1e-3
    fitted = refit_scales(w, h, wrong, codes)
    assert torch.allclose(fitted.scale, grid.scale, rtol=1e-5)
    assert relative_loss(fitted.dequantize(codes), w, h) < 1e-10
    assert torch.equal(fitted.zero, wrong.zero)


def test_refit_and_local_search_only_lower_gptqs_loss_row_by_row():
    """On a real-shaped problem the refit lowers act-order GPTQ's loss (no row gets worse, and
    the layer by a margin), and stays a descent when alternated with local search."""
    w, h, _ = synthetic_layer(96, 192, 4096, seed=2)
    grid = fit_grid(w, GridSpec(bits=3, group_size=64))
    start = gptq(w, h, grid, GPTQSettings(act_order=True))
    polished = local_search(w, h, grid, start.codes, 1)
    fitted = refit_scales(w, h, grid, polished.codes)
    before = row_losses(polished.weight, w, h)
    after = row_losses(fitted.dequantize(polished.codes), w, h)
    assert bool((after <= before).all())
    assert float(after.sum()) < 0.97 * float(before.sum())
    again = local_search(w, h, fitted, polished.codes, 1)
    assert again.loss <= relative_loss(fitted.dequantize(polished.codes), w, h)


def test_rounded_scales_and_idle_groups_keep_the_refit_honest():
    """Scales are judged after rounding to the stored dtype (a row whose rounded refit is no
    better keeps its old scales); a group whose codes all sit on the zero point keeps its
    scale; non-positive solutions are refused."""
    w, h, _ = synthetic_layer(32, 128, 2048, seed=3)
    grid = fit_grid(w, GridSpec(bits=3, group_size=64))
    codes = grid.codes(w)
    fitted = refit_scales(w, h, grid, codes, scale_dtype=torch.bfloat16)
    changed = (fitted.scale != grid.scale).any(dim=1)
    assert bool(changed.any())
    assert torch.equal(fitted.scale[changed].bfloat16().float(), fitted.scale[changed])
    idle = codes.clone()
    idle[:, :64] = grid.zero[:, :1].to(torch.int32)  # group 0: every code on the zero point
    kept = refit_scales(w, h, grid, idle)
    assert torch.equal(kept.scale[:, 0], grid.scale[:, 0])
    assert bool((kept.scale > 0).all())


def test_solve_refits_scales_after_admmq_by_default_and_for_any_method_on_request():
    """scale_refits: ADMM-Q refits once by default, the GPTQ and RTN baselines never unless
    asked; each refit lowers the loss and hands back the refitted grid (scales rounded to the
    stored dtype, zero points unchanged)."""
    from admmq_dist.quant.solvers.solve import DEFAULT_ADMMQ_REFITS, SolverSettings, solve

    assert SolverSettings().refits == DEFAULT_ADMMQ_REFITS >= 1
    assert SolverSettings(method="gptq").refits == SolverSettings(method="rtn").refits == 0
    w, h, _ = synthetic_layer(64, 128, 4096, seed=4)
    grid = fit_grid(w, GridSpec(bits=3, group_size=64))
    plain = solve(w, h, grid, SolverSettings(method="gptq"))
    assert plain.grid is grid
    refit = solve(w, h, grid, SolverSettings(method="gptq", scale_refits=2),
                  scale_dtype=torch.bfloat16)
    assert refit.loss < 0.97 * plain.loss
    assert torch.equal(refit.grid.zero, grid.zero) and not torch.equal(refit.grid.scale,
                                                                        grid.scale)
    assert torch.equal(refit.grid.scale, refit.grid.scale.bfloat16().float())
    assert torch.equal(refit.weight, refit.grid.dequantize(refit.codes))
    assert refit.loss == pytest.approx(relative_loss(refit.weight, w, h), rel=1e-5)
    admm = solve(w, h, grid, SolverSettings(scale_refits=0))
    admm_refit = solve(w, h, grid, SolverSettings())
    assert admm_refit.loss < admm.loss
    with pytest.raises(ValueError, match="scale_refits"):
        SolverSettings(scale_refits=-1)


def test_refit_solves_wide_systems_after_set_num_threads():
    """torch 2.13's batched LU on CPU fails for systems of 160+ groups once set_num_threads has
    run (every worker given a thread count calls it); the refit's Cholesky does not. 70B's
    down_proj at group 128 has 224 groups per row."""
    torch.set_num_threads(torch.get_num_threads())
    w, h, _ = synthetic_layer(8, 224 * 16, 4096, seed=5)
    grid = fit_grid(w, GridSpec(bits=3, group_size=16))
    codes = grid.codes(w)
    fitted = refit_scales(w, h, grid, codes, scale_dtype=torch.bfloat16)
    assert grid.num_groups == 224
    assert float(row_losses(fitted.dequantize(codes), w, h).sum()) \
        < float(row_losses(grid.dequantize(codes), w, h).sum())
