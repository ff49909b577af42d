"""A Hessian's factorizations, computed once and shared.

Every linear that reads the same input (q/k/v, gate/up) has the same Hessian, and a layer is
solved in row blocks; the factorizations depend on the Hessian alone, so one ``HessianFactors``
serves every row block of every such linear: ADMM-Q's eigendecomposition of the Jacobi-scaled
Hessian (the dominant one-off cost at wide inputs: an ``n³`` float64 ``eigh``) and GPTQ's
(act-order permuted, damped) upper Cholesky factor of the inverse. Each is computed on first use,
exactly as a solver alone would compute it, so sharing changes no byte; ``counts`` says how many
were computed.

Shapes: ``H`` is ``[n, n]``; ``ell`` ``[n]``; ``to_rotated``/``from_rotated`` ``[n, n]``.
"""

from __future__ import annotations

import torch

from .hessian import asymmetric_factor, condition_hessian, damp


class HessianFactors:
    """Factorizations of one (undamped) Hessian, on ``device``."""

    def __init__(self, hessian: torch.Tensor, device: torch.device | str | None = None) -> None:
        # GPTQ's dead-input rule, applied once: ``hessian`` is H with H_jj = 1 on ``dead`` inputs.
        self.hessian, self.dead = condition_hessian(
            hessian.to(device=device or hessian.device, dtype=torch.float32))
        self.counts = {"eigh": 0, "cholesky": 0, "asymmetric": 0}
        self._asymmetric: dict[float, torch.Tensor] = {}
        self._eigen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._gptq: dict[tuple, tuple[torch.Tensor | None, torch.Tensor]] = {}

    def eigen(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ℓ, D V, Vᵀ D⁻¹)`` with ``D⁻¹ H D⁻¹ = V diag(ℓ) Vᵀ``, ``D = diag(sqrt(H_jj))``:
        ADMM-Q's exact W-update runs in this basis (``R(M) = (M D) V`` is one GEMM each way)."""
        if self._eigen is None:
            H = self.hessian
            d = torch.sqrt(torch.diagonal(H)).double()
            evals, evecs = torch.linalg.eigh((H.double() / d[:, None]) / d[None, :])
            self._eigen = (evals.clamp_min(0).float(), (d[:, None] * evecs).float(),
                           (evecs.T / d[None, :]).float().contiguous())
            self.counts["eigh"] += 1
        return self._eigen

    def asymmetric(self, damping: float) -> torch.Tensor:
        """The float64 factor every linear reading this input moves its target with under
        asymmetric calibration (:func:`.hessian.asymmetric_factor`), computed once."""
        if damping not in self._asymmetric:
            self._asymmetric[damping] = asymmetric_factor(self.hessian, damping)
            self.counts["asymmetric"] += 1
        return self._asymmetric[damping]

    def gptq(self, act_order: bool, fraction: float, retry_factor: float,
             retries: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(act-order permutation or None, upper Cholesky factor of the damped inverse)``;
        the damping grows by ``retry_factor`` (up to ``retries`` times) where Cholesky fails."""
        key = (act_order, fraction, retry_factor, retries)
        if key not in self._gptq:
            H, perm = self.hessian, None
            if act_order:
                perm = torch.argsort(torch.diagonal(H), descending=True)
                H = H[perm][:, perm]
            self._gptq[key] = (perm, _upper_cholesky_of_inverse(H, fraction, retry_factor,
                                                                retries))
            self.counts["cholesky"] += 1
        return self._gptq[key]


def _upper_cholesky_of_inverse(hessian: torch.Tensor, fraction: float, retry_factor: float,
                               retries: int) -> torch.Tensor:
    for _ in range(retries + 1):
        L, info = torch.linalg.cholesky_ex(damp(hessian, fraction))
        if int(info) == 0:
            inv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return U
        fraction = max(fraction, 1e-4) * retry_factor
    raise ValueError(
        "the Hessian is not positive definite even with damping "
        f"{fraction / retry_factor:g}; the calibration data may be degenerate")
