"""One linear layer's solve, as every schedule runs it: the Hessian merged from every worker's
partial sums, the grid fitted to the whole layer, the canonical row blocks solved (cold, or warm
from the layer's previous codes and duals), and one report row per layer in a single schema."""

from __future__ import annotations

import dataclasses

import torch

from ..checkpoint.fp4_layout import fused_global_scales
from ..checkpoint.stored import stored_scale
from ..quant import fp4
from ..quant.factors import HessianFactors
from ..quant.grid import Grid, fit_grid
from ..quant.hessian import HessianAccumulator
from ..quant.solvers.result import SolverResult
from ..quant.solvers.rows import RowBlockResult, layer_history, solve_row_block
from ..quant.solvers.solve import SolverSettings
from ..recipe import Recipe


def merge_parts(parts: list[dict], device: torch.device
                ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """``(hessian, tokens, cross term or None)`` from every worker's partial sums (in any order:
    the merge is exact, so the result does not depend on the sharding)."""
    acc = HessianAccumulator.from_state(parts[0], device)
    for part in parts[1:]:
        acc.merge_state(part)
    return (acc.take("hessian"), acc.num_rows,
            acc.take("cross") if acc.has_cross else None)


def served_scale_dtype(recipe: Recipe, dtype: torch.dtype) -> torch.dtype:
    """The dtype whose numbers survive :func:`stored_scale` exactly (GPTQ's float16, or the
    model's; bfloat16 scales survive float16 too): what refitted scales are rounded to."""
    if recipe.output.format == "gptq" and dtype != torch.bfloat16:
        return torch.float16
    return dtype


def served_grid(weight: torch.Tensor, recipe: Recipe, dtype: torch.dtype, name: str,
                fused: list[torch.Tensor] = ()) -> Grid:
    """The grid fitted to ``weight`` with its scales rounded as the checkpoint stores them
    (``dtype``: the checkpoint's; GPTQ's float16): the codes are solved for, and later blocks
    calibrated on, the very numbers the engine will serve. ``fused``: the float weights of the
    linears sharing ``weight``'s input, this one's among them (engines fuse them), from which
    they all take one NVFP4 global scale; empty: ``weight``'s own."""
    if recipe.grid.kind != "int":
        # FP4 scales are the format's numbers by construction.
        shared = (fp4.shared_global_scale(list(fused) or [weight])
                  if recipe.grid.kind == "nvfp4" else None)
        return fit_grid(weight, recipe.grid, shared)
    grid = fit_grid(weight, recipe.grid)
    scale = stored_scale(recipe.output.format, dtype, name, grid)
    return Grid.from_parts(recipe.grid, weight.shape[1],
                           scale.to(device=grid.scale.device, dtype=torch.float32), grid.zero)


def grid_source(recipe: Recipe, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the grid is fitted to: the target solved for (under asymmetric calibration the moved
    target), or the float weight where ``calibration.asymmetric_grid`` says so."""
    return weight if recipe.calibration.asymmetric_grid == "weight" else target


def solve_rows(weight: torch.Tensor, hessian: torch.Tensor | None, grid: Grid,
               settings: SolverSettings, rows: list[tuple[int, int]], *,
               factors: HessianFactors | None = None,
               warm: list[dict | None] | None = None, compare: bool = False,
               scale_dtype: torch.dtype | None = None,
               true_objective: tuple | None = None) -> list[RowBlockResult]:
    """Row blocks ``rows`` of ``weight`` on ``grid`` (fitted to the whole layer: a row block's
    grid is its rows of the whole, so every solver of a part of the layer agrees on it);
    ``factors`` of ``hessian`` are shared by all of them (and by the other linears reading the
    same input); ``warm[k]`` warm-starts block ``k`` (``{"codes", "dual"}``); refitted scales
    (``settings.scale_refits``) are rounded to ``scale_dtype``; ``true_objective`` under
    asymmetric calibration (``weight`` is then the moved target): ``(float weight, cross term,
    deviation or its terms per row block)``, for the report's loss
    (:func:`.rows.solve_row_block`)."""
    if hessian is not None and factors is None:
        factors = HessianFactors(hessian)
    return [solve_row_block(weight, hessian, grid, settings, start, stop,
                            warm=None if warm is None else warm[k], compare=compare,
                            factors=factors, scale_dtype=scale_dtype,
                            true_objective=true_objective)
            for k, (start, stop) in enumerate(rows)]


def portable(blocks: list[RowBlockResult]) -> list[RowBlockResult]:
    """Row-block results ready to cross to another process: codes as bytes (every supported
    width fits 8 bits) on the CPU, no dequantized weight (the grid rebuilds it), no solver state,
    and only the parts of the solver's history the report plots."""
    return [dataclasses.replace(
        b, codes=b.codes.to(device="cpu", dtype=torch.uint8), weight=None, state={},
        scale=None if b.scale is None else b.scale.cpu(),
        history={k: b.history[k] for k in ("residual", "dual_residual", "rho", "weight_norm")
                 if k in b.history})
        for b in blocks]


def stored_grids(spec, quantized: dict[str, tuple]) -> dict[str, tuple[torch.Tensor, Grid]]:
    """``{name: (codes, grid)}`` of a block's ``{name: (codes, scale, zero)}``, as written: NVFP4
    linears that engines fuse take one global scale (:func:`fp4_layout.fused_global_scales`)."""
    grids = {name: (codes, Grid.from_parts(spec, codes.shape[1], scale, zero))
             for name, (codes, scale, zero) in quantized.items()}
    if spec.kind == "nvfp4":
        shared = fused_global_scales({name: grid.scale for name, (_, grid) in grids.items()})
        grids = {name: (codes, dataclasses.replace(grid, global_scale=shared[name]))
                 for name, (codes, grid) in grids.items()}
    return grids


def nbytes(value) -> int:
    """Bytes of the tensors in ``value`` (nested dicts, lists, tuples, dataclasses): what a
    transfer of it moves."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if dataclasses.is_dataclass(value):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


def dequantized(spec, layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                ) -> dict[str, torch.Tensor]:
    """``{name: weight}`` from ``{name: (codes, scale, zero)}`` on the grids ``spec`` fits: what
    every worker puts in place, computed where it is needed from the compact form."""
    return {name: Grid.from_parts(spec, codes.shape[1], scale, zero).dequantize(
        codes.to(torch.int32)) for name, (codes, scale, zero) in layers.items()}


def report_row(layer: str, block: int, result: SolverResult, blocks: list[RowBlockResult], *,
               solved: bool, calibration: str, tokens: int | None, group: list[str],
               **extra) -> dict:
    """The run report's line for one layer (``report.jsonl``; the HTML report plots it).
    ``loss`` is the relative loss of the objective the run calibrated for: under asymmetric
    calibration the true one (float weights on float inputs against quantized weights on
    quantized inputs), with ``target_loss`` the solver's, against the moved target."""
    loss = result.loss if solved else None
    target_loss = None
    if solved and blocks and all(b.true_loss is not None for b in blocks):
        # Summed in row order, whichever worker solved which block: the same bytes.
        blocks = sorted(blocks, key=lambda b: b.start)
        num = sum(b.true_loss[0] for b in blocks)
        den = sum(b.true_loss[1] for b in blocks)
        loss, target_loss = (num / den if den > 0 else float("nan")), result.loss
    return {"layer": layer, "block": block, "method": result.method,
            "shape": list(result.codes.shape), "loss": loss, "target_loss": target_loss,
            "iterations": result.iterations, "seconds": round(result.seconds, 4),
            "calibration": calibration, "tokens": tokens, "group": group,
            **layer_history(blocks), **extra}
