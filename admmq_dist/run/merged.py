"""A merged Hessian on the sequential worker that solves rows against it, from the owner's merge
to the end of its stage: the statistics the solves need, their factorizations, and under
asymmetric calibration the cross term, the deviation's share of every row block's true loss
and the moved targets.

Memory is what decides whether a 405B down_proj (53248 inputs: 10.6 GiB per float32 ``[n, n]``)
fits a GPU, so nothing here is held longer than it is needed: the statistics are finished in the
memory of their partial sums, the deviation (used only by the report's true loss) is consumed
into one number per canonical row block as soon as it is merged, and the targets of every linear
reading the input are moved at once, with the float64 factor dropped right after — off a CPU
with the Hessian and cross term waiting on the host meanwhile. None of it changes a byte.
"""

from __future__ import annotations

import torch

from ..quant.accumulator import HessianAccumulator
from ..quant.factors import HessianFactors
from ..quant.hessian import asymmetric_targets, deviation_term
from ..quant.solvers.rows import row_blocks


class MergedHessian:
    """``hessian`` (float32 ``[n, n]``, on the worker's device) of ``tokens`` tokens, its
    ``factors``, and ``asym``: under asymmetric calibration ``(cross term, {linear: {(start,
    stop): deviation term}})``, else None."""

    def __init__(self, hessian: torch.Tensor, tokens: int, asym: tuple | None,
                 device: torch.device) -> None:
        self.hessian, self.tokens, self.asym = hessian, tokens, asym
        self.factors = HessianFactors(hessian, device)
        # linear -> its moved target until handed out (None after)
        self._targets: dict[str, torch.Tensor | None] = {}

    @classmethod
    def finish(cls, acc: HessianAccumulator, weights: dict[str, torch.Tensor], row_block: int,
               device: torch.device) -> "MergedHessian":
        """The owner's: every statistic of ``acc`` finished in place, the deviation consumed at
        once into ``tr(W D Wᵀ)`` of every canonical row block of the float ``weights`` reading
        the input (still in place: the stage is not solved yet)."""
        asym = None
        if acc.has_cross:
            deviation = acc.take("deviation")
            terms = {name: {(start, stop): deviation_term(w[start:stop].float(), deviation)
                            for start, stop in row_blocks(w.shape[0], row_block)}
                     for name, w in weights.items()}
            del deviation
            asym = (acc.take("cross"), terms)
        return cls(acc.take("hessian"), acc.num_rows, asym, device)

    @classmethod
    def received(cls, merged: tuple, device: torch.device) -> "MergedHessian":
        """Another solver's, from the owner's :meth:`handed`."""
        hessian, tokens, asym = merged
        asym = None if asym is None else (asym[0].to(device), asym[1])
        return cls(hessian.to(device), tokens, asym, device)

    def handed(self) -> tuple:
        """``(hessian, tokens, (cross term, deviation terms) or None)`` on the CPU."""
        asym = None if self.asym is None else (self.asym[0].cpu(), self.asym[1])
        return self.hessian.cpu(), self.tokens, asym

    def target(self, name: str, weights: dict[str, torch.Tensor], strength: float,
               damping: float) -> torch.Tensor:
        """``name``'s moved target (:func:`asymmetric_targets`, float32). The first call moves
        every linear of ``weights`` not moved yet (one float64 factor per Hessian, dropped
        after: never beside GPTQ's factor or a row block's solve); off a CPU the Hessian and
        cross term wait on the host meanwhile, for the factor, the copy ``cholesky_solve``
        makes of it and the corrections."""
        if self._targets.get(name) is None:
            todo = {n: w for n, w in weights.items() if n == name or n not in self._targets}
            device = self.factors.device
            host = device.type != "cpu"
            if host:
                self._move(torch.device("cpu"))
            self._targets.update(asymmetric_targets(
                todo, self.hessian, self.asym[0], strength, damping,
                lambda: self.factors.asymmetric(damping), dtype=torch.float32))
            self.factors.drop_asymmetric()
            if host:
                self._move(device)
        target, self._targets[name] = self._targets[name], None
        return target

    def _move(self, device: torch.device) -> None:
        """The Hessian (and its factors' conditioned copy, where that is another tensor) and the
        cross term to ``device``; computed factors stay where they are."""
        same = self.factors.hessian is self.hessian
        self.hessian = self.hessian.to(device)
        self.factors.hessian = self.hessian if same else self.factors.hessian.to(device)
        self.asym = (self.asym[0].to(device), self.asym[1])
