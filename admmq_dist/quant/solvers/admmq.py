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

import contextlib
import time
from dataclasses import dataclass
from typing import Literal

import torch

from ..grid import Grid
from ..factors import HessianFactors
from ..hessian import relative_loss
from .gptq import GPTQSettings, gptq
from .admmq_iterations import run_iterations
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
    # needs one eigh per Hessian and worker (n³ in float32, 8 bytes per entry while it runs: 6 GiB
    # at Llama-3-70B's down_proj, 28672 wide); CG needs none, for three times the iteration time
    # (six GEMMs for two) and ~0.5% more layer loss. Measured at Llama-3.2-1B shapes
    # (benchmarks/results/layer_shapes_1b_cpu.md) the float32 eigh costs as much as the CG's extra
    # time on 0.014-0.026·n rows (0.04-0.065·n when this threshold was set with a float64 eigh),
    # so CG is the faster on a worker that solves fewer rows of a Hessian than that: 70B's
    # down_proj from ~16 workers on (512 rows each), no longer from 8. The threshold stays (it
    # also bounds the eigh's memory) until a GPU measures both. The choice goes by width alone so
    # that the result never depends on the number of workers.
    w_update: Literal["auto", "exact", "cg", "gradient"] = "auto"
    cg_from_width: int = 16384
    projection: Literal["hard", "soft", "random"] = "hard"
    # Early stop once the fraction of changed codes stays below stop_tolerance for stop_patience
    # iterations with ρ above stop_min_rho (at small ρ codes may rest and move again).
    stop_tolerance: float = 1e-4
    stop_patience: int = 5
    stop_min_rho: float = 1.0
    # Active rows (solvers/active_rows.py): a row whose codes have not moved for row_patience
    # iterations with ρ above row_min_rho (None: stop_min_rho) leaves the iteration, its best
    # iterate final; the W-update, projection, dual update and loss then run on the rows left.
    # The run stops when no row is left (or by the whole-matrix rule above, whichever first).
    active_rows: bool = False
    row_patience: int = 5
    row_min_rho: float | None = None
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
    # The iterations' float32 matrix products on a CUDA device: "tf32" on the tensor cores (10
    # mantissa bits in, float32 sums), "float32" in full. A CPU computes float32 either way.
    # Decided on a CPU by rounding the operands as the hardware does
    # (benchmarks/results/gemm_precision.md).
    products: Literal["float32", "tf32"] = "float32"

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
                              ("projection", ("hard", "soft", "random")),
                              ("products", ("float32", "tf32"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"admm {name}={getattr(self, name)!r} must be one of {allowed}")
        if self.stop_patience < 1:
            raise ValueError(f"admm stop_patience={self.stop_patience} must be at least 1")
        if self.row_patience < 1:
            raise ValueError(f"admm row_patience={self.row_patience} must be at least 1")
        if self.row_min_rho is not None and not self.row_min_rho > 0:
            raise ValueError(f"admm row_min_rho={self.row_min_rho} must be positive")
        if not isinstance(self.active_rows, bool):
            raise ValueError(f"admm active_rows={self.active_rows!r} must be true or false")
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

    def row_min_rho_for(self) -> float:
        """The ρ above which a row's quiet iterations count (active rows)."""
        return self.stop_min_rho if self.row_min_rho is None else self.row_min_rho

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
        codes0 = gptq(w0, h0, grid, gptq_settings, factors, with_loss=False).codes
    else:
        codes0 = grid.codes(loop.W0)  # dead input columns already zeroed
    dual0 = _start_dual(loop, init_dual, codes0, grid)
    with products_in(settings.products, device):
        best_codes, best_loss, iterations, history, rho, last, dual = run_iterations(
            loop, codes0, grid, settings, dual0)
    deq = grid.dequantize(best_codes)
    loss = relative_loss(deq, w0, h0) if h0 is not None else best_loss
    return SolverResult("admmq", best_codes, grid, deq, loss, iterations,
                        time.perf_counter() - start, history, state={"dual": dual, "rho": rho,
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
        return loop.stationary_dual(grid.dequantize(codes0))
    return init_dual.to(device=codes0.device, dtype=torch.float32)


@contextlib.contextmanager
def products_in(products: str, device: torch.device):
    """cuBLAS's float32 products in ``products`` ("tf32" or "float32") inside the block, on a
    CUDA ``device``; anywhere else nothing changes. torch's newer per-backend setting, restored
    on the way out."""
    if products == "float32" or device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = before
