"""GPTQ (Frantar et al., 2022): column-by-column quantization with error feedback.

Blocked lazy updates, act-order with static groups (the grid is fitted to the whole weight before
any column moves, so permuting the columns never changes a column's scale), and damping. This is
the baseline ADMM-Q must beat and one of its initialisers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..grid import Grid
from ..factors import HessianFactors
from ..hessian import relative_loss, zero_columns
from .result import SolverResult


@dataclass(frozen=True)
class GPTQSettings:
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    # Cholesky can fail on a badly conditioned H; retry with damping multiplied by this factor.
    damp_retry_factor: float = 10.0
    damp_retries: int = 4

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"gptq block_size={self.block_size} must be at least 1")
        if not 0 <= self.damp < 1:
            raise ValueError(f"gptq damp={self.damp} must lie in [0, 1)")
        if self.damp_retry_factor <= 1:
            raise ValueError(f"gptq damp_retry_factor={self.damp_retry_factor} must exceed 1")
        if self.damp_retries < 0:
            raise ValueError(f"gptq damp_retries={self.damp_retries} must be non-negative")


def gptq(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid,
         settings: GPTQSettings = GPTQSettings(),
         factors: HessianFactors | None = None, with_loss: bool = True) -> SolverResult:
    """Quantize ``weight`` (``[out, in]``) on ``grid`` against ``hessian`` (``[in, in]``, undamped).

    Runs on the device of ``weight``; returns codes in the original column order. ``factors``
    (of ``hessian``) shares the Cholesky factor with every other solve on the same Hessian.
    ``with_loss=False`` leaves the loss NaN (two float64 GEMMs saved: ADMM-Q's start takes the
    codes only).
    """
    start = time.perf_counter()
    w0 = weight.float()
    h0 = hessian.to(device=w0.device, dtype=torch.float32)
    if factors is None:
        factors = HessianFactors(h0)
    if w0.shape[1] != h0.shape[0]:
        raise ValueError(f"weight has {w0.shape[1]} inputs but the Hessian is {h0.shape[0]} wide")
    W = zero_columns(w0, factors.dead)
    rows, cols = W.shape
    scale, zero = grid.expanded()
    perm, Hinv = factors.gptq(settings.act_order, settings.damp, settings.damp_retry_factor,
                              settings.damp_retries)
    if perm is not None:
        W = W[:, perm]
        scale, zero = scale[:, perm], zero[:, perm]
    W = W.clone()
    codes = torch.zeros(rows, cols, dtype=torch.int32, device=W.device)
    bs = settings.block_size
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            s, z = scale[:, i1 + i], zero[:, i1 + i]
            c, q = grid.quantize_values(w, s, z)
            codes[:, i1 + i] = c
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    deq = grid.dequantize(codes)
    loss = relative_loss(deq, w0, h0) if with_loss else float("nan")
    name = "gptq-act" if settings.act_order else "gptq"
    return SolverResult(name, codes, grid, deq, loss, 0, time.perf_counter() - start)
