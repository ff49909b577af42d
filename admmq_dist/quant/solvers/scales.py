"""Refitting a grid's scales to fixed codes: the one step no solver here takes on its own.

Every solver chooses codes on a grid fitted once, to the weights' ranges (min-max or GPTQ's range
search) — a choice made before the Hessian is looked at. Once the codes are known, the loss
``tr((Q − W) H (Q − W)ᵀ)`` is, row by row, a quadratic in that row's group scales (zero points
are integers and stay): with ``Q_i = Σ_g s_g v_g`` (``v_g``: the row's ``code − zero`` on group
``g``'s columns, zero elsewhere) the best scales solve the ``[G, G]`` system
``(V H Vᵀ) s = V H W_iᵀ``. Alternating it with local search over the codes (which re-optimises
the codes on the new grid) is a descent method: neither step can raise a row's loss, because
each keeps a row's previous value unless the new one is better.

Written here because no library solves a batched, per-row, group-structured least squares on a
Hessian metric; it is a few einsums and one batched solve.
"""

from __future__ import annotations

import dataclasses

import torch

from ..grid import Grid
from ..hessian import condition


def row_losses(quantized: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor
               ) -> torch.Tensor:
    """``[rows]`` float64: ``(Q_i − W_i) H (Q_i − W_i)ᵀ`` per row."""
    delta = (quantized - weight).double()
    return ((delta @ hessian.double()) * delta).sum(dim=1)


def refit_scales(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, codes: torch.Tensor,
                 scale_dtype: torch.dtype | None = None, ridge: float = 1e-9) -> Grid:
    """The grid with each row's group scales refitted to ``codes`` (int ``[out, in]``), zero
    points kept. A row keeps its old scales unless the new ones are all positive and lower its
    loss (measured after rounding them to ``scale_dtype``, the dtype the checkpoint stores).

    Shapes: weight ``[out, in]``, hessian ``[in, in]``; cost ``out · in²`` (one matrix product
    of the weight's size with the Hessian), memory ``out · G · in`` (``G`` groups per row):
    callers pass row blocks of large layers.
    """
    W, H = condition(weight.float(), hessian.float())
    W, H = W.double(), H.double()
    rows, cols = W.shape
    G = grid.num_groups
    gs = grid.group_size
    padded = G * gs
    _, zero = grid.expanded()
    d = torch.zeros(rows, padded, dtype=torch.float64, device=W.device)
    d[:, :cols] = codes.double() - zero.double()
    h = torch.zeros(padded, cols, dtype=torch.float64, device=W.device)
    h[:cols] = H
    d = d.view(rows, G, gs)
    vh = torch.einsum("rgk,gkn->rgn", d, h.view(G, gs, cols))  # [rows, G, cols]: V H per row
    vh_pad = torch.zeros(rows, G, padded, dtype=torch.float64, device=W.device)
    vh_pad[..., :cols] = vh
    a = torch.einsum("rghk,rhk->rgh", vh_pad.view(rows, G, G, gs), d)  # V H Vᵀ
    b = torch.einsum("rgn,rn->rg", vh, W)  # V H Wᵀ
    old = grid.scale.double()
    # A group whose codes all sit on its zero point has no say in the loss: keep its scale.
    idle = torch.diagonal(a, dim1=1, dim2=2) <= 0
    a = a + torch.diag_embed(idle.double())
    b = torch.where(idle, old, b)
    a = a + ridge * torch.diag_embed(torch.diagonal(a, dim1=1, dim2=2))
    new = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)
    if scale_dtype is not None:
        new = new.to(scale_dtype).double()
    ok = torch.isfinite(new).all(dim=1) & (new > 0).all(dim=1)
    new = torch.where(ok.unsqueeze(1), new, old)
    candidate = dataclasses.replace(grid, scale=new.float())
    before = row_losses(grid.dequantize(codes), W, H)
    after = row_losses(candidate.dequantize(codes), W, H)
    keep_new = ok & (after < before)
    return dataclasses.replace(
        grid, scale=torch.where(keep_new.unsqueeze(1), new.float(), grid.scale))
