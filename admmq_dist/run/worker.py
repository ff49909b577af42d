"""The sequential schedule's worker: one device, a shard of the calibration batches, and the
decoder block being quantized.

The schedule (:mod:`admmq_dist.run.sequential`) drives workers block by block; a worker decides
nothing about the plan. Its methods take and return plain tensors, dicts and lists, so that the
in-process backend calls them directly and the Ray backend across processes.

Why activations stay put: a worker's shard of hidden states is the largest thing in a run (samples
x tokens x hidden, per block), so only Hessian partial sums (hidden² per group) and solved weights
move between workers — "data-parallel sequential" in ``architecture.md``.
"""

from __future__ import annotations

import time

import torch

from ..model.arch import target_linears
from ..model.capture import Stage, calibration_stages, capture_hessians, record_inputs
from ..model.loading import load_block, release
from ..model.moe import ExpertList, expert_lists
from ..quant.hessian import HessianAccumulator
from ..quant.solvers.rows import RowBlockResult
from ..recipe import Recipe
from . import memory
from .device_model import DeviceModel, block_linears
from .experts import ALL_TOKENS
from .faults import PositionError
from .layer import (dequantized, grid_source, nbytes, portable, served_grid, served_scale_dtype,
                    solve_rows)
from .merged import MergedHessian


class Worker(DeviceModel):
    """Holds its calibration shard's hidden states and, while it is being solved, one decoder
    block (``current``)."""

    def __init__(self, model_dir: str, recipe: Recipe, batches: dict[int, torch.Tensor],
                 device: str, threads: int | None = None) -> None:
        super().__init__(model_dir, recipe, batches, device, threads)
        self.hidden = self.first_hidden
        # Asymmetric calibration: the float model's hidden states run beside the quantized ones,
        # and while a block is loaded, its float pass (each dense linear's inputs, the outputs).
        self.asymmetric = recipe.calibration.asymmetric_strength(recipe.solver.method)
        self.float_hidden = self.hidden
        self._float: dict | None = None
        self.current: int | None = None
        # Every step names the block it applies to and is refused (PositionError) unless it
        # follows this worker's position: ``at_block`` is the block whose inputs ``hidden`` holds.
        # A worker rebuilt after a crash is back at block 0 and says so at its next step.
        self.at_block = 0
        self.linears: dict[str, torch.nn.Linear] = {}
        self._parts: dict = {}
        self._hessians: dict[str, MergedHessian] = {}
        # key -> the stage's linears reading that input
        self._groups: dict[str, list[str]] = {}

    # ------------------------------------------------------------------------- decoder blocks

    def block_tensors(self, b: int) -> dict[str, torch.Tensor]:
        """Decoder block ``b``'s tensors read from the checkpoint (module-path names), for
        sharing with the other workers (one reads the files, all load)."""
        prefix = self.layout.block_prefix(b) + "."
        return {name: self.index.read(name) for name in self.index.module_names()
                if name.startswith(prefix)}

    def position(self) -> dict:
        """The block whose inputs this worker holds, and the block loaded (None)."""
        return {"block": self.at_block, "loaded": self.current, "token": self.token}

    def load_block(self, b: int, state: dict[str, torch.Tensor] | None = None) -> dict:
        """Load decoder block ``b`` (from the files, or ``state`` shared by the worker that read
        them); returns the checkpoint tensors its split experts replace and its bytes."""
        if self.at_block != b:
            raise PositionError(f"asked to load block {b}, but this worker holds the inputs of "
                                f"block {self.at_block}")
        if self.current is not None:
            self.release_block()
        consumed = load_block(self.blocks[b], self.layout.block_prefix(b), self.index,
                              self.device, self.dtype, state)
        self.current = b
        self.linears = block_linears(self.blocks[b], self.recipe.output.skip)
        if self.asymmetric:
            self._float_pass()
        return {"consumed": sorted(consumed),
                "bytes": sum(p.numel() * p.element_size()
                             for p in self.blocks[b].state_dict().values())}

    def release_block(self) -> None:
        if self.current is not None:
            release(self.blocks[self.current])
        self.current, self.linears = None, {}
        self._parts = {}
        self._drop_hessians()
        self._float = None

    def _drop_hessians(self) -> None:
        """Forget the merged Hessians (and their targets), counting the factorizations they
        needed."""
        for merged in self._hessians.values():
            self.count_factorizations(merged.factors)
        self._hessians = {}

    def _float_pass(self) -> None:
        """Run the just-loaded (float) block on the float model's hidden states, keeping what
        every dense linear received per batch and the block's outputs. Experts are left out: the
        float and the quantized model route different tokens to them, so their activations do
        not pair up."""
        b = self._block(self.current)
        experts = tuple(p + "." for p in expert_lists(self.blocks[b]))
        dense = {n: m for n, m in self.linears.items() if not n.startswith(experts)}
        t = time.perf_counter()
        inputs, outputs = record_inputs(self.blocks[b], dense, self.float_hidden, self.args[b],
                                        self.kwargs[b])
        self.busy["forward"] += time.perf_counter() - t
        self._float = {"inputs": inputs, "outputs": outputs}

    def plan(self, b: int) -> dict:
        """Block ``b``'s stages and the shapes of its linears (from the first batch, which
        worker 0 always holds, so the plan never depends on the sharding)."""
        self._block(b)
        stages = calibration_stages(self.blocks[b], self.linears, self.hidden[0],
                                    self.args[b][0], self.kwargs[b][0])
        return {"stages": stages,
                "shapes": {n: tuple(m.weight.shape) for n, m in self.linears.items()},
                # Linears not solved (the recipe's skips, routers): not checked for widths.
                "skipped": sorted(n for n in target_linears(self.blocks[b])
                                  if n not in self.linears)}

    def memory_plan(self, b: int, stages: list[Stage], workers: int) -> dict:
        """This worker's planned peak memory for block ``b`` (:mod:`.memory`) and what its
        device can hold."""
        self._block(b)
        shapes = {n: tuple(m.weight.shape) for n, m in self.linears.items()}
        groups = memory.stage_entries(stages, shapes, self.recipe.solver.row_block)
        tokens = sum(int(h.shape[0]) * int(h.shape[1]) for h in self.hidden)
        plan = memory.plan_block(groups, hidden=int(self.hidden[0].shape[-1]), tokens=tokens,
                                 batch_range=(self.batch_ids[0], self.batch_ids[-1] + 1),
                                 act_bytes=self.dtype.itemsize,
                                 row_block=self.recipe.solver.row_block,
                                 asymmetric=bool(self.asymmetric), workers=workers,
                                 eigh_for=self.recipe.solver.uses_eigh,
                                 group_size=self.recipe.grid.group_size,
                                 batch_tokens=max(int(h.shape[0]) * int(h.shape[1])
                                                  for h in self.hidden),
                                 embeddings=self.outside_bytes(b), host=self.device.type != "cpu")
        return {"block": b, **plan.on(self.device)}

    # -------------------------------------------------------------------------------- capture

    def capture(self, b: int, stage: Stage, calibrate_all: list[int] = ()) -> dict:
        """Accumulate the stage's Hessians over this worker's batches (kept here until fetched
        with :meth:`hessian_part`); returns the tokens routed to each expert, if any."""
        self._block(b)
        # The previous stage's Hessians, factors, targets and handed partial sums are done with
        # (its layers are set): not held beside this capture.
        self._drop_hessians()
        self._parts = {}
        self._groups = {group[0]: list(group) for group in stage.groups}
        block = self.blocks[b]
        inputs_of = {}
        for group in stage.groups:
            refs = None
            if self._float is not None and stage.experts is None:
                refs = self._float["inputs"].get(group[0])
                refs = refs if refs is not None and all(r is not None for r in refs) else None
            first = self.linears[group[0]]
            inputs_of[group[0]] = (first, first.in_features, refs)
        experts: ExpertList | None = None
        if stage.experts is not None:
            experts = block.get_submodule(stage.experts)
            experts.reset_counts()
            experts.calibrate_all = frozenset(calibrate_all)
            if stage.role == 0:
                width = experts[0].linears()[0].in_features
                inputs_of[ALL_TOKENS + stage.experts] = (experts, width, None)
        t = time.perf_counter()
        try:
            self._parts = capture_hessians(block, inputs_of, self.hidden, self.args[b],
                                           self.kwargs[b], self.batch_ids, self.device)
        finally:
            if experts is not None:
                experts.calibrate_all = frozenset()
        self.busy["forward"] += time.perf_counter() - t
        return {"routed": list(experts.routed_tokens) if experts is not None else None,
                "part_bytes": {key: acc.nbytes for key, acc in self._parts.items()}}

    def hessian_part(self, b: int, key: str) -> dict:
        """This worker's partial sums for one group (``key``: its first linear, or
        ``ALL_TOKENS + experts path``), to be merged on the group's owner. Off a CPU, what stays
        here for a retry is the host copy handed over: the device's is freed."""
        self._block(b)
        state = self._parts[key].state()
        if self.device.type != "cpu":
            self._parts[key] = HessianAccumulator.from_state(state, "cpu")
        return state

    def _own_part(self, key: str) -> HessianAccumulator:
        """This worker's partial sums for ``key`` on its device (back from the host if they
        were handed over before this worker came to merge them)."""
        acc = self._parts[key]
        if acc.device != self.device:
            acc = self._parts[key] = HessianAccumulator.from_state(acc.state(), self.device)
        return acc

    def merge_hessian_part(self, b: int, key: str, part: dict) -> None:
        """As the owner of ``key``: fold one other worker's partial sums into its own, node by
        node and in place (:meth:`HessianAccumulator.merge_state`): beside the accumulator at
        most two ``[n, n]`` matrices are on the device, the node arriving and a sibling back
        from the host (the merge is exact in any order)."""
        self._block(b)
        t = time.perf_counter()
        acc = self._own_part(key)
        # Off a CPU the nodes waiting for a sibling wait on the host (HessianAccumulator.stash).
        acc.stash = torch.device("cpu") if self.device.type != "cpu" else None
        acc.merge_state(part)
        self.busy["merge"] += time.perf_counter() - t

    def finish_hessian(self, b: int, key: str) -> int:
        """As the owner of ``key``: the merged Hessian, kept for solving (:meth:`MergedHessian.
        finish`: the deviation becomes its share of every row block's true loss at once);
        returns the bytes handed to the other solvers."""
        self._block(b)
        acc = self._own_part(key)
        del self._parts[key]
        merged = self._hessians[key] = MergedHessian.finish(
            acc, self._group_weights(key), self.recipe.solver.row_block, self.device)
        return nbytes([merged.hessian, merged.asym])

    def _group_weights(self, key: str) -> dict[str, torch.Tensor]:
        """The weights of the linears reading ``key``'s input (the stage's group), as loaded."""
        return {n: self.linears[n].weight.detach() for n in self._groups.get(key, [key])
                if n in self.linears}

    def merged_hessian(self, b: int, key: str) -> tuple:
        """The owner's merged ``(hessian, tokens, (cross term, deviation terms) or None)``, for
        the other solvers of ``key``."""
        self._block(b)
        return self._hessians[key].handed()

    def release_hessian(self, b: int, key: str) -> None:
        """Drop ``key``'s merged Hessian, factors and targets: this worker has solved every
        row it was given of it (an expert stage solved expert by expert)."""
        self._block(b)
        merged = self._hessians.pop(key, None)
        if merged is not None:
            self.count_factorizations(merged.factors)

    # ---------------------------------------------------------------------------------- solve

    @torch.no_grad()
    def solve(self, b: int, name: str, key: str | None, rows: list[tuple[int, int]],
              merged: tuple | None = None) -> dict:
        """Solve row blocks ``rows`` of linear ``name`` against the Hessian of ``key`` — merged
        here (this worker owns ``key``), or ``merged`` by the owner; ``key`` None rounds to
        nearest.

        Returns ``{"blocks": [RowBlockResult], "tokens", "grid": {"scale", "zero"} or None}``;
        the grid comes with the block that starts at row 0.
        """
        self._block(b)
        t = time.perf_counter()
        hessian, tokens, asym, factors, target = None, None, None, None, None
        if key is not None:
            if key not in self._hessians:
                if merged is None:
                    raise RuntimeError(f"no merged Hessian for {key!r} on this worker")
                self._hessians[key] = MergedHessian.received(merged, self.device)
            m = self._hessians[key]
            if m.asym is not None:
                # The asymmetric objective is the ordinary one with a moved target.
                target = m.target(name, self._group_weights(key) | {
                    name: self.linears[name].weight.detach()}, self.asymmetric,
                    self.recipe.solver.gptq.damp)
                asym = (m.asym[0], m.asym[1][name])
            hessian, tokens, factors = m.hessian, m.tokens, m.factors
        weight = self.linears[name].weight.detach().float()
        target = weight if target is None else target
        fused = next((g for g in self._groups.values() if name in g), [name])
        grid = served_grid(grid_source(self.recipe, target, weight), self.recipe,
                           self.scale_dtype, name,
                           [self.linears[n].weight.detach() for n in fused if n in self.linears])
        blocks: list[RowBlockResult] = solve_rows(
            target, hessian, grid, self.recipe.solver, rows, factors=factors,
            compare=self.recipe.report.compare,
            scale_dtype=served_scale_dtype(self.recipe, self.scale_dtype),
            # The report's loss is the true objective's, not the moved target's.
            true_objective=None if key is None or asym is None else (weight, *asym))
        self.busy["solve"] += time.perf_counter() - t
        first = any(start == 0 for start, _ in rows)
        return {"blocks": portable(blocks), "tokens": tokens,
                "grid": {"scale": grid.scale.cpu(), "zero": grid.zero.cpu()} if first else None}

    @torch.no_grad()
    def set_codes(self, b: int, layers: dict[str, tuple]) -> None:
        """Put solved layers of block ``b`` in place — ``{name: (codes, scale, zero)}``,
        dequantized here: later stages see the quantized layers."""
        self._block(b)
        for name, w in dequantized(self.recipe.grid, layers).items():
            linear = self.linears[name]
            linear.weight.copy_(w.to(linear.weight.device, linear.weight.dtype))

    # ------------------------------------------------------------------------------ propagate

    def propagate(self, b: int) -> None:
        """Run the (quantized) block ``b`` on this worker's shard: the next block's inputs.
        Idempotent: a worker already past ``b`` does nothing (a retried step)."""
        if self.at_block == b + 1:
            return
        self._block(b)
        self.hidden = self.forward(b, self.hidden)
        if self._float is not None:
            self.float_hidden = self._float["outputs"]
            self._float = None
        self.at_block = b + 1

    def replay(self, b: int, layers: dict[str, tuple],
               state: dict[str, torch.Tensor] | None = None) -> None:
        """Bring this worker past block ``b`` with that block's committed layers
        (``{name: (codes, scale, zero)}``; resume, or a restarted worker catching up): load,
        set, propagate, release. Idempotent: a worker already past ``b`` does nothing."""
        if self.at_block == b + 1:
            return
        self.load_block(b, state)
        self.set_codes(b, layers)
        self.propagate(b)
        self.release_block()

    def _block(self, b: int | None) -> int:
        """Refuse a step on block ``b`` unless it is loaded here on its inputs."""
        if b is None or self.current != b or self.at_block != b:
            raise PositionError(
                f"asked for a step on block {b}, but this worker holds the inputs of block "
                f"{self.at_block} and {'no block' if self.current is None else f'block {self.current}'}"
                " loaded")
        return b
