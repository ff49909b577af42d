"""The layer-wise sequential protocol on one device (``admmq-algorithm.md`` §6).

Catch the inputs of every decoder block, then per block: load its weights, capture one Hessian per
group of linears that share an input (true sequential: each group after the previous groups were
quantized), solve, put the dequantized weights in place, run the block to produce the next block's
inputs, hand the packed tensors to the writer, and free the block.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from .checkpoint import CheckpointWriter
from .model.arch import find_blocks, target_linears
from .model.calibration import read_text, token_windows
from .model.capture import block_output, input_groups, record_block_calls
from .model.loading import (TensorIndex, build_skeleton, materialize, release,
                            resolve_model_dir)
from .quant.grid import fit_grid
from .quant.hessian import HessianAccumulator
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


@torch.no_grad()
def quantize_model(model: str, out_dir: Path, recipe: Recipe, *, device: torch.device,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Quantize ``model`` (hub id or folder) into a checkpoint at ``out_dir``; returns a summary."""
    started = time.perf_counter()
    timings = {"load": 0.0, "forward": 0.0, "hessian": 0.0, "solve": 0.0, "write": 0.0}
    model_dir = resolve_model_dir(model)
    index = TensorIndex(model_dir)
    config, skeleton = build_skeleton(model_dir, torch.float32)
    out_dtype = output_dtype(recipe, config)
    # Forward passes in float32 on the CPU (half precision is slow there); the model's own
    # half-precision dtype on a GPU. Hessians are float32 either way.
    compute_dtype = torch.float32 if device.type == "cpu" else out_dtype
    layout, blocks = find_blocks(skeleton)
    grid_spec = recipe.grid

    t = time.perf_counter()
    batches = calibration_batches(model_dir, recipe)
    # Everything but the blocks (embeddings, rotary tables, final norm, lm_head) is small.
    materialize(skeleton, "", index, device, compute_dtype, tied=_tied_names(skeleton),
                exclude=layout.prefix)
    timings["load"] += time.perf_counter() - t

    t = time.perf_counter()
    calls = record_block_calls(skeleton, blocks, batches, device)
    timings["forward"] += time.perf_counter() - t

    writer = CheckpointWriter(out_dir, format=recipe.output.format, bits=grid_spec.bits,
                              group_size=grid_spec.group_size, symmetric=grid_spec.symmetric,
                              dtype=out_dtype, overwrite=overwrite,
                              max_shard_bytes=int(recipe.output.max_shard_gb * 1024**3))
    report: list[dict] = []
    try:
        hidden = [h.to(compute_dtype) for h in calls.first_hidden]
        quantized_names: set[str] = set()
        bar = tqdm(range(layout.num_blocks), desc="blocks", unit="block", disable=not progress,
                   mininterval=1 if sys.stderr.isatty() else 30)
        for b in bar:
            prefix = layout.block_prefix(b)
            block = blocks[b]
            t = time.perf_counter()
            materialize(block, prefix, index, device, compute_dtype)
            timings["load"] += time.perf_counter() - t
            linears = target_linears(block, recipe.output.skip)
            groups = input_groups(block, linears, hidden[0], calls.args[b][0], calls.kwargs[b][0])
            for group in groups:
                # Linears of one group see the same input: one accumulator serves them all.
                first = linears[group[0]]
                acc = HessianAccumulator(first.in_features, device)
                batch = {"index": 0}
                handle = first.register_forward_pre_hook(
                    lambda module, inputs: acc.add(inputs[0], batch["index"]))
                t = time.perf_counter()
                try:
                    for i, h in enumerate(hidden):
                        batch["index"] = i
                        block(h, *calls.args[b][i], **calls.kwargs[b][i])
                finally:
                    handle.remove()
                timings["forward"] += time.perf_counter() - t
                t = time.perf_counter()
                hessian = acc.hessian()
                timings["hessian"] += time.perf_counter() - t
                for name in group:
                    linear = linears[name]
                    t = time.perf_counter()
                    weight = linear.weight.detach().float()
                    grid = fit_grid(weight, grid_spec)
                    result = solve(weight, hessian, grid, recipe.solver)
                    linear.weight.copy_(result.weight.to(linear.weight.dtype))
                    timings["solve"] += time.perf_counter() - t
                    full = f"{prefix}.{name}"
                    t = time.perf_counter()
                    writer.add_quantized(full, result.codes.cpu(), grid.to("cpu"))
                    timings["write"] += time.perf_counter() - t
                    quantized_names.add(f"{full}.weight")
                    report.append({"layer": full, "block": b, "group": group, "method":
                                   result.method, "shape": list(weight.shape), "loss": result.loss,
                                   "iterations": result.iterations, "seconds": result.seconds,
                                   "tokens": acc.num_rows})
                bar.set_postfix(loss=f"{report[-1]['loss']:.4f}")
            t = time.perf_counter()
            hidden = [block_output(block(h, *calls.args[b][i], **calls.kwargs[b][i]))
                      for i, h in enumerate(hidden)]
            timings["forward"] += time.perf_counter() - t
            t = time.perf_counter()
            for name in index.names():
                if name.startswith(prefix + ".") and name not in quantized_names:
                    writer.add_tensor(name, index.read(name))
            timings["write"] += time.perf_counter() - t
            release(block)
        t = time.perf_counter()
        for name in index.names():
            if not name.startswith(layout.prefix + "."):
                writer.add_tensor(name, index.read(name))
        resolved = to_mapping(recipe)
        summary = {
            "model": model, "output": str(out_dir), "format": recipe.output.format,
            "bits": grid_spec.bits, "group_size": grid_spec.group_size,
            "symmetric": grid_spec.symmetric, "method": recipe.solver.method,
            "layers": len(report),
            "mean_loss": sum(r["loss"] for r in report) / max(len(report), 1),
            "seconds": {k: round(v, 3) for k, v in timings.items()},
            "peak_memory_bytes": peak_memory_bytes(device),
            "device": str(device),
        }
        writer.finalize(
            config=config.to_dict(), source_dir=model_dir, ignore=list(recipe.output.skip),
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
