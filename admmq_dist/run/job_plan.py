"""The whole job planned from the model's ``config.json`` alone, before any weight is read: per
worker the device and host peaks (:mod:`.memory`, whose sequential model tests hold within
[1, 1.3] of the peaks measured on real blocks), the driver's host peak, disk for the output and
the work folder, and bytes moved per block; and whether it fits. ``admmq plan`` prints it;
``admmq quantize`` refuses, before any work, a job it says does not fit.

The skeleton is built on the meta device from the config (no weights), and each block's
true-sequential stages are inferred from its linears' names — q/k/v (or an MLA's two down
projections) share the attention's input, gate/up the MLP's, each expert's gate/up one Hessian,
every expert's down one stage — where the run observes them from a forward pass
(:func:`.capture.calibration_stages`). A linear whose name no rule covers is its own stage, which
can only add Hessians to the plan.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..model.arch import find_blocks
from ..model.loading import ModelLoadError, resolve_model_dir, source_dtype
from ..model.moe import is_router
from ..recipe import Recipe
from . import memory
from .memory import usable

# Leaf names of the linears that read the attention's input, and the MLP's.
ATTENTION_INPUT = {"q_proj", "k_proj", "v_proj", "qkv_proj", "q_a_proj", "kv_a_proj_with_mqa",
                   "query_key_value", "W_pack", "c_attn", "Wqkv"}
MLP_INPUT = {"gate_proj", "up_proj", "w1", "w3", "fc1", "c_fc", "gate_up_proj"}
@dataclass
class JobPlan:
    """The plan of a whole job; bytes throughout."""

    model: str
    schedule: str
    workers: int
    worker_device_peak_bytes: int
    worker_host_peak_bytes: int
    driver_host_peak_bytes: int
    output_bytes: int
    work_bytes: int
    bytes_moved_per_block: int
    device_capacity_bytes: int
    host_capacity_bytes: int | None
    worst: str
    items: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    # The fewest workers of this device size whose device peak fits (None: none do; unset: not
    # searched).
    smallest_workers: int | None = -1

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def disk_bytes(self) -> int:
        return self.output_bytes + self.work_bytes

    def as_json(self) -> dict:
        return {"fits": self.fits, "model": self.model, "schedule": self.schedule,
                "workers": self.workers,
                "worker_device_peak_bytes": self.worker_device_peak_bytes,
                "worker_host_peak_bytes": self.worker_host_peak_bytes,
                "driver_host_peak_bytes": self.driver_host_peak_bytes,
                "disk_bytes": self.disk_bytes, "output_bytes": self.output_bytes,
                "work_bytes": self.work_bytes,
                "bytes_moved_per_block": self.bytes_moved_per_block,
                "device_capacity_bytes": self.device_capacity_bytes,
                "usable_device_bytes": usable(self.device_capacity_bytes),
                "worst": self.worst, "items": self.items, "problems": self.problems,
                **({} if self.smallest_workers == -1
                   else {"smallest_workers": self.smallest_workers})}

    def describe(self) -> str:
        gib = 2**30
        top = sorted(self.items.items(), key=lambda kv: -kv[1])[:4]
        lines = [
            f"{self.model}: {self.schedule} schedule on {self.workers} worker(s)",
            f"  per worker, device: {self.worker_device_peak_bytes / gib:.1f} GiB of "
            f"{usable(self.device_capacity_bytes) / gib:.1f} GiB usable "
            f"({self.device_capacity_bytes / gib:.0f} GiB less the reserve); worst: {self.worst}",
            "  largest items: " + ", ".join(f"{k} {v / gib:.1f} GiB" for k, v in top),
            f"  per worker, host: {self.worker_host_peak_bytes / gib:.1f} GiB; driver host: "
            f"{self.driver_host_peak_bytes / gib:.1f} GiB",
            f"  disk: {self.output_bytes / gib:.1f} GiB output + {self.work_bytes / gib:.1f} GiB "
            "work folder (removed at the end)",
            f"  moved between workers per block: at most {self.bytes_moved_per_block / gib:.2f} "
            "GiB",
            *([] if self.smallest_workers == -1 else [
                "  no number of workers of this device size fits it"
                if self.smallest_workers is None else
                f"  the fewest workers of this device size that hold it: "
                f"{self.smallest_workers}"]),
            "  fits" if self.fits else "  does NOT fit:\n" + "\n".join(
                f"    - {p}" for p in self.problems)]
        return "\n".join(lines)


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def block_stages(block: nn.Module, skip: tuple[str, ...], row_block: int
                 ) -> list[list[tuple[str, int, int, int]]]:
    """The block's true-sequential stages as :func:`.memory.plan_block` takes them: per stage,
    ``(name, rows, cols, row-block units)`` of every Hessian (linears sharing an input count
    once, their rows added)."""
    entries: list[tuple[str, int, int, int]] = []  # (name, rows, cols, experts)
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and not is_router(name) \
                and not any(s and s in name for s in skip):
            entries.append((name, module.out_features, module.in_features, 1))
    for name, param in block.named_parameters():
        if param.dim() == 3 and not any(s and s in name for s in skip):  # fused experts
            entries.append((name, int(param.shape[1]), int(param.shape[2]), int(param.shape[0])))
    stages: list[list[tuple[str, int, int, int]]] = []
    attention: list[tuple[str, int, int, int]] = []
    experts_in: list[tuple[str, int, int, int]] = []
    experts_out: list[tuple[str, int, int, int]] = []
    pending: tuple[str, list] | None = None  # an MLP-input group being gathered
    for name, rows, cols, count in entries:
        parent, leaf = name.rpartition(".")[0], _leaf(name.removesuffix(".weight"))
        per_expert = re.search(r"experts\.(\d+)\.", name)
        units = count * math.ceil(rows / row_block)
        if count > 1 or per_expert:
            target = experts_in if leaf in MLP_INPUT else experts_out
            if count > 1:
                target += [(f"{name}[{e}]", rows, cols, math.ceil(rows / row_block))
                           for e in range(count)]
            else:
                target.append((name, rows, cols, units))
            continue
        if leaf in ATTENTION_INPUT:
            attention.append((name, rows, cols, units))
            continue
        if leaf in MLP_INPUT:
            if pending and pending[0] == parent:
                pending[1].append((name, rows, cols, units))
            else:
                pending = (parent, [(name, rows, cols, units)])
                stages.append(pending[1])
            continue
        stages.append([(name, rows, cols, units)])
    out = []
    if attention:
        out.append([(attention[0][0], sum(e[1] for e in attention), attention[0][2],
                     sum(e[3] for e in attention))])
    for stage in stages:
        out.append([(stage[0][0], sum(e[1] for e in stage), stage[0][2], sum(e[3] for e in stage))])
    # Experts' gate/up of one expert share an input: pair them by expert.
    if experts_in:
        merged: dict[str, list] = {}
        for name, rows, cols, units in experts_in:
            key = re.sub(r"\.(gate_proj|up_proj|w1|w3)(\.weight)?$", "", name)
            entry = merged.setdefault(key, [name, 0, cols, 0])
            entry[1] += rows
            entry[3] += units
        out.append([tuple(v) for v in merged.values()])
    if experts_out:
        out.append(experts_out)
    # The attention's input comes first, the MLP's last, as the block calls them.
    return out


def config_folder(model: str) -> Path:
    """The folder holding the model's ``config.json``: a local folder, or for a hub id only that
    file fetched (nothing else is downloaded). Mistakes are worded as the run words them."""
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        folder = resolve_model_dir(model)  # a local path: its own errors
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{model} has no config.json; point at a Hugging Face model "
                                 "folder")
        return folder
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model, "config.json")).parent
    except Exception as exc:  # offline, unknown id, gated: all mean "not available"
        raise ModelLoadError(
            f"cannot find model {model!r}: it is not a local folder and the hub answered: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Pass a local folder, or check the name, your network and HF_HUB_OFFLINE") from None


def meta_skeleton(config_dir: Path):
    """``(config, model)`` with every parameter and buffer on the meta device: nothing is
    allocated, even for fused expert tensors that ``init_empty_weights`` would first create in
    host memory (DeepSeek-V3's are 30 GB each in float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        except ValueError as exc:
            raise ValueError(f"{config_dir} is not a causal language model transformers can "
                             f"build: {str(exc).splitlines()[0]}") from None
    return config, model


def _source_bytes(config_dir: Path) -> int:
    try:
        return source_dtype(config_dir).itemsize
    except Exception:
        return 2


def smallest_fitting(model: str, recipe: Recipe, *, device_bytes: int,
                     device_type: str = "cuda", skeleton=None) -> int | None:
    """The fewest workers with ``device_bytes`` each on which the job's device peak fits (the
    peak falls as workers are added: fewer calibration tokens, or fewer blocks, each), or None
    when even the most the job can use do not suffice."""
    if skeleton is None:
        skeleton = meta_skeleton(config_folder(model))
    calib = recipe.calibration
    most = (math.ceil(calib.num_samples / calib.batch_size)
            if recipe.solver.schedule == "sequential"
            else find_blocks(skeleton[1])[0].num_blocks)

    def fits(workers: int) -> bool:
        plan = plan_job(model, recipe, workers=workers, device_bytes=device_bytes,
                        device_type=device_type, skeleton=skeleton)
        return plan.worker_device_peak_bytes <= usable(device_bytes)

    if not fits(most):
        return None
    low, high = 1, most
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    return low


def plan_job(model: str, recipe: Recipe, *, workers: int, device_bytes: int,
             host_bytes: int | None = None, device_type: str = "cuda",
             skeleton=None) -> JobPlan:
    """Plan quantizing ``model`` (folder or hub id; only its config is read) with the settled
    ``recipe`` on ``workers`` workers with ``device_bytes`` each (``host_bytes`` of host memory
    per node, when given). Sequential schedule measured; the round schedules planned with
    :func:`.memory.plan_segments` / :func:`.memory.plan_coordinated`."""
    if workers < 1:
        raise ValueError(f"--workers {workers} must be at least 1")
    config_dir = config_folder(model)
    config, skeleton = skeleton or meta_skeleton(config_dir)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layout, blocks = find_blocks(skeleton)
    calib, solver, grid = recipe.calibration, recipe.solver, recipe.grid
    act = 4 if device_type == "cpu" else 2
    stored = _source_bytes(config_dir)
    skip = tuple(recipe.output.skip)
    signatures: dict[tuple, tuple[int, list]] = {}
    for b, block in enumerate(blocks):
        stages = block_stages(block, skip, solver.row_block)
        signatures.setdefault(tuple(map(tuple, stages)), (b, stages))
    block_params = {b: sum(p.numel() for p in blocks[b].parameters())
                    for b, _ in signatures.values()}
    counts = {key: 0 for key in signatures}
    for block in blocks:
        counts[tuple(map(tuple, block_stages(block, skip, solver.row_block)))] += 1
    total_params = sum(p.numel() for p in skeleton.parameters())

    def over_blocks(per_stage_entry) -> int:
        return sum(counts[key] * sum(per_stage_entry(rows, cols) for stage in stages
                                     for _, rows, cols, *_ in stage)
                   for key, (_, stages) in signatures.items())

    quantized = over_blocks(lambda rows, cols: rows * cols)
    scale_count = over_blocks(lambda rows, cols: rows * grid.num_groups(cols))
    embeddings = (total_params - sum(counts[k] * block_params[b]
                                     for k, (b, _) in signatures.items())) * act
    batches = math.ceil(calib.num_samples / calib.batch_size)
    problems = []
    if workers > batches:
        problems.append(f"{workers} workers but only {batches} calibration batches "
                        f"({calib.num_samples} samples / batch {calib.batch_size}): use at most "
                        f"{batches} workers, or more --num-samples or a smaller --batch-size")
    asymmetric = calib.asymmetric_strength(solver.method) > 0
    hidden = int(text.hidden_size)
    tokens, batch_range = memory.tokens_per_worker(calib.num_samples, calib.seq_len,
                                                   calib.batch_size, min(workers, batches))
    worst_plan, worst_block = None, -1
    if solver.schedule == "sequential":
        for b, stages in signatures.values():
            p = memory.plan_block(
                stages, hidden=hidden, tokens=tokens,
                batch_range=batch_range, act_bytes=act, row_block=solver.row_block,
                asymmetric=asymmetric, workers=workers, eigh_for=solver.uses_eigh,
                group_size=grid.group_size, batch_tokens=calib.batch_size * calib.seq_len,
                embeddings=embeddings)
            if worst_plan is None or p.peak > worst_plan.peak:
                worst_plan, worst_block = p, b
    else:
        per_worker = math.ceil(len(blocks) / workers)
        stages = signatures[max(signatures, key=lambda k: block_params[signatures[k][0]])][1]
        if solver.schedule == "depth-parallel":
            worst_plan = memory.plan_segments(
                [stages] * per_worker, hidden=hidden,
                tokens=calib.num_samples * calib.seq_len, num_batches=batches, act_bytes=act,
                row_block=solver.row_block, segments=solver.segments or 1,
                asymmetric=asymmetric, eigh_for=solver.uses_eigh)
        else:
            worst_plan = memory.plan_coordinated(
                [stages] * per_worker, hidden=hidden,
                batch_tokens=calib.batch_size * calib.seq_len, act_bytes=act,
                row_block=solver.row_block, asymmetric=asymmetric, eigh_for=solver.uses_eigh)
        worst_plan.items["embeddings and lm_head"] = embeddings
        worst_plan.peak += embeddings
        worst_block = signatures[max(signatures, key=lambda k: block_params[signatures[k][0]])][0]
    largest_block = max(block_params.values())
    # Host: a worker reads its block from the files (mapped pages) and gets its results back as
    # uint8 codes; the driver holds one block's results (and the block's tensors it shares).
    worker_host = largest_block * stored + largest_block
    driver_host = memory.RESULTS_BYTES_PER_WEIGHT * largest_block + largest_block * stored
    # The output: packed codes, scales in the stored dtype (and packed zero points when
    # asymmetric), everything else dense; the work folder: every committed block's uint8 codes
    # and float32 scales and zero points (kept until the output is complete).
    dense = total_params - quantized
    output = int(quantized * grid.bits / 8 + scale_count * stored
                 + (0 if grid.symmetric else scale_count * grid.bits / 8) + dense * stored)
    work = int(quantized + scale_count * 8)
    # Between workers, per block, at most: every other worker's partial Hessians to their owner
    # and the merged ones back to the other solvers, the block's tensors shared by the worker
    # that read them, and the uint8 codes every worker puts in place.
    stats = 3 if asymmetric else 1
    hessian_bytes = max(sum(stats * 4 * cols * cols for stage in stages
                            for _, _, cols, *_ in stage) for _, stages in signatures.values())
    moved = 0 if workers == 1 else (2 * (workers - 1) * hessian_bytes
                                    + (workers - 1) * largest_block * stored
                                    + workers * largest_block)
    usable_bytes = usable(device_bytes)
    if worst_plan.peak > usable_bytes:
        problems.append(
            f"each worker needs about {worst_plan.describe()} on its device, more than the "
            f"{usable_bytes / 2**30:.1f} GiB usable of {device_bytes / 2**30:.0f} GiB; "
            + ("use more workers (each holds fewer calibration tokens), fewer --num-samples or "
               "a shorter --seq-len, or devices with more memory"
               if solver.schedule == "sequential" else
               "use more workers (each holds fewer blocks) or devices with more memory"))
    if host_bytes is not None and driver_host > usable(host_bytes):
        problems.append(f"the driver needs about {driver_host / 2**30:.1f} GiB of host memory, "
                        f"more than the {usable(host_bytes) / 2**30:.1f} GiB usable")
    return JobPlan(
        model=model, schedule=solver.schedule, workers=workers,
        worker_device_peak_bytes=worst_plan.peak, worker_host_peak_bytes=worker_host,
        driver_host_peak_bytes=driver_host, output_bytes=output, work_bytes=work,
        bytes_moved_per_block=moved, device_capacity_bytes=device_bytes,
        host_capacity_bytes=host_bytes,
        worst=f"{layout.block_prefix(worst_block)}.{worst_plan.worst_stage}",
        items=dict(worst_plan.items), problems=problems)


def parse_bytes(text: str) -> int:
    """``80GiB``, ``80GB``, ``141G``, ``512MiB``, or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.I)
    if not match:
        raise ValueError(f"{text!r} is not an amount of memory: write e.g. 80GiB, 80GB or 141G")
    number, unit, binary = match.groups()
    power = "KMGT".find(unit.upper()) + 1 if unit else 0
    base = 1024 if binary or not unit else 1000
    if unit and not binary and unit.upper() == "G":
        base = 1000
    return int(float(number) * base ** power)
