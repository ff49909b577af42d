"""What every solver returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..grid import Grid


@dataclass(frozen=True)
class SolverResult:
    """The quantized layer and how it was obtained.

    ``codes`` is int32 ``[out, in]`` in ``[0, 2**bits - 1]``; ``weight`` is the dequantised
    ``grid.scale * (codes - grid.zero)`` in float32; ``loss`` is the relative error
    ``tr(ΔHΔᵀ) / tr(W0 H W0ᵀ)`` on the undamped Hessian.
    """

    method: str
    codes: torch.Tensor
    grid: Grid
    weight: torch.Tensor
    loss: float
    iterations: int
    seconds: float
    history: dict[str, list[float]] = field(default_factory=dict)
    # What a later warm start needs (ADMM-Q: the unscaled dual "dual" [out, in] and "rho").
    state: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"method": self.method, "loss": self.loss, "iterations": self.iterations,
                "seconds": self.seconds}
