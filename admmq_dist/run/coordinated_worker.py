"""The coordinated schedule's worker. It owns a contiguous run of decoder blocks for the whole run
(one segment per block, so that the segment worker's loading, memory plan, results and round
commits serve it unchanged) and keeps, per layer, the state of one ADMM-Q run that continues from
round to round: its best codes, its last iterate and each row block's dual.

A round here is two calls: every calibration batch flows through the owned blocks at their current
weights (the pipelined forward the coordinator drives from worker to worker) while every layer's
Hessian is accumulated; then every layer takes the coordinator's iterations at the coordinator's ρ
on its refreshed Hessian. Each layer is solved whole on its owner and every Hessian is summed in
canonical batch order, so the bytes do not depend on the number of workers.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..model.capture import block_output
from ..quant.factors import HessianFactors
from ..quant.hessian import HessianAccumulator, asymmetric_loss_terms, loss_terms
from ..quant.grid import Grid
from ..quant.solvers.local_search import local_search
from ..quant.solvers.rows import row_blocks
from ..quant.solvers.scales import refit_scales
from ..quant.solvers.solve import SolverSettings
from . import round_memory
from .layer import served_grid, served_scale_dtype, solve_rows
from .segment_worker import SegmentWorker, totals
from .workdir import load_start_hidden, save_segment_round, save_start_hidden


def better_rows(block, codes: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor,
                grid, true_objective: tuple | None = None) -> object:
    """``block`` (a row block's result) with each row's codes replaced by ``codes``' where those
    have the smaller loss on ``hessian`` (rows do not interact in the objective);
    ``true_objective`` as :func:`.layer.solve_rows` takes it, to keep the report's loss."""
    w = weight[block.start:block.stop].double()
    g = grid.row_slice(block.start, block.stop)
    h = hessian.double()
    old = codes[block.start:block.stop].to(block.codes.device, torch.int32)
    new = block.codes.to(torch.int32)

    def row_loss(c):
        d = g.dequantize(c).double() - w
        return ((d @ h) * d).sum(dim=1)

    take = row_loss(old) < row_loss(new)
    if not bool(take.any()):
        return block
    chosen = torch.where(take[:, None], old, new)
    deq = g.dequantize(chosen)
    num, _ = loss_terms(deq, w.float(), hessian)
    true_loss = block.true_loss
    if true_objective is not None:
        float_weight, cross, deviation = true_objective
        true_loss = asymmetric_loss_terms(deq, float_weight[block.start:block.stop], hessian,
                                          cross, deviation)
    return dataclasses.replace(block, codes=chosen.to(block.codes.dtype),
                               weight=None if block.weight is None else deq, loss_num=num,
                               true_loss=true_loss)


class CoordinatedWorker(SegmentWorker):
    def memory_plan(self) -> dict:
        """This worker's planned peak memory (:func:`.round_memory.plan_coordinated`) and what
        its device can hold."""
        self._owned()
        shape = self._plan_shape()
        plan = round_memory.plan_coordinated(
            self._block_shapes(), **shape, eigh_for=self.recipe.solver.uses_eigh,
            start=self.recipe.solver.coordinated_start == "sequential")
        return {**plan.on(self.device), "driver": self._driver_bytes(shape)}

    @torch.no_grad()
    def sequential_start(self, s: int, hidden: tuple | str | None, settings: SolverSettings,
                         folder: str, hand_on: bool = True) -> tuple | None:
        """The sequential start: solve block ``s`` (one segment per block) with ``settings``
        (GPTQ) on all its inputs — ``hidden``: ``(quantized, float)`` per batch from the block
        before, None on block 0, or the work ``folder`` to read the block before's committed
        outputs from (a resumed start) — commit it to ``folder`` and return its outputs for the
        next (None when ``hand_on`` is False: the last block). Its codes become the layers'
        states, the start of round 0."""
        self._owned()
        if isinstance(hidden, str):
            hidden = load_start_hidden(hidden, s - 1)
        if hidden is not None:
            h, ref = hidden
            self.inputs[s] = [x.to(self.device, self.dtype) for x in h]
            if ref is not None:
                self.float_inputs[s] = [x.to(self.device, self.dtype) for x in ref]
        # Every batch, in order, on this worker: one running sum per statistic, not the tree
        # (at 70B's down_proj, up to three fewer 28672² partial sums of each statistic).
        self.run_round(settings, [s], [s], settings, in_order=True)
        for (b, _), state in self.layer_states.items():
            if b in self.segments[s]:
                state["last"] = state["codes"]
        # Each round captures its inputs afresh: nothing of the start is kept.
        out, ref = self.outputs.pop(s), self.float_outputs.pop(s, None)
        if s != 0:
            self.inputs[s] = [None] * len(self.batch_ids)
            self.float_inputs[s] = [None] * len(self.batch_ids)
        # The outputs first: a block whose codes are committed can always be gone on from.
        if hand_on:
            save_start_hidden(folder, s, out, ref)
        save_segment_round(folder, "start", s, {key: state for key, state
                                                in self.layer_states.items()
                                                if key[0] in self.segments[s]}, [])
        if not hand_on:
            return None
        return tuple(None if x is None else [t.cpu() for t in x] for x in (out, ref))

    @torch.no_grad()
    def load_start(self, folder: str, segments: list[int]) -> None:
        """Restore the owned ``segments``' committed sequential start (their codes become the
        layers' states and their last iterates) and put the weights in place."""
        self._owned()
        for s in segments:
            self._restore(folder, "start", s)
            for key, state in self.layer_states.items():
                if key[0] in self.segments[s]:
                    state["last"] = state["codes"]

    def start_capture(self, frozen: list[tuple[int, str]] = ()) -> None:
        """Fresh Hessian accumulators for every owned layer input (one per group of linears that
        read the same input: q/k/v, gate/up), with cross terms under asymmetric calibration —
        except the groups whose every layer is ``frozen``."""
        self._owned()
        frozen = {tuple(key) for key in frozen}
        self.accumulators = {
            (b, group[0]): HessianAccumulator(self.layers[(b, group[0])].in_features, self.device,
                                              cross=bool(self.asymmetric), in_order=True)
            for b in self.owned for stage in self._stages(b) for group in stage
            if not all((b, name) in frozen for name in group)}

    @torch.no_grad()
    def capture_batch(self, i: int, hidden: tuple | None) -> tuple:
        """Run global batch ``i`` through the owned blocks at their current weights, adding each
        layer input to its Hessian; returns the hidden states for the next worker (``hidden``
        None: the embeddings, on the worker that owns block 0).

        With asymmetric calibration the float model's hidden states travel beside the quantized
        model's (``(quantized, float)``; float None while no layer is quantized yet: the same
        stream), each block runs on them with its float weights, and every Hessian gets its cross
        term against the float model's input of the same tokens."""
        self._owned()
        t = time.perf_counter()
        local = self.batch_ids.index(i)
        if hidden is None:
            h = self.first_hidden[local]
            ref = h if self.asymmetric and self.layer_states else None
        else:
            h, ref = (None if x is None else x.to(self.device, self.dtype) for x in hidden)
        for b in self.owned:
            call = (self.args[b][local], self.kwargs[b][local])
            references = None
            if ref is not None:
                references, refs = self._float_block(b, [ref], [call[0]], [call[1]])
                ref = refs[0]
            handles = [self.layers[(bb, name)].register_forward_pre_hook(self._adder(
                acc, i, None if references is None else references[name][0]))
                for (bb, name), acc in self.accumulators.items() if bb == b]
            try:
                h = block_output(self.blocks[b](h, *call[0], **call[1]))
            finally:
                for handle in handles:
                    handle.remove()
        self.busy["forward"] += time.perf_counter() - t
        return tuple(None if x is None else x.cpu() if self.device.type != "cpu" else x
                     for x in (h, ref))

    def _adder(self, acc: HessianAccumulator, i: int, reference: torch.Tensor | None):
        if not acc.has_cross:
            return lambda module, inputs: acc.add(inputs[0], i)
        # Without a float stream (round 0) the float model's input is the input itself.
        return lambda module, inputs: acc.add(inputs[0], i,
                                              inputs[0] if reference is None else reference)

    def _hessians(self):
        """``(block, group, Hessian, tokens, factors, targets, asym)`` per owned layer input, in
        block order — ``targets``: each linear's weight to aim at (its float weight, or under
        asymmetric calibration the moved target of :func:`asymmetric_target`); ``asym``: the
        ``(cross term, deviation)`` the report's true loss needs, or None; the accumulators are
        released as they are read."""
        for b in self.owned:
            for stage in self._stages(b):
                for group in stage:
                    acc = self.accumulators.pop((b, group[0]), None)
                    if acc is None:  # every layer of the group is frozen
                        continue
                    hessian, tokens, asym = totals(acc)
                    del acc  # its running sums: not held through the solves
                    factors = HessianFactors(hessian, self.device)
                    targets = self._targets(b, group, hessian, factors, asym)
                    yield b, group, hessian, tokens, factors, targets, asym
                    self.count_factorizations(factors)

    @torch.no_grad()
    def iterate(self, rho: float, iterations: int,
                frozen: list[tuple[int, str]] = ()) -> list[dict]:
        """Every owned layer but the ``frozen`` takes ``iterations`` ADMM-Q iterations from ``rho`` on the Hessian
        just captured, warm from its last iterate and dual (a layer without a state starts as
        ``admm.init`` says, on this Hessian). The best iterate goes in place for the next round's
        forward. Returns each layer's report row, with the fraction of its iterate that moved
        (``changed``) and its size."""
        self._owned()
        t = time.perf_counter()
        solver = self.recipe.solver
        # No early stop inside a round: when to stop is the coordinator's call.
        # Nor a scale refit: the grid stays the one of round 0, so codes compare across rounds.
        settings = dataclasses.replace(
            solver, local_search_sweeps=0, scale_refits=0, admm=dataclasses.replace(
                solver.admm, iterations=iterations, rho_start=rho, stop_tolerance=0.0))
        frozen = {tuple(key) for key in frozen}
        out = [self._iterate_layer(b, name, group, hessian, factors, tokens, settings,
                                   targets[name], asym)
               for b, group, hessian, tokens, factors, targets, asym in self._hessians()
               for name in group if (b, name) not in frozen]
        self.busy["solve"] += time.perf_counter() - t
        return out

    def _iterate_layer(self, b: int, name: str, group: list[str], hessian: torch.Tensor,
                       factors: HessianFactors, tokens: int, settings: SolverSettings,
                       weight: torch.Tensor, asym: tuple | None = None) -> dict:
        previous = self.layer_states.get((b, name))
        # The grid is fitted once, in round 0, to the float weight (the target then: the float
        # model's inputs are its own), and kept: codes stay comparable across rounds.
        grid = (previous["grid"] if previous is not None else
                served_grid(weight, self.recipe, self.scale_dtype, f"block {b} {name}",
                            self._fused_weights(b, group)))
        rows = row_blocks(weight.shape[0], settings.row_block)
        warm = None
        if previous is not None:
            rule = self.recipe.solver.refresh_dual
            warm = [{"codes": previous["last"][start:stop],
                     "dual": {"keep": previous["duals"][k], "zero": None}[rule]}
                    for k, (start, stop) in enumerate(rows)]
        true_objective = None if asym is None else (self.float_weights[(b, name)], *asym)
        blocks = solve_rows(weight, hessian, grid, settings, rows, factors=factors, warm=warm,
                            compare=self.recipe.report.compare, true_objective=true_objective)
        if previous is not None and self.recipe.solver.coordinated_keep_best:
            blocks = [better_rows(blk, previous["codes"], weight, hessian, grid, true_objective)
                      for blk in blocks]
        last = torch.cat([blk.state["last_codes"] for blk in blocks]).to(torch.int32)
        changed = 1.0 if previous is None else float((last != previous["last"]).float().mean())
        return self._keep(b, name, group, blocks, grid, tokens, changed, last)

    @torch.no_grad()
    def polish(self) -> list[dict]:
        """On the Hessians just captured (every layer's inputs as the final model gives them):
        the recipe's scale refits of every owned layer's best codes, row block by row block (the
        sequential schedule's default, after the last round here: the grid stays fixed through
        the rounds so that codes compare across them), then a local-search sweep on the refitted
        grid. Returns the report rows."""
        self._owned()
        t = time.perf_counter()
        solver = self.recipe.solver
        sweeps = solver.sweeps or 1
        out = []
        for b, group, hessian, tokens, _, targets, asym in self._hessians():
            for name in group:
                state = self.layer_states[(b, name)]
                before = state["codes"]
                for _ in range(solver.refits):
                    state["grid"] = self._refit(targets[name], hessian, state["grid"], before)
                result = local_search(targets[name], hessian, state["grid"], before, sweeps,
                                      method="admmq")
                state["codes"] = result.codes.to(torch.int32)
                linear = self.layers[(b, name)]
                linear.weight.copy_(result.weight.to(linear.weight.dtype))
                loss = result.loss
                if asym is not None:  # the true objective's, as the rounds report it
                    num, den = asymmetric_loss_terms(result.weight, self.float_weights[(b, name)],
                                                     hessian, *asym)
                    loss = num / den if den > 0 else float("nan")
                out.append({"block": b, "layer": name, "loss": loss, "tokens": tokens,
                            "changed": float((state["codes"] != before).float().mean())})
        self.busy["solve"] += time.perf_counter() - t
        return out

    def _refit(self, target: torch.Tensor, hessian: torch.Tensor, grid, codes: torch.Tensor):
        """``grid`` with every row block's scales refitted to ``codes`` (as the sequential
        schedule's row blocks refit theirs; a row block at a time bounds the memory)."""
        scale_dtype = served_scale_dtype(self.recipe, self.scale_dtype)
        scales = [refit_scales(target[start:stop], hessian, grid.row_slice(start, stop),
                               codes[start:stop], scale_dtype).scale
                  for start, stop in row_blocks(target.shape[0], self.recipe.solver.row_block)]
        return Grid.from_parts(self.recipe.grid, target.shape[1], torch.cat(scales), grid.zero,
                               grid.global_scale)
