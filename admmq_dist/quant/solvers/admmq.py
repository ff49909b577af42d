"""ADMM-Q: the alternating direction method of multipliers for layer-wise quantization.

Solves ``min_W tr((W - W0) H (W - W0)ᵀ)`` subject to ``W`` on the grid, by the splitting ``W = Z``
with ``Z`` on the grid, in scaled dual form with a Jacobi-preconditioned penalty
``(ρ/2)‖(W - Z + U) D‖²``, ``D = diag(sqrt(H_jj))``. See ``shared/docs/admmq-algorithm.md`` §2–3.

Shapes: ``W, Z, U, W0`` are ``[m, n]`` (out, in); ``H`` is ``[n, n]``; ``d`` is ``[n]``.

The exact W-update runs in the eigenbasis of ``H̃ = D⁻¹ H D⁻¹ = V diag(ℓ) Vᵀ``. With the map
``R(M) = (M D) V`` the objective is ``Σ_ij R(M - W0)_ij² ℓ_j`` and the W-update is elementwise:
``R(W) = (R(W0) ℓ + ρ (R(Z) - R(U))) / (ℓ + ρ)``. ``R`` is linear, so ``R(U)`` follows ``U`` by the
same recurrence, and one iteration costs two GEMMs (back to ``W`` for the projection, forward with
the new ``Z``) while the true objective of every iterate comes free.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from ..grid import Grid, dequantize_codes
from ..factors import HessianFactors
from ..hessian import relative_loss
from .gptq import GPTQSettings, gptq
from .result import SolverResult
from .w_updates import ExactUpdate, InexactUpdate


@dataclass(frozen=True)
class ADMMSettings:
    """ADMM-Q settings. Penalties are in units of the unit-diagonal ``H̃``."""

    iterations: int = 150
    # A two-phase geometric schedule, measured on SmolLM2 layers (benchmarks/results/): the codes
    # settle between ρ ≈ 0.3 and ρ ≈ 2, so the schedule hurries (×1.1) from rho_start to
    # rho_slow_from and then grows by rho_growth_slow. Starting below 0.1 changes nothing but the
    # time; at an equal number of iterations this beats a single ×1.05 by ~0.7% of the loss, and
    # ×1.02 in the slow phase buys another ~0.6% for ~15% more time. rho_slow_from=None gives the
    # spec's single-rate schedule.
    rho_start: float = 0.1
    rho_growth: float = 1.1
    rho_slow_from: float | None = 0.3
    rho_growth_slow: float = 1.03
    init: Literal["gptq", "rtn"] = "gptq"
    # "auto": the exact update below cg_from_width inputs, CG at and above it. The exact update
    # needs one float64 eigh per Hessian and worker (n³, 24 bytes per entry while it runs: 18 GiB
    # at Llama-3-70B's down_proj, 28672 wide); CG needs none, for three times the iteration time
    # (six GEMMs for two) and ~0.5% more layer loss. Measured at Llama-3.2-1B shapes
    # (benchmarks/results/layer_shapes_1b_cpu.md) the eigh costs as much as the CG's extra time on
    # 0.04-0.065·n rows, so CG is the faster on a worker that solves fewer rows of a Hessian than
    # that: 70B's down_proj from 8 workers on (1,024 rows each), 405B (16384+ wide) from ~32. The
    # choice goes by width alone so that the result never depends on the number of workers.
    w_update: Literal["auto", "exact", "cg", "gradient"] = "auto"
    cg_from_width: int = 16384
    projection: Literal["hard", "soft", "random"] = "hard"
    # Early stop once the fraction of changed codes stays below stop_tolerance for stop_patience
    # iterations with ρ above stop_min_rho (at small ρ codes may rest and move again).
    stop_tolerance: float = 1e-4
    stop_patience: int = 5
    stop_min_rho: float = 1.0
    # Inexact W-updates. Five warm-started CG steps per iteration keep the layer loss within
    # ~0.5% of the exact update's on Llama-shaped layers; three lose ~2.5%, one or two ~8%.
    cg_steps: int = 5
    gradient_steps: int = 4
    gradient_batch_tokens: int = 2048
    # Soft projection: Z moves toward the grid by at most soft_strength * ‖scales‖ of its row.
    soft_strength: float = 0.3
    # Randomised projection: each coordinate is re-projected with this probability.
    random_probability: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"admm iterations={self.iterations} must be non-negative")
        if not self.rho_start > 0:
            raise ValueError(f"admm rho_start={self.rho_start} must be positive")
        if not self.rho_growth_slow >= 1:
            raise ValueError(f"admm rho_growth_slow={self.rho_growth_slow} must be at least 1")
        if self.rho_slow_from is not None and not self.rho_slow_from > 0:
            raise ValueError(f"admm rho_slow_from={self.rho_slow_from} must be positive")
        if not self.rho_growth >= 1:
            raise ValueError(f"admm rho_growth={self.rho_growth} must be at least 1")
        for name, allowed in (("init", ("gptq", "rtn")), ("w_update", ("auto", "exact", "cg", "gradient")),
                              ("projection", ("hard", "soft", "random"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"admm {name}={getattr(self, name)!r} must be one of {allowed}")
        if self.stop_patience < 1:
            raise ValueError(f"admm stop_patience={self.stop_patience} must be at least 1")
        if self.cg_from_width < 1:
            raise ValueError(f"admm cg_from_width={self.cg_from_width} must be at least 1")
        if self.cg_steps < 1 or self.gradient_steps < 1 or self.gradient_batch_tokens < 1:
            raise ValueError("admm cg_steps, gradient_steps and gradient_batch_tokens must be >= 1")
        if not self.soft_strength > 0:
            raise ValueError(f"admm soft_strength={self.soft_strength} must be positive")
        if not 0 < self.random_probability <= 1:
            raise ValueError(
                f"admm random_probability={self.random_probability} must lie in (0, 1]"
            )

    def w_update_for(self, width: int) -> str:
        """The W-update a layer with ``width`` inputs gets (``"auto"`` resolved)."""
        if self.w_update != "auto":
            return self.w_update
        return "cg" if width >= self.cg_from_width else "exact"


def admmq(weight: torch.Tensor, hessian: torch.Tensor | None, grid: Grid,
          settings: ADMMSettings = ADMMSettings(), *,
          activations: torch.Tensor | None = None,
          init_codes: torch.Tensor | None = None,
          init_dual: torch.Tensor | Literal["stationary"] | None = None,
          gptq_settings: GPTQSettings = GPTQSettings(),
          factors: HessianFactors | None = None) -> SolverResult:
    """Run ADMM-Q on one layer.

    ``weight``: ``[m, n]``; ``hessian``: ``[n, n]`` undamped ``X Xᵀ / N``. With
    ``w_update="gradient"`` the Hessian may be ``None`` and ``activations`` (``[N, n]`` calibration
    inputs) drive mini-batch gradient W-steps instead. ``init_codes`` overrides ``settings.init``;
    with ``init_dual`` (the unscaled dual ``Y = ρU`` of an earlier run, ``[m, n]``) the run is a warm
    start — a later round of the depth-parallel schedule, on a Hessian from quantized inputs;
    ``"stationary"`` sets the dual at which the initial codes are a fixed point of the W-step on
    this Hessian (:meth:`ExactUpdate.stationary_dual`).
    Returns the best iterate by the true objective (the initial codes included); ``state`` holds
    the final dual and ρ for the next warm start. ``factors`` (of ``hessian``) shares the
    eigendecomposition and GPTQ's start factor with every other solve on the same Hessian.
    """
    start = time.perf_counter()
    w0 = weight.float()
    device = w0.device
    if settings.w_update == "gradient" and activations is None:
        raise ValueError("w_update='gradient' takes gradient steps on calibration activations: "
                         "pass activations= (with a Hessian only, use exact, cg or auto)")
    if hessian is None:
        if activations is None:
            raise ValueError("admmq needs a Hessian or calibration activations")
        if settings.w_update not in ("gradient", "auto"):
            raise ValueError("without a Hessian only w_update='gradient' (or 'auto', which means "
                             "it there) can run; pass the Hessian")
        x = activations.reshape(-1, w0.shape[1]).to(device=device, dtype=torch.float32)
        h0 = None
    else:
        h0 = hessian.to(device=device, dtype=torch.float32)
        x = None
        if factors is None:
            factors = HessianFactors(h0)

    loop = _w_update(settings, w0, h0, factors, x, activations)
    if init_codes is not None:
        codes0 = init_codes.to(device=device, dtype=torch.int32)
    elif settings.init == "gptq" and h0 is not None:
        codes0 = gptq(w0, h0, grid, gptq_settings, factors).codes
    else:
        codes0 = grid.codes(loop.W0)  # dead input columns already zeroed
    dual0 = _start_dual(loop, init_dual, codes0, grid)
    best_codes, best_loss, iterations, history, rho, last = _run(loop, codes0, grid, settings,
                                                                 dual0)
    deq = grid.dequantize(best_codes)
    loss = relative_loss(deq, w0, h0) if h0 is not None else best_loss
    return SolverResult("admmq", best_codes, grid, deq, loss, iterations,
                        time.perf_counter() - start, history, state={"dual": loop.Y, "rho": rho,
                                                       "last_codes": grid.codes(last)})


def _w_update(settings: ADMMSettings, w0: torch.Tensor, h0: torch.Tensor | None,
              factors: HessianFactors | None, x: torch.Tensor | None,
              activations: torch.Tensor | None):
    """The W-update the settings ask for: gradient steps on the activations (whether or not a
    Hessian is given), the exact update, or CG."""
    if settings.w_update == "gradient":
        x = activations.reshape(-1, w0.shape[1]).to(device=w0.device, dtype=torch.float32)
        return InexactUpdate(w0, None, x, settings)
    if h0 is not None and settings.w_update_for(w0.shape[1]) == "exact":
        return ExactUpdate(w0, factors)
    return InexactUpdate(w0, factors, x, settings)


def _start_dual(loop, init_dual, codes0: torch.Tensor, grid: Grid) -> torch.Tensor | None:
    """The dual the run starts from: none, an earlier run's, or the stationary one of the
    initial codes."""
    if init_dual is None:
        return None
    if isinstance(init_dual, str):
        if init_dual != "stationary":
            raise ValueError(f"init_dual={init_dual!r}: a tensor, 'stationary' or None")
        scale, zero = grid.expanded()
        return loop.stationary_dual(dequantize_codes(codes0, scale, zero))
    return init_dual.to(device=codes0.device, dtype=torch.float32)


def _project(settings: ADMMSettings, V: torch.Tensor, P: torch.Tensor, Z: torch.Tensor, gen,
             row_scale_norm):
    """The Z-step's projection of ``V = W + U`` given its nearest grid points ``P``: ``(Z, the
    hard Z the soft variant also passes on or None, the codes' grid points)``."""
    if settings.projection == "hard":
        return P, None, P
    if settings.projection == "random":
        keep = torch.rand(P.shape, generator=gen, device=P.device) >= settings.random_probability
        Znew = torch.where(keep, Z, P)
        return Znew, None, Znew
    dist = (P - V).norm(dim=1, keepdim=True)
    t = settings.soft_strength * row_scale_norm
    frac = torch.where(dist <= t, torch.ones_like(dist), t / dist.clamp_min(1e-30))
    return V + frac * (P - V), P, P


def _run(loop, codes0: torch.Tensor, grid: Grid, settings: ADMMSettings,
         dual0: torch.Tensor | None = None):
    """The ADMM iterations; ``loop`` supplies the W-step. Returns the best codes row by row, the
    best loss, the iterations run, the history and the ρ the next iteration would have used."""
    scale, zero = grid.expanded()
    inv_scale = 1.0 / scale
    # clamp(round(v / s) + z, 0, maxq) - z == clamp(round(v / s), -z, maxq - z): z is an integer.
    low, high = -zero, grid.maxq - zero
    Z = dequantize_codes(codes0, scale, zero)
    # The objective is a sum over rows that do not interact, so the best iterate is kept row by
    # row: a row that oscillates is taken at its own best moment, not at the matrix's.
    best_rows = loop.start(Z, dual0)
    best_Z = Z
    # "residual" is the primal residual ‖W − Z‖_F per iteration (the report plots it beside ρ);
    # "weight_norm" holds ‖W0‖_F so that row blocks' residuals combine into a layer's. The figures
    # stay on the device until the run ends: the only value read back per iteration is the count
    # of changed codes, and only once ρ is high enough for it to stop the run.
    track: dict[str, list[torch.Tensor]] = {"loss": [best_rows.sum()], "best_loss": [],
                                            "changed": [], "residual": [], "dual_residual": []}
    rhos: list[float] = []
    gen = None
    if settings.projection == "random":
        gen = torch.Generator(device=Z.device).manual_seed(settings.seed)
    row_scale_norm = scale.norm(dim=1, keepdim=True) if settings.projection == "soft" else None
    hard = Z
    rho = settings.rho_start
    quiet = 0
    iterations = 0
    for it in range(settings.iterations):
        W = loop.w_step(rho)
        V = torch.add(W, loop.Y, alpha=1.0 / rho)  # W + U
        P = (V * inv_scale).round_().clamp_(low, high).mul_(scale)
        Znew, Zhard, new_hard = _project(settings, V, P, Z, gen, row_scale_norm)
        # Counting changed codes costs two passes; below stop_min_rho it only feeds the history.
        count = torch.count_nonzero(new_hard != hard) \
            if rho > settings.stop_min_rho or it % 5 == 0 else None
        track["changed"].append(count)
        track["residual"].append(torch.linalg.vector_norm(W - Znew))
        # The dual residual ρ‖Z − Z_prev‖_F (Boyd et al. §3.3): with the primal one, what a
        # coordinator balancing the penalty reads.
        track["dual_residual"].append(rho * torch.linalg.vector_norm(Znew - Z))
        rows_loss = loop.z_done(Znew, Zhard, rho)
        Z, hard = Znew, new_hard
        iterations = it + 1
        better = rows_loss < best_rows
        best_rows = torch.where(better, rows_loss, best_rows)
        best_Z = torch.where(better.unsqueeze(1), hard, best_Z)
        track["loss"].append(rows_loss.sum())
        track["best_loss"].append(best_rows.sum())
        rhos.append(rho)
        if rho > settings.stop_min_rho and int(count) / P.numel() < settings.stop_tolerance:
            quiet += 1
            if quiet >= settings.stop_patience:
                break
        else:
            quiet = 0
        slow = settings.rho_slow_from is not None and rho >= settings.rho_slow_from
        rho *= settings.rho_growth_slow if slow else settings.rho_growth
    history = _history(track, rhos, Z.numel(), loop.W0)
    return grid.codes(best_Z), float(best_rows.sum()), iterations, history, rho, hard


def _history(track: dict[str, list], rhos: list[float], size: int,
             W0: torch.Tensor) -> dict[str, list[float]]:
    """The run's figures as numbers, read back from the device once."""
    def floats(values: list[torch.Tensor]) -> list[float]:
        return torch.stack(values).tolist() if values else []

    return {"loss": floats(track["loss"]), "best_loss": floats(track["best_loss"]),
            "rho": rhos,
            "changed": [float("nan") if c is None else int(c) / size for c in track["changed"]],
            "residual": floats(track["residual"]),
            "dual_residual": floats(track["dual_residual"]),
            "weight_norm": [float(torch.linalg.vector_norm(W0))]}
