"""Solving a layer in fixed blocks of output rows, so any number of workers gets the same bytes.

Every method here is separable over output rows — the objective ``tr(ΔHΔᵀ)`` is a sum over rows,
the grid is fitted row by row, GPTQ's column updates and ADMM-Q's updates act on each row alone —
so a layer can be cut into row blocks solved anywhere. The blocks are *canonical*: their
boundaries depend only on the layer's shape and ``row_block``, never on how many workers there
are, and a block's result is a function of that block alone (its own matrix products, its own
early stop). Which worker solves which block therefore cannot change a single bit.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

from ..factors import HessianFactors
from ..grid import Grid
from ..hessian import asymmetric_loss_terms, loss_terms
from .result import SolverResult
from .rtn import rtn
from .solve import SolverSettings, solve


def row_blocks(rows: int, row_block: int) -> list[tuple[int, int]]:
    """``ceil(rows / row_block)`` contiguous ``(start, stop)`` blocks of near-equal size."""
    if rows < 1 or row_block < 1:
        raise ValueError(f"rows={rows} and row_block={row_block} must be positive")
    n = math.ceil(rows / row_block)
    base, extra = divmod(rows, n)
    bounds, start = [], 0
    for i in range(n):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass(frozen=True)
class RowBlockResult:
    """One row block's codes and dequantized weight, with its share of the loss."""

    start: int
    stop: int
    method: str
    codes: torch.Tensor
    weight: torch.Tensor
    loss_num: float
    loss_den: float
    iterations: int
    seconds: float
    state: dict = field(default_factory=dict)
    # The solver's per-iteration history (ADMM-Q: "residual", "rho", "weight_norm", ...).
    history: dict = field(default_factory=dict)
    # method -> (loss numerator, denominator) of baselines solved on the same rows and Hessian.
    compare: dict = field(default_factory=dict)
    # Under asymmetric calibration: (numerator, denominator) of the true objective
    # (hessian.asymmetric_loss_terms); loss_num/loss_den are against the moved target solved for.
    true_loss: tuple[float, float] | None = None
    # The rows' scales when the solver refitted them (SolverSettings.scale_refits), else None:
    # the layer's grid is then the fitted one's rows with these in place (:func:`layer_grid`).
    scale: torch.Tensor | None = None


def solve_row_block(weight: torch.Tensor, hessian: torch.Tensor | None, grid: Grid,
                    settings: SolverSettings, start: int, stop: int,
                    warm: dict | None = None, compare: bool = False,
                    factors: HessianFactors | None = None,
                    scale_dtype: torch.dtype | None = None,
                    true_objective: tuple | None = None) -> RowBlockResult:
    """Solve rows ``start:stop`` of ``weight`` (``[out, in]``) on the rows' part of ``grid``.

    ``hessian`` None rounds to nearest (an expert with no calibration signal); the loss is then 0/0.
    ``warm`` (``{"codes", "dual"}`` of these rows) warm-starts ADMM-Q. ``compare`` also solves the
    rows with GPTQ and round-to-nearest (their losses only; the codes are ``settings.method``'s).
    ``true_objective`` (asymmetric calibration: ``(float weight [out, in] of the whole layer,
    cross term, deviation)``, ``weight`` being the moved target; the deviation ``[in, in]``, or
    ``{(start, stop): its deviation_term}`` per canonical row block, taken when the Hessian was
    merged) adds each row block's share of the true objective, and makes the baselines' losses
    the true objective's too.
    """
    t = time.perf_counter()
    w = weight[start:stop]
    g = grid.row_slice(start, stop)
    baselines = {}
    if hessian is None:
        result = rtn(w, None, g)
        num, den = 0.0, 0.0
    else:
        result = solve(w, hessian, g, settings, warm=warm, factors=factors,
                       scale_dtype=scale_dtype)
        num, den = loss_terms(result.weight, w.float(), hessian)
    seconds = time.perf_counter() - t

    def true_loss(quantized: torch.Tensor) -> tuple[float, float]:
        float_weight, cross, deviation = true_objective
        if isinstance(deviation, dict):
            if (start, stop) not in deviation:
                raise ValueError(f"rows {start}:{stop} are not a canonical row block: the "
                                 f"deviation terms were taken for {sorted(deviation)}")
            deviation = deviation[(start, stop)]
        return asymmetric_loss_terms(quantized, float_weight[start:stop], hessian, cross,
                                     deviation)

    if compare and hessian is not None:
        for method in ("gptq", "rtn"):
            other = solve(w, hessian, g, dataclasses.replace(settings, method=method),
                          factors=factors)
            baselines[method] = (loss_terms(other.weight, w.float(), hessian)
                                 if true_objective is None else true_loss(other.weight))
    refitted = result.grid.scale if result.grid is not g else None
    return RowBlockResult(start, stop, result.method, result.codes, result.weight, num, den,
                          result.iterations, seconds, result.state, result.history, baselines,
                          true_loss=(None if true_objective is None or hessian is None
                                     else true_loss(result.weight)),
                          scale=refitted)


def layer_history(blocks: list[RowBlockResult]) -> dict:
    """A layer's ADMM-Q curves from its row blocks': the relative primal and dual residuals
    ``‖W − Z‖_F / ‖W0‖_F`` and ``ρ‖Z − Z_prev‖_F / ‖W0‖_F`` and ρ per iteration (a block that
    stopped early holds its last value), and the baselines' relative losses. Empty lists for
    methods without iterations."""
    blocks = sorted(blocks, key=lambda b: b.start)
    curves = [b.history for b in blocks if b.history.get("residual")]
    out: dict = {"residual": [], "dual_residual": [], "rho": []}
    if curves:
        length = max(len(c["residual"]) for c in curves)
        norm = math.sqrt(sum(c["weight_norm"][0] ** 2 for c in curves)) or 1.0
        for key in ("residual", "dual_residual"):
            for i in range(length if all(c.get(key) for c in curves) else 0):
                squares = sum(c[key][min(i, len(c[key]) - 1)] ** 2 for c in curves)
                out[key].append(_short(math.sqrt(squares) / norm))
        out["rho"] = [_short(r) for r in max(curves, key=lambda c: len(c["rho"]))["rho"]]
    methods = {m for b in blocks for m in b.compare}
    if methods:
        out["compare"] = {}
        for m in sorted(methods):
            num = sum(b.compare[m][0] for b in blocks if m in b.compare)
            den = sum(b.compare[m][1] for b in blocks if m in b.compare)
            out["compare"][m] = num / den if den > 0 else None
    return out


def _short(x: float) -> float:
    """Four significant digits: plenty for a plot, and report.jsonl stays small."""
    return float(f"{x:.4g}")


def layer_grid(blocks: list[RowBlockResult], grid: Grid) -> Grid:
    """The layer's grid as its row blocks left it: ``grid`` (the fitted one), with the scales
    of blocks that refitted theirs in place."""
    if all(b.scale is None for b in blocks):
        return grid
    scale = grid.scale.clone()
    for b in blocks:
        if b.scale is not None:
            scale[b.start:b.stop] = b.scale.to(device=scale.device, dtype=scale.dtype)
    return dataclasses.replace(grid, scale=scale)


def combine(blocks: list[RowBlockResult], grid: Grid) -> SolverResult:
    """The layer's result from all its row blocks (in any order); ``grid`` is the fitted one,
    the result's that grid with any refitted scales in place."""
    blocks = sorted(blocks, key=lambda b: b.start)
    grid = layer_grid(blocks, grid)
    if blocks[0].start != 0 or blocks[-1].stop != grid.rows or any(
            a.stop != b.start for a, b in zip(blocks, blocks[1:])):
        raise ValueError("row blocks do not tile the layer")
    num = sum(b.loss_num for b in blocks)
    den = sum(b.loss_den for b in blocks)
    loss = num / den if den > 0 else float("nan")
    codes = torch.cat([b.codes for b in blocks]).to(torch.int32)
    # Row blocks that crossed processes travel without their dequantized weights (codes and the
    # grid say the same in a quarter of the bytes): rebuild them here.
    weight = (torch.cat([b.weight for b in blocks]) if all(b.weight is not None for b in blocks)
              else grid.dequantize(codes))
    return SolverResult(blocks[0].method, codes, grid, weight, loss,
                        max(b.iterations for b in blocks), sum(b.seconds for b in blocks))
