"""Coordinate-descent local search (QuantEase-style) that polishes any solver's codes.

The loss ``tr((Q - W0) H (Q - W0)ᵀ)`` is separable over rows, so for one column ``j`` every row's
best code, the others fixed, is the grid point nearest ``t = Q[:, j] - G[:, j] / H_jj`` with
``G = (Q - W0) H``. Each step is an exact minimisation along one coordinate whose current value is
a candidate, so a sweep never increases the loss. Updates to ``G`` are applied lazily per block of
columns (as GPTQ does) so that most of the work is one GEMM per block.
"""

from __future__ import annotations

import time

import torch

from ..grid import Grid, codes_of, dequantize_codes
from ..hessian import condition, relative_loss
from .result import SolverResult


def _sweep(Q: torch.Tensor, codes: torch.Tensor, W: torch.Tensor, H: torch.Tensor,
           scale: torch.Tensor, zero: torch.Tensor, maxq: int, order: torch.Tensor,
           block_size: int) -> int:
    """One pass over the columns in ``order``; updates ``Q`` and ``codes`` in place.

    Returns how many codes changed.
    """
    G = (Q - W) @ H
    cols = Q.shape[1]
    changed = 0
    diag = torch.diagonal(H)
    for b1 in range(0, cols, block_size):
        idx = order[b1:b1 + block_size]
        Hb = H[idx][:, idx]
        Gb = G[:, idx].clone()
        deltas = torch.zeros(Q.shape[0], idx.numel(), dtype=Q.dtype, device=Q.device)
        for k in range(idx.numel()):
            j = int(idx[k])
            s, z = scale[:, j], zero[:, j]
            target = Q[:, j] - Gb[:, k] / diag[j]
            c = codes_of(target, s, z, maxq)
            q = dequantize_codes(c, s, z)
            delta = q - Q[:, j]
            moved = c != codes[:, j]
            changed += int(moved.sum())
            if moved.any():
                Q[:, j] = q
                codes[:, j] = c
                deltas[:, k] = delta
                Gb += delta.unsqueeze(1) * Hb[k].unsqueeze(0)
        rest = order[b1 + block_size:]
        if rest.numel() and changed:
            G[:, rest] += deltas @ H[idx][:, rest]
    return changed


def local_search(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, codes: torch.Tensor,
                 sweeps: int = 2, block_size: int = 128, method: str = "local-search",
                 start_seconds: float = 0.0, start_iterations: int = 0) -> SolverResult:
    """Polish ``codes`` (int ``[out, in]``) by up to ``sweeps`` coordinate-descent sweeps.

    Columns are visited in decreasing ``H_jj`` (the most sensitive inputs first). Stops early when
    a sweep changes nothing. ``start_seconds``/``start_iterations`` let a caller that ran a solver
    first report the total.
    """
    if sweeps < 0:
        raise ValueError(f"local search sweeps={sweeps} must be non-negative")
    start = time.perf_counter()
    w0 = weight.float()
    h0 = hessian.to(device=w0.device, dtype=torch.float32)
    W, H = condition(w0, h0)
    scale, zero = grid.expanded()
    codes = codes.to(torch.int32).clone()
    Q = dequantize_codes(codes, scale, zero)
    order = torch.argsort(torch.diagonal(H), descending=True)
    history = {"loss": [relative_loss(Q, w0, h0)], "changed": []}
    done = 0
    for _ in range(sweeps):
        before_Q, before_codes = Q.clone(), codes.clone()
        changed = _sweep(Q, codes, W, H, scale, zero, grid.maxq, order, block_size)
        done += 1
        loss = relative_loss(Q, w0, h0)
        if loss > history["loss"][-1]:
            # Only float round-off can do this; keep the better codes so the step stays monotone.
            Q, codes = before_Q, before_codes
            break
        history["loss"].append(loss)
        history["changed"].append(changed / codes.numel())
        if changed == 0:
            break
    return SolverResult(method, codes, grid, Q, history["loss"][-1], start_iterations + done,
                        start_seconds + time.perf_counter() - start, history)
