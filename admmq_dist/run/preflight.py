"""Before any work: the recipe settled for the model, and the checks that cost a line, not a run,
made from the model's config alone (:mod:`.job_plan`) before any weight is read or hashed and
before Ray or any worker starts."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import torch

from ..checkpoint.serving import Layout, check_servable, default_symmetric
from ..checkpoint.stored import check_ignore_entries, check_width
from ..model.arch import find_blocks
from ..model.moe import has_fused_experts
from ..recipe import Recipe
from . import memory
from .job_plan import JobPlan, plan_job, smallest_fitting
from .model_shape import block_stages, config_folder, meta_skeleton
from .rates import load_rates


def settle_recipe(recipe: Recipe, experts: bool) -> tuple[Recipe, list[str]]:
    """The recipe with the choices it leaves open made for this model (the grid's symmetry, the
    strength asymmetric calibration's "auto" stands for), and one line per such choice and per
    engine that will not serve the result. Raises ValueError, before any work, when no engine
    would serve it."""
    notes = []
    if recipe.grid.symmetric is None:
        symmetric, why = default_symmetric(recipe.output.format, experts)
        if recipe.grid.kind != "int":
            symmetric, why = True, None  # FP4 grids have no zero points
        recipe = dataclasses.replace(
            recipe, grid=dataclasses.replace(recipe.grid, symmetric=symmetric))
        if why:
            notes.append(why)
    # Stored resolved, so the recipe beside the checkpoint says what ran.
    recipe = dataclasses.replace(
        recipe, calibration=recipe.calibration.settled(recipe.solver.method))
    grid = recipe.grid
    notes += check_servable(Layout(recipe.output.format, grid.bits, grid.symmetric,
                                   grid.group_size, experts, grid.kind))
    return recipe, notes


def preflight(model: str, out_dir: Path, recipe: Recipe, *, device: torch.device,
              overwrite: bool, resume: bool, workers: int | None, local: bool,
              modelled: bool = False, work_dir: Path | None = None) -> JobPlan:
    """The checks that cost a line, not a run, made from the model's config alone before any
    weight is read, hashed or any worker started: the output folder, the workers against the
    calibration batches, the job's plan against this machine's device (workers in this process)
    and the free disk where the output goes. ``modelled``: also model the job's time (the Ray
    workers' step deadline is derived from it)."""
    if (out_dir.exists() or out_dir.is_symlink()) and not overwrite and not resume:
        raise FileExistsError(f"{out_dir} already exists; choose another output folder or pass "
                              "--overwrite")
    count = workers or 1
    skeleton = meta_skeleton(config_folder(model))
    recipe, _ = settle_recipe(recipe, has_fused_experts(skeleton[1]))
    check_layers(skeleton[1], recipe, model)
    calib = recipe.calibration
    batches = -(-calib.num_samples // calib.batch_size)
    if recipe.solver.schedule == "sequential" and count > batches:
        raise ValueError(f"{count} workers but only {batches} calibration batches "
                         f"({calib.num_samples} samples / batch {calib.batch_size}); use at most "
                         f"{batches} workers, or more --num-samples or a smaller --batch-size")
    usable = memory.device_capacity(device)  # free memory, less the reserve
    plan = plan_job(model, recipe, workers=count, device_bytes=usable,
                    device_type=device.type, skeleton=skeleton,
                    rates=load_rates() if modelled else None)
    if local and recipe.solver.schedule == "sequential" and \
            plan.worker_device_peak_bytes > usable:
        raise MemoryError(
            f"{_block_of(plan.worst)} needs about "
            f"{plan.worker_device_peak_bytes / 2**30:.1f} GiB on each worker (worst: "
            f"{plan.worst}; `admmq plan` lists the items), more than the "
            f"{usable / 2**30:.1f} GiB usable on this {device.type} device; "
            "use more workers (each holds fewer calibration tokens), fewer --num-samples or a "
            "shorter --seq-len, or a device with more memory")
    output = out_dir.resolve().parent
    work = Path(work_dir).resolve() if work_dir is not None else output
    _check_free_disk([(output, plan.output_bytes, "the output"),
                      (work, plan.work_bytes, "its work folder")])
    return plan


def _check_free_disk(places: list[tuple[Path, int, str]]) -> None:
    """Each filesystem has room for what goes there (the output and the work folder on one, or
    two with ``--work-dir``)."""
    need: dict[int, list] = {}
    for folder, size, what in places:
        while not folder.exists():
            folder = folder.parent
        entry = need.setdefault(os.stat(folder).st_dev, [folder, 0, []])
        entry[1] += size
        entry[2].append(what)
    for folder, size, what in need.values():
        free = shutil.disk_usage(folder).free
        if size > free:
            raise OSError(f"{' and '.join(what)} need about {size / 2**30:.1f} GiB at {folder}, "
                          f"which has {free / 2**30:.1f} GiB free; free space or write "
                          f"{' and '.join(what)} elsewhere" + (" (--work-dir)" if "its work folder"
                                                                in what else ""))


def check_layers(module: torch.nn.Module, recipe: Recipe, model: str) -> None:
    """Every ``--skip`` entry names something in ``model``, the format can keep those modules
    dense, and the grid's groups tile every quantized linear's input width — from the model's
    structure on the meta device, before any weight is read."""
    names = [name for name, _ in module.named_modules()] + [
        name for name, _ in module.named_parameters()]
    for entry in recipe.output.skip:
        if entry and entry != "lm_head" and not any(entry in name for name in names):
            raise ValueError(
                f"--skip {entry!r} matches no module of {model}; a skip entry is part of a "
                f"module's name, e.g. 'mlp.down_proj' or 'layers.0.' (this model's first "
                f"block holds: {', '.join(_first_block_linears(module))})")
    check_ignore_entries(recipe.output.format, list(recipe.output.skip))
    layout, blocks = find_blocks(module)
    seen = set()
    for b, block in enumerate(blocks):
        for stage in block_stages(block, tuple(recipe.output.skip), recipe.solver.row_block):
            for name, _, cols, *_ in stage:
                if (name, cols) not in seen:
                    seen.add((name, cols))
                    check_width(recipe.output.format, recipe.grid.group_size,
                                f"{layout.prefix}.{b}.{name}", cols)


def _first_block_linears(module: torch.nn.Module) -> list[str]:
    _, blocks = find_blocks(module)
    return [name for name, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear)]


def _block_of(where: str) -> str:
    """``model.layers.3`` of ``model.layers.3.mlp.down_proj``."""
    match = re.match(r"(.*?\.\d+)\.", where)
    return match.group(1) if match else where


def plan_model(model: str, recipe: Recipe, *, workers: int, device_bytes: int,
               host_bytes: int | None = None, device_type: str = "cuda",
               rates: str | Path | None = None) -> JobPlan:
    """``admmq plan``: the job :func:`quantize_model` would run, planned from the model's
    config alone with the recipe settled for it as the run settles it, and its time modelled
    from ``rates`` (a file ``benchmarks/fit_rates.py`` wrote; default: the shipped CPU rates)."""
    fitted = load_rates(rates)
    skeleton = meta_skeleton(config_folder(model))
    recipe, _ = settle_recipe(recipe, has_fused_experts(skeleton[1]))
    check_layers(skeleton[1], recipe, model)
    plan = plan_job(model, recipe, workers=workers, device_bytes=device_bytes,
                    host_bytes=host_bytes, device_type=device_type, skeleton=skeleton,
                    rates=fitted)
    plan.smallest_workers = smallest_fitting(model, recipe, device_bytes=device_bytes,
                                             device_type=device_type, skeleton=skeleton)
    return plan
