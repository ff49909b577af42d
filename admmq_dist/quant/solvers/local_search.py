"""Coordinate-descent local search (QuantEase-style) that polishes any solver's codes.

The loss ``tr((Q - W0) H (Q - W0)ᵀ)`` is separable over rows, so for one column ``j`` every row's
best code, the others fixed, is the grid point nearest ``t = Q[:, j] - G[:, j] / H_jj`` with
``G = (Q - W0) H``. Each step is an exact minimisation along one coordinate whose current value is
a candidate, so a sweep never increases the loss. Updates to ``G`` are applied lazily per block of
columns (as GPTQ does) so that most of the work is one GEMM per block.

Shapes: the sweep works on transposes (``[in, out]``) so that a column of ``Q`` is a contiguous row.
"""

from __future__ import annotations

import time

import torch

from ..grid import Grid
from ..hessian import condition, reference_term, relative_loss
from .result import SolverResult


def _sweep(Qt: torch.Tensor, Gt: torch.Tensor, H: torch.Tensor, scale_t: torch.Tensor,
           low_t: torch.Tensor, high_t: torch.Tensor, inv_diag: list[float],
           block_size: int, grid: Grid) -> None:
    """One pass over the columns in their stored order; updates ``Qt`` (``[n, m]``) and the
    gradient ``Gt`` (``H (Q - W0)ᵀ``, ``[n, m]``) in place.

    Every operand is already in visiting order, so a block and the columns after it are
    contiguous slices: the lazy update is one GEMM on views, with no gathered copy of ``H``.
    """
    inv_scale_t = 1.0 / scale_t
    n = Qt.shape[0]
    for b1 in range(0, n, block_size):
        b2 = min(b1 + block_size, n)
        Hb = H[b1:b2, b1:b2]
        Gb = Gt[b1:b2]
        before = Qt[b1:b2].clone()
        for j in range(b1, b2):
            # The nearest grid point to Q[:, j] - G[:, j] / H_jj, computed in place.
            t = torch.sub(Qt[j], Gt[j], alpha=inv_diag[j])
            q = grid.round_normalized_(t.mul_(inv_scale_t[j]), low_t[j], high_t[j])
            q.mul_(scale_t[j])
            delta = q - Qt[j]
            Qt[j] = q
            Gb.addr_(Hb[:, j - b1], delta)
        if b2 < n:
            Gt[b2:].addmm_(H[b2:, b1:b2], Qt[b1:b2] - before)


def local_search(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, codes: torch.Tensor,
                 sweeps: int = 1, block_size: int = 128, method: str = "local-search",
                 loss: float | None = None) -> SolverResult:
    """Polish ``codes`` (int ``[out, in]``) by up to ``sweeps`` coordinate-descent sweeps.

    Columns are visited in decreasing ``H_jj`` (the most sensitive inputs first). Stops early when
    a sweep changes nothing. ``loss``: the relative loss of ``codes`` on ``grid`` when the caller
    has it (a solver's result: the same number, computed the same way), saving its evaluation.
    """
    if sweeps < 0:
        raise ValueError(f"local search sweeps={sweeps} must be non-negative")
    start = time.perf_counter()
    w0 = weight.float()
    h0 = hessian.to(device=w0.device, dtype=torch.float32)
    W, H = condition(w0, h0)
    scale, zero = grid.expanded()
    Qt = grid.dequantize(codes.to(torch.int32)).T.contiguous()
    W0t = W.T.contiguous()
    scale_t = scale.T.contiguous()
    # clamp(round(v / s) + z, 0, maxq) - z == clamp(round(v / s), -z, maxq - z): z is an integer.
    low_t = (-zero).T.contiguous()
    high_t = (grid.maxq - zero).T.contiguous()
    # Work in visiting order (decreasing H_jj): one permuted copy of H per call, not a gathered
    # copy of its remaining rows per block (n / block_size copies of up to n² entries a sweep).
    order = torch.argsort(torch.diagonal(H), descending=True)
    Hp = H[order][:, order]
    inverse = torch.argsort(order)
    Qp = Qt[order]
    scale_p, low_p, high_p = scale_t[order], low_t[order], high_t[order]
    inv_diag = (1.0 / torch.diagonal(Hp)).tolist()
    # Losses on [out, in] arrays laid out as the solvers' own, so a solver's loss is this one.
    den = reference_term(w0, h0)
    if loss is None:
        loss = relative_loss(Qt.T.contiguous(), w0, h0, den)
    history = {"loss": [loss], "changed": []}
    done = 0
    for _ in range(sweeps):
        before = Qp.clone()
        # G in the original column order, then permuted, so its sums run as they always did.
        Gp = (H @ (Qp[inverse] - W0t))[order]
        _sweep(Qp, Gp, Hp, scale_p, low_p, high_p, inv_diag, block_size, grid)
        done += 1
        loss = relative_loss(Qp[inverse].T.contiguous(), w0, h0, den)
        if loss > history["loss"][-1]:
            # Only float round-off can do this; keep the better codes so the step stays monotone.
            Qp = before
            break
        changed = int(torch.count_nonzero(Qp != before))
        history["loss"].append(loss)
        history["changed"].append(changed / Qp.numel())
        if changed == 0:
            break
    Q = Qp[inverse].T.contiguous()
    final = grid.codes(Q)
    return SolverResult(method, final, grid, grid.dequantize(final), history["loss"][-1], done,
                        time.perf_counter() - start, history)
