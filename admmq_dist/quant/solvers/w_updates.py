"""ADMM-Q's W-updates: each holds ``W``, the unscaled dual ``Y = ρU`` and the reference ``W0``,
makes the W-step for a ρ and, once the projection has set ``Z``, updates the dual and returns each
row's true loss of the iterate (see :mod:`.admmq`).

Shapes: ``W, Z, Y, W0`` are ``[m, n]`` (out, in); ``H`` is ``[n, n]``; ``d2`` is ``[n]``.
"""

from __future__ import annotations

import torch

from ..factors import HessianFactors
from ..hessian import zero_columns
from .active_rows import compact


class ExactUpdate:
    """The exact W-update in the eigenbasis of the Jacobi-preconditioned Hessian.

    Holds the unscaled dual ``Y = ρ U`` (and ``R(Y)``): it is continuous when ρ changes, so the
    spec's rescaling ``U ← U / τ`` needs no work of its own.
    """

    def __init__(self, w0: torch.Tensor, factors: HessianFactors):
        if w0.shape[1] != factors.hessian.shape[0]:
            raise ValueError(f"weight has {w0.shape[1]} inputs but the Hessian is "
                             f"{factors.hessian.shape[0]} wide")
        self.W0 = zero_columns(w0, factors.dead)
        # R(M) = (M D) V and its inverse, with D folded into the matrices: one GEMM each.
        self.ell, self.to_rotated, self.from_rotated = factors.eigen()
        self.RW0 = self.W0 @ self.to_rotated
        self.RW0_ell = self.RW0 * self.ell
        norm = float(((self.RW0 ** 2) @ self.ell).sum())
        self.norm = norm if norm > 0 else 1.0

    def start(self, Z: torch.Tensor, Y: torch.Tensor | None = None) -> torch.Tensor:
        self.RZ = Z @ self.to_rotated
        self.Y = torch.zeros_like(Z) if Y is None else Y.clone()
        self.RY = torch.zeros_like(self.RZ) if Y is None else self.Y @ self.to_rotated
        return self.row_loss_rotated(self.RZ)

    def stationary_dual(self, Z: torch.Tensor) -> torch.Tensor:
        """The dual ``Y`` at which ``Z`` is a fixed point of the W-step, whatever ρ: from
        ``(ℓ + ρ) R(W) = R(W0) ℓ + ρ R(Z) - R(Y)`` with ``W = Z``, ``R(Y) = (R(W0) - R(Z)) ℓ`` —
        the objective's negative gradient at ``Z`` in the penalty's metric."""
        return ((self.RW0 - Z @ self.to_rotated) * self.ell) @ self.from_rotated

    def row_loss_rotated(self, RZ: torch.Tensor) -> torch.Tensor:
        E = RZ - self.RW0
        return (E.square_() @ self.ell) / self.norm

    def w_step(self, rho: float) -> torch.Tensor:
        # R(W) = (R(W0) ℓ + ρ R(Z) - R(Y)) / (ℓ + ρ)
        RW = torch.add(self.RW0_ell, self.RZ, alpha=rho).sub_(self.RY)
        self.RW = RW.mul_(1.0 / (self.ell + rho))
        self.W = self.RW @ self.from_rotated
        return self.W

    def z_done(self, Z: torch.Tensor, Zhard: torch.Tensor | None, rho: float) -> torch.Tensor:
        """Record the new ``Z``; returns each row's true loss of the hard projection."""
        RZ = Z @ self.to_rotated
        self.Y.add_(self.W, alpha=rho).sub_(Z, alpha=rho)
        self.RY.add_(self.RW, alpha=rho).sub_(RZ, alpha=rho)
        self.RZ = RZ
        if Zhard is None:
            return self.row_loss_rotated(RZ)
        return self.row_loss_rotated(Zhard @ self.to_rotated)

    def keep(self, index: torch.Tensor, memo: dict) -> None:
        """Keep only rows ``index`` of the row state (active rows, :mod:`.active_rows`); the last
        W-step's ``W`` is dropped, the next one makes it."""
        self.W = self.RW = None
        _keep_rows(self, ("W0", "RW0", "RW0_ell", "RZ", "Y", "RY"), index, memo)


class InexactUpdate:
    """Inexact W-updates: warm-started conjugate gradient on H, or mini-batch gradient steps on
    calibration activations (no ``n×n`` matrix formed)."""

    def __init__(self, w0, factors: HessianFactors | None, x, settings):
        self.settings = settings
        if factors is not None:
            self.W0, self.H = zero_columns(w0, factors.dead), factors.hessian
            self.d2 = torch.diagonal(self.H).clone()
            self.W0H = self.W0 @ self.H
        else:
            self.W0, self.H = w0, None
            self.x = x
            self.d2 = (x * x).mean(dim=0)
            dead = self.d2 == 0
            self.W0 = w0.clone()
            self.W0[:, dead] = 0
            self.d2[dead] = 1.0
            self.gen = torch.Generator(device=x.device).manual_seed(settings.seed + 1)
            # Steps are Jacobi-preconditioned (scaled by D⁻²), so the bound is on H̃ = D⁻¹ H D⁻¹.
            self.lmax = top_eigenvalue(x / torch.sqrt(self.d2), self.gen)
        self.norm = 1.0
        self.norm = float(self._row_loss(torch.zeros_like(self.W0)).sum())
        self.norm = self.norm if self.norm > 0 else 1.0

    def _apply_h(self, M: torch.Tensor) -> torch.Tensor:
        return M @ self.H

    def _row_loss(self, Z: torch.Tensor) -> torch.Tensor:
        """``[m]``: each row's share of the objective, over the norm."""
        delta = Z - self.W0
        if self.H is not None:
            return (self._apply_h(delta) * delta).sum(dim=1) / self.norm
        total = torch.zeros(delta.shape[0], device=delta.device)
        for chunk in torch.split(self.x, 8192):
            total += ((chunk @ delta.T) ** 2).sum(dim=0)
        return total / (self.x.shape[0] * self.norm)

    def stationary_dual(self, Z: torch.Tensor) -> torch.Tensor:
        """The dual ``Y`` at which ``Z`` solves the W-step, whatever ρ: from
        ``W (H + ρD²) = W0 H + ρ Z D² - Y D²`` with ``W = Z``, ``Y = (W0 - Z) H D⁻²``."""
        if self.H is None:
            raise ValueError("the stationary dual needs the Hessian (not the gradient W-update)")
        return (self.W0H - Z @ self.H) / self.d2.clamp_min(1e-30)

    def start(self, Z: torch.Tensor, Y: torch.Tensor | None = None) -> torch.Tensor:
        self.Z = Z
        self.Y = torch.zeros_like(Z) if Y is None else Y.clone()
        self.W = Z.clone()
        if self.H is not None:
            self.WH = self.W @ self.H
        return self._row_loss(Z)

    def w_step(self, rho: float) -> torch.Tensor:
        s = self.settings
        target = self.Z - self.Y / rho
        if self.H is not None:
            # Row-batched Jacobi-preconditioned CG on W (H + ρD²) = W0 H + ρ (Z - U) D². W H is
            # carried along (W H += α p H) so that a step costs one GEMM, p H, and an iteration
            # cg_steps + 1 with the objective's (the exact update costs 2 and one eigh).
            rhs = self.W0H + rho * target * self.d2
            precond = 1.0 / (torch.diagonal(self.H) + rho * self.d2)
            W, WH = self.W, self.WH
            r = rhs - (WH + rho * W * self.d2)
            z = r * precond
            p = z.clone()
            rz = (r * z).sum(dim=1, keepdim=True)
            for _ in range(s.cg_steps):
                pH = self._apply_h(p)
                Ap = pH + rho * p * self.d2
                alpha = rz / (p * Ap).sum(dim=1, keepdim=True).clamp_min(1e-30)
                W = W + alpha * p
                WH = WH + alpha * pH
                r = r - alpha * Ap
                z = r * precond
                rz_new = (r * z).sum(dim=1, keepdim=True)
                p = z + (rz_new / rz.clamp_min(1e-30)) * p
                rz = rz_new
            self.WH = WH
        else:
            # Mini-batch gradient steps: (W - W0) H ≈ ((W - W0) X_Bᵀ) X_B / |B|, preconditioned
            # by D⁻² so that one step size suits quiet and outlier channels alike.
            W = self.W
            eta = 1.0 / (self.lmax + rho)
            n_tok = self.x.shape[0]
            for _ in range(s.gradient_steps):
                idx = torch.randint(0, n_tok, (min(s.gradient_batch_tokens, n_tok),),
                                    generator=self.gen, device=self.x.device)
                xb = self.x[idx]
                grad = ((W - self.W0) @ xb.T) @ xb / xb.shape[0] + rho * (W - target) * self.d2
                W = W - eta * grad / self.d2
        self.W = W
        return W

    def z_done(self, Z: torch.Tensor, Zhard: torch.Tensor | None, rho: float) -> torch.Tensor:
        self.Y.add_(self.W, alpha=rho).sub_(Z, alpha=rho)
        self.Z = Z
        return self._row_loss(Z if Zhard is None else Zhard)

    def keep(self, index: torch.Tensor, memo: dict) -> None:
        """Keep only rows ``index`` of the row state (active rows, :mod:`.active_rows`)."""
        _keep_rows(self, ("W0", "W0H", "Z", "Y", "W", "WH"), index, memo)


def _keep_rows(loop, names: tuple[str, ...], index: torch.Tensor, memo: dict) -> None:
    state = {name: getattr(loop, name, None) for name in names}
    compact(state, index, memo)
    for name, value in state.items():
        if value is not None:
            setattr(loop, name, value)


def top_eigenvalue(x: torch.Tensor, gen: torch.Generator, steps: int = 30) -> float:
    """Largest eigenvalue of ``xᵀ x / N`` by power iteration (the gradient step's Lipschitz bound)."""
    v = torch.randn(x.shape[1], generator=gen, device=x.device)
    lam = 0.0
    for _ in range(steps):
        w = (x.T @ (x @ v)) / x.shape[0]
        lam = float(w.norm())
        if lam == 0:
            return 1.0
        v = w / lam
    return lam * 1.05  # a margin: power iteration approaches λmax from below
