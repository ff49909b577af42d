"""A worker: one device, a shard of the calibration batches, and the current decoder block.

The coordinator (:mod:`admmq_dist.coordinator`) drives workers through the sequential protocol
block by block; a worker never decides anything about the plan. It is plain Python so that the
in-process run and the tests use it directly; :mod:`admmq_dist.cluster` wraps it in a Ray actor.
Every method takes and returns plain tensors, dicts and lists, so calls can cross processes.

Why activations stay put: a worker's shard of hidden states is the largest thing in a run (samples
x tokens x hidden, per block), so only Hessian partial sums (hidden² per group) and solved weights
move between workers — "data-parallel sequential" in ``architecture.md``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .model.arch import find_blocks, target_linears, weight_modules
from .model.capture import Stage, block_output, calibration_stages, record_block_calls
from .model.loading import TensorIndex, build_skeleton, materialize, release
from .model.moe import ExpertList, expert_lists, is_router, load_fused_into, unfuse_experts
from .quant.grid import fit_grid
from .quant.hessian import HessianAccumulator, asymmetric_target
from .quant.solvers.rows import BlockResult, combine, layer_history, row_blocks, solve_block
from .recipe import Recipe

ALL_TOKENS = "all-tokens:"  # key prefix of an expert list's every-token input accumulator


def tied_names(model) -> dict[str, str]:
    """Output embeddings that share the input embeddings' weight are absent from the files."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if out_emb is None or in_emb is None:
        return {}
    return {f"{names[id(out_emb)]}.weight": f"{names[id(in_emb)]}.weight"}


def load_block(block: torch.nn.Module, prefix: str, index: TensorIndex, device: torch.device,
               dtype: torch.dtype, state: dict[str, torch.Tensor] | None = None) -> set[str]:
    """Materialize one block from ``state`` (module-path names, as :meth:`Worker.block_state`
    returns) or from the checkpoint files. Experts stored fused are split as they load.

    Returns the checkpoint names of fused tensors consumed that way (written back per expert).
    """
    def read(name):
        return state[name] if state is not None else index.read(name)

    def has(name):
        return name in state if state is not None else name in index

    fused, consumed = [], set()
    for path, experts in expert_lists(block).items():
        first = f"{prefix}.{path}.0.{experts.roles[0]}.weight"
        if not has(first) and has(f"{prefix}.{path}.gate_up_proj"):
            load_fused_into(experts, read(f"{prefix}.{path}.gate_up_proj").to(device, dtype),
                            read(f"{prefix}.{path}.down_proj").to(device, dtype))
            fused.append(path)
            consumed |= {index.disk_name(f"{prefix}.{path}.{p}") for p in ("gate_up_proj", "down_proj")}
    if state is None:
        materialize(block, prefix, index, device, dtype, exclude=tuple(fused))
    else:
        from accelerate.utils import set_module_tensor_to_device

        skip = tuple(f + "." for f in fused)
        for name, _ in list(block.state_dict(keep_vars=True).items()):
            if skip and name.startswith(skip):
                continue
            value = state[f"{prefix}.{name}"]
            value = value.to(dtype) if value.is_floating_point() else value
            set_module_tensor_to_device(block, name, device, value=value)
        for name, buffer in list(block.named_buffers()):
            if buffer.device != device:
                owner, _, leaf = name.rpartition(".")
                (block.get_submodule(owner) if owner else block)._buffers[leaf] = buffer.to(device)
    return consumed


def block_linears(block: torch.nn.Module, skip: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    """The linears of ``block`` to quantize: routers stay dense in mixture-of-experts blocks."""
    linears = target_linears(block, skip)
    if expert_lists(block):
        linears = {n: m for n, m in linears.items() if not is_router(n)}
    return linears


class Worker:
    """Holds its calibration shard's hidden states and, while it is being solved, one block.

    ``batches`` maps global batch indices to token ids: the indices order Hessian sums
    canonically (:class:`HessianAccumulator`), which makes results independent of sharding.
    """

    def __init__(self, model_dir: str, recipe: Recipe, batches: dict[int, torch.Tensor],
                 device: str, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.recipe = recipe
        self.model_dir = Path(model_dir)
        self.config, self.model = build_skeleton(self.model_dir, torch.float32)
        self.index = TensorIndex(self.model_dir, getattr(self.config, "model_type", None))
        from .pipeline import output_dtype

        self.dtype = (torch.float32 if self.device.type == "cpu"
                      else output_dtype(recipe, self.model_dir))
        self.layout, self.blocks = find_blocks(self.model)
        for b in range(self.layout.num_blocks):
            unfuse_experts(self.blocks[b], self.layout.block_prefix(b), self.index.module_names())
        materialize(self.model, "", self.index, self.device, self.dtype,
                    tied=tied_names(self.model), exclude=(self.layout.prefix,))
        self.batch_ids = sorted(batches)
        self.seq_len = int(batches[self.batch_ids[0]].shape[1])
        calls = record_block_calls(self.model, self.blocks,
                                   [batches[i] for i in self.batch_ids], self.device)
        self.hidden = [h.to(self.dtype) for h in calls.first_hidden]
        self.first_hidden = self.hidden
        # Asymmetric calibration: the float model's hidden states run beside the quantized ones,
        # and while a block is loaded, its float pass (each dense linear's inputs, the outputs).
        self.asymmetric = recipe.calibration.asymmetric if recipe.solver.method != "rtn" else 0.0
        self.float_hidden = self.hidden
        self._float: dict | None = None
        self.args, self.kwargs = calls.args, calls.kwargs
        self.current: int | None = None
        self.linears: dict[str, torch.nn.Linear] = {}
        self._parts: dict[str, HessianAccumulator] = {}
        self._hessians: dict[str, torch.Tensor] = {}
        self.busy = {"forward": 0.0, "merge": 0.0, "solve": 0.0}
        self.token = f"{os.getpid()}-{time.time_ns()}"

    # -------------------------------------------------------------------------------- blocks

    def num_blocks(self) -> int:
        return self.layout.num_blocks

    def block_prefix(self) -> str:
        return self.layout.prefix

    def dense_modules(self) -> dict[str, bool]:
        """Every module with a 2-D weight that the run leaves dense — ``lm_head``, the recipe's
        skips, routers and shared-expert gates whatever their class, projectors — by checkpoint
        name (and module path where transformers renames it, since each engine matches its own
        names), mapped to whether it is an ``nn.Linear`` inside the decoder blocks. The ignore
        list names them all, exactly: engines match names, not substrings."""
        solved = {f"{self.layout.block_prefix(b)}.{n}"
                  for b in range(self.layout.num_blocks)
                  for n in block_linears(self.blocks[b], self.recipe.output.skip)}
        inside = self.layout.prefix + "."
        out = {}
        for name, is_linear in weight_modules(self.model).items():
            if name not in solved:
                disk = self.index.disk_name(f"{name}.weight")[: -len(".weight")]
                for entry in {name, disk}:
                    out[entry] = is_linear and name.startswith(inside)
        return dict(sorted(out.items()))

    def ping(self) -> str:
        """A token that changes when the worker is rebuilt (a restarted Ray actor)."""
        return self.token

    def block_state(self, b: int) -> dict[str, torch.Tensor]:
        """Block ``b``'s tensors read from the checkpoint (module-path names), for sharing."""
        prefix = self.layout.block_prefix(b) + "."
        return {name: self.index.read(name) for name in self.index.module_names()
                if name.startswith(prefix)}

    def load_block(self, b: int, state: dict[str, torch.Tensor] | None = None) -> list[str]:
        if self.current is not None:
            self.release_block()
        consumed = load_block(self.blocks[b], self.layout.block_prefix(b), self.index,
                              self.device, self.dtype, state)
        self.current = b
        self.linears = block_linears(self.blocks[b], self.recipe.output.skip)
        if self.asymmetric:
            self._float_pass()
        return sorted(consumed)

    def release_block(self) -> None:
        if self.current is not None:
            release(self.blocks[self.current])
        self.current, self.linears = None, {}
        self._parts, self._hessians = {}, {}
        self._float = None

    @torch.no_grad()
    def _float_pass(self) -> None:
        """Run the just-loaded (float) block on the float model's hidden states, keeping what
        every dense linear received per batch and the block's outputs. Linears that share an
        input share one stored tensor. Experts are left out: the float and the quantized model
        route different tokens to them, so their activations do not pair up."""
        b = self._block()
        experts = tuple(p + "." for p in expert_lists(self.blocks[b]))
        dense = {n: m for n, m in self.linears.items() if not n.startswith(experts)}
        inputs: dict[str, list] = {n: [] for n in dense}
        seen: dict[str, torch.Tensor] = {}
        handles = [m.register_forward_pre_hook(
            lambda module, args, name=n: seen.setdefault(name, args[0])) for n, m in dense.items()]
        outputs = []
        t = time.perf_counter()
        try:
            for i, h in enumerate(self.float_hidden):
                seen.clear()
                outputs.append(block_output(self.blocks[b](h, *self.args[b][i],
                                                           **self.kwargs[b][i])))
                for n in dense:
                    inputs[n].append(seen.get(n))
        finally:
            for handle in handles:
                handle.remove()
        self.busy["forward"] += time.perf_counter() - t
        self._float = {"inputs": inputs, "outputs": outputs}

    def plan(self) -> dict:
        """The current block's stages and the shapes of its linears (from the first batch, which
        worker 0 always holds, so the plan never depends on the sharding)."""
        b = self._block()
        stages = calibration_stages(self.blocks[b], self.linears, self.hidden[0],
                                    self.args[b][0], self.kwargs[b][0])
        return {"stages": stages,
                "shapes": {n: tuple(m.weight.shape) for n, m in self.linears.items()},
                # Everything not solved: the recipe's skips and the routers. Each is named to the
                # checkpoint's ignore list, which engines match exactly (not as substrings).
                "skipped": sorted(n for n in target_linears(self.blocks[b])
                                  if n not in self.linears)}

    # ------------------------------------------------------------------------------ capture

    @torch.no_grad()
    def capture(self, stage: Stage, calibrate_all: list[int] = ()) -> dict:
        """Accumulate the stage's Hessians over this worker's batches (kept here until fetched
        with :meth:`hessian_part`); returns the tokens routed to each expert, if any."""
        b = self._block()
        block = self.blocks[b]
        self._parts, self._hessians = {}, {}
        batch = {"index": 0, "local": 0}
        handles = []

        def hook(acc, references=None):
            if references is None:
                return lambda module, inputs: acc.add(inputs[0], batch["index"])
            return lambda module, inputs: acc.add(inputs[0], batch["index"],
                                                  references[batch["local"]])

        for group in stage.groups:
            first = self.linears[group[0]]
            refs = None
            if self._float is not None and stage.experts is None:
                refs = self._float["inputs"].get(group[0])
                refs = refs if refs is not None and all(r is not None for r in refs) else None
            self._parts[group[0]] = HessianAccumulator(first.in_features, self.device,
                                                       cross=refs is not None)
            handles.append(first.register_forward_pre_hook(hook(self._parts[group[0]], refs)))
        experts: ExpertList | None = None
        if stage.experts is not None:
            experts = block.get_submodule(stage.experts)
            experts.reset_counts()
            experts.calibrate_all = frozenset(calibrate_all)
            if stage.role == 0:
                acc = HessianAccumulator(experts[0].linears()[0].in_features, self.device)
                self._parts[ALL_TOKENS + stage.experts] = acc
                handles.append(experts.register_forward_pre_hook(hook(acc)))
        t = time.perf_counter()
        try:
            for i, h in enumerate(self.hidden):
                batch["index"], batch["local"] = self.batch_ids[i], i
                block(h, *self.args[b][i], **self.kwargs[b][i])
        finally:
            for handle in handles:
                handle.remove()
            if experts is not None:
                experts.calibrate_all = frozenset()
        self.busy["forward"] += time.perf_counter() - t
        return {"routed": list(experts.routed_tokens) if experts is not None else None}

    def hessian_part(self, key: str) -> dict:
        """This worker's partial sums for one group (``key``: its first linear, or
        ``ALL_TOKENS + experts path``), to be merged on the layer's owner."""
        return self._parts[key].state()

    # -------------------------------------------------------------------------------- solve

    @torch.no_grad()
    def solve(self, name: str, key: str | None, rows: list[tuple[int, int]], *parts: dict) -> dict:
        """Solve row blocks ``rows`` of linear ``name`` against the Hessian merged from ``parts``
        (every worker's partial sums for ``key``); ``key`` None rounds to nearest.

        Returns ``{"blocks": [BlockResult], "grid": {"scale", "zero"} or None}``; the grid comes
        with the block that starts at row 0.
        """
        t = time.perf_counter()
        hessian, tokens, cross = None, None, None
        if key is not None:
            if key not in self._hessians:
                acc = HessianAccumulator.from_state(parts[0], self.device)
                for part in parts[1:]:
                    acc.merge(HessianAccumulator.from_state(part, self.device))
                self._hessians[key] = (acc.hessian(), acc.num_rows,
                                       acc.cross() if acc.has_cross else None)
            hessian, tokens, cross = self._hessians[key]
        self.busy["merge"] += time.perf_counter() - t
        t = time.perf_counter()
        weight = self.linears[name].weight.detach().float()
        if key is not None and cross is not None:
            # The asymmetric objective is the ordinary one with a moved target (see the function).
            weight = asymmetric_target(weight, hessian, cross, self.asymmetric,
                                       self.recipe.solver.gptq.damp)
        # The grid is fitted to the whole layer by every solver of a part of it: the same bits
        # everywhere, and a row block's grid is its rows of the whole (fitting is row-wise).
        grid = fit_grid(weight, self.recipe.grid)
        out = [solve_block(weight, hessian, grid, self.recipe.solver, start, stop,
                           compare=self.recipe.report.compare)
               for start, stop in rows]
        self.busy["solve"] += time.perf_counter() - t
        blocks = [BlockResult(r.start, r.stop, r.method, r.codes.cpu(), r.weight.cpu(),
                              r.loss_num, r.loss_den, r.iterations, r.seconds,
                              history=report_curves(r.history), compare=r.compare) for r in out]
        first = any(start == 0 for start, _ in rows)
        return {"blocks": blocks, "tokens": tokens,
                "grid": {"scale": grid.scale.cpu(), "zero": grid.zero.cpu()} if first else None}

    @torch.no_grad()
    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Put solved (dequantized) weights in place; later stages see the quantized layers."""
        for name, w in weights.items():
            linear = self.linears[name]
            linear.weight.copy_(w.to(linear.weight.device, linear.weight.dtype))

    # ---------------------------------------------------------------------------- propagate

    def propagate(self) -> None:
        """Run the (quantized) block on this worker's shard: the next block's inputs."""
        b = self._block()
        t = time.perf_counter()
        with torch.no_grad():
            self.hidden = [block_output(self.blocks[b](h, *self.args[b][i], **self.kwargs[b][i]))
                           for i, h in enumerate(self.hidden)]
        self.busy["forward"] += time.perf_counter() - t
        if self._float is not None:
            self.float_hidden = self._float["outputs"]
            self._float = None

    def replay(self, b: int, weights: dict[str, torch.Tensor],
               state: dict[str, torch.Tensor] | None = None) -> None:
        """Bring this worker past block ``b`` with that block's committed quantized weights
        (resume, or a restarted worker catching up): load, set, propagate, release."""
        self.load_block(b, state)
        self.set_weights(weights)
        self.propagate()
        self.release_block()

    def stats(self) -> dict:
        """Busy seconds per activity and this worker's peak memory (device, or host RSS)."""
        from .pipeline import peak_memory_bytes

        return {**self.busy, "peak_memory_bytes": peak_memory_bytes(self.device)}

    def _block(self) -> int:
        if self.current is None:
            raise RuntimeError("no block is loaded on this worker")
        return self.current


class ShardWorker(Worker):
    """The depth-parallel schedule's worker. It owns one or more *segments* — contiguous runs of
    blocks — for the whole run and quantizes them the sequential way (stage by stage, block by
    block, each on the outputs of the quantized blocks before it) from the segment's input, which
    is the float model's activations in round 0 and the previous segment's output from the round
    before afterwards. Every worker holds every calibration batch; each layer keeps its ADMM-Q
    state (codes, dual) from round to round for warm starts."""

    def own(self, segments: dict[int, list[int]]) -> None:
        self.segments = {s: list(blocks) for s, blocks in sorted(segments.items())}
        self.owned = [b for blocks in self.segments.values() for b in blocks]
        self.layers: dict[tuple[int, str], torch.nn.Linear] = {}
        self.stages: dict[int, list[list[list[str]]]] = {}
        self.float_weights: dict[tuple[int, str], torch.Tensor] = {}
        self.state: dict[tuple[int, str], dict] = {}
        for b in self.owned:
            load_block(self.blocks[b], self.layout.block_prefix(b), self.index, self.device,
                       self.dtype)
            for name, linear in block_linears(self.blocks[b], self.recipe.output.skip).items():
                self.layers[(b, name)] = linear
                self.float_weights[(b, name)] = linear.weight.detach().float().clone()
        for b in self.owned:
            self._stages(b)
        # Each segment's input per batch: the embeddings for segment 0, else set by the
        # pipelined float forward (round 0) and by the coordinator (later rounds).
        self.inputs: dict[int, list] = {s: [None] * len(self.batch_ids) for s in self.segments}
        if 0 in self.inputs:
            self.inputs[0] = list(self.first_hidden)
        self.outputs: dict[int, list[torch.Tensor]] = {}

    def layer_widths(self) -> dict[tuple[int, str], int]:
        """``in_features`` of every owned linear, for the writer's checks before any solve."""
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

    @torch.no_grad()
    def forward_shard(self, i: int, hidden: torch.Tensor | None) -> torch.Tensor:
        """Round 0's pipelined forward of the float model: run global batch ``i`` through this
        worker's blocks, keeping each segment's input; returns the hidden states."""
        t = time.perf_counter()
        local = self.batch_ids.index(i)
        h = self.first_hidden[local] if hidden is None else hidden.to(self.device, self.dtype)
        for s, blocks in self.segments.items():
            if s != 0:
                self.inputs[s][local] = h
            for b in blocks:
                h = block_output(self.blocks[b](h, *self.args[b][local], **self.kwargs[b][local]))
        self.busy["forward"] += time.perf_counter() - t
        return h.cpu() if self.device.type != "cpu" else h

    def set_input(self, s: int, hidden: list[torch.Tensor]) -> None:
        """Segment ``s``'s input for the next round (the previous segment's latest output)."""
        self.inputs[s] = [h.to(self.device, self.dtype) for h in hidden]

    def segment_output(self, s: int) -> list[torch.Tensor]:
        return [h.cpu() for h in self.outputs[s]]

    @torch.no_grad()
    def run_round(self, r: int, warm_settings, segments: list[int],
                  cold: list[int] = ()) -> list[dict]:
        """Quantize the owned ``segments`` sequentially from their inputs: the ``cold`` ones (and
        every layer without a state yet) with the full schedule, the others warm-started with
        ``warm_settings`` (a SolverSettings); per layer: loss, iterations, the fraction of codes
        that changed, and the report's curves."""
        out = []
        for s in segments:
            h = self.inputs[s]
            for b in self.segments[s]:
                for groups in self._stages(b):
                    out += self._solve_stage(b, groups, h, warm_settings, s in cold)
                t = time.perf_counter()
                h = [block_output(self.blocks[b](x, *self.args[b][i], **self.kwargs[b][i]))
                     for i, x in enumerate(h)]
                self.busy["forward"] += time.perf_counter() - t
            self.outputs[s] = h
        return out

    def _solve_stage(self, b: int, groups: list[list[str]], hidden: list[torch.Tensor],
                     warm_settings, cold: bool) -> list[dict]:
        t = time.perf_counter()
        accs, handles = {}, []
        batch = {"index": 0}

        def hook(acc):
            return lambda module, inputs: acc.add(inputs[0], batch["index"])

        for group in groups:
            first = self.layers[(b, group[0])]
            accs[group[0]] = HessianAccumulator(first.in_features, self.device)
            handles.append(first.register_forward_pre_hook(hook(accs[group[0]])))
        try:
            for i, x in enumerate(hidden):
                batch["index"] = self.batch_ids[i]
                self.blocks[b](x, *self.args[b][i], **self.kwargs[b][i])
        finally:
            for handle in handles:
                handle.remove()
        self.busy["forward"] += time.perf_counter() - t
        t = time.perf_counter()
        out = []
        for group in groups:
            hessian = accs[group[0]].hessian()
            for name in group:
                weight = self.float_weights[(b, name)]
                grid = fit_grid(weight, self.recipe.grid)
                previous = self.state.get((b, name))
                settings = self.recipe.solver if previous is None or cold else warm_settings
                blocks = []
                for k, (start, stop) in enumerate(row_blocks(weight.shape[0], settings.row_block)):
                    warm = None
                    if previous is not None and not cold:
                        warm = {"codes": previous["codes"][start:stop], "dual": previous["duals"][k]}
                    blocks.append(solve_block(weight, hessian, grid, settings, start, stop,
                                              warm=warm, compare=self.recipe.report.compare))
                result = combine(blocks, grid)
                changed = 1.0 if previous is None else float(
                    (result.codes != previous["codes"]).float().mean())
                self.state[(b, name)] = {"codes": result.codes, "grid": grid,
                                         "duals": [blk.state.get("dual") for blk in blocks]}
                linear = self.layers[(b, name)]
                linear.weight.copy_(grid.dequantize(result.codes).to(linear.weight.dtype))
                out.append({"block": b, "layer": name, "loss": result.loss,
                            "iterations": result.iterations, "changed": changed,
                            "size": result.codes.numel(), "tokens": accs[group[0]].num_rows,
                            "method": result.method, "group": group,
                            "seconds": result.seconds, **layer_history(blocks)})
        self.busy["solve"] += time.perf_counter() - t
        return out

    def results(self, b: int) -> dict:
        """Codes and grids of block ``b``'s layers, for the writer."""
        return {name: (st["codes"].cpu(), st["grid"].scale.cpu(), st["grid"].zero.cpu())
                for (bb, name), st in self.state.items() if bb == b}

    def save_round(self, folder: str, r: int, segments: list[int]) -> None:
        """Commit the owned ``segments`` solved in round ``r``: their layers' codes, grids and
        duals, and the segment's output (the next segment's input) — temp file, then rename."""
        from safetensors.torch import save_file

        for s in segments:
            tensors = {}
            for b in self.segments[s]:
                for (bb, name), st in self.state.items():
                    if bb != b:
                        continue
                    key = f"{b}.{name}"
                    tensors[f"{key}.codes"] = st["codes"].to(torch.uint8).cpu().contiguous()
                    tensors[f"{key}.scale"] = st["grid"].scale.cpu().contiguous()
                    tensors[f"{key}.zero"] = st["grid"].zero.cpu().contiguous()
                    for k, dual in enumerate(st["duals"]):
                        if dual is not None:
                            tensors[f"{key}.dual.{k}"] = dual.cpu().contiguous()
            for i, h in enumerate(self.outputs[s]):
                tensors[f"output.{i}"] = h.cpu().contiguous()
            final = Path(folder) / f"round-{r:03d}-segment-{s:05d}.safetensors"
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            save_file(tensors, str(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)

    @torch.no_grad()
    def load_round(self, folder: str, solved_in: dict[int, int]) -> None:
        """Restore the owned segments' states and outputs from the rounds that last solved them
        (``solved_in``: segment -> round), and put the quantized weights in place."""
        from safetensors import safe_open

        from .quant.grid import Grid

        for s, blocks in self.segments.items():
            path = Path(folder) / f"round-{solved_in[s]:03d}-segment-{s:05d}.safetensors"
            with safe_open(path, "pt") as f:
                keys = set(f.keys())
                self.outputs[s] = [f.get_tensor(f"output.{i}").to(self.device, self.dtype)
                                   for i in range(len(self.batch_ids))]
                for (b, name), linear in self.layers.items():
                    if b not in blocks:
                        continue
                    key = f"{b}.{name}"
                    codes = f.get_tensor(f"{key}.codes").to(torch.int32).to(self.device)
                    spec = self.recipe.grid
                    grid = Grid(spec.bits, spec.effective_group_size(codes.shape[1]),
                                codes.shape[1], spec.symmetric,
                                f.get_tensor(f"{key}.scale").to(self.device),
                                f.get_tensor(f"{key}.zero").to(self.device))
                    parts = row_blocks(codes.shape[0], self.recipe.solver.row_block)
                    duals = [f.get_tensor(f"{key}.dual.{k}").to(self.device)
                             if f"{key}.dual.{k}" in keys else None for k in range(len(parts))]
                    self.state[(b, name)] = {"codes": codes, "grid": grid, "duals": duals}
                    linear.weight.copy_(grid.dequantize(codes).to(linear.weight.dtype))


def report_curves(history: dict) -> dict:
    """The parts of a solver's history the run report plots (they travel to the coordinator)."""
    return {k: history[k] for k in ("residual", "rho", "weight_norm") if k in history}
