"""Layer Hessians ``H = X Xᵀ / N`` from calibration activations, and their conditioning;
the losses and the asymmetric target computed from them. The partial sums over calibration
batches are :mod:`.accumulator`'s (re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .accumulator import HessianAccumulator  # noqa: F401  (re-exported)


def dead_inputs(hessian: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: inputs that never carried signal (zero diagonal)."""
    return torch.diagonal(hessian) == 0


def condition(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's dead-input rule: ``H_jj = 1`` and ``W[:, j] = 0`` where ``H_jj == 0``.

    Such a column never affects the layer's output, so any value is optimal; zero keeps it small.
    Returns new ``(weight, hessian)``; the inputs are not modified.
    """
    if weight.shape[1] != hessian.shape[0]:
        raise ValueError(
            f"weight has {weight.shape[1]} inputs but the Hessian is {hessian.shape[0]} wide"
        )
    hessian, dead = condition_hessian(hessian)
    return zero_columns(weight, dead), hessian


def condition_hessian(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hessian half of :func:`condition`: ``(H with H_jj = 1 where dead, dead [n] bool)``."""
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"the Hessian must be square, got shape {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise ValueError("the Hessian holds NaN or Inf: the calibration activations overflowed")
    dead = dead_inputs(hessian)
    if not dead.any():
        return hessian, dead
    hessian = hessian.clone()
    idx = torch.nonzero(dead).squeeze(1)
    hessian[idx, idx] = 1.0
    return hessian, dead


def zero_columns(weight: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The weight half of :func:`condition`: dead input columns set to zero (a copy if any)."""
    if not dead.any():
        return weight
    weight = weight.clone()
    weight[:, dead] = 0
    return weight


def damp(hessian: torch.Tensor, fraction: float) -> torch.Tensor:
    """``H + fraction * mean(diag H) * I``: regularises factorisations; losses use the undamped H."""
    if fraction < 0:
        raise ValueError(f"damping fraction must be non-negative, got {fraction}")
    out = hessian.clone()
    out.diagonal().add_(fraction * torch.diagonal(hessian).mean())
    return out


# Rows of a Hessian taken into float64 at a time by the loss terms: a [256, 28672] float64 block
# is 59 MB, where a float64 copy of the whole is 6.6 GB.
LOSS_CHUNK = 256


def bilinear_sums(pairs: list[tuple[torch.Tensor, torch.Tensor]], matrix: torch.Tensor,
                  chunk: int = LOSS_CHUNK) -> list[float]:
    """``[Σ (a Mᵀ) ⊙ b for (a, b) in pairs]`` in float64 (``a M`` for a symmetric ``M``;
    pass ``Mᵀ`` for ``a M`` otherwise), with ``matrix`` ``M`` ``[in, in]`` in any float dtype and
    float64 ``a``, ``b`` ``[rows, in]``: ``M`` is taken into float64 ``chunk`` rows at a time
    (``(a Mᵀ)[:, c] = a M[c, :]ᵀ``), never copied whole."""
    totals = [0.0] * len(pairs)
    for start in range(0, matrix.shape[0], chunk):
        block = matrix[start:start + chunk].double()
        for k, (a, b) in enumerate(pairs):
            totals[k] += float(((a @ block.T) * b[:, start:start + chunk]).sum())
    return totals


def loss_terms(weight: torch.Tensor, reference: torch.Tensor,
               hessian: torch.Tensor) -> tuple[float, float]:
    """``(tr(Δ H Δᵀ), tr(W0 H W0ᵀ))`` with ``Δ = weight - reference``, in float64: summed over
    row blocks, they give the relative loss of the whole matrix."""
    delta = (weight - reference).double()
    w0 = reference.double()
    num, den = bilinear_sums([(delta, delta), (w0, w0)], hessian)
    return num, den


def relative_loss(weight: torch.Tensor, reference: torch.Tensor, hessian: torch.Tensor,
                  reference_term: float | None = None) -> float:
    """``tr(Δ H Δᵀ) / tr(W0 H W0ᵀ)`` with ``Δ = weight - reference``, in float64.
    ``reference_term``: the denominator when already taken (:func:`reference_term`: the same
    number), so that repeated losses of one layer cost one float64 GEMM each, not two."""
    if reference_term is None:
        num, den = loss_terms(weight, reference, hessian)
    else:
        delta = (weight - reference).double()
        (num,), den = bilinear_sums([(delta, delta)], hessian), reference_term
    return num / den if den > 0 else num


def reference_term(reference: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(W0 H W0ᵀ)``, the denominator of :func:`relative_loss`, bit for bit."""
    w0 = reference.double()
    (den,) = bilinear_sums([(w0, w0)], hessian)
    return den


def deviation_term(weight: torch.Tensor, deviation: torch.Tensor) -> float:
    """``tr(W D Wᵀ)`` of :func:`asymmetric_loss_terms` (``weight`` ``[rows, in]``, ``deviation``
    ``[in, in]``): it does not depend on the quantized weight, so a Hessian's owner can take it
    for every row block when the Hessian is merged and hand the number on instead of ``D``."""
    w = weight.double()
    (wdw,) = bilinear_sums([(w, w)], deviation)
    return wdw


def asymmetric_loss_terms(quantized: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor,
                          cross: torch.Tensor, deviation: torch.Tensor | float
                          ) -> tuple[float, float]:
    """``(‖W X_ref − Q X‖², ‖W X_ref‖²)`` per token, in float64: the true asymmetric objective
    (float weights on the float model's inputs against quantized weights on the quantized
    model's) whatever strength the solver ran with. Summed over row blocks they give the whole
    matrix's relative loss.

    With ``Δ = W − Q`` and ``ΔX = X_ref − X``: ``W X_ref − Q X = Δ X + W ΔX``, so the numerator is
    ``tr(Δ H Δᵀ) + 2 tr(W C Δᵀ) + tr(W D Wᵀ)`` — a sum of the parts, with no difference of large
    numbers. Shapes: quantized and weight ``[out, in]``; ``hessian`` (``X Xᵀ``), ``cross``
    (``ΔX Xᵀ``) and ``deviation`` (``ΔX ΔXᵀ``) ``[in, in]``, all averaged over tokens — or
    ``deviation`` its :func:`deviation_term` for these rows, taken earlier (the same number).
    """
    w = weight.double()
    delta = w - quantized.double()
    # C is not symmetric: (W C)[:, c] = W C[:, c], so C's columns are taken through Cᵀ's rows.
    dhd, whw = bilinear_sums([(delta, delta), (w, w)], hessian)
    wcd, wcw = bilinear_sums([(w, delta), (w, w)], cross.T)
    wdw = deviation_term(w, deviation) if isinstance(deviation, torch.Tensor) else deviation
    num = dhd + 2 * wcd + wdw
    # X_ref X_refᵀ = H + C + Cᵀ + D
    den = whw + 2 * wcw + wdw
    return num, den


def asymmetric_factor(hessian: torch.Tensor, damping: float,
                      device: torch.device | None = None) -> torch.Tensor:
    """``[in, in]`` float64 lower Cholesky factor of ``H`` with dead inputs at 1 (as in
    :func:`condition`) damped by ``damping · mean(diag H)``: what :func:`asymmetric_target`
    solves with, the same for every linear that reads the same input (share it:
    :meth:`.factors.HessianFactors.asymmetric`).

    Factorized in place: the float64 copy is made column-major (LAPACK's layout, the layout of
    ``torch.linalg.cholesky``'s result), so the factor overwrites it — 8 bytes per entry in all,
    the factor itself, and the bytes of the out-of-place factorization. ``device`` (default
    ``H``'s): where the damping and the factorization are computed; ``H`` may wait on the host
    meanwhile (the copy and the dead inputs are exact anywhere)."""
    n = hessian.shape[0]
    h = torch.empty_strided((n, n), (1, n), dtype=torch.float64, device=hessian.device)
    h.copy_(hessian)
    dead = dead_inputs(hessian)
    h[dead, dead] = 1.0
    h = h.to(device or hessian.device)  # keeps the column-major layout
    h.diagonal().add_(damping * torch.diagonal(h).mean())
    return torch.linalg.cholesky(h, out=h)


def asymmetric_target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor,
                      strength: float, damping: float,
                      factor: torch.Tensor | None = None) -> torch.Tensor:
    """The weight whose layer loss on the quantized model's inputs is GPTAQ's asymmetric objective.

    ``‖W X_ref − Q X‖²`` (float weights on the float model's inputs ``X_ref``, quantized weights on
    the quantized model's inputs ``X``) equals ``‖(Q − W̃) X‖²`` up to a constant, with
    ``W̃ = W + W ΔXXᵀ H⁻¹`` (``ΔXXᵀ = cross``, ``H = hessian``, both averaged over tokens). So any
    solver of the ordinary problem solves the asymmetric one when handed ``W̃`` as its target.
    ``strength`` scales the correction (GPTAQ uses 0.25: the exact ``W̃`` over-fits the calibration
    tokens); ``H`` is damped by ``damping · mean(diag H)`` and dead inputs are treated as in
    :func:`condition`; ``factor``: :func:`asymmetric_factor` of them, when already computed (or
    a function computing it: :func:`asymmetric_targets`). Shapes: weight ``[out, in]``, hessian
    and cross ``[in, in]``.
    """
    if strength == 0:
        return weight
    return asymmetric_targets({"": weight}, hessian, cross, strength, damping, factor)[""]


def asymmetric_targets(weights: dict[str, torch.Tensor], hessian: torch.Tensor,
                       cross: torch.Tensor, strength: float, damping: float,
                       factor: torch.Tensor | Callable[[], torch.Tensor] | None = None,
                       dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """:func:`asymmetric_target` of every weight reading the same input (``{name: [out, in]}``,
    in ``dtype``, default each weight's), the same bytes, in less memory: every correction
    ``W C`` is formed while the float64 copy of ``C`` exists, and only then is the float64
    factor computed (``factor`` a function: on demand), so the two ``[in, in]`` float64 arrays
    never coexist; the caller may drop the factor as soon as this returns. Computed on the
    weights' device; ``cross`` (and ``hessian``) may wait on the host meanwhile."""
    if strength == 0:
        return {name: w if dtype is None else w.to(dtype) for name, w in weights.items()}
    device = next(iter(weights.values())).device
    c64 = cross.double().to(device)  # converted where it is: exact, and the same bytes
    if factor is None:
        factor = lambda: asymmetric_factor(hessian, damping, device)  # noqa: E731
    corrections = {name: w.double() @ c64 for name, w in weights.items()}  # [out, in] each
    del c64
    if callable(factor):
        factor = factor()
    out = {}
    for name, w in weights.items():
        # X H = C  <=>  H Xᵀ = Cᵀ (H symmetric)
        moved = torch.cholesky_solve(corrections.pop(name).T, factor).T
        # W + s·X: addition commutes bit for bit, and W enters as float64 exactly.
        out[name] = moved.mul_(strength).add_(w).to(w.dtype if dtype is None else dtype)
        del moved
    return out
