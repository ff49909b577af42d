"""A Hessian's factorizations, computed once and shared.

Every linear that reads the same input (q/k/v, gate/up) has the same Hessian, and a layer is
solved in row blocks; the factorizations depend on the Hessian alone, so one ``HessianFactors``
serves every row block of every such linear: ADMM-Q's eigendecomposition of the Jacobi-scaled
Hessian (the dominant one-off cost at wide inputs: an ``n³`` ``eigh``, in float32) and GPTQ's
(act-order permuted, damped) upper Cholesky factor of the inverse. Each is computed on first use,
exactly as a solver alone would compute it, so sharing changes no byte; ``counts`` says how many
were computed. The Cholesky factors are computed in place (the bytes of the out-of-place chains,
in the memory of their result: what decides whether a 53248-wide down_proj fits a GPU).

Shapes: ``H`` is ``[n, n]``; ``ell`` ``[n]``; ``to_rotated``/``from_rotated`` ``[n, n]``.
"""

from __future__ import annotations

import torch

from .hessian import asymmetric_factor, condition_hessian


class HessianFactors:
    """Factorizations of one (undamped) Hessian, on ``device``."""

    def __init__(self, hessian: torch.Tensor, device: torch.device | str | None = None) -> None:
        # GPTQ's dead-input rule, applied once: ``hessian`` is H with H_jj = 1 on ``dead`` inputs.
        self.hessian, self.dead = condition_hessian(
            hessian.to(device=device or hessian.device, dtype=torch.float32))
        # Where the factorizations are computed (``hessian`` may wait on the host for a while).
        self.device = self.hessian.device
        self.counts = {"eigh": 0, "cholesky": 0, "asymmetric": 0}
        self._asymmetric: dict[float, torch.Tensor] = {}
        self._eigen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._gptq: dict[tuple, tuple[torch.Tensor | None, torch.Tensor]] = {}

    def eigen(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ℓ, D V, Vᵀ D⁻¹)`` with ``D⁻¹ H D⁻¹ = V diag(ℓ) Vᵀ``, ``D = diag(sqrt(H_jj))``:
        ADMM-Q's exact W-update runs in this basis (``R(M) = (M D) V`` is one GEMM each way)."""
        if self._eigen is None:
            # In float32: half the time and memory of float64 at no cost in loss (benchmarks/
            # eigh_precision.md: final loss ratio 0.9978-1.0019 over 21 real layers); ADMM-Q adds
            # rho to every eigenvalue, so the small ones' lost digits do not reach the solution.
            try:
                evals, evecs, d = _scaled_eigh(self.hessian, torch.float32)
            except torch.linalg.LinAlgError:  # LAPACK did not converge: float64 does
                evals, evecs, d = _scaled_eigh(self.hessian, torch.float64)
            self._eigen = (evals.clamp_min(0).float(), (d[:, None] * evecs).float(),
                           (evecs.T / d[None, :]).float().contiguous())
            self.counts["eigh"] += 1
        return self._eigen

    def asymmetric(self, damping: float) -> torch.Tensor:
        """The float64 factor every linear reading this input moves its target with under
        asymmetric calibration (:func:`.hessian.asymmetric_factor`), computed once."""
        if damping not in self._asymmetric:
            self._asymmetric[damping] = asymmetric_factor(self.hessian, damping, self.device)
            self.counts["asymmetric"] += 1
        return self._asymmetric[damping]

    def drop_asymmetric(self) -> None:
        """Forget the asymmetric factors (8 bytes per entry each): once every target that
        needs one is moved (:func:`.hessian.asymmetric_targets`), nothing else reads them."""
        self._asymmetric = {}

    def gptq(self, act_order: bool, fraction: float, retry_factor: float,
             retries: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(act-order permutation or None, upper Cholesky factor of the damped inverse)``;
        the damping grows by ``retry_factor`` (up to ``retries`` times) where Cholesky fails."""
        key = (act_order, fraction, retry_factor, retries)
        if key not in self._gptq:
            H, perm = self.hessian, None
            if act_order:
                perm = torch.argsort(torch.diagonal(H), descending=True)
            self._gptq[key] = (perm, _upper_cholesky_of_inverse(H, perm, fraction, retry_factor,
                                                                retries))
            self.counts["cholesky"] += 1
        return self._gptq[key]


def _scaled_eigh(H: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ℓ, V, d)``: ``eigh`` of the Jacobi-scaled ``D⁻¹ H D⁻¹`` in ``dtype``, ``d = sqrt(H_jj)``."""
    d = torch.sqrt(torch.diagonal(H)).to(dtype)
    scaled = H.to(dtype, copy=True)
    scaled /= d[:, None]
    scaled /= d[None, :]
    evals, evecs = torch.linalg.eigh(scaled)
    return evals, evecs, d


def _damped_permuted(hessian: torch.Tensor, perm: torch.Tensor | None,
                     fraction: float) -> torch.Tensor:
    """``damp(H[perm][:, perm], fraction)`` as a column-major ``[n, n]`` (the layout LAPACK
    factorizes in place, and that of torch's factors): its transpose is gathered into a
    row-major buffer ``PERMUTE_ROWS`` rows at a time, so there is no second ``[n, n]`` copy (and
    ``H`` need not be exactly symmetric: the column-major view is the permuted ``H`` itself)."""
    n = hessian.shape[0]
    rows = torch.empty((n, n), dtype=hessian.dtype, device=hessian.device)
    if perm is None:
        rows.copy_(hessian.mT)
    else:
        for start in range(0, n, PERMUTE_ROWS):
            rows[start:start + PERMUTE_ROWS] = hessian.index_select(
                1, perm[start:start + PERMUTE_ROWS]).index_select(0, perm).T
    out = rows.mT
    out.diagonal().add_(fraction * torch.diagonal(out).mean())
    return out


# Rows of the permuted Hessian gathered at a time by :func:`_damped_permuted`.
PERMUTE_ROWS = 64


def _upper_cholesky_of_inverse(hessian: torch.Tensor, perm: torch.Tensor | None,
                               fraction: float, retry_factor: float,
                               retries: int) -> torch.Tensor:
    """GPTQ's factor of ``H[perm][:, perm]``, damped, computed in place: the damped permuted
    copy, its Cholesky factor, the inverse and the inverse's upper factor are one ``[n, n]``
    array in turn (4 bytes per entry in all: the result; on a GPU cuSOLVER's inverse works on a
    copy of the factor, 4 more), where the out-of-place chain held up to four — the same bytes
    (the factor's layout is torch's own, column-major; no step reads its input after writing
    its output, so aliasing them is safe on either device)."""
    info = torch.empty((), dtype=torch.int32, device=hessian.device)
    for _ in range(retries + 1):
        A = _damped_permuted(hessian, perm, fraction)
        torch.linalg.cholesky_ex(A, out=(A, info))
        if int(info) == 0:
            torch.cholesky_inverse(A, out=A)
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
            if int(info) == 0:
                return A
        del A
        fraction = max(fraction, 1e-4) * retry_factor
    raise ValueError(
        "the Hessian is not positive definite even with damping "
        f"{fraction / retry_factor:g}; the calibration data may be degenerate")
