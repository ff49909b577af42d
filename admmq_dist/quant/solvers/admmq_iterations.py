"""ADMM-Q's iterations (see :mod:`.admmq` for the method and the W-step ``loop`` objects): the
projection, the dual update through the loop, the best iterate row by row, the stop rules and the
history. With ``active_rows`` settled rows leave the iteration (:mod:`.active_rows`).
"""

from __future__ import annotations

import torch

from ..grid import Grid
from .active_rows import COMPACT_SHARE, ActiveRows


def _project(settings, V: torch.Tensor, P: torch.Tensor, Z: torch.Tensor, gen,
             row_scale_norm):
    """The Z-step's projection of ``V = W + U`` given its nearest grid points ``P``: ``(Z, the
    hard Z the soft variant also passes on or None, the codes' grid points)``."""
    if settings.projection == "hard":
        return P, None, P
    if settings.projection == "random":
        keep = torch.rand(P.shape, generator=gen, device=P.device) >= settings.random_probability
        Znew = torch.where(keep, Z, P)
        return Znew, None, Znew
    dist = (P - V).norm(dim=1, keepdim=True)
    t = settings.soft_strength * row_scale_norm
    frac = torch.where(dist <= t, torch.ones_like(dist), t / dist.clamp_min(1e-30))
    return V + frac * (P - V), P, P


def run_iterations(loop, codes0: torch.Tensor, grid: Grid, settings,
                   dual0: torch.Tensor | None = None):
    """The ADMM iterations; ``loop`` supplies the W-step. Returns the best codes row by row, the
    best loss, the iterations run, the history, the ρ the next iteration would have used, the
    last hard iterate and the final dual (all rows)."""
    run = _Run(loop, codes0, grid, settings, dual0)
    for _ in range(settings.iterations):
        if run.step():
            break
    return run.finish()


class _Run:
    """One run's state. ``state`` holds the arrays with a row per (still iterating) output row:
    the iterate ``Z``, its hard projection, the best iterate and loss per row, the expanded grid."""

    def __init__(self, loop, codes0: torch.Tensor, grid: Grid, settings, dual0):
        self.loop, self.grid, self.settings = loop, grid, settings
        scale, zero = grid.expanded()
        Z = grid.dequantize(codes0)
        # The objective is a sum over rows that do not interact, so the best iterate is kept row
        # by row: a row that oscillates is taken at its own best moment, not at the matrix's.
        best_rows = loop.start(Z, dual0)
        # clamp(round(v / s) + z, 0, maxq) - z == clamp(round(v / s), -z, maxq - z): z is an
        # integer.
        self.state = {"Z": Z, "hard": Z, "best_Z": Z, "best_rows": best_rows, "scale": scale,
                      "inv_scale": 1.0 / scale, "low": -zero, "high": grid.maxq - zero,
                      "row_scale_norm": (scale.norm(dim=1, keepdim=True)
                                         if settings.projection == "soft" else None)}
        # "residual" is the primal residual ‖W − Z‖_F per iteration (the report plots it beside
        # ρ); "weight_norm" holds ‖W0‖_F so that row blocks' residuals combine into a layer's.
        # The figures stay on the device until the run ends: the only value read back per
        # iteration is the count of changed codes, and only once ρ is high enough for it to
        # stop the run. Rows that left count in every sum with their last values.
        self.track: dict[str, list] = {"loss": [best_rows.sum()], "best_loss": [], "changed": [],
                                       "residual": [], "dual_residual": [], "rows": []}
        self.rhos: list[float] = []
        self.gen = None
        if settings.projection == "random":
            self.gen = torch.Generator(device=Z.device).manual_seed(settings.seed)
        self.rho = settings.rho_start
        self.quiet = 0
        self.size = Z.numel()
        self.weight_norm = float(torch.linalg.vector_norm(loop.W0))
        self.active = (ActiveRows(Z.shape[0], settings.row_patience, Z.device)
                       if settings.active_rows else None)

    def _frozen(self, key: str, value: torch.Tensor) -> torch.Tensor:
        return value if self.active is None else value + self.active.frozen[key]

    def step(self) -> bool:
        """One iteration; True when the run stops."""
        s, st, loop, rho = self.settings, self.state, self.loop, self.rho
        W = loop.w_step(rho)
        V = torch.add(W, loop.Y, alpha=1.0 / rho)  # W + U
        P = self.grid.round_normalized_(V * st["inv_scale"], st["low"], st["high"])
        P.mul_(st["scale"])
        Znew, Zhard, new_hard = _project(s, V, P, st["Z"], self.gen, st["row_scale_norm"])
        high = rho > s.stop_min_rho
        rows_high = self.active is not None and rho > s.row_min_rho_for()
        count, row_changes = self._changes(new_hard, high or rows_high or len(self.rhos) % 5 == 0,
                                           rows_high)
        r2 = self._residuals(W, Znew, rho)
        del W, V, P
        rows_loss = loop.z_done(Znew, Zhard, rho)
        st["Z"], st["hard"] = Znew, new_hard
        better = rows_loss < st["best_rows"]
        st["best_rows"] = torch.where(better, rows_loss, st["best_rows"])
        st["best_Z"] = torch.where(better.unsqueeze(1), new_hard, st["best_Z"])
        self.track["loss"].append(self._frozen("loss", rows_loss.sum()))
        self.track["best_loss"].append(self._frozen("best", st["best_rows"].sum()))
        self.track["rows"].append(st["Z"].shape[0])
        self.rhos.append(rho)
        stop = self._whole_matrix_stop(count, high)
        if self.active is not None and not stop:
            stop = self._rows_leave(row_changes, rows_loss, r2)
        slow = s.rho_slow_from is not None and rho >= s.rho_slow_from
        self.rho *= s.rho_growth_slow if slow else s.rho_growth
        return stop

    def _changes(self, new_hard: torch.Tensor, wanted: bool, rows_high: bool):
        """The count of changed codes (None when not ``wanted``: below stop_min_rho it only feeds
        the history, and counting costs two passes) and, with active rows above their minimum ρ
        (``rows_high``), each row's count."""
        self.track["changed"].append(None)
        if not wanted:
            return None, None
        changed = new_hard != self.state["hard"]
        if not rows_high:
            count = torch.count_nonzero(changed)
            self.track["changed"][-1] = count
            return count, None
        row_changes = changed.sum(dim=1)
        self.track["changed"][-1] = count = row_changes.sum()
        return count, row_changes

    def _residuals(self, W: torch.Tensor, Znew: torch.Tensor, rho: float):
        """Record the primal residual ‖W − Z‖_F and the dual one ρ‖Z − Z_prev‖_F (Boyd et al.
        §3.3: with the primal one, what a coordinator balancing the penalty reads); with active
        rows, return each row's squared primal residual (rows that left keep their last)."""
        dual = rho * torch.linalg.vector_norm(Znew - self.state["Z"])
        if self.active is None:
            self.track["residual"].append(torch.linalg.vector_norm(W - Znew))
            self.track["dual_residual"].append(dual)
            return None
        r2 = (W - Znew).square_().sum(dim=1)
        self.track["residual"].append(self._frozen("r2", r2.sum()).sqrt())
        self.track["dual_residual"].append(dual)  # rows that left no longer move
        return r2

    def _whole_matrix_stop(self, count, high: bool) -> bool:
        """The whole-matrix rule: the fraction of changed codes below stop_tolerance for
        stop_patience iterations with ρ above stop_min_rho."""
        if high and int(count) / self.size < self.settings.stop_tolerance:
            self.quiet += 1
            return self.quiet >= self.settings.stop_patience
        self.quiet = 0
        return False

    def _rows_leave(self, row_changes, rows_loss: torch.Tensor, r2: torch.Tensor) -> bool:
        """Count the rows' quiet iterations; settled rows leave once they are COMPACT_SHARE of
        those iterating. True when every row has settled."""
        settled = self.active.settled(row_changes)
        iterating = self.state["Z"].shape[0]
        if settled == iterating:
            return True
        if settled and settled >= COMPACT_SHARE * iterating:
            self.active.leave(self.state, self.loop,
                              {"loss": rows_loss, "best": self.state["best_rows"], "r2": r2})
        return False

    def finish(self):
        st, loop = self.state, self.loop
        if self.active is None:
            best_Z, hard, best_rows, dual = st["best_Z"], st["hard"], st["best_rows"], loop.Y
        else:
            out = self.active.finish(st, loop)
            best_Z, hard, best_rows, dual = out["best_Z"], out["hard"], out["best_rows"], out["Y"]
        history = _history(self.track, self.rhos, self.size, self.weight_norm)
        return (self.grid.codes(best_Z), float(best_rows.sum()), len(self.rhos), history,
                self.rho, hard, dual)


def _history(track: dict[str, list], rhos: list[float], size: int,
             weight_norm: float) -> dict[str, list]:
    """The run's figures as numbers, read back from the device once. "rows": the rows iterated
    in each iteration (all of them unless active rows left)."""
    def floats(values: list[torch.Tensor]) -> list[float]:
        return torch.stack(values).tolist() if values else []

    return {"loss": floats(track["loss"]), "best_loss": floats(track["best_loss"]),
            "rho": rhos,
            "changed": [float("nan") if c is None else int(c) / size for c in track["changed"]],
            "residual": floats(track["residual"]),
            "dual_residual": floats(track["dual_residual"]),
            "rows": track["rows"],
            "weight_norm": [weight_norm]}
