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
from ..hessian import dead_inputs, zero_columns


# Columns of the Hessian taken into float64 at a time: bounds the refit's working set to
# O(rows · in) whatever the layer's width (a [256, 28672] float64 slice is 59 MB).
COLUMN_CHUNK = 256


def _column_chunks(cols: int, group_size: int, chunk: int = COLUMN_CHUNK):
    """``(group, start, stop)``: ranges of at most ``chunk`` columns, none crossing a group."""
    for group_start in range(0, cols, group_size):
        group_stop = min(group_start + group_size, cols)
        for start in range(group_start, group_stop, chunk):
            yield group_start // group_size, start, min(start + chunk, group_stop)


def _hessian_rows(hessian: torch.Tensor, start: int, stop: int, dead: torch.Tensor
                  ) -> torch.Tensor:
    """``H[start:stop, :]`` in float64 with the dead-input rule (``H_jj = 1``) applied — the
    conditioned Hessian a block at a time, never a conditioned copy of the whole."""
    block = hessian[start:stop].double()
    if not torch.isfinite(block).all():
        raise ValueError("the Hessian holds NaN or Inf: the calibration activations overflowed")
    idx = torch.nonzero(dead[start:stop]).squeeze(1)
    block[idx, idx + start] = 1.0
    return block


def row_losses(quantized: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor,
               chunk: int = COLUMN_CHUNK) -> torch.Tensor:
    """``[rows]`` float64: ``(Q_i − W_i) H (Q_i − W_i)ᵀ`` per row, summed in float64 over
    column blocks of ``H`` (no float64 copy of the whole Hessian)."""
    no_dead = torch.zeros(hessian.shape[0], dtype=torch.bool, device=hessian.device)
    return _row_losses((quantized - weight).double(), hessian, no_dead, chunk)


def refit_scales(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, codes: torch.Tensor,
                 scale_dtype: torch.dtype | None = None, ridge: float = 1e-9,
                 chunk: int = COLUMN_CHUNK) -> Grid:
    """The grid with each row's group scales refitted to ``codes`` (int ``[out, in]``), zero
    points kept. A row keeps its old scales unless the new ones are all positive and lower its
    loss (measured after rounding them to ``scale_dtype``, the dtype the checkpoint stores, or
    for FP4 grids to the format's scale numbers).

    Shapes: weight ``[out, in]``, hessian ``[in, in]`` (any float dtype; never copied whole);
    cost ``out · in²``; memory beyond the inputs a few ``[out, in]`` float64 arrays, one
    ``[chunk, in]`` float64 block of ``H`` and the ``[out, G, G]`` systems (``G`` groups per row).
    The systems are formed block by block: for the columns ``c`` of group ``g``,
    ``A[:, g, :] += Σ_{j ∈ c} d_j · (d_c H_c)`` summed per group, ``b[:, g] += d_c · (W H_c)``.
    """
    if weight.shape[1] != hessian.shape[0]:
        raise ValueError(
            f"weight has {weight.shape[1]} inputs but the Hessian is {hessian.shape[0]} wide")
    dead = dead_inputs(hessian)
    W = zero_columns(weight.float(), dead).double()
    rows, cols = W.shape
    G, gs = grid.num_groups, grid.group_size
    d = grid.normalized(codes).double()  # [rows, cols]: V's entries, group by group
    a = torch.zeros(rows, G, G, dtype=torch.float64, device=W.device)
    b = torch.zeros(rows, G, dtype=torch.float64, device=W.device)
    loss_before = torch.zeros(rows, dtype=torch.float64, device=W.device)
    delta_before = grid.dequantize(codes).double() - W
    for group, start, stop in _column_chunks(cols, gs, chunk):
        block = _hessian_rows(hessian, start, stop, dead)  # [c, cols]
        dh = d[:, start:stop] @ block  # [rows, cols]: this chunk's share of row i's V H
        # Σ over each group h of the columns: A[i, group, h] gathers d_h · (V H) per group.
        a[:, group, :] += _sum_by_group(dh * d, G, gs)
        b[:, group] += (d[:, start:stop] * (W @ block.T)).sum(dim=1)
        loss_before += ((delta_before @ block.T) * delta_before[:, start:stop]).sum(dim=1)
        del dh
    del delta_before
    old = grid.scale.double()
    # A group whose codes all sit on its zero point has no say in the loss: keep its scale.
    diagonal = torch.diagonal(a, dim1=1, dim2=2)  # a view: the updates below are in place
    idle = diagonal <= 0
    diagonal.add_(idle.double())
    b = torch.where(idle, old, b)
    diagonal.mul_(1 + ridge)
    # Handed over in a list so that the callee holds the only reference and can free the
    # [rows, G, G] systems as soon as they are factorized (the refit's planned peak).
    systems = [a]
    del a, diagonal
    new, ok = (_solve(systems, b, grid, scale_dtype) if grid.kind == "int"
               else _snapped_descent(systems, b, old, grid))
    ok = ok & torch.isfinite(new).all(dim=1) & (new > 0).all(dim=1)
    new = torch.where(ok.unsqueeze(1), new, old)
    candidate = dataclasses.replace(grid, scale=new.float())
    after = _row_losses(candidate.dequantize(codes).double() - W, hessian, dead, chunk)
    keep_new = ok & (after < loss_before)
    return dataclasses.replace(
        grid, scale=torch.where(keep_new.unsqueeze(1), new.float(), grid.scale))


def _solve(systems: list[torch.Tensor], b: torch.Tensor, grid: Grid,
           scale_dtype: torch.dtype | None):
    """The solutions of the one ``[rows, G, G]`` system in ``systems`` (taken out of it),
    rounded to ``scale_dtype``, and which rows factorized."""
    # Cholesky, not LU: the systems are Gram matrices (positive definite with the ridge), and
    # torch 2.13's batched LU on CPU fails ("Pivots given to lu_solve must all be greater or
    # equal to 1") for systems of 160 groups or more once torch.set_num_threads has been called,
    # which every worker with a thread count does (tests/test_scales.py).
    factor, info = torch.linalg.cholesky_ex(systems.pop())
    new = torch.cholesky_solve(b.unsqueeze(-1), factor).squeeze(-1)
    del factor
    return grid.snap_scales(new, scale_dtype), info == 0


def _snapped_descent(systems: list[torch.Tensor], b: torch.Tensor, old: torch.Tensor,
                     grid: Grid, sweeps: int = 2):
    """FP4 grids: coordinate descent over a row's group scales, each step the format's scale
    number nearest the one-group optimum (the loss along one scale is a parabola, so the nearest
    representable number to its vertex is the best one). Rounding the joint solution instead
    loses to the old scales on nearly every row: the format's numbers are 1/8 to a factor 2
    apart. Each step keeps or lowers the row's loss."""
    a = systems.pop()
    s = old.clone()
    diag = torch.diagonal(a, dim1=1, dim2=2)
    for _ in range(sweeps):
        for g in range(s.shape[1]):
            # b_g − Σ_{h≠g} A_gh s_h, over A_gg: the vertex along group g.
            rest = torch.einsum("rh,rh->r", a[:, g, :], s) - diag[:, g] * s[:, g]
            vertex = (b[:, g] - rest) / diag[:, g]
            s[:, g] = grid.snap_scales(vertex.clamp_min(0), None)
    return s, torch.ones(s.shape[0], dtype=torch.bool, device=s.device)


def _sum_by_group(x: torch.Tensor, groups: int, group_size: int) -> torch.Tensor:
    """``[rows, cols]`` → ``[rows, groups]``: sums over each group's columns (ragged last)."""
    rows, cols = x.shape
    padded = groups * group_size
    if padded != cols:
        x = torch.nn.functional.pad(x, (0, padded - cols))
    return x.view(rows, groups, group_size).sum(dim=-1)


def _row_losses(delta: torch.Tensor, hessian: torch.Tensor, dead: torch.Tensor, chunk: int
                ) -> torch.Tensor:
    """``[rows]``: ``δ_i H δ_iᵀ`` for float64 ``delta`` on the conditioned Hessian, blockwise."""
    out = torch.zeros(delta.shape[0], dtype=torch.float64, device=delta.device)
    for start in range(0, hessian.shape[0], chunk):
        stop = min(start + chunk, hessian.shape[0])
        block = _hessian_rows(hessian, start, stop, dead)
        out += ((delta @ block.T) * delta[:, start:stop]).sum(dim=1)
    return out
