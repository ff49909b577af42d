"""Partial sums of layer Hessians ``H = X Xᵀ / N`` over calibration batches, merged into the
same bytes whatever the sharding (:class:`HessianAccumulator`).

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

Memory: two partial sums combine in place into one of them (IEEE addition is commutative, so
``a.add_(b)`` is the bytes of ``a + b`` and of ``b + a``), another worker's partial sums fold in
one ``[n, n]`` node at a time (``merge_state``), nodes waiting for a sibling can wait on the host
(``stash``), and ``take`` finishes a statistic in the memory of its partial sums — so beside a
worker's own tree a merge needs at most two ``[n, n]`` matrices on the device (the node arriving
and a sibling back from the host), never a second copy of the statistics. A node this
accumulator shares with someone else (handed out by ``state`` without a copy, or taken in from
another's without one) is never written to.
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
        # id() of the nodes shared with someone else: added into a new tensor, never in place.
        self._shared: set[int] = set()
        # Where a partial sum waits for its sibling (None: on ``device``). Off a CPU the host:
        # folding in other shards in any order leaves up to log2(batches) nodes per statistic
        # waiting, and only the two being added need the device (same bytes: IEEE addition is
        # the same on either, and every sum is still formed on ``device``).
        self.stash: torch.device | None = None

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
            self._insert(nodes, 0, batch_index, value, owned=True)
        elif (0, 0) in nodes:
            nodes[(0, 0)].add_(value)
        else:
            nodes[(0, 0)] = value

    def merge(self, other: "HessianAccumulator") -> None:
        """Fold in a disjoint set of batches accumulated elsewhere (any order gives the same bytes)."""
        self._check_merge(other.num_inputs, other.has_cross, other.in_order)
        for mine, theirs in self._statistics(other._nodes, other._cross, other._deviation):
            for (level, index), value in sorted(theirs.items()):
                moved = value.to(self.device)
                if moved is value:  # now in both trees: neither writes to it
                    other._shared.add(id(value))
                self._insert(mine, level, index, moved, owned=moved is not value)
        self.num_rows += other.num_rows

    def merge_state(self, state: dict) -> None:
        """``merge(from_state(state))``, one node at a time: beside this accumulator's own
        partial sums, at most one of the part's ``[n, n]`` nodes is on its device at once."""
        self._check_merge(state["num_inputs"], "cross" in state, False)
        for mine, theirs in self._statistics(state["nodes"], state.get("cross"),
                                             state.get("deviation")):
            for (level, index), value in sorted(theirs.items()):
                moved = value.to(self.device)
                self._insert(mine, level, index, moved, owned=moved is not value)
                del moved
        self.num_rows += state["num_rows"]

    def _check_merge(self, num_inputs: int, cross: bool, in_order: bool) -> None:
        if num_inputs != self.num_inputs:
            raise ValueError(f"cannot merge Hessians of width {num_inputs} and {self.num_inputs}")
        if cross != self.has_cross:
            raise ValueError("cannot merge an accumulator with cross terms into one without")
        if self.in_order or in_order:
            raise ValueError("in-order accumulators hold every batch themselves; nothing merges")

    def _statistics(self, nodes: dict, cross: dict | None, deviation: dict | None) -> list:
        """``(this accumulator's nodes, the other's)`` per statistic, one statistic after
        another."""
        return [(self._nodes, nodes), (self._cross, cross or {}),
                (self._deviation, deviation or {})]

    def _insert(self, nodes: dict, level: int, index: int, value: torch.Tensor,
                owned: bool) -> None:
        """Put the sum over batch range ``(level, index)`` in the tree, combining it with its
        siblings: in place into whichever operand this accumulator owns (``owned``: ``value``),
        else into a new tensor. The bytes are ``left + right``'s either way. A sibling waiting on
        the stash comes back to ``value``'s device for the addition; the result, if it waits,
        goes to the stash."""
        if (level, index) in nodes:
            raise ValueError(f"batch range ({level}, {index}) was added twice")
        while (level, index ^ 1) in nodes:
            sibling = nodes.pop((level, index ^ 1))
            mine = self._release(sibling)
            if sibling.device != value.device:
                sibling, mine = sibling.to(value.device), True
            if owned:
                value.add_(sibling)
            elif mine:
                value = sibling.add_(value)
            else:
                value = sibling + value
            owned = True
            del sibling
            level, index = level + 1, index >> 1
        if self.stash is not None and value.device != self.stash:
            value, owned = value.to(self.stash), True
        nodes[(level, index)] = value
        if not owned:
            self._shared.add(id(value))

    def _release(self, node: torch.Tensor) -> bool:
        """Forget ``node`` (leaving the tree); whether this accumulator owned it."""
        if id(node) in self._shared:
            self._shared.discard(id(node))
            return False
        return True

    @property
    def nbytes(self) -> int:
        """Bytes of the partial sums held: what :meth:`state` hands over."""
        return sum(v.numel() * v.element_size() for nodes in (self._nodes, self._cross or {},
                                                              self._deviation or {})
                   for v in nodes.values())

    def state(self) -> dict:
        """A picklable snapshot (for moving partial sums between workers). Nodes already on
        the CPU are handed out as they are, and from then on shared (never written to)."""
        def host(nodes: dict) -> dict:
            out = {}
            for key, value in nodes.items():
                out[key] = value.cpu()
                if out[key] is value:
                    self._shared.add(id(value))
            return out

        out = {"num_inputs": self.num_inputs, "num_rows": self.num_rows,
               "nodes": host(self._nodes)}
        if self._cross is not None:
            out["cross"] = host(self._cross)
            out["deviation"] = host(self._deviation)
        return out

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> "HessianAccumulator":
        acc = cls(state["num_inputs"], device, cross="cross" in state)
        acc.num_rows = state["num_rows"]

        def moved(nodes: dict) -> dict:
            out = {}
            for key, value in nodes.items():
                out[key] = value.to(acc.device)
                if out[key] is value:  # the state's own tensor: shared
                    acc._shared.add(id(value))
            return out

        acc._nodes = moved(state["nodes"])
        if "cross" in state:
            acc._cross = moved(state["cross"])
            acc._deviation = moved(state["deviation"])
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

    def take(self, statistic: str) -> torch.Tensor:
        """``hessian()``, ``cross()`` or ``deviation()`` (``statistic``), the same bytes,
        finished in the memory of its partial sums: they are summed left to right into the
        first one this accumulator owns and divided in place, and the accumulator no longer
        holds them (it cannot give this statistic again)."""
        nodes = {"hessian": self._nodes, "cross": self._cross,
                 "deviation": self._deviation}[statistic]
        if nodes is None:
            raise ValueError("this accumulator was made without cross terms")
        if self.num_rows == 0:
            raise ValueError("no calibration activations were accumulated for this layer")
        if not nodes:
            raise ValueError(f"this accumulator's {statistic} was taken already")
        total = None
        for key in sorted(nodes, key=lambda k: k[1] << k[0]):
            value = nodes.pop(key)
            mine = self._release(value)
            if value.device != self.device:  # from the stash, one at a time
                value, mine = value.to(self.device), True
            if total is None:
                total = value if mine else value.clone()
            else:
                total.add_(value)
            del value
        return total.div_(self.num_rows)
