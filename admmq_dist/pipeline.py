"""The main job: a model in, a quantized checkpoint out (``admmq-algorithm.md`` §6).

Catch the inputs of every decoder block, then per block: load its weights, capture one Hessian per
group of linears that share an input (true sequential: each group after the previous groups were
quantized), solve, put the dequantized weights in place, run the block to produce the next block's
inputs, hand the packed tensors to the writer, and free the block. The loop lives in
:mod:`admmq_dist.coordinator`, the per-device work in :mod:`admmq_dist.worker`; this module picks
the backend (in-process, or Ray actors) and prepares the calibration batches.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import resource
from pathlib import Path

import torch

from .checkpoint.serving import Layout, check_servable, default_symmetric
from .model.calibration import read_text, token_windows
from .model.loading import build_skeleton, resolve_model_dir, source_dtype
from .model.moe import has_fused_experts
from .recipe import Recipe

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def default_calibration_text() -> str:
    """The calibration text shipped in the package (see ``admmq_dist/data/README.md``)."""
    return importlib.resources.files("admmq_dist").joinpath("data/calibration.txt").read_text(
        encoding="utf-8")


def output_dtype(recipe: Recipe, model_dir: Path) -> torch.dtype:
    """The dtype of the checkpoint's scales and dense tensors: the recipe's, or with ``auto`` the
    one the model was saved in (a bfloat16 model stays bfloat16)."""
    if recipe.output.dtype != "auto":
        return DTYPES[recipe.output.dtype]
    return source_dtype(Path(model_dir))


def settle_recipe(recipe: Recipe, experts: bool) -> tuple[Recipe, list[str]]:
    """The recipe with the choices it leaves open made for this model (the grid's symmetry), and
    one line per such choice and per engine that will not serve the result. Raises ValueError,
    before any work, when no engine would serve it."""
    notes = []
    if recipe.grid.symmetric is None:
        symmetric, why = default_symmetric(recipe.output.format, experts)
        recipe = dataclasses.replace(
            recipe, grid=dataclasses.replace(recipe.grid, symmetric=symmetric))
        if why:
            notes.append(why)
    grid = recipe.grid
    notes += check_servable(Layout(recipe.output.format, grid.bits, grid.symmetric,
                                   grid.group_size, experts))
    return recipe, notes


def calibration_batches(model_dir: Path, recipe: Recipe) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    cal = recipe.calibration
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = default_calibration_text() if cal.dataset is None else read_text(
        cal.dataset, split=cal.split, text_field=cal.text_field)
    windows = token_windows(tokenizer, text, cal.num_samples, cal.seq_len, cal.seed)
    return list(torch.split(windows, cal.batch_size))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.no_grad()
def quantize_model(model: str, out_dir: Path, recipe: Recipe, *, device: torch.device,
                   overwrite: bool = False, progress: bool = True, workers: int | None = None,
                   address: str | None = None, threads: int | None = None,
                   resume: bool = False, on_block=None, round_checkpoints: bool = False) -> dict:
    """Quantize ``model`` (hub id or folder) into a checkpoint at ``out_dir``; returns a summary.

    ``workers``/``address`` run the workers as Ray actors (a local Ray instance, or the cluster
    at ``address``); otherwise one worker runs in this process. ``threads`` limits each worker's
    CPU threads. ``resume`` finishes an interrupted run from its committed blocks.
    ``round_checkpoints`` (depth-parallel schedule) also writes the model as each round left it,
    to ``<out_dir>.round-<r>`` (for comparing rounds; the final output is unaffected).
    """
    from .coordinator import LocalBackend, run

    model_dir = resolve_model_dir(model)
    config, skeleton = build_skeleton(model_dir, torch.float32)
    recipe, notes = settle_recipe(recipe, has_fused_experts(skeleton))
    del skeleton
    for note in notes:
        log.warning("%s", note)
    batches = calibration_batches(model_dir, recipe)
    previous_threads = torch.get_num_threads()
    if workers is None and address is None:
        backend = LocalBackend(1)
        if threads:
            torch.set_num_threads(threads)
    else:
        from .cluster import RayBackend

        backend = RayBackend(workers or 1, address=address, threads=threads,
                             gpu=torch.device(device).type == "cuda")
    try:
        return run(model_dir, model, Path(out_dir), recipe, batches, backend,
                   device="cuda" if backend_uses_gpu(backend, device) else str(device),
                   threads=threads, config=config, overwrite=overwrite, resume=resume,
                   progress=progress, on_block=on_block, round_checkpoints=round_checkpoints,
                   notes=tuple(notes))
    finally:
        backend.shutdown()
        torch.set_num_threads(previous_threads)


def backend_uses_gpu(backend, device) -> bool:
    """Ray GPU actors each see their own GPU as ``cuda``; an in-process run uses ``device``."""
    return getattr(backend, "gpu", False)
