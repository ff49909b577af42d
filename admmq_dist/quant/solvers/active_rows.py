"""Active rows: ADMM-Q's rows leave the iteration once their codes have settled.

The layer objective is a sum over output rows that do not interact, and ADMM-Q's W-update,
projection, dual update and loss act on each row alone (:mod:`.admmq`). A row whose codes have not
moved for ``row_patience`` iterations in a row with ρ above ``row_min_rho`` (by default
``stop_min_rho``) has settled; it
leaves the iteration with its best iterate (kept row by row) final, and the W-update, projection,
dual update and loss evaluation then run on the remaining rows only. The run ends when no row is
left (or when the whole-matrix stop rule fires first).

Rows leave in batches: the loop's row state is compacted (``index_select``) once the settled rows
are at least :data:`COMPACT_SHARE` of the rows still iterating, so that copies stay rare; until
then a settled row iterates on (and stays a candidate only while its codes stay put). The first
compaction keeps the full-size arrays the run returns (best codes, last codes, dual) as stores and
the rows that leave later are written into them; every other array shrinks, so the solver's peak
memory is the one it had before any row left.
"""

from __future__ import annotations

import torch

# Compact once the settled rows are at least this share of the rows still iterating.
COMPACT_SHARE = 0.25


def compact(tensors: dict, index: torch.Tensor, memo: dict) -> None:
    """``tensors[name] = tensors[name][index]`` for every tensor in the dict, in place of the
    dict's values; tensors that alias one another (``memo``: ``id`` -> copy) stay one copy."""
    for name, value in tensors.items():
        if value is None:
            continue
        if id(value) not in memo:
            memo[id(value)] = value.index_select(0, index)
        tensors[name] = memo[id(value)]


class ActiveRows:
    """Which rows still iterate: the original row of each compact row, each row's count of quiet
    iterations, the full-size stores of what the run returns, and the history's frozen shares
    (sums over the rows that left) of the loss, best loss and squared primal residual."""

    def __init__(self, rows: int, patience: int, device):
        self.rows = rows
        self.patience = patience
        self.index: torch.Tensor | None = None  # original row of each compact row; None: all
        self.quiet = torch.zeros(rows, dtype=torch.int32, device=device)
        self.stores: dict[str, torch.Tensor] | None = None
        zero = torch.zeros((), dtype=torch.float32, device=device)
        self.frozen = {"loss": zero, "best": zero, "r2": zero}

    def settled(self, row_changes: torch.Tensor | None) -> int:
        """Count one iteration (``row_changes``: each compact row's changed codes, or None below
        the rows' minimum ρ, which resets every count); how many rows have settled (one read-back)."""
        if row_changes is None:
            self.quiet.zero_()
            return 0
        self.quiet = torch.where(row_changes == 0, self.quiet + 1, 0).to(torch.int32)
        return int((self.quiet >= self.patience).sum())

    def leave(self, state: dict, loop, sums: dict) -> None:
        """Drop the settled rows: their returned arrays (``best_Z``, ``hard``, ``best_rows`` of
        ``state`` and the loop's dual) go to the stores, their last ``sums`` (``loss``, ``best``,
        ``r2``: per compact row) to the frozen shares; ``state`` and ``loop`` keep the rest."""
        settled = self.quiet >= self.patience
        leave = settled.nonzero().squeeze(1)
        keep = (~settled).nonzero().squeeze(1)
        for key, values in sums.items():
            self.frozen[key] = self.frozen[key] + values.index_select(0, leave).sum()
        returned = self._returned(state, loop)
        if self.stores is None:
            self.stores = returned  # the full-size arrays themselves: no copy
        else:
            rows = self.index.index_select(0, leave)
            for name, store in self.stores.items():
                store.index_copy_(0, rows, returned[name].index_select(0, leave))
        base = self.index if self.index is not None else torch.arange(
            self.rows, device=keep.device)
        self.index = base.index_select(0, keep)
        memo: dict = {}
        compact(state, keep, memo)
        loop.keep(keep, memo)
        self.quiet = self.quiet.index_select(0, keep)

    @staticmethod
    def _returned(state: dict, loop) -> dict:
        return {"best_Z": state["best_Z"], "hard": state["hard"],
                "best_rows": state["best_rows"], "Y": loop.Y}

    def finish(self, state: dict, loop) -> dict:
        """The returned arrays over all rows: the stores with the rows still iterating in place
        (or the arrays themselves when no row left)."""
        returned = self._returned(state, loop)
        if self.stores is None:
            return returned
        for name, store in self.stores.items():
            store.index_copy_(0, self.index, returned[name])
        return self.stores
