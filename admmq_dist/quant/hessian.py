"""Layer Hessians ``H = X Xᵀ / N`` from calibration activations, and their conditioning.

Why a tree and not GPTQ's running average: workers that each see a shard of the calibration
samples must merge their partial statistics into *exactly* the bytes a single pass would produce,
so that the quantized checkpoint does not depend on the number of workers. Floating-point sums
depend on their order, so every batch carries its global index, and partial sums are combined in
one canonical binary tree over those indices (pairwise summation, which is also more accurate than
a running sum). Any sharding of the batches — merged in any order — yields the same tree, hence the
same float32 result. At most ``log2(num_batches) + 1`` partial matrices are held at once.
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Accumulates ``Σ x xᵀ`` over rows of activations ``x`` (``[..., n]``) in float32.

    Call :meth:`add` once per batch with that batch's global index (its position in the
    calibration set, the same however the set is sharded); :meth:`merge` folds in another shard's
    accumulator; :meth:`hessian` returns the average ``[n, n]``.
    """

    def __init__(self, num_inputs: int, device: torch.device | str = "cpu") -> None:
        self.num_inputs = num_inputs
        self.device = torch.device(device)
        self.num_rows = 0
        # (level, index) -> sum over batches [index * 2**level, (index + 1) * 2**level)
        self._nodes: dict[tuple[int, int], torch.Tensor] = {}

    def add(self, activations: torch.Tensor, batch_index: int) -> None:
        """Add one batch; ``activations`` is ``[..., num_inputs]`` in any float dtype."""
        if activations.shape[-1] != self.num_inputs:
            raise ValueError(
                f"activations have {activations.shape[-1]} features, expected {self.num_inputs}"
            )
        if batch_index < 0:
            raise ValueError(f"batch_index must be non-negative, got {batch_index}")
        x = activations.reshape(-1, self.num_inputs).to(device=self.device, dtype=torch.float32)
        self._insert(0, batch_index, x.T @ x, x.shape[0])

    def merge(self, other: "HessianAccumulator") -> None:
        """Fold in a disjoint set of batches accumulated elsewhere (any order gives the same bytes)."""
        if other.num_inputs != self.num_inputs:
            raise ValueError(f"cannot merge Hessians of width {other.num_inputs} and {self.num_inputs}")
        for (level, index), value in sorted(other._nodes.items()):
            self._insert(level, index, value.to(self.device), 0)
        self.num_rows += other.num_rows

    def _insert(self, level: int, index: int, value: torch.Tensor, rows: int) -> None:
        if (level, index) in self._nodes:
            raise ValueError(f"batch range ({level}, {index}) was added twice")
        self.num_rows += rows
        while (level, index ^ 1) in self._nodes:
            sibling = self._nodes.pop((level, index ^ 1))
            left, right = (sibling, value) if index & 1 else (value, sibling)
            value = left + right
            level, index = level + 1, index >> 1
        self._nodes[(level, index)] = value

    def state(self) -> dict:
        """A picklable snapshot (for moving partial sums between workers)."""
        return {"num_inputs": self.num_inputs, "num_rows": self.num_rows,
                "nodes": {k: v.cpu() for k, v in self._nodes.items()}}

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> "HessianAccumulator":
        acc = cls(state["num_inputs"], device)
        acc.num_rows = state["num_rows"]
        acc._nodes = {k: v.to(acc.device) for k, v in state["nodes"].items()}
        return acc

    def hessian(self) -> torch.Tensor:
        """``Σ x xᵀ / num_rows`` as float32 ``[n, n]``; the remaining subtrees combine left to right."""
        if self.num_rows == 0:
            raise ValueError("no calibration activations were accumulated for this layer")
        total = None
        for key in sorted(self._nodes, key=lambda k: k[1] << k[0]):
            value = self._nodes[key]
            total = value.clone() if total is None else total + value
        return total / self.num_rows


def dead_inputs(hessian: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: inputs that never carried signal (zero diagonal)."""
    return torch.diagonal(hessian) == 0


def condition(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's dead-input rule: ``H_jj = 1`` and ``W[:, j] = 0`` where ``H_jj == 0``.

    Such a column never affects the layer's output, so any value is optimal; zero keeps it small.
    Returns new ``(weight, hessian)``; the inputs are not modified.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"the Hessian must be square, got shape {tuple(hessian.shape)}")
    if weight.shape[1] != hessian.shape[0]:
        raise ValueError(
            f"weight has {weight.shape[1]} inputs but the Hessian is {hessian.shape[0]} wide"
        )
    if not torch.isfinite(hessian).all():
        raise ValueError("the Hessian holds NaN or Inf: the calibration activations overflowed")
    dead = dead_inputs(hessian)
    if not dead.any():
        return weight, hessian
    weight = weight.clone()
    hessian = hessian.clone()
    weight[:, dead] = 0
    idx = torch.nonzero(dead).squeeze(1)
    hessian[idx, idx] = 1.0
    return weight, hessian


def damp(hessian: torch.Tensor, fraction: float) -> torch.Tensor:
    """``H + fraction * mean(diag H) * I``: regularises factorisations; losses use the undamped H."""
    if fraction < 0:
        raise ValueError(f"damping fraction must be non-negative, got {fraction}")
    out = hessian.clone()
    out.diagonal().add_(fraction * torch.diagonal(hessian).mean())
    return out


def loss_terms(weight: torch.Tensor, reference: torch.Tensor,
               hessian: torch.Tensor) -> tuple[float, float]:
    """``(tr(Δ H Δᵀ), tr(W0 H W0ᵀ))`` with ``Δ = weight - reference``, in float64: summed over
    row blocks, they give the relative loss of the whole matrix."""
    h = hessian.double()
    delta = (weight - reference).double()
    w0 = reference.double()
    return float(((delta @ h) * delta).sum()), float(((w0 @ h) * w0).sum())


def relative_loss(weight: torch.Tensor, reference: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(Δ H Δᵀ) / tr(W0 H W0ᵀ)`` with ``Δ = weight - reference``, in float64."""
    num, den = loss_terms(weight, reference, hessian)
    return num / den if den > 0 else num
