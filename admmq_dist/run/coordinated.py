"""The coordinated schedule: one ADMM-Q run across rounds, every layer of the model at once.

Workers own contiguous runs of decoder blocks for the whole run. A round:

1. **refresh** — every calibration batch flows through the model at its current weights, worker to
   worker (all workers busy at once on different batches), and every layer's Hessian is captured
   from the inputs the current model gives it (round 0: the float model);
2. **iterate** — every layer takes ``coordinated_iterations`` ADMM-Q iterations on its refreshed
   Hessian, warm from its own last iterate and dual, at the one ρ the coordinator holds;
3. **synchronize** — the coordinator reads what changed and the whole model's primal and dual
   residuals, advances ρ along the admm schedule (a continuation: never reset, so the codes of
   the whole model anneal together; the ``penalty`` rule "balance" also scales it by the
   residuals' balance), decides whether the run is done, and commits the round (every layer's
   codes, iterate and duals, and ρ).

The duals are the unscaled ``Y = ρU`` (see :mod:`admmq_dist.quant.solvers.admmq`): a change of ρ
rescales the scaled dual consistently on every worker without any work, and when a Hessian is
refreshed the recipe's ``refresh_dual`` rule says whether Y is kept or reset. The duals stay with
their owners (tens of GB for a 70B model); the coordinator holds ρ, the figures and the commits.
After the last round an optional polish refreshes once more and runs a local-search sweep on every
layer against its final inputs. A resumed run continues from the last committed round.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Iterator

from ..quant.solvers.admmq import ADMMSettings
from ..recipe import Recipe
from .depth_parallel import DepthParallelSchedule
from .workdir import (DecoderBlockOutput, committed_start, last_round_marker, mark_round,
                      prune_rounds, round_files)

log = logging.getLogger(__name__)


def advance(rho: float, iterations: int, admm: ADMMSettings) -> float:
    """ρ after ``iterations`` steps of the admm schedule from ``rho`` (what one run of that many
    iterations would reach: ×rho_growth below rho_slow_from, ×rho_growth_slow from there)."""
    for _ in range(iterations):
        slow = admm.rho_slow_from is not None and rho >= admm.rho_slow_from
        rho *= admm.rho_growth_slow if slow else admm.rho_growth
    return rho


# Residual balancing (Boyd et al. 2011, (3.13)): ρ ×τ when the primal residual is more than μ
# times the dual one, ÷τ when the dual one is more than μ times the primal; their values.
BALANCE_RATIO = 10.0
BALANCE_STEP = 2.0


def model_residuals(rows: list[dict]) -> tuple[float, float] | None:
    """The whole model's relative primal and dual residuals at the end of a round: the root mean
    square, weighted by layer size, of every layer's last ``‖W − Z‖/‖W0‖`` and
    ``ρ‖Z − Z_prev‖/‖W0‖`` of the round (None without ADMM-Q curves)."""
    rows = [r for r in rows if r.get("residual") and r.get("dual_residual")]
    size = sum(r["size"] for r in rows)
    if not size:
        return None
    return tuple((sum(r["size"] * r[key][-1] ** 2 for r in rows) / size) ** 0.5
                 for key in ("residual", "dual_residual"))


def next_rho(rho: float, iterations: int, admm: ADMMSettings, rule: str,
             residuals: tuple[float, float] | None) -> float:
    """The next round's ρ: the admm continuation over the round's ``iterations``; under the
    "balance" rule also balanced on the model's ``(primal, dual)`` residuals (``BALANCE_*``)."""
    rho = advance(rho, iterations, admm)
    if rule == "balance" and residuals is not None:
        primal, dual = residuals
        if primal > BALANCE_RATIO * dual:
            rho *= BALANCE_STEP
        elif dual > BALANCE_RATIO * primal:
            rho /= BALANCE_STEP
    return rho


class CoordinatedSchedule(DepthParallelSchedule):
    owns = "blocks"
    memory_advice = ("use more workers (each then holds fewer blocks), fewer --num-samples or "
                     "a shorter --seq-len, or devices with more memory")

    @staticmethod
    def segment_count(recipe: Recipe, workers: int, num_blocks: int) -> int:
        return num_blocks  # one segment per block: blocks are owned, never solved in sequence

    def _run(self, check_width: Callable[[str, int], None], progress: bool,
             on_round: Callable[[int, Iterator[tuple[int, DecoderBlockOutput]]], None] | None = None
             ) -> list[dict]:
        """Every round until the codes settle or ``coordinated_rounds`` ran, then the polish;
        returns the per-round figures. ``on_round(r, blocks)`` sees the model as each round left
        it, block by block."""
        solver = self.recipe.solver
        self.history, self.latest = [], {}  # a recovery starts again from the last commit
        self._own_and_check(check_width)
        started, aside = time.perf_counter(), 0.0  # aside: time spent in on_round
        self.frozen: set[tuple[int, str]] = set()
        self.polished = False
        first, self.rho, stopped = self._resume()
        if first == 0 and solver.coordinated_start == "sequential":
            self._sequential_start(progress)
        for r in range(first, solver.coordinated_rounds):
            if stopped:
                break
            self._refresh(self.frozen)
            stopped = self._round(r, started, aside, progress)
            if on_round is not None:
                t = time.perf_counter()
                on_round(r, self._each_block())
                aside += time.perf_counter() - t
        if not self.polished:
            self._polish(progress)
        return self.history

    def _resume(self) -> tuple[int, float, bool]:
        """``(first round to run, ρ, whether the run had stopped)`` after the last committed
        round; ``(0, admm.rho_start, False)`` for a fresh run."""
        marker = last_round_marker(self.work)
        if marker is None:
            return 0, self.recipe.solver.admm.rho_start, False
        self.history = marker["history"]
        self.latest = {(row["block"], row["layer"]): row for row in marker["rows"]}
        self.frozen = {tuple(key) for key in marker.get("frozen", [])}
        self.polished = marker.get("polished", False)
        self._each("load_round", lambda k: (str(self.work),
                                            {j: marker["round"] for j in self.owned[k]}))
        log.info("resuming the coordinated schedule after round %d", marker["round"])
        return marker["round"] + 1, marker["rho"], marker["stopped"]

    def _sequential_start(self, progress: bool) -> None:
        """One GPTQ pass block by block, each on the outputs of the quantized blocks before it:
        the codes round 0 starts from. One worker computes at a time (GPTQ's cost, not
        ADMM-Q's); every block is committed as it finishes (its codes, and its outputs until the
        next block's are), so a stopped run goes on from the first block not committed."""
        t = time.perf_counter()
        settings = dataclasses.replace(self.recipe.solver, method="gptq", schedule="sequential",
                                       local_search_sweeps=0)
        done = committed_start(self.work, self.num_segments)
        if done:
            self._each("load_start", lambda k: (str(self.work),
                                                [j for j in self.owned[k] if j < done]))
            log.info("resuming the sequential start after block %d", done - 1)
        # A resumed start reads the last committed block's outputs from the work folder.
        hidden = str(self.work) if done else None
        for j in range(done, self.num_segments):
            hidden = self.backend.call(self.segment_owner[j], "sequential_start", j, hidden,
                                       settings, str(self.work), j < self.num_segments - 1)
        if done < self.num_segments:
            self.backend.get([hidden])
        self.timings["solve"] += time.perf_counter() - t
        if progress:
            print(f"sequential GPTQ start: {time.perf_counter() - t:.0f}s", file=sys.stderr,
                  flush=True)

    def _refresh(self, frozen: set[tuple[int, str]] = frozenset()) -> None:
        """The pipelined forward through the current model: every layer's Hessian refreshed
        (but the ``frozen`` layers')."""
        self._each("start_capture", lambda w: (sorted(frozen),))
        self._pipeline("capture_batch")

    def _round(self, r: int, started: float, aside: float, progress: bool) -> bool:
        """Iterate every layer at the coordinator's ρ, advance ρ, commit; True when done."""
        solver = self.recipe.solver
        t = time.perf_counter()
        k = solver.coordinated_iterations
        rows = [row for part in self._each("iterate", lambda w: (self.rho, k, sorted(self.frozen)))
                for row in part]
        self.timings["solve"] += time.perf_counter() - t
        residuals = model_residuals(rows)
        for row in rows:
            old = self.latest.get((row["block"], row["layer"]))
            if old is not None:  # one run across rounds: its curves continue
                for curve in ("residual", "dual_residual", "rho"):
                    row[curve] = old.get(curve, []) + row.get(curve, [])
                row["iterations"] += old["iterations"]
            self.latest[(row["block"], row["layer"])] = row
        for key in self.frozen:
            self.latest[key]["changed"] = 0.0
        size = sum(row["size"] for row in self.latest.values())
        changed = sum(row["changed"] * row["size"] for row in self.latest.values()) / max(size, 1)
        rho, self.rho = self.rho, next_rho(self.rho, k, solver.admm, solver.penalty, residuals)
        if solver.freeze_changed is not None and r >= 1 and rho > solver.admm.stop_min_rho:
            self.frozen |= {(row["block"], row["layer"]) for row in rows
                            if row["changed"] < solver.freeze_changed}
        self.history.append({
            "round": r, "rho": rho, "changed": changed, "segments_solved": self.num_segments,
            **({} if residuals is None else {"primal_residual": residuals[0],
                                             "dual_residual": residuals[1]}),
            "mean_loss": sum(row["loss"] for row in self.latest.values()) / max(len(self.latest), 1),
            "iterations": sum(row["iterations"] for row in self.latest.values()),
            "frozen": len(self.frozen),
            "seconds": round(time.perf_counter() - t, 3),
            "elapsed_seconds": round(time.perf_counter() - started - aside, 3)})
        if progress:
            print(f"round {r}: ρ {rho:.3g}, mean loss {self.history[-1]['mean_loss']:.5f}, "
                  f"{changed:.2%} of codes moved", file=sys.stderr, flush=True)
        # Codes rest at small ρ and move again later: only a quiet round past stop_min_rho ends.
        stop = (r >= 1 and changed < solver.round_stop_changed
                and rho > solver.admm.stop_min_rho)
        self._each("save_round", lambda w: (str(self.work), r, self.owned[w]))
        # What the work folder holds once this round is marked and the older ones pruned.
        self.history[-1]["work_bytes"] = round_files(self.work)[0]
        mark_round(self.work, r, {"round": r, "rho": self.rho, "history": self.history,
                                  "stopped": stop, "rows": list(self.latest.values()),
                                  "frozen": sorted(self.frozen)})
        prune_rounds(self.work)
        return stop

    def _polish(self, progress: bool) -> None:
        """Refresh every Hessian on the final model, refit every layer's scales on it and run
        a local-search sweep on the refitted grid (:meth:`.CoordinatedWorker.polish`)."""
        self._refresh()
        t = time.perf_counter()
        rows = [row for part in self._each("polish") for row in part]
        self.timings["solve"] += time.perf_counter() - t
        for row in rows:
            self.latest[(row["block"], row["layer"])]["loss"] = row["loss"]
        size = {key: row["size"] for key, row in self.latest.items()}
        changed = (sum(row["changed"] * size[(row["block"], row["layer"])] for row in rows)
                   / max(sum(size.values()), 1))
        self.history.append({"round": "polish", "changed": changed,
                             "mean_loss": sum(r["loss"] for r in rows) / max(len(rows), 1),
                             "seconds": round(time.perf_counter() - t, 3)})
        # Committed like a round: a resumed run does not refit and polish twice.
        r = max((h["round"] for h in self.history if isinstance(h["round"], int)),
                default=-1) + 1
        self._each("save_round", lambda w: (str(self.work), r, self.owned[w]))
        self.history[-1]["work_bytes"] = round_files(self.work)[0]
        mark_round(self.work, r, {"round": r, "rho": self.rho, "history": self.history,
                                  "stopped": True, "polished": True,
                                  "rows": list(self.latest.values()),
                                  "frozen": sorted(self.frozen)})
        prune_rounds(self.work)
        if progress:
            print(f"polish: mean loss {self.history[-1]['mean_loss']:.5f}, {changed:.2%} of "
                  "codes moved", file=sys.stderr, flush=True)
