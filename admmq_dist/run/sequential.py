"""The sequential schedule, run data-parallel (``architecture.md``, "Across GPUs and nodes").

Per decoder block: one worker reads it from safetensors and shares it with the others; every
worker accumulates Hessians over its shard of the calibration batches, stage by stage (true
sequential); each linear's canonical row blocks are spread over workers by cost, each solver
merges the partial Hessians it needs (exactly, whatever the sharding); the schedule assembles and
broadcasts the quantized weights, and every worker propagates its own shard. Activations never
move. Nothing decided here depends on the number of workers, so any backend and worker count
writes the same bytes. Every finished block is committed, so a resumed run replays the committed
blocks instead of solving them again.
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
from .backends import WorkerLost
from .experts import ExpertPolicy
from .layer import report_row
from .plan import assign, stage_units
from .workdir import DecoderBlockOutput, commit_block, read_commit

log = logging.getLogger(__name__)


class SequentialSchedule:
    """Decoder block after decoder block over a backend's workers."""

    def __init__(self, backend, recipe: Recipe, index: TensorIndex, layout_prefix: str,
                 num_blocks: int, timings: dict[str, float], work: Path,
                 check_width: Callable[[str, int], None]) -> None:
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

    def blocks(self) -> Iterator[tuple[int, DecoderBlockOutput, bool]]:
        """``(b, output, resumed)`` per decoder block, in order: committed blocks are replayed on
        every worker, the others quantized, committed and released."""
        for b in range(self.num_blocks):
            out = read_commit(self.work, b)
            if out is not None:
                t = time.perf_counter()
                self.replay(b, out, list(range(self.backend.size)))
                self.timings["forward"] += time.perf_counter() - t
                yield b, out, True
                continue
            out = self.run_block_with_restarts(b)
            t = time.perf_counter()
            commit_block(self.work, b, out)
            self.timings["commit"] += time.perf_counter() - t
            self._all("release_block")
            yield b, out, False

    def _all(self, method: str, *args) -> list:
        return self.backend.get([self.backend.call(w, method, *args)
                                 for w in range(self.backend.size)])

    def owner(self, b: int) -> int:
        """Workers own contiguous shards of decoder blocks (who reads which from the files)."""
        return b * self.backend.size // self.num_blocks

    def load(self, b: int) -> list[str]:
        """The owner reads block ``b`` from safetensors and shares it with the other workers."""
        owner, n = self.owner(b), self.backend.size
        if n == 1:
            return self.backend.get([self.backend.call(0, "load_block", b)])[0]
        state = self.backend.call(owner, "block_tensors", b)
        return self.backend.get([self.backend.call(w, "load_block", b,
                                                   None if w == owner else state)
                                 for w in range(n)])[owner]

    def replay(self, b: int, out: DecoderBlockOutput, workers: list[int]) -> None:
        """Bring ``workers`` past committed block ``b``."""
        weights = self.weights(out)
        owner = self.owner(b)
        state = None if workers == [owner] or self.backend.size == 1 else \
            self.backend.call(owner, "block_tensors", b)
        self.backend.get([self.backend.call(w, "replay", b, weights,
                                            None if w == owner else state) for w in workers])

    def weights(self, out: DecoderBlockOutput) -> dict[str, torch.Tensor]:
        """The dequantized weights every worker puts in place, computed once from codes and
        grid: the same bytes in a first run, after a resume and after a worker restart."""
        return {name: Grid.from_parts(self.recipe.grid, codes.shape[1], scale, zero)
                .dequantize(codes) for name, (codes, scale, zero) in out.quantized.items()}

    def run_block_with_restarts(self, b: int, attempts: int = 3) -> DecoderBlockOutput:
        """Run block ``b``; when a worker dies, bring restarted workers up to block ``b`` from the
        committed blocks and redo the block on every worker (results are deterministic, so the
        redo writes the same bytes)."""
        for attempt in range(attempts):
            try:
                return self.run_block(b)
            except WorkerLost as exc:
                if attempt == attempts - 1:
                    raise
                restarted = self.backend.restarted()
                log.warning("worker lost on block %d (%s); restarted %s, redoing the block", b,
                            exc, restarted)
                for w in range(self.backend.size):
                    self.backend.get([self.backend.call(w, "release_block")])
                for done in range(b):
                    self.replay(done, read_commit(self.work, done), restarted)
        raise AssertionError("unreachable")

    def run_block(self, b: int) -> DecoderBlockOutput:
        """Quantize block ``b`` on every worker; returns its results (workers keep it loaded and
        propagated)."""
        t = time.perf_counter()
        out = DecoderBlockOutput(consumed=self.load(b))
        self.timings["load"] += time.perf_counter() - t
        plan = self.backend.get([self.backend.call(0, "plan")])[0]
        self._start_layer_bar(b, plan)
        prefix = f"{self.layout_prefix}.{b}"
        for name, (_, cols) in plan["shapes"].items():
            self.check_width(f"{prefix}.{name}", cols)
        for stage in plan["stages"]:
            how = self._capture(stage, plan)
            results = self._solve(stage, plan, how)
            weights = self._collect(b, stage, how, results, out)
            self._all("set_weights", weights)
            if self.layer_bar is not None:
                self.layer_bar.update(len(weights))
        t = time.perf_counter()
        self._all("propagate")
        self.timings["forward"] += time.perf_counter() - t
        return out

    def _start_layer_bar(self, b: int, plan: dict) -> None:
        if self.layer_bar is not None and not self.layer_bar.total:
            per_block = sum(len(g) for st in plan["stages"] for g in st.groups)
            self.layer_bar.reset(total=per_block * self.num_blocks)
            self.layer_bar.update(per_block * b)  # blocks resumed from commits

    def _capture(self, stage: Stage, plan: dict) -> dict[str, dict]:
        """Capture the stage on every worker; for each linear: the Hessian key its solver merges
        (None: round to nearest), how it was calibrated and on how many tokens."""
        t = time.perf_counter()
        captured = self._all("capture", stage, self.experts.calibrate_all(stage))
        self.timings["forward"] += time.perf_counter() - t
        if stage.experts is None:
            return {name: {"key": group[0], "calibration": "dense", "tokens": None}
                    for group in stage.groups for name in group}
        if stage.role == 0:
            routed = [sum(c["routed"][e] for c in captured)
                      for e in range(len(captured[0]["routed"]))]
            self.experts.decide(stage, routed, hidden_size=plan["shapes"][stage.groups[0][0]][1])
        return self.experts.plan(stage)

    def _solve(self, stage: Stage, plan: dict, how: dict[str, dict]) -> dict:
        """Every row block of the stage solved on the worker it is assigned to; each solver is
        handed every worker's partial Hessian for its layer's group."""
        n = self.backend.size
        assignment = assign(stage_units(stage, plan["shapes"], self.recipe.solver.row_block), n)
        t = time.perf_counter()
        calls, part_refs = {}, {}
        for w in range(n):
            by_name: dict[str, list] = {}
            for name, rows, _ in assignment[w]:
                by_name.setdefault(name, []).append(rows)
            for name, rows in by_name.items():
                key = how[name]["key"]
                if key is not None and key not in part_refs:
                    part_refs[key] = [self.backend.call(k, "hessian_part", key) for k in range(n)]
                parts = part_refs[key] if key is not None else []
                calls[(w, name)] = self.backend.call(w, "solve", name, key, rows, *parts)
        results = dict(zip(calls, self.backend.get(list(calls.values()))))
        self.timings["solve"] += time.perf_counter() - t
        return results

    def _collect(self, b: int, stage: Stage, how: dict[str, dict], results: dict,
                 out: DecoderBlockOutput) -> dict[str, torch.Tensor]:
        """Each linear's row blocks put together: its codes and grid into ``out``, its report
        row; returns the dequantized weights every worker puts in place."""
        prefix = f"{self.layout_prefix}.{b}"
        weights = {}
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
                out.quantized[name] = (codes, grid_state["scale"], grid_state["zero"])
                out.disk[name] = self.index.disk_name(f"{full}.weight")[: -len(".weight")]
                grid = Grid.from_parts(self.recipe.grid, codes.shape[1], grid_state["scale"],
                                       grid_state["zero"])
                weights[name] = grid.dequantize(codes)
                out.report.append(report_row(
                    full, b, combine(blocks, grid), blocks, solved=how[name]["key"] is not None,
                    calibration=how[name]["calibration"],
                    tokens=how[name]["tokens"] if how[name]["tokens"] is not None else tokens,
                    group=group))
        return weights
