"""Layer Hessians ``H = X Xᵀ / N`` from calibration activations, and their conditioning.

Why a tree and not GPTQ's running average: workers that each see a shard of the calibration
samples must merge their partial statistics into *exactly* the bytes a single pass would produce,
so that the quantized checkpoint does not depend on the number of workers. Floating-point sums
depend on their order, so every batch carries its global index, and partial sums are combined in
one canonical binary tree over those indices (pairwise summation, which is also more accurate than
a running sum). Any sharding of the batches — merged in any order — yields the same tree, hence the
same float32 result. At most ``log2(num_batches) + 1`` partial matrices are held at once.

A worker that sees every batch, in order (the coordinated schedule's), needs no tree to be
independent of the sharding: ``in_order=True`` keeps one running sum instead, a fifth of the
memory of the tree at 16 batches — which decides how many 70B blocks a GPU can hold there.
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Accumulates ``Σ x xᵀ`` over rows of activations ``x`` (``[..., n]``) in float32.

    Call :meth:`add` once per batch with that batch's global index (its position in the
    calibration set, the same however the set is sharded); :meth:`merge` folds in another shard's
    accumulator; :meth:`hessian` returns the average ``[n, n]``.

    With ``cross=True`` it also accumulates ``Σ (x_ref − x) xᵀ``, where ``x_ref`` is what the same
    tokens looked like in the float model (asymmetric calibration, :func:`asymmetric_target`), and
    ``Σ (x_ref − x)(x_ref − x)ᵀ``, which only the loss against the true asymmetric objective
    needs (:func:`asymmetric_loss_terms`).
    """

    def __init__(self, num_inputs: int, device: torch.device | str = "cpu",
                 cross: bool = False, in_order: bool = False) -> None:
        self.num_inputs = num_inputs
        self.device = torch.device(device)
        self.num_rows = 0
        # in_order: batches 0, 1, 2, ... and nothing merged; one running sum per statistic.
        self.in_order = in_order
        self._batches = 0
        # (level, index) -> sum over batches [index * 2**level, (index + 1) * 2**level)
        self._nodes: dict[tuple[int, int], torch.Tensor] = {}
        self._cross: dict[tuple[int, int], torch.Tensor] | None = {} if cross else None
        self._deviation: dict[tuple[int, int], torch.Tensor] | None = {} if cross else None

    @property
    def has_cross(self) -> bool:
        return self._cross is not None

    def add(self, activations: torch.Tensor, batch_index: int,
            reference: torch.Tensor | None = None) -> None:
        """Add one batch; ``activations`` is ``[..., num_inputs]`` in any float dtype, and
        ``reference`` (required with ``cross``) the float model's activations for the same tokens."""
        if activations.shape[-1] != self.num_inputs:
            raise ValueError(
                f"activations have {activations.shape[-1]} features, expected {self.num_inputs}"
            )
        if batch_index < 0:
            raise ValueError(f"batch_index must be non-negative, got {batch_index}")
        if (reference is None) == self.has_cross:
            raise ValueError("reference activations are required exactly when cross=True")
        if self.in_order and batch_index != self._batches:
            raise ValueError(f"batch {batch_index} added out of order (expected "
                             f"{self._batches}) to an in-order accumulator")
        x = activations.reshape(-1, self.num_inputs).to(device=self.device, dtype=torch.float32)
        if reference is not None:
            if reference.shape != activations.shape:
                raise ValueError(f"reference activations have shape {tuple(reference.shape)}, "
                                 f"expected {tuple(activations.shape)}")
            ref = reference.reshape(-1, self.num_inputs).to(device=self.device, dtype=torch.float32)
            delta = ref - x
            self._add(self._cross, batch_index, delta.T @ x)
            self._add(self._deviation, batch_index, delta.T @ delta)
        self._add(self._nodes, batch_index, x.T @ x)
        self.num_rows += x.shape[0]
        self._batches += 1

    def _add(self, nodes: dict, batch_index: int, value: torch.Tensor) -> None:
        if not self.in_order:
            self._insert(nodes, 0, batch_index, value)
        elif (0, 0) in nodes:
            nodes[(0, 0)].add_(value)
        else:
            nodes[(0, 0)] = value

    def merge(self, other: "HessianAccumulator") -> None:
        """Fold in a disjoint set of batches accumulated elsewhere (any order gives the same bytes)."""
        if other.num_inputs != self.num_inputs:
            raise ValueError(f"cannot merge Hessians of width {other.num_inputs} and {self.num_inputs}")
        if other.has_cross != self.has_cross:
            raise ValueError("cannot merge an accumulator with cross terms into one without")
        if self.in_order or other.in_order:
            raise ValueError("in-order accumulators hold every batch themselves; nothing merges")
        for (level, index), value in sorted(other._nodes.items()):
            self._insert(self._nodes, level, index, value.to(self.device))
        for (level, index), value in sorted((other._cross or {}).items()):
            self._insert(self._cross, level, index, value.to(self.device))
        for (level, index), value in sorted((other._deviation or {}).items()):
            self._insert(self._deviation, level, index, value.to(self.device))
        self.num_rows += other.num_rows

    @staticmethod
    def _insert(nodes: dict, level: int, index: int, value: torch.Tensor) -> None:
        if (level, index) in nodes:
            raise ValueError(f"batch range ({level}, {index}) was added twice")
        while (level, index ^ 1) in nodes:
            sibling = nodes.pop((level, index ^ 1))
            left, right = (sibling, value) if index & 1 else (value, sibling)
            value = left + right
            level, index = level + 1, index >> 1
        nodes[(level, index)] = value

    def state(self) -> dict:
        """A picklable snapshot (for moving partial sums between workers)."""
        out = {"num_inputs": self.num_inputs, "num_rows": self.num_rows,
               "nodes": {k: v.cpu() for k, v in self._nodes.items()}}
        if self._cross is not None:
            out["cross"] = {k: v.cpu() for k, v in self._cross.items()}
            out["deviation"] = {k: v.cpu() for k, v in self._deviation.items()}
        return out

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> "HessianAccumulator":
        acc = cls(state["num_inputs"], device, cross="cross" in state)
        acc.num_rows = state["num_rows"]
        acc._nodes = {k: v.to(acc.device) for k, v in state["nodes"].items()}
        if "cross" in state:
            acc._cross = {k: v.to(acc.device) for k, v in state["cross"].items()}
            acc._deviation = {k: v.to(acc.device) for k, v in state["deviation"].items()}
        return acc

    def _total(self, nodes: dict) -> torch.Tensor:
        if self.num_rows == 0:
            raise ValueError("no calibration activations were accumulated for this layer")
        total = None
        for key in sorted(nodes, key=lambda k: k[1] << k[0]):
            value = nodes[key]
            total = value.clone() if total is None else total + value
        return total / self.num_rows

    def hessian(self) -> torch.Tensor:
        """``Σ x xᵀ / num_rows`` as float32 ``[n, n]``; the remaining subtrees combine left to right."""
        return self._total(self._nodes)

    def cross(self) -> torch.Tensor:
        """``Σ (x_ref − x) xᵀ / num_rows`` as float32 ``[n, n]`` (``cross=True`` only)."""
        if self._cross is None:
            raise ValueError("this accumulator was made without cross terms")
        return self._total(self._cross)

    def deviation(self) -> torch.Tensor:
        """``Σ (x_ref − x)(x_ref − x)ᵀ / num_rows`` as float32 ``[n, n]`` (``cross=True``
        only)."""
        if self._deviation is None:
            raise ValueError("this accumulator was made without cross terms")
        return self._total(self._deviation)


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


def relative_loss(weight: torch.Tensor, reference: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(Δ H Δᵀ) / tr(W0 H W0ᵀ)`` with ``Δ = weight - reference``, in float64."""
    num, den = loss_terms(weight, reference, hessian)
    return num / den if den > 0 else num


def asymmetric_loss_terms(quantized: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor,
                          cross: torch.Tensor, deviation: torch.Tensor) -> tuple[float, float]:
    """``(‖W X_ref − Q X‖², ‖W X_ref‖²)`` per token, in float64: the true asymmetric objective
    (float weights on the float model's inputs against quantized weights on the quantized
    model's) whatever strength the solver ran with. Summed over row blocks they give the whole
    matrix's relative loss.

    With ``Δ = W − Q`` and ``ΔX = X_ref − X``: ``W X_ref − Q X = Δ X + W ΔX``, so the numerator is
    ``tr(Δ H Δᵀ) + 2 tr(W C Δᵀ) + tr(W D Wᵀ)`` — a sum of the parts, with no difference of large
    numbers. Shapes: quantized and weight ``[out, in]``; ``hessian`` (``X Xᵀ``), ``cross``
    (``ΔX Xᵀ``) and ``deviation`` (``ΔX ΔXᵀ``) ``[in, in]``, all averaged over tokens.
    """
    w = weight.double()
    delta = w - quantized.double()
    # C is not symmetric: (W C)[:, c] = W C[:, c], so C's columns are taken through Cᵀ's rows.
    dhd, whw = bilinear_sums([(delta, delta), (w, w)], hessian)
    wcd, wcw = bilinear_sums([(w, delta), (w, w)], cross.T)
    (wdw,) = bilinear_sums([(w, w)], deviation)
    num = dhd + 2 * wcd + wdw
    # X_ref X_refᵀ = H + C + Cᵀ + D
    den = whw + 2 * wcw + wdw
    return num, den


def asymmetric_factor(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """``[in, in]`` float64 lower Cholesky factor of ``H`` with dead inputs at 1 (as in
    :func:`condition`) damped by ``damping · mean(diag H)``: what :func:`asymmetric_target`
    solves with, the same for every linear that reads the same input (share it:
    :meth:`.factors.HessianFactors.asymmetric`)."""
    h = hessian.double()
    if h.data_ptr() == hessian.data_ptr():
        h = h.clone()
    dead = dead_inputs(hessian)
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * torch.diagonal(h).mean())
    factor = torch.linalg.cholesky(h)
    del h
    return factor


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
    :func:`condition`; ``factor``: :func:`asymmetric_factor` of them, when already computed.
    Shapes: weight ``[out, in]``, hessian and cross ``[in, in]``.
    """
    if strength == 0:
        return weight
    if factor is None:
        factor = asymmetric_factor(hessian, damping)
    correction = weight.double() @ cross.double()  # [out, in]
    # X H = C  <=>  H Xᵀ = Cᵀ (H symmetric)
    correction = torch.cholesky_solve(correction.T, factor).T
    return (weight.double() + strength * correction).to(weight.dtype)
