"""Polish ideas measured by ``layer_quality.py --ablation`` and not shipped (yet): what they buy
on real layers decides whether they move into ``admmq_dist.quant.solvers``.

- :func:`refit_zero_points`: the scale refit (``solvers/scales.py``) keeps each group's integer
  zero point; this one also moves it — the joint affine fit ``q = a · code + b`` per group, then
  ``zero = round(−b / a)`` and the exact scales for it, kept per row where the loss drops.
- :func:`pair_moves`: local search moves one code at a time; this tries joint ±1 moves of two
  codes on the most strongly coupled column pairs of the Hessian (largest
  ``|H_jk| / √(H_jj H_kk)``), where a pair move can pay though neither single move does.
"""

from __future__ import annotations

import dataclasses

import torch

from admmq_dist.quant.grid import Grid
from admmq_dist.quant.hessian import condition
from admmq_dist.quant.solvers.scales import refit_scales, row_losses


def refit_zero_points(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid,
                      codes: torch.Tensor, scale_dtype: torch.dtype | None) -> Grid:
    """``grid`` with zero points (and then scales) refitted to ``codes`` where a row gains.

    Shapes: weight, codes ``[out, in]``; hessian ``[in, in]``. Memory ``out · 2G · in``."""
    W, H = condition(weight.float(), hessian.float())
    W, H = W.double(), H.double()
    rows, cols = W.shape
    groups = grid.num_groups
    member = torch.zeros(groups, cols, dtype=torch.float64, device=W.device)
    member[grid.group_index(), torch.arange(cols, device=W.device)] = 1
    design = torch.cat([codes.double().unsqueeze(1) * member, member.expand(rows, -1, -1)], 1)
    dh = design @ H                                             # [rows, 2G, in]
    system = dh @ design.transpose(1, 2)
    system = system + 1e-9 * torch.diag_embed(torch.diagonal(system, dim1=1, dim2=2)) \
        + 1e-12 * torch.eye(2 * groups, dtype=torch.float64, device=W.device)
    fit = torch.linalg.solve(system, (dh @ W.unsqueeze(-1))).squeeze(-1)
    slope, offset = fit[:, :groups], fit[:, groups:]
    zero = torch.where(slope > 0, (-offset / slope).round().clamp(0, grid.maxq),
                       grid.zero.double()).float()
    moved = refit_scales(weight, hessian, dataclasses.replace(grid, zero=zero), codes, scale_dtype)
    keep = (row_losses(moved.dequantize(codes), W, H)
            < row_losses(grid.dequantize(codes), W, H)).unsqueeze(1)
    return dataclasses.replace(grid, scale=torch.where(keep, moved.scale, grid.scale),
                               zero=torch.where(keep, moved.zero, grid.zero))


def pair_moves(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, codes: torch.Tensor,
               num_pairs: int) -> torch.Tensor:
    """One pass of joint ±1 moves over the ``num_pairs`` most strongly coupled column pairs;
    returns the new codes (every accepted move lowers its row's loss)."""
    W, H = condition(weight.float(), hessian.float())
    W, H = W.double(), H.double()
    scale, zero = (t.double() for t in grid.expanded())
    c = codes.clone().long()
    g = (scale * (c.double() - zero) - W) @ H        # [out, in]: the loss's half-gradient
    d = torch.diagonal(H)
    coupling = torch.triu((H / torch.sqrt(d[:, None] * d[None, :])).abs(), 1)
    top = torch.topk(coupling.flatten(), min(num_pairs, coupling.numel())).indices
    for j, k in zip((top // H.shape[0]).tolist(), (top % H.shape[0]).tolist()):
        best = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
        step_j, step_k = torch.zeros_like(best), torch.zeros_like(best)
        for sj in (-1, 1):
            for sk in (-1, 1):
                fits = ((c[:, j] + sj).clamp(0, grid.maxq) == c[:, j] + sj) \
                    & ((c[:, k] + sk).clamp(0, grid.maxq) == c[:, k] + sk)
                dj, dk = sj * scale[:, j], sk * scale[:, k]
                change = (2 * dj * g[:, j] + 2 * dk * g[:, k] + dj * dj * d[j] + dk * dk * d[k]
                          + 2 * dj * dk * H[j, k])
                better = fits & (change < best)
                best = torch.where(better, change, best)
                step_j = torch.where(better, float(sj), step_j)
                step_k = torch.where(better, float(sk), step_k)
        rows = step_j.nonzero().squeeze(1)
        if rows.numel():
            c[rows, j] += step_j[rows].long()
            c[rows, k] += step_k[rows].long()
            g[rows] += ((step_j[rows] * scale[rows, j])[:, None] * H[j]
                        + (step_k[rows] * scale[rows, k])[:, None] * H[k])
    return c.to(codes.dtype)
