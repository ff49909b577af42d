"""The sequential schedule, run data-parallel (``architecture.md``, "Across GPUs and nodes").

Per decoder block: one worker reads it from safetensors and shares it with the others; every
worker accumulates Hessians over its shard of the calibration batches, stage by stage (true
sequential); each linear's canonical row blocks are spread over workers by cost, each solver
merges the partial Hessians it needs (exactly, whatever the sharding); the schedule assembles and
broadcasts the quantized weights, and every worker propagates its own shard. Activations never
move. Nothing decided here depends on the number of workers, so any backend and worker count
writes the same bytes. Every finished block is committed, so a resumed run replays the committed
blocks instead of solving them again.

Faults: every step names its block and a worker refuses one that does not follow its position
(:class:`.faults.PositionError`), so a worker rebuilt between two calls is noticed at its next
step, not only when a call fails. A block is committed *before* any worker propagates it, and
propagating is idempotent, so whatever step fails — a lost worker, or one out of position — the
schedule asks every worker where it is, replays the committed blocks on those behind, and redoes
only what is not committed: survivors never capture from inputs the others do not share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..model.capture import Stage
from ..model.loading import TensorIndex
from ..quant.grid import Grid
from ..quant.solvers.rows import combine
from ..recipe import Recipe
from . import memory
from .faults import RECOVERABLE, FaultLog, PositionError
from .experts import ExpertPolicy
from .layer import nbytes, report_row
from .plan import assign, assign_whole, expert_waves, most_waves, stage_units
from .workdir import DecoderBlockOutput, commit_block, read_commit

# What crosses between processes per decoder block (counted as in a Ray run with as many
# workers): the block's tensors shared by the worker that read them, partial Hessians moved to
# each Hessian's owner, merged Hessians handed to its other solvers, row-block results to the
# schedule, and the quantized layers (codes, scales, zeros) to every worker.
TRANSFERS = ("block_tensors", "hessian_parts", "merged_hessians", "solve_results", "weights")


def compact(quantized: dict[str, tuple]) -> dict[str, tuple]:
    """Committed layers as they travel: codes as bytes, scales and zeros as they are."""
    return {name: (codes.to(torch.uint8), scale, zero)
            for name, (codes, scale, zero) in quantized.items()}

log = logging.getLogger(__name__)


class SequentialSchedule:
    """Decoder block after decoder block over a backend's workers."""

    def __init__(self, backend, recipe: Recipe, index: TensorIndex, layout_prefix: str,
                 num_blocks: int, timings: dict[str, float], work: Path,
                 check_width: Callable[[str, int], None], faults: FaultLog | None = None) -> None:
        self.backend = backend
        self.recipe = recipe
        self.index = index
        self.layout_prefix = layout_prefix
        self.num_blocks = num_blocks
        self.timings = timings
        self.work = work
        # The writer's check, run on a block's linears before any of its forward passes, so a
        # group size the format cannot hold fails in seconds.
        self.check_width = check_width
        self.experts = ExpertPolicy(recipe.calibration)
        # A tqdm bar over every linear of the run (its total is set from the first block's plan).
        self.layer_bar = None
        self.faults = faults if faults is not None else FaultLog(3)
        # Each worker's token as last seen (a rebuilt worker has a new one); None after a fault
        # was recorded, so that the rebuild it caused is not counted twice.
        self.tokens: list[str] | None = None

    def blocks(self) -> Iterator[tuple[int, DecoderBlockOutput, bool]]:
        """``(b, output, resumed)`` per decoder block, in order: committed blocks are replayed on
        every worker, the others quantized, committed, propagated and released."""
        for b in range(self.num_blocks):
            resumed = read_commit(self.work, b) is not None
            while True:  # until done, or the fault budget is spent (record raises)
                try:
                    out = self._block(b)
                    break
                except RECOVERABLE as exc:
                    restarted = self.backend.restarted()
                    committed = read_commit(self.work, b) is not None
                    log.warning("block %d: %s; restarted workers %s; redoing %s", b, exc,
                                restarted, "the propagation" if committed else "the block")
                    self.faults.record(f"block {b}", exc, restarted,
                                       f"block {b}: " + ("propagate" if committed else "solve"))
                    self.tokens = None
            yield b, out, resumed

    def _block(self, b: int) -> DecoderBlockOutput:
        """Bring every worker past block ``b``: catch up the workers behind on the committed
        blocks, quantize and commit ``b`` unless it is committed, then every worker propagates
        it (a no-op on one already past) and releases it."""
        behind = self._catch_up(b)
        out = read_commit(self.work, b)
        if out is not None:  # resumed, or committed before a fault
            t = time.perf_counter()
            self.replay(b, out, behind)
            self.timings["forward"] += time.perf_counter() - t
            out.moved = {"weights": nbytes(compact(out.quantized)) * len(behind)}
            return out
        out = self.run_block(b)
        t = time.perf_counter()
        commit_block(self.work, b, out)
        self.timings["commit"] += time.perf_counter() - t
        t = time.perf_counter()
        self._all("propagate", b)
        self.timings["forward"] += time.perf_counter() - t
        self._all("release_block")
        return out

    def _catch_up(self, b: int) -> list[int]:
        """Ask every worker where it is (a rebuilt one is back at block 0), release what is
        loaded, and replay the committed blocks before ``b`` on the workers behind; returns the
        workers at block ``b`` (those already past it, after a fault in its propagation, are
        left there)."""
        positions = self._all("position")
        at = [p["block"] for p in positions]
        tokens = [p["token"] for p in positions]
        if self.tokens is not None:
            rebuilt = [w for w in range(len(at)) if tokens[w] != self.tokens[w]]
            if rebuilt:
                self.faults.record(f"block {b}", PositionError(
                    f"workers {rebuilt} were rebuilt between two steps"), rebuilt,
                    f"blocks {min(at)}..{b - 1} replayed on workers {rebuilt}")
        self.tokens = tokens
        if any(a > b + 1 for a in at):
            raise RuntimeError(f"a worker is past block {b + 1} while block {b} is being "
                               f"quantized (positions {at}); this is a bug")
        self._all("release_block")
        for done in range(min(at), b):
            behind = [w for w, a in enumerate(at) if a == done]
            self.replay(done, read_commit(self.work, done), behind)
            for w in behind:
                at[w] = done + 1
        return [w for w, a in enumerate(at) if a == b]

    def _all(self, method: str, *args) -> list:
        return self.backend.get([self.backend.call(w, method, *args)
                                 for w in range(self.backend.size)])

    def owner(self, b: int) -> int:
        """Workers own contiguous shards of decoder blocks (who reads which from the files)."""
        return b * self.backend.size // self.num_blocks

    def load(self, b: int, moved: dict[str, int]) -> list[str]:
        """The owner reads block ``b`` from safetensors and shares it with the other workers;
        returns the checkpoint tensors its split experts replace."""
        owner, n = self.owner(b), self.backend.size
        if n == 1:
            return self.backend.get([self.backend.call(0, "load_block", b)])[0]["consumed"]
        state = self.backend.call(owner, "block_tensors", b)
        loaded = self.backend.get([self.backend.call(w, "load_block", b,
                                                     None if w == owner else state)
                                   for w in range(n)])[owner]
        moved["block_tensors"] += loaded["bytes"] * (n - 1)
        return loaded["consumed"]

    def replay(self, b: int, out: DecoderBlockOutput, workers: list[int]) -> None:
        """Bring ``workers`` past committed block ``b``: each dequantizes the committed codes
        itself, the same bytes in a first run, after a resume and after a worker restart."""
        if not workers:
            return
        owner = self.owner(b)
        state = None if workers == [owner] or self.backend.size == 1 else \
            self.backend.call(owner, "block_tensors", b)
        self.backend.get([self.backend.call(w, "replay", b, compact(out.quantized),
                                            None if w == owner else state) for w in workers])

    def run_block(self, b: int) -> DecoderBlockOutput:
        """Quantize block ``b`` on every worker; returns its results (workers keep it loaded, with
        its quantized weights in place)."""
        t = time.perf_counter()
        moved = dict.fromkeys(TRANSFERS, 0)
        out = DecoderBlockOutput(consumed=self.load(b, moved), moved=moved)
        self.timings["load"] += time.perf_counter() - t
        plan = self.backend.get([self.backend.call(0, "plan", b)])[0]
        self._start_layer_bar(b, plan)
        prefix = f"{self.layout_prefix}.{b}"
        for name, (_, cols) in plan["shapes"].items():
            self.check_width(f"{prefix}.{name}", cols)
        out.memory, stages = self._check_memory(b, prefix, plan)
        for stage in stages:
            how, part_bytes = self._capture(b, stage, plan)
            results = self._solve(b, stage, plan, how, part_bytes, moved)
            layers = self._collect(b, stage, how, results, out)
            self._all("set_codes", b, layers)
            moved["solve_results"] += sum(nbytes(r) for r in results.values())
            moved["weights"] += nbytes(layers) * self.backend.size
            if self.layer_bar is not None:
                self.layer_bar.update(len(layers))
        return out

    def _check_memory(self, b: int, prefix: str, plan: dict) -> tuple[dict, list[Stage]]:
        """Every worker's planned peak for the block against its device, before the block's
        work, with its expert stages in the fewest waves that fit (:func:`.plan.expert_waves`);
        returns the largest plan and the stages as they will be captured."""
        n, tried = self.backend.size, {}

        def fits(waves: int) -> bool:
            stages = expert_waves(plan["stages"], waves, n)
            tried[waves] = stages, self._all("memory_plan", b, stages, n)
            return all(p["peak"] <= p["capacity"] for p in tried[waves][1])

        waves = memory.fewest_waves(fits, most_waves(
            [len(st.groups) for st in plan["stages"] if st.experts is not None], n))
        if waves not in tried:
            fits(waves)
        stages, plans = tried[waves]
        worst = memory.largest_fitting(
            plans, lambda w, p: f"{prefix} needs about {p['describe']} on worker {w}",
            "use more workers (each holds fewer calibration tokens), fewer --num-samples or a "
            "shorter --seq-len, or devices with more memory")
        driver = memory.results_bytes(memory.stage_entries(plan["stages"], plan["shapes"],
                                                           self.recipe.solver.row_block))
        return {"peak_bytes": plans[worst]["peak"], "worker": worst, "expert_waves": waves,
                "worst": f"{prefix}.{plans[worst]['worst']}", "items": plans[worst]["items"],
                "driver_bytes": driver,
                # Every worker and the driver in one process (the in-process backend).
                "in_process_peak_bytes": memory.in_process_peak([p["phases"] for p in plans],
                                                                driver)}, stages

    def _start_layer_bar(self, b: int, plan: dict) -> None:
        if self.layer_bar is not None and not self.layer_bar.total:
            per_block = sum(len(g) for st in plan["stages"] for g in st.groups)
            self.layer_bar.reset(total=per_block * self.num_blocks)
            self.layer_bar.update(per_block * b)  # blocks resumed from commits

    def _capture(self, b: int, stage: Stage, plan: dict) -> tuple[dict[str, dict], list[dict]]:
        """Capture the stage on every worker; for each linear: the Hessian key its solver merges
        (None: round to nearest), how it was calibrated and on how many tokens; and each
        worker's bytes of partial sums per key."""
        t = time.perf_counter()
        captured = self._all("capture", b, stage, self.experts.calibrate_all(stage))
        self.timings["forward"] += time.perf_counter() - t
        part_bytes = [c["part_bytes"] for c in captured]
        if stage.experts is None:
            return {name: {"key": group[0], "calibration": "dense", "tokens": None}
                    for group in stage.groups for name in group}, part_bytes
        if stage.role == 0:
            routed = [sum(c["routed"][e] for c in captured)
                      for e in range(len(captured[0]["routed"]))]
            self.experts.decide(stage, routed, hidden_size=plan["shapes"][stage.groups[0][0]][1])
        return self.experts.plan(stage), part_bytes

    def _solve(self, b: int, stage: Stage, plan: dict, how: dict[str, dict],
               part_bytes: list[dict], moved: dict[str, int]) -> dict:
        """Every row block of the stage solved on the worker it is assigned to. Each Hessian is
        reduced toward one owner (the worker solving most of its rows: the other workers'
        partial sums move there once), and the owner hands the merged Hessian to the other
        solvers of it — not every partial sum to every solver."""
        n = self.backend.size
        units = stage_units(stage, plan["shapes"], self.recipe.solver.row_block)
        # An expert stage with a Hessian per worker or more is solved expert by expert (its
        # owner alone solves it, then drops it): a 256-expert stage would otherwise keep every
        # expert's Hessian and factors on every worker that solves a row of it.
        whole = stage.experts is not None and len(stage.groups) >= n
        assignment = (assign_whole(units, {name: i for i, g in enumerate(stage.groups)
                                           for name in g}, n) if whole else assign(units, n))
        by_worker: list[dict[str, list]] = [{} for _ in range(n)]
        for w in range(n):
            for name, rows, _ in assignment[w]:
                by_worker[w].setdefault(name, []).append(rows)
        t = time.perf_counter()
        merged, sizes = self._reduce(b, how, by_worker, part_bytes, moved)
        calls = {}
        for w in range(n):
            last = {how[name]["key"]: name for name in by_worker[w]}  # each key's last solve
            for name, rows in by_worker[w].items():
                key = how[name]["key"]
                owner_or_ref = merged.get(key)
                handed = None if owner_or_ref is None or owner_or_ref[0] == w else owner_or_ref[1]
                calls[(w, name)] = self.backend.call(w, "solve", b, name, key, rows, handed)
                if whole and key is not None and last[key] == name:
                    self.backend.call(w, "release_hessian", b, key)
        results = dict(zip(calls, self.backend.get(list(calls.values()))))
        merged_bytes = self.backend.get([future for _, future in sizes])
        moved["merged_hessians"] += sum(solvers * size
                                        for (solvers, _), size in zip(sizes, merged_bytes))
        self.timings["solve"] += time.perf_counter() - t
        return results

    def _reduce(self, b: int, how: dict[str, dict], by_worker: list[dict[str, list]],
                part_bytes: list[dict], moved: dict[str, int]) -> tuple[dict, list]:
        """Merge every Hessian of the stage on its owner: ``key -> (owner, merged-Hessian
        future for the other solvers, or None when the owner solves it alone)``, and per key
        ``(number of other solvers, future of its merged bytes)``."""
        rows_of: dict[str, list[int]] = {}
        for w, names in enumerate(by_worker):
            for name, blocks in names.items():
                key = how[name]["key"]
                if key is not None:
                    count = rows_of.setdefault(key, [0] * len(by_worker))
                    count[w] += sum(stop - start for start, stop in blocks)
        out, sizes = {}, []
        for key, rows in rows_of.items():
            owner = max(range(len(rows)), key=lambda w: (rows[w], -w))
            others = [w for w in range(len(rows)) if w != owner]
            for w in others:  # one part per call: the owner holds one at a time
                self.backend.call(owner, "merge_hessian_part", b, key,
                                  self.backend.call(w, "hessian_part", b, key))
            size = self.backend.call(owner, "finish_hessian", b, key)
            moved["hessian_parts"] += sum(part_bytes[w].get(key, 0) for w in others)
            solvers = [w for w in others if rows[w]]
            out[key] = (owner, self.backend.call(owner, "merged_hessian", b, key) if solvers
                        else None)
            sizes.append((len(solvers), size))
        return out, sizes

    def _collect(self, b: int, stage: Stage, how: dict[str, dict], results: dict,
                 out: DecoderBlockOutput) -> dict[str, tuple]:
        """Each linear's row blocks put together: its codes and grid into ``out``, its report
        row; returns what every worker puts in place, ``{name: (codes, scale, zero)}``."""
        prefix = f"{self.layout_prefix}.{b}"
        layers = {}
        for group in stage.groups:
            for name in group:
                blocks, grid_state, tokens = [], None, None
                for (_, nm), r in results.items():
                    if nm == name:
                        blocks += r["blocks"]
                        grid_state = r["grid"] or grid_state
                        tokens = r["tokens"] if tokens is None else tokens
                codes = torch.cat([blk.codes for blk in sorted(blocks, key=lambda x: x.start)])
                full = f"{prefix}.{name}"
                # The fitted grid, with the scales of row blocks that refitted theirs.
                result = combine(blocks, Grid.from_parts(
                    self.recipe.grid, codes.shape[1], grid_state["scale"], grid_state["zero"]))
                grid = result.grid
                out.quantized[name] = (codes.to(torch.int32), grid.scale, grid.zero)
                out.disk[name] = self.index.disk_name(f"{full}.weight")[: -len(".weight")]
                layers[name] = (codes, grid.scale, grid.zero)
                out.report.append(report_row(
                    full, b, result, blocks, solved=how[name]["key"] is not None,
                    calibration=how[name]["calibration"],
                    tokens=how[name]["tokens"] if how[name]["tokens"] is not None else tokens,
                    group=group))
        return layers
