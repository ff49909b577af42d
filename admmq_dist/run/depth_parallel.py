"""The depth-parallel schedule: every segment of decoder blocks quantized at once, then
correction rounds.

The blocks are cut into ``solver.segments`` contiguous segments (one per worker by default), and
workers own whole segments for the whole run. Round 0: one pipelined forward of the float model —
batches flow from worker to worker, all computing at once — leaves every segment its float input,
then every worker quantizes its segments at once, sequentially inside each (stage by stage, block
by block, as the sequential schedule does). Round r re-solves the segments from r on, each from
the output the segment before it produced in round r - 1: segment r - 1 was then solved on final
inputs, so after round r segments 0…r are exactly sequential and the error left is only
downstream. Segment r, whose inputs are final in round r, is solved cold (the full schedule, as
the sequential schedule would), the later ones warm-started. The result depends on the segments,
never on how many workers hold them. Every round is committed (layer states and segment outputs),
so a resumed run continues from the last finished round with the same bytes.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..model.loading import TensorIndex
from ..recipe import Recipe
from . import memory, round_memory
from .faults import RECOVERABLE, FaultLog
from .workdir import (DecoderBlockOutput, last_round_marker, mark_round, prune_rounds,
                      round_files)

log = logging.getLogger(__name__)


class DepthParallelSchedule:
    def __init__(self, backend, recipe: Recipe, index: TensorIndex, layout_prefix: str,
                 num_blocks: int, num_batches: int, timings: dict, work: Path,
                 faults: FaultLog | None = None) -> None:
        self.backend, self.recipe, self.index = backend, recipe, index
        self.faults = faults if faults is not None else FaultLog(3)
        self.blocks_prefix = f"{layout_prefix}."
        self.num_blocks, self.num_batches = num_blocks, num_batches
        self.timings, self.work = timings, work
        self.num_segments = self.segment_count(recipe, backend.size, num_blocks)
        n = self.num_workers = min(backend.size, self.num_segments)
        bounds = [num_blocks * j // self.num_segments for j in range(self.num_segments + 1)]
        self.segments = {j: list(range(bounds[j], bounds[j + 1]))
                         for j in range(self.num_segments)}
        self.owned = {k: list(range(self.num_segments * k // n, self.num_segments * (k + 1) // n))
                      for k in range(n)}
        self.segment_owner = {j: k for k, js in self.owned.items() for j in js}
        self.block_owner = {b: self.segment_owner[j] for j, blocks in self.segments.items()
                            for b in blocks}
        # Per (block, layer): the report row of the round that last solved it.
        self.latest: dict[tuple[int, str], dict] = {}
        self.history: list[dict] = []

    owns = "segments"  # what a worker holds, for the memory refusal
    memory_advice = ("use more workers or more --segments (each worker then holds fewer "
                     "blocks), fewer --num-samples or a shorter --seq-len, or devices with more "
                     "memory")

    @staticmethod
    def segment_count(recipe: Recipe, workers: int, num_blocks: int) -> int:
        return min(recipe.solver.segments or workers, num_blocks)

    def _each(self, method: str, per_worker: Callable[[int], tuple] = lambda k: ()) -> list:
        return self.backend.get([self.backend.call(k, method, *per_worker(k))
                                 for k in range(self.num_workers)])

    def run(self, check_width: Callable[[str, int], None], progress: bool,
            on_round: Callable[[int, Iterator[tuple[int, DecoderBlockOutput]]], None] | None = None
            ) -> list[dict]:
        """The rounds (:meth:`_run`); when a worker is lost or found rebuilt, every worker takes
        its blocks again and the run continues from the last committed round — the resume path,
        in process, so the bytes are the uninterrupted run's. Returns the per-round figures; the
        blocks then come from :meth:`blocks`."""
        self._arguments = (check_width, progress, on_round)
        while True:  # until done, or the fault budget is spent (record raises)
            try:
                return self._run(check_width, progress, on_round)
            except RECOVERABLE as exc:
                marker = last_round_marker(self.work)
                after = "the start" if marker is None else f"round {marker['round']}"
                self.faults.record(f"round {0 if marker is None else marker['round'] + 1}", exc,
                                   self.backend.restarted(), f"every worker reloaded; resumed "
                                   f"after {after}")

    def _run(self, check_width: Callable[[str, int], None], progress: bool,
             on_round: Callable[[int, Iterator[tuple[int, DecoderBlockOutput]]], None] | None = None
             ) -> list[dict]:
        """Round 0 and the correction rounds; returns the per-round figures. ``on_round(r,
        blocks)`` sees the model as each round left it, block by block."""
        self.history, self.latest = [], {}  # a recovery starts again from the last commit
        self._own_and_check(check_width)
        started, aside = time.perf_counter(), 0.0  # aside: time spent in on_round
        first = self._resume_or_forward()
        for r in range(first, self.recipe.solver.rounds + 1):
            dirty = [j for j in range(self.num_segments) if j >= r]
            if not dirty:  # every segment was solved on final inputs
                break
            stop = self._round(r, dirty, started, aside, progress)
            if on_round is not None:
                t = time.perf_counter()
                on_round(r, self._each_block())
                aside += time.perf_counter() - t
            if stop:
                break
            # The next round's inputs: what each re-solved segment now outputs.
            self._exchange([j + 1 for j in dirty if j + 1 < self.num_segments])
        return self.history

    def _own_and_check(self, check_width: Callable[[str, int], None]) -> None:
        """Hand every worker its segments, then check every layer's width for the writer and
        every worker's memory plan, before any work."""
        self._each("own", lambda k: ({j: self.segments[j] for j in self.owned[k]},))
        for widths in self._each("layer_widths"):
            for (b, name), cols in sorted(widths.items()):
                check_width(f"{self.blocks_prefix}{b}.{name}", cols)
        self.memory_plan = self._check_memory()

    def _check_memory(self) -> dict:
        """Every worker's planned peak for its segments against its device, before round 0;
        returns the largest plan."""
        plans = self._each("memory_plan")
        k = memory.largest_fitting(
            plans, lambda w, p: f"the {self.owns} of worker {w} need about {p['describe']}",
            self.memory_advice)
        return {"peak_bytes": plans[k]["peak"], "worker": k, "worst": plans[k]["worst"],
                "items": plans[k]["items"],
                "driver_bytes": max(max(p["driver"].values()) for p in plans),
                # Every worker and the driver in one process (the in-process backend).
                "in_process_peak_bytes": round_memory.in_process_peak(plans)}

    def _resume_or_forward(self) -> int:
        """The first round to run: after the last committed one, or 0 after round 0's
        pipelined float forward."""
        marker = last_round_marker(self.work)
        if marker is None:
            self._pipeline("forward_shard")
            return 0
        self.history = marker["history"]
        self.latest = {(row["block"], row["layer"]): row for row in marker["rows"]}
        solved_in = {j: min(j, marker["round"]) for j in range(self.num_segments)}
        if self.recipe.calibration.asymmetric_strength(self.recipe.solver.method):
            # The float model's segment inputs were not committed (they never change): one float
            # forward, before the committed weights go in place, gives them back.
            self._pipeline("forward_shard")
        self._each("load_round", lambda k: (str(self.work),
                                            {j: solved_in[j] for j in self.owned[k]}))
        self._exchange(list(range(1, self.num_segments)))
        log.info("resuming the depth-parallel schedule after round %d", marker["round"])
        return self.recipe.solver.rounds + 1 if marker.get("stopped") else marker["round"] + 1

    def _pipeline(self, method: str) -> None:
        """Every calibration batch through every worker in block order, ``method(i, hidden)``
        handing the hidden states on: the workers compute at once, on different batches."""
        t = time.perf_counter()
        last = []
        for i in range(self.num_batches):
            h = None
            for k in range(self.num_workers):
                h = self.backend.call(k, method, i, h)
            last.append(h)
        self.backend.get(last)
        self.timings["forward"] += time.perf_counter() - t

    def _round(self, r: int, dirty: list[int], started: float, aside: float,
               progress: bool) -> bool:
        """Re-solve the ``dirty`` segments, commit the round; True when the run should stop."""
        t = time.perf_counter()
        # Segment r has final inputs from this round on: its result is final, so it gets the
        # full schedule from a GPTQ start; the segments after it are warm-started corrections.
        warm = self.recipe.solver.warm()
        rows = [row for part in self._each(
            "run_round", lambda k: (warm, [j for j in self.owned[k] if j in dirty], [r]))
            for row in part]
        self.timings["solve"] += time.perf_counter() - t
        for row in self.latest.values():
            row["changed"] = 0.0
        self.latest.update({(row["block"], row["layer"]): row for row in rows})
        sizes = sum(row["size"] for row in self.latest.values())
        changed = sum(row["changed"] * row["size"] for row in self.latest.values()) / max(sizes, 1)
        self.history.append({
            "round": r, "changed": changed, "segments_solved": len(dirty),
            "mean_loss": sum(x["loss"] for x in self.latest.values()) / max(len(self.latest), 1),
            "iterations": sum(row["iterations"] for row in rows),
            "seconds": round(time.perf_counter() - t, 3),
            "elapsed_seconds": round(time.perf_counter() - started - aside, 3)})
        if progress:
            print(f"round {r}: {len(dirty)} of {self.num_segments} segments solved, mean loss "
                  f"{self.history[-1]['mean_loss']:.5f}, {changed:.2%} of codes changed",
                  file=sys.stderr, flush=True)
        stop = r >= 1 and changed < self.recipe.solver.round_stop_changed
        self._each("save_round", lambda k: (str(self.work), r,
                                            [j for j in self.owned[k] if j in dirty]))
        # What the work folder holds once this round is marked and the older ones pruned.
        self.history[-1]["work_bytes"] = round_files(self.work)[0]
        mark_round(self.work, r, {"round": r, "history": self.history, "stopped": stop,
                                  "rows": list(self.latest.values())})
        prune_rounds(self.work)
        return stop

    def _exchange(self, targets: list[int]) -> None:
        """Give each segment in ``targets`` the latest output of the segment before it."""
        outs = {j: self.backend.call(self.segment_owner[j - 1], "segment_output", j - 1)
                for j in targets}
        self.backend.get([self.backend.call(self.segment_owner[j], "set_input", j, outs[j])
                          for j in targets])

    def blocks(self) -> Iterator[tuple[int, DecoderBlockOutput]]:
        """Every block's codes (uint8) and report rows, one block at a time in order, as the
        writer takes them: the driver never holds more than the block being written. A worker
        lost on the way is rebuilt, the run resumed from its last commit (no solving: it had
        finished) and the blocks go on from where they stopped."""
        following = 0
        while following < self.num_blocks:
            try:
                for b, out in self._each_block(start=following):
                    following = b + 1
                    yield b, out
            except RECOVERABLE as exc:
                self.faults.record(f"collecting block {following}", exc,
                                   self.backend.restarted(),
                                   "every worker reloaded from the last commit")
                self.run(*self._arguments)

    def _each_block(self, start: int = 0) -> Iterator[tuple[int, DecoderBlockOutput]]:
        for b in range(start, self.num_blocks):
            prefix = f"{self.blocks_prefix}{b}"
            out = DecoderBlockOutput()
            results = self.backend.get([self.backend.call(self.block_owner[b], "results", b)])[0]
            for row in (x for x in self.latest.values() if x["block"] == b):
                name = row["layer"]
                out.quantized[name] = results[name]
                out.disk[name] = self.index.disk_name(f"{prefix}.{name}.weight")[: -len(".weight")]
                report = {k: v for k, v in row.items() if k not in ("changed", "size")}
                out.report.append({**report, "layer": f"{prefix}.{name}",
                                   "changed_last_round": row["changed"]})
            yield b, out
