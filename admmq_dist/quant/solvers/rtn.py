"""Round-to-nearest: every weight to its nearest grid point, ignoring the Hessian."""

from __future__ import annotations

import time

import torch

from ..grid import Grid
from ..hessian import relative_loss
from .result import SolverResult


def rtn(weight: torch.Tensor, hessian: torch.Tensor | None, grid: Grid) -> SolverResult:
    """Quantize ``weight`` (``[out, in]``) to the nearest grid points; the loss uses ``hessian``
    (``[in, in]``) when given, else it is NaN."""
    start = time.perf_counter()
    w0 = weight.float()
    codes = grid.codes(w0)
    deq = grid.dequantize(codes)
    loss = relative_loss(deq, w0, hessian) if hessian is not None else float("nan")
    return SolverResult("rtn", codes, grid, deq, loss, 0, time.perf_counter() - start)
