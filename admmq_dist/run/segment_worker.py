"""The depth-parallel schedule's worker. It owns one or more *segments* — contiguous runs of
decoder blocks — for the whole run and quantizes them the sequential way (stage by stage, block
by block, each on the outputs of the quantized blocks before it) from the segment's input, which
is the float model's activations in round 0 and the previous segment's output from the round
before afterwards. Every worker holds every calibration batch; each layer keeps its ADMM-Q state
(codes, grid, duals) from round to round for warm starts.

Asymmetric calibration needs, beside each layer's quantized-model input, the float model's input of
the same tokens. The float model never changes, so each segment's float input is kept from round
0's forward, and every round runs each block with its float weights on the float stream beside
the quantized one — the same pass, batch for batch, as the sequential schedule's, so one segment
is still the sequential schedule byte for byte."""

from __future__ import annotations

import time

import torch

from ..model.capture import block_output, calibration_stages, capture_hessians, record_inputs
from ..model.loading import load_block
from ..quant.factors import HessianFactors
from ..quant.grid import Grid
from ..quant.hessian import asymmetric_target
from ..quant.solvers.rows import combine, row_blocks
from ..quant.solvers.solve import SolverSettings
from . import round_memory
from .device_model import DeviceModel, block_linears
from .faults import PositionError
from .layer import grid_source, report_row, served_grid, served_scale_dtype, solve_rows
from .workdir import load_segment_round, save_segment_round


def moved_codes(previous: dict, result) -> float:
    """The fraction of a layer's codes that moved since ``previous`` (its state: codes and
    grid), counted on one grid: the previous weights as the new grid would code them (a refit
    or a fresh fit changes the grid, and with it what a code means)."""
    before = result.grid.codes(previous["grid"].dequantize(previous["codes"]).to(
        result.grid.scale.device))
    return float((result.codes != before).float().mean())


def totals(acc) -> tuple[torch.Tensor, int, tuple | None]:
    """``(Hessian, tokens, (cross term, deviation) or None)`` of a finished accumulator."""
    return acc.hessian(), acc.num_rows, (acc.cross(), acc.deviation()) if acc.has_cross else None


class SegmentWorker(DeviceModel):
    def own(self, segments: dict[int, list[int]]) -> None:
        """Take ``segments`` (segment -> its decoder blocks): load their blocks for good."""
        self.segments = {s: list(blocks) for s, blocks in sorted(segments.items())}
        self.owned = [b for blocks in self.segments.values() for b in blocks]
        self.layers: dict[tuple[int, str], torch.nn.Linear] = {}
        self.stages: dict[int, list[list[list[str]]]] = {}
        self.float_weights: dict[tuple[int, str], torch.Tensor] = {}
        # Per layer, what the last round left: codes, grid, and each row block's dual.
        self.layer_states: dict[tuple[int, str], dict] = {}
        self.asymmetric = self.recipe.calibration.asymmetric_strength(
            self.recipe.solver.method)
        for b in self.owned:
            load_block(self.blocks[b], self.layout.block_prefix(b), self.index, self.device,
                       self.dtype)
            for name, linear in block_linears(self.blocks[b], self.recipe.output.skip).items():
                self.layers[(b, name)] = linear
                self.float_weights[(b, name)] = linear.weight.detach().float().clone()
        for b in self.owned:
            self._stages(b)
        # Each segment's input per batch: the embeddings for segment 0, else set by the
        # pipelined float forward (round 0) and by the schedule (later rounds).
        self.inputs: dict[int, list] = {s: [None] * len(self.batch_ids) for s in self.segments}
        if 0 in self.inputs:
            self.inputs[0] = list(self.first_hidden)
        self.outputs: dict[int, list[torch.Tensor]] = {}
        # Asymmetric calibration: each segment's input in the float model, from round 0's forward.
        self.float_inputs: dict[int, list] = {s: list(v) for s, v in self.inputs.items()}
        self.float_outputs: dict[int, list] = {}

    def position(self) -> dict:
        """Whether this worker owns its blocks (a rebuilt worker does not), and its token."""
        return {"owned": hasattr(self, "segments"), "token": self.token}

    def _owned(self) -> None:
        if not hasattr(self, "segments"):
            raise PositionError("this worker owns no blocks: it was rebuilt since the schedule "
                                "handed them out")

    def layer_widths(self) -> dict[tuple[int, str], int]:
        """``in_features`` of every owned linear, for the writer's checks before any solve."""
        self._owned()
        return {key: linear.in_features for key, linear in self.layers.items()}

    def _stages(self, b: int) -> list[list[list[str]]]:
        """Block ``b``'s true-sequential stages, each a list of groups sharing an input."""
        if b not in self.stages:
            linears = {n: m for (bb, n), m in self.layers.items() if bb == b}
            # Which linears share an input is structure, not values: a zero input of the
            # block's shape finds it on any worker.
            probe = torch.zeros(1, self.seq_len, self.config.get_text_config().hidden_size,
                                dtype=self.dtype, device=self.device)
            stages = calibration_stages(self.blocks[b], linears, probe, self.args[b][0],
                                        self.kwargs[b][0])
            if any(st.experts for st in stages):
                raise ValueError("the depth-parallel schedule does not handle mixture-of-experts "
                                 "blocks yet; use --schedule sequential")
            self.stages[b] = [list(st.groups) for st in stages]
        return self.stages[b]

    def memory_plan(self) -> dict:
        """This worker's planned peak memory for its segments
        (:func:`.round_memory.plan_segments`) and what its device can hold."""
        self._owned()
        shape = self._plan_shape()
        plan = round_memory.plan_segments(
            self._block_shapes(), **shape, segments=len(self.segments),
            eigh_for=self.recipe.solver.uses_eigh)
        return {**plan.on(self.device), "driver": self._driver_bytes(shape)}

    def _driver_bytes(self, shape: dict) -> dict[str, int]:
        return round_memory.driver_bytes(self._block_shapes(), tokens=shape["tokens"],
                                         hidden=shape["hidden"], asymmetric=shape["asymmetric"])

    def _plan_shape(self) -> dict:
        """What the memory plans take of this worker's calibration shard and model."""
        first = self.first_hidden[0]
        return {"hidden": int(first.shape[-1]), "act_bytes": self.dtype.itemsize,
                "tokens": sum(int(h.shape[0]) * int(h.shape[1]) for h in self.first_hidden),
                "num_batches": len(self.batch_ids),
                "batch_tokens": max(int(h.shape[0]) * int(h.shape[1]) for h in self.first_hidden),
                "row_block": self.recipe.solver.row_block,
                "asymmetric": bool(self.asymmetric), "group_size": self.recipe.grid.group_size,
                "embeddings": self.resident_bytes(), "host": self.device.type != "cpu"}

    def _block_shapes(self) -> list[list[list[tuple[str, int, int]]]]:
        """Per owned block, per stage, ``(first linear, rows of the group, cols)`` per group."""
        return [[[(g[0], sum(self.layers[(b, n)].weight.shape[0] for n in g),
                   self.layers[(b, g[0])].weight.shape[1]) for g in stage]
                 for stage in self._stages(b)] for b in self.owned]

    @torch.no_grad()
    def forward_shard(self, i: int, hidden: torch.Tensor | None) -> torch.Tensor:
        """Round 0's pipelined forward of the float model: run global batch ``i`` through this
        worker's blocks, keeping each segment's input (its float input too, under asymmetric
        calibration); returns the hidden states."""
        self._owned()
        local = self.batch_ids.index(i)
        h = self.first_hidden[local] if hidden is None else hidden.to(self.device, self.dtype)
        for s, blocks in self.segments.items():
            if s != 0:
                self.inputs[s][local] = h
                if self.asymmetric:
                    self.float_inputs[s][local] = h
            for b in blocks:
                t = time.perf_counter()
                h = block_output(self.blocks[b](h, *self.args[b][local], **self.kwargs[b][local]))
                self.busy["forward"] += time.perf_counter() - t
        return h.cpu() if self.device.type != "cpu" else h

    def set_input(self, s: int, hidden: list[torch.Tensor]) -> None:
        """Segment ``s``'s input for the next round (the previous segment's latest output)."""
        self._owned()
        self.inputs[s] = [h.to(self.device, self.dtype) for h in hidden]

    def segment_output(self, s: int) -> list[torch.Tensor]:
        self._owned()
        return [h.cpu() for h in self.outputs[s]]

    @torch.no_grad()
    def run_round(self, warm_settings: SolverSettings, segments: list[int],
                  cold: list[int] = (), cold_settings: SolverSettings | None = None,
                  in_order: bool = False) -> list[dict]:
        """Quantize the owned ``segments`` sequentially from their inputs: the ``cold`` ones (and
        every layer without a state yet) with the full schedule (``cold_settings``, default the
        recipe's), the others warm-started with ``warm_settings``; ``in_order``: capture with one
        running sum per statistic (:func:`.capture.capture_hessians`). Returns each layer's report
        row, with the fraction of its codes that changed (``changed``) and its size."""
        self._owned()
        out = []
        for s in segments:
            h = self.inputs[s]
            ref = self.float_inputs[s] if self.asymmetric else None
            for b in self.segments[s]:
                references = None
                if ref is not None:
                    t = time.perf_counter()
                    references, ref = self._float_block(b, ref, self.args[b], self.kwargs[b])
                    self.busy["forward"] += time.perf_counter() - t
                for groups in self._stages(b):
                    out += self._solve_stage(b, groups, h, warm_settings,
                                             (cold_settings or self.recipe.solver)
                                             if s in cold else None, references, in_order)
                h = self.forward(b, h)
            self.outputs[s] = h
            if ref is not None:
                self.float_outputs[s] = ref
        return out

    def _float_block(self, b: int, hidden: list[torch.Tensor], args: list[tuple],
                     kwargs: list[dict]) -> tuple[dict[str, list], list[torch.Tensor]]:
        """Block ``b`` with its float weights on the float stream ``hidden``: what the first
        linear of each group receives per batch, and the block's outputs. The quantized weights
        go back in place after."""
        heads = {g[0]: self.layers[(b, g[0])] for stage in self._stages(b) for g in stage}
        quantized = {key: linear.weight.detach().clone() for key, linear in self.layers.items()
                     if key[0] == b}
        for key in quantized:
            self.layers[key].weight.copy_(self.float_weights[key].to(self.dtype))
        try:
            return record_inputs(self.blocks[b], heads, hidden, args, kwargs)
        finally:
            for key, weight in quantized.items():
                self.layers[key].weight.copy_(weight)

    def _targets(self, b: int, group: list[str], hessian: torch.Tensor,
                 factors: HessianFactors, asym: tuple | None) -> dict[str, torch.Tensor]:
        """Each linear's weight to aim at: its float weight, or under asymmetric calibration the
        moved target (the asymmetric objective is the ordinary one with a moved target) — all
        of the group's at once, so the float64 factor they share is gone before any solve."""
        weights = {name: self.float_weights[(b, name)] for name in group}
        if asym is None:
            return weights
        damping = self.recipe.solver.gptq.damp
        targets = {name: asymmetric_target(w, hessian, asym[0], self.asymmetric, damping,
                                           factors.asymmetric(damping))
                   for name, w in weights.items()}
        factors.drop_asymmetric()
        return targets

    def _solve_stage(self, b: int, groups: list[list[str]], hidden: list[torch.Tensor],
                     warm_settings: SolverSettings, cold: SolverSettings | None,
                     references: dict[str, list] | None = None, in_order: bool = False
                     ) -> list[dict]:
        """Solve one stage's groups on ``hidden``: cold with the ``cold`` settings, else warm."""
        t = time.perf_counter()
        inputs_of = {g[0]: (self.layers[(b, g[0])], self.layers[(b, g[0])].in_features,
                            None if references is None else references[g[0]]) for g in groups}
        hessians = capture_hessians(self.blocks[b], inputs_of, hidden, self.args[b],
                                    self.kwargs[b], self.batch_ids, self.device, in_order)
        self.busy["forward"] += time.perf_counter() - t
        t = time.perf_counter()
        out = []
        for group in groups:
            # The running sums go as soon as their totals exist: not held through the solves.
            hessian, tokens, asym = totals(hessians.pop(group[0]))
            factors = HessianFactors(hessian, self.device)
            targets = self._targets(b, group, hessian, factors, asym)
            for name in group:
                weight = self.float_weights[(b, name)]
                out.append(self._solve_layer(b, name, group, hessian, factors, tokens,
                                             warm_settings, cold, targets[name],
                                             None if asym is None else (weight, *asym)))
            self.count_factorizations(factors)
        self.busy["solve"] += time.perf_counter() - t
        return out

    def _solve_layer(self, b: int, name: str, group: list[str], hessian: torch.Tensor,
                     factors: HessianFactors, tokens: int, warm_settings: SolverSettings,
                     cold: SolverSettings | None, weight: torch.Tensor,
                     true_objective: tuple | None = None) -> dict:
        """``weight``: the target solved for; ``true_objective``: ``(float weight, cross term,
        deviation)`` under asymmetric calibration, for the report's loss."""
        float_weight = weight if true_objective is None else true_objective[0]
        previous = self.layer_states.get((b, name))
        warm_start = previous is not None and cold is None
        # A warm round goes on from its codes on the grid they were solved on (the refitted
        # one); a cold one fits afresh, as the sequential schedule does.
        grid = previous["grid"] if warm_start else served_grid(
            grid_source(self.recipe, weight, float_weight), self.recipe, self.scale_dtype,
            f"block {b} {name}", self._fused_weights(b, group))
        settings = warm_settings if warm_start else cold or self.recipe.solver
        rows = row_blocks(weight.shape[0], settings.row_block)
        warm = ([{"codes": previous["codes"][start:stop], "dual": previous["duals"][k]}
                 for k, (start, stop) in enumerate(rows)] if warm_start else None)
        blocks = solve_rows(weight, hessian, grid, settings, rows, factors=factors, warm=warm,
                            compare=self.recipe.report.compare,
                            scale_dtype=served_scale_dtype(self.recipe, self.scale_dtype),
                            true_objective=true_objective)
        result = combine(blocks, grid)
        changed = 1.0 if previous is None else moved_codes(previous, result)
        return self._keep(b, name, group, blocks, grid, tokens, changed)

    def _fused_weights(self, b: int, group: list[str]) -> list[torch.Tensor]:
        """The float weights of ``group`` (linears reading one input, which engines fuse): one
        NVFP4 global scale is fitted from them all (:func:`.layer.served_grid`)."""
        return [self.float_weights[(b, n)] for n in group]

    def _keep(self, b: int, name: str, group: list[str], blocks: list, grid: Grid, tokens: int,
              changed: float, last: torch.Tensor | None = None) -> dict:
        """Keep a layer's solve as its state (codes, grid, row blocks' duals, and the last
        iterate where the schedule continues from it), put it in place, return its report row.
        ``grid`` is the fitted one; refitted scales in ``blocks`` replace its rows'."""
        result = combine(blocks, grid)
        grid = result.grid
        self.layer_states[(b, name)] = {"codes": result.codes, "grid": grid, "last": last,
                                        "duals": [blk.state.get("dual") for blk in blocks]}
        linear = self.layers[(b, name)]
        linear.weight.copy_(grid.dequantize(result.codes).to(linear.weight.dtype))
        return report_row(name, b, result, blocks, solved=True, calibration="dense",
                          tokens=tokens, group=group, changed=changed,
                          size=result.codes.numel())

    def results(self, b: int) -> dict:
        """Codes (uint8: a quarter of int32's bytes on the wire and on the driver) and grids of
        block ``b``'s layers, for the writer."""
        self._owned()
        return {name: (st["codes"].to(torch.uint8).cpu(), st["grid"].scale.cpu(),
                       st["grid"].zero.cpu())
                for (bb, name), st in self.layer_states.items() if bb == b}

    def save_round(self, folder: str, r: int, segments: list[int]) -> None:
        """Commit the owned ``segments`` solved in round ``r``: their layers' states and each
        segment's output (the next segment's input)."""
        self._owned()
        for s in segments:
            states = {(b, name): st for (b, name), st in self.layer_states.items()
                      if b in self.segments[s]}
            # The coordinated schedule keeps no segment outputs: each round starts from the
            # embeddings.
            save_segment_round(folder, r, s, states, self.outputs.get(s, []))

    @torch.no_grad()
    def load_round(self, folder: str, solved_in: dict[int, int]) -> None:
        """Restore the owned segments' states and outputs from the rounds that last solved them
        (``solved_in``: segment -> round), and put the quantized weights in place."""
        self._owned()
        for s in self.segments:
            self._restore(folder, solved_in[s], s)

    def _restore(self, folder: str, r: int | str, s: int) -> None:
        """Segment ``s``'s states and outputs as round ``r`` (or ``"start"``) committed them,
        the quantized weights put in place."""
        layers = {key: linear.weight.shape for key, linear in self.layers.items()
                  if key[0] in self.segments[s]}
        outputs, states = load_segment_round(
            folder, r, s, layers, len(self.batch_ids),
            lambda rows: len(row_blocks(rows, self.recipe.solver.row_block)), self.device)
        self.outputs[s] = [h.to(self.device, self.dtype) for h in outputs]
        for key, (codes, scale, zero, duals, last, global_scale) in states.items():
            grid = Grid.from_parts(self.recipe.grid, codes.shape[1], scale, zero, global_scale)
            self.layer_states[key] = {"codes": codes, "grid": grid, "duals": duals,
                                      "last": last}
            linear = self.layers[key]
            linear.weight.copy_(grid.dequantize(codes).to(linear.weight.dtype))
