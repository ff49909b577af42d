"""One entry point for every method, so the pipeline and the benchmarks run the same code."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..factors import HessianFactors
from ..grid import Grid
from .admmq import ADMMSettings, admmq
from .gptq import GPTQSettings, gptq
from .local_search import local_search
from .result import SolverResult
from .rtn import rtn
from .scales import refit_scales

METHODS = ("admmq", "gptq", "rtn")
SCHEDULES = ("sequential", "depth-parallel", "coordinated")
REFRESH_DUALS = ("keep", "zero")
PENALTIES = ("continuation", "balance")


@dataclass(frozen=True)
class SolverSettings:
    """Which method quantizes a layer, its settings, and the local-search polish after it."""

    method: Literal["admmq", "gptq", "rtn"] = "admmq"
    gptq: GPTQSettings = field(default_factory=GPTQSettings)
    admm: ADMMSettings = field(default_factory=ADMMSettings)
    # None: one sweep after ADMM-Q, none after GPTQ and RTN, so that those stay the standard
    # baselines; set it to polish any method.
    local_search_sweeps: int | None = None
    # After the polish: this many rounds of refitting the grid's scales to the codes
    # (solvers/scales.py), each followed by a local-search sweep on the new grid. None: the
    # method's default (none for the GPTQ and RTN baselines; see `refits`).
    scale_refits: int | None = None
    # Layers are solved in blocks of about this many output rows (see solvers/rows.py): the unit
    # of work spread over workers, fixed so that results never depend on the worker count.
    row_block: int = 512
    # "sequential": block by block, each on the outputs of the quantized blocks before it.
    # "depth-parallel": every segment at once from the float model's inputs (round 0), then up
    # to `rounds` corrections, each re-solving the segments downstream of the last exact one on
    # their predecessor's new output, warm-started for round_iterations from ρ = round_rho_start;
    # stops when fewer than round_stop_changed of the codes moved.
    # "coordinated": one ADMM-Q run across rounds with every layer at once. Each round a
    # pipelined forward through the current model (the float model in round 0) refreshes every
    # layer's Hessian, then every layer runs coordinated_iterations ADMM-Q iterations warm from its
    # own codes and dual at the one ρ the coordinator holds: ρ is advanced round by round along
    # the admm schedule, never reset, so codes anneal together across the model. Stops when fewer
    # than round_stop_changed of the codes moved in a round (with ρ past admm.stop_min_rho), or
    # after coordinated_rounds.
    schedule: Literal["sequential", "depth-parallel", "coordinated"] = "sequential"
    # depth-parallel: contiguous segments of blocks, each quantized sequentially inside; None is
    # one per worker (the fewest rounds to reach sequential quality, but then the bytes depend on
    # the worker count); a number fixes them, so any worker count writes the same bytes.
    segments: int | None = None
    rounds: int = 3
    round_iterations: int = 40
    round_rho_start: float = 0.3
    round_stop_changed: float = 1e-3
    coordinated_rounds: int = 8
    coordinated_iterations: int = 10
    # What a layer's dual does when its Hessian is refreshed: "zero" it (the default) or "keep"
    # the unscaled dual Y = ρU (continuous in ρ, so a change of ρ rescales U consistently by
    # itself). Measured on the first 8 SmolLM2 blocks (3-bit g64, three seeds,
    # benchmarks/results/schedules_slice_options.md): output error 1.0140x sequential's with
    # zero, 1.0291x with keep, lower on every seed — a dual built on the previous round's
    # Hessian pulls toward that round's inputs. (A third rule, reset to the new Hessian's
    # stationary dual, diverged — perplexity 2.6e14 by round 5, coordinated_start_quick.md at
    # commit 4a28e2d — and was removed.)
    refresh_dual: Literal["keep", "zero"] = "zero"
    # coordinated: how the coordinator sets each round's ρ: "continuation" — the admm schedule
    # carried across rounds; "balance" — that, and ×2 / ÷2 when the whole model's primal residual
    # is more than 10× its dual one / the other way round (residual balancing, Boyd et al. 2011
    # §3.4.1; the workers report both residuals each round).
    penalty: Literal["continuation", "balance"] = "continuation"
    # Where round 0's codes come from: "sequential" — one sequential GPTQ pass first (block by
    # block on the quantized model's inputs, one worker busy at a time: GPTQ's time), so that
    # round 0's Hessians are already near the final model's; "float" — GPTQ on the float
    # model's Hessians, every layer at once. Measured on SmolLM2 3-bit (one run,
    # coordinated_start_quick.md at commit 4a28e2d, before today's defaults): the sequential
    # start ended at the sequential schedule's perplexity, the float start 7.9% above it; with
    # today's defaults: benchmarks/results/schedules_slice.md.
    coordinated_start: Literal["float", "sequential"] = "sequential"
    # coordinated: a layer whose iterate moved less than this fraction in a round past
    # admm.stop_min_rho is frozen — no longer iterated nor its Hessian captured (its codes stay
    # in place) — so late rounds work only on the layers still moving. None: never.
    freeze_changed: float | None = None
    # coordinated: each round, per row, the better (on the refreshed Hessian) of the round's best
    # iterate and the codes the previous round left in place — so a round whose iterates are
    # still at small ρ cannot put worse codes in the model the next round calibrates on.
    coordinated_keep_best: bool = False
    def __post_init__(self) -> None:
        if self.row_block < 1:
            raise ValueError(f"row_block={self.row_block} must be at least 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} must be one of {SCHEDULES}")
        if self.coordinated_rounds < 1 or self.coordinated_iterations < 1:
            raise ValueError("coordinated_rounds and coordinated_iterations must be at least 1")
        if self.freeze_changed is not None and not 0 <= self.freeze_changed < 1:
            raise ValueError(f"freeze_changed={self.freeze_changed} must lie in [0, 1) or be null")
        if self.admm.w_update == "gradient":
            raise ValueError("admm.w_update='gradient' steps on calibration activations, which "
                             "the pipeline does not keep (it accumulates Hessians): use exact, "
                             "cg or auto (the solver function admmq(..., activations=X) runs "
                             "gradient steps)")
        if self.coordinated_start not in ("float", "sequential"):
            raise ValueError(f"coordinated_start={self.coordinated_start!r} must be 'float' or "
                             "'sequential'")
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty={self.penalty!r} must be one of {PENALTIES}")
        if self.refresh_dual not in REFRESH_DUALS:
            raise ValueError(f"refresh_dual={self.refresh_dual!r} must be one of {REFRESH_DUALS}")
        if self.segments is not None and self.segments < 1:
            raise ValueError(f"segments={self.segments} must be at least 1 (or null: one per worker)")
        if self.rounds < 0 or self.round_iterations < 1 or not self.round_rho_start > 0:
            raise ValueError("rounds must be >= 0, round_iterations >= 1, round_rho_start > 0")
        if self.schedule != "sequential" and self.method != "admmq":
            raise ValueError(f"the {self.schedule} schedule warm-starts ADMM-Q; use method admmq")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} must be one of {METHODS}")
        if self.local_search_sweeps is not None and self.local_search_sweeps < 0:
            raise ValueError(
                f"local_search_sweeps={self.local_search_sweeps} must be non-negative"
            )
        if self.scale_refits is not None and self.scale_refits < 0:
            raise ValueError(f"scale_refits={self.scale_refits} must be non-negative")

    def warm(self) -> "SolverSettings":
        """The settings of a depth-parallel correction round."""
        import dataclasses

        return dataclasses.replace(self, admm=dataclasses.replace(
            self.admm, rho_start=self.round_rho_start, iterations=self.round_iterations))

    def uses_eigh(self, width: int) -> bool:
        """Whether solving a layer with ``width`` inputs computes ADMM-Q's eigendecomposition."""
        return self.method == "admmq" and self.admm.w_update_for(width) == "exact"

    @property
    def sweeps(self) -> int:
        """The local-search sweeps that actually run after the method."""
        if self.local_search_sweeps is not None:
            return self.local_search_sweeps
        return 1 if self.method == "admmq" else 0

    @property
    def refits(self) -> int:
        """The scale refits that actually run after the polish."""
        if self.scale_refits is not None:
            return self.scale_refits
        return DEFAULT_ADMMQ_REFITS if self.method == "admmq" else 0


# Scale refits after ADMM-Q by default: measured on SmolLM2 layers (benchmarks/layer_quality.py).
DEFAULT_ADMMQ_REFITS = 1


def _polished(result: SolverResult, polished: SolverResult, start: float,
              **history) -> SolverResult:
    """``result`` (its method, iterations and warm-start state) with ``polished``'s codes,
    grid and loss, the time since ``start``, and ``history`` added to its own."""
    return dataclasses.replace(result, codes=polished.codes, grid=polished.grid,
                               weight=polished.weight, loss=polished.loss,
                               seconds=time.perf_counter() - start,
                               history={**result.history, **history})


def solve(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid,
          settings: SolverSettings = SolverSettings(), warm: dict | None = None,
          factors: HessianFactors | None = None,
          scale_dtype: torch.dtype | None = None) -> SolverResult:
    """Quantize ``weight`` (``[out, in]``) on ``grid`` against ``hessian`` (``[in, in]``).

    ``warm`` (ADMM-Q only): ``{"codes", "dual"}`` of an earlier run to start from, with
    ``settings.admm`` holding the warm schedule. The reported time and iterations include the
    local-search polish. ``factors`` (of ``hessian``) are shared with every other solve on the
    same Hessian (:mod:`admmq_dist.quant.factors`). With scale refits the result's grid is not
    ``grid``: its scales are refitted to the codes (rounded to ``scale_dtype``, the dtype the
    checkpoint stores them in; zero points unchanged).
    """
    start = time.perf_counter()
    if settings.method == "rtn":
        result = rtn(weight, hessian, grid)
    elif settings.method == "gptq":
        result = gptq(weight, hessian, grid, settings.gptq, factors)
    else:
        # ADMM-Q's GPTQ start uses the same GPTQ settings as the GPTQ method.
        result = admmq(weight, hessian, grid, settings.admm, gptq_settings=settings.gptq,
                       init_codes=None if warm is None else warm["codes"],
                       init_dual=None if warm is None else warm.get("dual"), factors=factors)
    if settings.sweeps:
        # GPTQ's and ADMM-Q's losses are the sweep's starting loss, bit for bit (RTN's takes
        # the Hessian in its own dtype).
        polished = local_search(weight, hessian, grid, result.codes, settings.sweeps,
                                method=result.method,
                                loss=None if settings.method == "rtn" else result.loss)
        result = _polished(result, polished, start, local_search_loss=polished.history["loss"])
    for _ in range(settings.refits):
        grid = refit_scales(weight, hessian, grid, result.codes, scale_dtype)
        polished = local_search(weight, hessian, grid, result.codes, max(settings.sweeps, 1),
                                method=result.method)
        result = _polished(result, polished, start, refit_loss=[
            *result.history.get("refit_loss", []), polished.loss])
    return result
