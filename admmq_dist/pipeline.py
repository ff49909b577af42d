"""The layer-wise sequential protocol on one device (``admmq-algorithm.md`` §6).

Catch the inputs of every decoder block, then per block: load its weights, capture one Hessian per
group of linears that share an input (true sequential: each group after the previous groups were
quantized), solve, put the dequantized weights in place, run the block to produce the next block's
inputs, hand the packed tensors to the writer, and free the block.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import logging
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from .checkpoint import CheckpointWriter
from .model.arch import find_blocks, target_linears
from .model.calibration import read_text, token_windows
from .model.capture import Stage, block_output, calibration_stages, record_block_calls
from .model.loading import (TensorIndex, build_skeleton, materialize, release,
                            resolve_model_dir)
from .model.moe import ExpertList, expert_lists, is_router, load_fused_into, unfuse_experts
from .quant.grid import fit_grid
from .quant.hessian import HessianAccumulator
from .quant.solvers.rtn import rtn
from .quant.solvers.solve import solve
from .recipe import Recipe, to_mapping

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def default_calibration_text() -> str:
    """The calibration text shipped in the package (see ``admmq_dist/data/README.md``)."""
    return importlib.resources.files("admmq_dist").joinpath("data/calibration.txt").read_text(
        encoding="utf-8")


def output_dtype(recipe: Recipe, config) -> torch.dtype:
    if recipe.output.dtype != "auto":
        return DTYPES[recipe.output.dtype]
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def calibration_batches(model_dir: Path, recipe: Recipe) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    cal = recipe.calibration
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = default_calibration_text() if cal.dataset is None else read_text(
        cal.dataset, split=cal.split, text_field=cal.text_field)
    windows = token_windows(tokenizer, text, cal.num_samples, cal.seq_len, cal.seed)
    return list(torch.split(windows, cal.batch_size))


def _tied_names(model) -> dict[str, str]:
    """Output embeddings that share the input embeddings' weight are absent from the files."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if out_emb is None or in_emb is None:
        return {}
    return {f"{names[id(out_emb)]}.weight": f"{names[id(in_emb)]}.weight"}


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class BlockContext:
    """What solving one block needs: its calibration calls and where its results go."""

    block: torch.nn.Module
    index: int
    prefix: str
    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]
    recipe: Recipe
    device: torch.device
    timings: dict[str, float]


def load_block(block: torch.nn.Module, prefix: str, index: TensorIndex, device: torch.device,
               dtype: torch.dtype) -> set[str]:
    """Materialize one block; experts stored fused in the checkpoint are split as they load.

    Returns the checkpoint names of fused tensors consumed that way (written back per expert).
    """
    fused, consumed = [], set()
    for path, experts in expert_lists(block).items():
        first = f"{prefix}.{path}.0.{experts.roles[0]}.weight"
        if first not in index and f"{prefix}.{path}.gate_up_proj" in index:
            gate_up = index.read(f"{prefix}.{path}.gate_up_proj").to(device, dtype)
            down = index.read(f"{prefix}.{path}.down_proj").to(device, dtype)
            load_fused_into(experts, gate_up, down)
            fused.append(path)
            consumed |= {index.disk_name(f"{prefix}.{path}.{p}") for p in ("gate_up_proj", "down_proj")}
    materialize(block, prefix, index, device, dtype, exclude=tuple(fused))
    return consumed


def _run_block(ctx: BlockContext) -> None:
    for i, h in enumerate(ctx.hidden):
        ctx.block(h, *ctx.args[i], **ctx.kwargs[i])


def capture_stage(ctx: BlockContext, linears: dict[str, torch.nn.Linear], stage: Stage,
                  all_tokens: HessianAccumulator | None = None) -> dict[str, HessianAccumulator]:
    """One calibration pass over the block: a Hessian accumulator per group of ``stage``.

    ``all_tokens``, when given, also accumulates the input of the stage's expert list (every
    token reaching the experts) — the gate/up Hessian of an under-routed expert.
    """
    accs: dict[str, HessianAccumulator] = {}
    batch = {"index": 0}
    handles = []

    def hook(acc):
        return lambda module, inputs: acc.add(inputs[0], batch["index"])

    for group in stage.groups:
        first = linears[group[0]]
        accs[group[0]] = HessianAccumulator(first.in_features, ctx.device)
        handles.append(first.register_forward_pre_hook(hook(accs[group[0]])))
    if all_tokens is not None:
        handles.append(ctx.block.get_submodule(stage.experts).register_forward_pre_hook(
            hook(all_tokens)))
    t = time.perf_counter()
    try:
        for i, h in enumerate(ctx.hidden):
            batch["index"] = i
            ctx.block(h, *ctx.args[i], **ctx.kwargs[i])
    finally:
        for handle in handles:
            handle.remove()
    ctx.timings["forward"] += time.perf_counter() - t
    return accs


def _expert_calibration(ctx: BlockContext, stage: Stage, experts: ExpertList,
                        memo: dict) -> dict[int, str]:
    """How each expert of ``stage`` is calibrated: "routed", "all-tokens" or "rtn".

    Decided at the gate/up stage from the routed token counts and kept for the down stage.
    """
    if stage.role == 0 or stage.experts not in memo:
        cal = ctx.recipe.calibration
        hidden = experts[0].linears()[0].in_features
        threshold = hidden if cal.min_expert_tokens is None else cal.min_expert_tokens
        memo[stage.experts] = {
            e: "routed" if n >= threshold and n > 0 else cal.expert_fallback
            for e, n in enumerate(experts.routed_tokens)}
    return memo[stage.experts]


@torch.no_grad()
def quantize_block(ctx: BlockContext, writer: CheckpointWriter, index: TensorIndex,
                   progress=None) -> tuple[list[dict], set[str]]:
    """Quantize every target linear of one loaded block, stage by stage (true sequential).

    Returns the report rows and the checkpoint names of the weights written quantized.
    """
    recipe, block = ctx.recipe, ctx.block
    experts = expert_lists(block)
    linears = target_linears(block, recipe.output.skip)
    if experts:
        # Routers (and shared-expert gates) stay in full precision, as in every engine.
        linears = {n: m for n, m in linears.items() if not is_router(n)}
    stages = calibration_stages(block, linears, ctx.hidden[0], ctx.args[0], ctx.kwargs[0])
    report: list[dict] = []
    written: set[str] = set()
    expert_memo: dict = {}
    for stage in stages:
        expert_list = experts.get(stage.experts) if stage.experts else None
        all_tokens = None
        if expert_list is not None:
            if stage.role == 0:
                expert_list.reset_counts()
                all_tokens = HessianAccumulator(linears[stage.groups[0][0]].in_features,
                                                ctx.device)
            elif recipe.calibration.expert_fallback == "all-tokens":
                decided = expert_memo.get(stage.experts, {})
                expert_list.calibrate_all = frozenset(
                    e for e, how in decided.items() if how == "all-tokens")
        try:
            accs = capture_stage(ctx, linears, stage, all_tokens)
        finally:
            if expert_list is not None:
                expert_list.calibrate_all = frozenset()
        calibration = (_expert_calibration(ctx, stage, expert_list, expert_memo)
                       if expert_list is not None else {})
        for group in stage.groups:
            acc = accs[group[0]]
            how = "dense"
            if expert_list is not None:
                how = calibration[int(group[0][len(stage.experts) + 1:].split(".")[0])]
                if how == "all-tokens" and stage.role == 0:
                    acc = all_tokens
            t = time.perf_counter()
            hessian = acc.hessian() if how != "rtn" else None
            ctx.timings["hessian"] += time.perf_counter() - t
            for name in group:
                row = _solve_linear(ctx, linears[name], name, hessian, writer, index)
                written.add(index.disk_name(f"{ctx.prefix}.{name}.weight"))
                tokens = (expert_list.routed_tokens[int(name[len(stage.experts) + 1:].split(".")[0])]
                          if expert_list is not None else acc.num_rows)
                row.update(calibration=how, tokens=tokens, group=group)
                report.append(row)
            if progress is not None and report[-1]["loss"] is not None:
                progress.set_postfix(loss=f"{report[-1]['loss']:.4f}")
    return report, written


def _solve_linear(ctx: BlockContext, linear: torch.nn.Linear, name: str,
                  hessian: torch.Tensor | None, writer: CheckpointWriter,
                  index: TensorIndex) -> dict:
    """Solve one linear (round to nearest when ``hessian`` is None), put the dequantized weight
    in place and hand the codes to the writer."""
    t = time.perf_counter()
    weight = linear.weight.detach().float()
    grid = fit_grid(weight, ctx.recipe.grid)
    if hessian is None:
        result = rtn(weight, None, grid)
    else:
        result = solve(weight, hessian, grid, ctx.recipe.solver)
    linear.weight.copy_(result.weight.to(linear.weight.dtype))
    ctx.timings["solve"] += time.perf_counter() - t
    full = f"{ctx.prefix}.{name}"
    t = time.perf_counter()
    writer.add_quantized(index.disk_name(f"{full}.weight")[: -len(".weight")],
                         result.codes.cpu(), grid.to("cpu"))
    ctx.timings["write"] += time.perf_counter() - t
    return {"layer": full, "block": ctx.index, "method": result.method,
            "shape": list(weight.shape), "loss": result.loss if hessian is not None else None,
            "iterations": result.iterations, "seconds": result.seconds}


def skipped_block_linears(block: torch.nn.Module, prefix: str, index: TensorIndex,
                          skip: tuple[str, ...]) -> list[str]:
    """Ignore entries for the block's linears left in full precision (MoE routers): regexes on
    the checkpoint name relative to the block, so one entry covers every block."""
    if not expert_lists(block):
        return []
    names = [n for n in target_linears(block, skip) if is_router(n)]
    disk = [index.disk_name(f"{prefix}.{n}.weight")[len(prefix) + 1: -len(".weight")]
            for n in names]
    return [f"re:.*\\.{re.escape(d)}$" for d in disk]


@torch.no_grad()
def quantize_model(model: str, out_dir: Path, recipe: Recipe, *, device: torch.device,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Quantize ``model`` (hub id or folder) into a checkpoint at ``out_dir``; returns a summary."""
    started = time.perf_counter()
    timings = {"load": 0.0, "forward": 0.0, "hessian": 0.0, "solve": 0.0, "write": 0.0}
    model_dir = resolve_model_dir(model)
    config, skeleton = build_skeleton(model_dir, torch.float32)
    index = TensorIndex(model_dir, getattr(config, "model_type", None))
    out_dtype = output_dtype(recipe, config)
    # Forward passes in float32 on the CPU (half precision is slow there); the model's own
    # half-precision dtype on a GPU. Hessians are float32 either way.
    compute_dtype = torch.float32 if device.type == "cpu" else out_dtype
    layout, blocks = find_blocks(skeleton)
    moe = [unfuse_experts(blocks[b], layout.block_prefix(b), index.module_names())
           for b in range(layout.num_blocks)]
    grid_spec = recipe.grid
    if any(moe) and not grid_spec.symmetric:
        raise ValueError(
            "mixture-of-experts checkpoints must be symmetric: vLLM's quantized MoE kernels and "
            "transformers' expert loader read no zero points; use --sym")

    t = time.perf_counter()
    batches = calibration_batches(model_dir, recipe)
    # Everything but the blocks (embeddings, rotary tables, final norm, lm_head) is small.
    materialize(skeleton, "", index, device, compute_dtype, tied=_tied_names(skeleton),
                exclude=(layout.prefix,))
    timings["load"] += time.perf_counter() - t

    t = time.perf_counter()
    calls = record_block_calls(skeleton, blocks, batches, device)
    timings["forward"] += time.perf_counter() - t

    writer = CheckpointWriter(out_dir, format=recipe.output.format, bits=grid_spec.bits,
                              group_size=grid_spec.group_size, symmetric=grid_spec.symmetric,
                              dtype=out_dtype, overwrite=overwrite,
                              max_shard_bytes=int(recipe.output.max_shard_gb * 1024**3))
    report: list[dict] = []
    ignore = list(recipe.output.skip)
    try:
        hidden = [h.to(compute_dtype) for h in calls.first_hidden]
        bar = tqdm(range(layout.num_blocks), desc="blocks", unit="block", disable=not progress,
                   mininterval=1 if sys.stderr.isatty() else 30)
        for b in bar:
            prefix = layout.block_prefix(b)
            block = blocks[b]
            t = time.perf_counter()
            consumed = load_block(block, prefix, index, device, compute_dtype)
            timings["load"] += time.perf_counter() - t
            ctx = BlockContext(block, b, prefix, hidden, calls.args[b], calls.kwargs[b], recipe,
                               device, timings)
            rows, written = quantize_block(ctx, writer, index, progress=bar)
            written |= consumed
            report.extend(rows)
            ignore.extend(n for n in skipped_block_linears(block, prefix, index, recipe.output.skip)
                          if n not in ignore)
            t = time.perf_counter()
            hidden = [block_output(block(h, *calls.args[b][i], **calls.kwargs[b][i]))
                      for i, h in enumerate(hidden)]
            timings["forward"] += time.perf_counter() - t
            t = time.perf_counter()
            for disk, name in zip(index.names(), index.module_names()):
                if name.startswith(prefix + ".") and disk not in written:
                    writer.add_tensor(disk, index.read(disk))
            timings["write"] += time.perf_counter() - t
            release(block)
        t = time.perf_counter()
        for disk, name in zip(index.names(), index.module_names()):
            if not name.startswith(layout.prefix + "."):
                writer.add_tensor(disk, index.read(disk))
        resolved = to_mapping(recipe)
        solved = [r for r in report if r["loss"] is not None]
        summary = {
            "model": model, "output": str(out_dir), "format": recipe.output.format,
            "bits": grid_spec.bits, "group_size": grid_spec.group_size,
            "symmetric": grid_spec.symmetric, "method": recipe.solver.method,
            "layers": len(report),
            "mean_loss": sum(r["loss"] for r in solved) / max(len(solved), 1),
            "seconds": {k: round(v, 3) for k, v in timings.items()},
            "peak_memory_bytes": peak_memory_bytes(device),
            "device": str(device),
        }
        calibrations = [r["calibration"] for r in report if r["calibration"] != "dense"]
        if calibrations:
            summary["experts"] = {how: calibrations.count(how)
                                  for how in ("routed", "all-tokens", "rtn")}
        writer.finalize(
            config=config.to_dict(), source_dir=model_dir, ignore=ignore,
            extra_files={
                "recipe.yaml": yaml.safe_dump(resolved, sort_keys=False),
                "report.jsonl": "".join(json.dumps(r) + "\n" for r in report),
            })
        timings["write"] += time.perf_counter() - t
    except BaseException:
        writer.abort()
        raise
    summary["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    summary["seconds"]["total"] = round(time.perf_counter() - started, 3)
    return summary
