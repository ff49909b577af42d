"""The whole job planned from the model's ``config.json`` alone, before any weight is read: per
worker the device and host peaks (:mod:`.memory`, whose sequential model tests hold within
[1, 1.3] of the peaks measured on real blocks), the driver's host peak, disk for the output and
the work folder, and bytes moved per block; whether it fits, and the fewest workers that hold it.
``admmq plan`` prints it; ``admmq quantize`` refuses, before any work, a job it says does not fit
(:mod:`.preflight`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..recipe import Recipe
from . import memory, round_memory, time_model
from .memory import usable
from .model_shape import ModelShape, model_shape, routed_stage, stages_in_waves
from .plan import most_waves, tokens_per_worker


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
    # How many waves the worst block's expert stages are captured in (a forward pass each).
    expert_waves: int = 1
    # The modelled time (:mod:`.time_model`; None: not modelled), by phase, and the rates'
    # provenance in words.
    modelled_seconds: float | None = None
    modelled_seconds_by_phase: dict[str, float] = field(default_factory=dict)
    modelled_rates: str = ""

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
                "expert_waves": self.expert_waves,
                **({} if self.smallest_workers == -1
                   else {"smallest_workers": self.smallest_workers}),
                **({} if self.modelled_seconds is None
                   else {"modelled_seconds": self.modelled_seconds,
                         "modelled_seconds_by_phase": self.modelled_seconds_by_phase,
                         "modelled_rates": self.modelled_rates})}

    def describe(self) -> str:
        gib = 2**30
        top = sorted(self.items.items(), key=lambda kv: -kv[1])[:4]
        lines = [
            f"{self.model}: {self.schedule} schedule on {self.workers} worker(s)",
            f"  per worker, device: {self.worker_device_peak_bytes / gib:.1f} GiB of "
            f"{usable(self.device_capacity_bytes) / gib:.1f} GiB usable "
            f"({self.device_capacity_bytes / gib:.0f} GiB less the reserve); worst: {self.worst}",
            "  largest items: " + ", ".join(f"{k} {v / gib:.1f} GiB" for k, v in top),
            *([] if self.expert_waves == 1 else [
                f"  expert stages captured in {self.expert_waves} waves (a forward pass each) "
                "so that their partial sums fit"]),
            f"  per worker, host: {self.worker_host_peak_bytes / gib:.1f} GiB; driver host: "
            f"{self.driver_host_peak_bytes / gib:.1f} GiB",
            f"  disk: {self.output_bytes / gib:.1f} GiB output + {self.work_bytes / gib:.1f} GiB "
            "work folder (removed at the end)",
            f"  moved between workers per block: at most {self.bytes_moved_per_block / gib:.2f} "
            "GiB" + ("" if self.schedule == "sequential" else " per round"),
            *([] if self.smallest_workers == -1 else [
                "  no number of workers of this device size fits it"
                if self.smallest_workers is None else
                f"  the fewest workers of this device size that hold it: "
                f"{self.smallest_workers}"]),
            *([] if self.modelled_seconds is None else [self._time_line()]),
            "  fits" if self.fits else "  does NOT fit:\n" + "\n".join(
                f"    - {p}" for p in self.problems)]
        return "\n".join(lines)

    def _time_line(self) -> str:
        h = {k: v / 3600 for k, v in self.modelled_seconds_by_phase.items()}
        return (f"  modelled time: {self.modelled_seconds / 3600:.2f} h (forward "
                f"{h['forward']:.2f} h, capture {h['capture']:.2f} h, factorizations "
                f"{h['factorizations']:.2f} h, solve {h['solve']:.2f} h, transfers "
                f"{h['transfers']:.2f} h at an assumed "
                f"{time_model.LINK_BYTES_PER_S / 1e9:.0f} GB/s) {self.modelled_rates}")


def _device_plan(shape: ModelShape, recipe: Recipe, workers: int, act: int, capacity: int
                 ) -> tuple[memory.MemoryPlan, int, int]:
    """The worst block's plan on one worker, that block's index and the waves its expert stages
    are captured in (the fewest that fit ``capacity`` usable bytes, as the run chooses)."""
    calib, solver = recipe.calibration, recipe.solver
    asymmetric = calib.asymmetric_strength(solver.method) > 0
    embeddings = shape.outside * act
    if solver.schedule == "sequential":
        batches = math.ceil(calib.num_samples / calib.batch_size)
        tokens, batch_range = tokens_per_worker(
            calib.num_samples, calib.seq_len, calib.batch_size, min(workers, batches))

        def block_plan(stages: list, waves: int) -> memory.MemoryPlan:
            return memory.plan_block(
                stages_in_waves(stages, waves, workers), hidden=shape.hidden, tokens=tokens,
                batch_range=batch_range, act_bytes=act, row_block=solver.row_block,
                asymmetric=asymmetric, workers=workers, eigh_for=solver.uses_eigh,
                group_size=recipe.grid.group_size,
                batch_tokens=calib.batch_size * calib.seq_len, embeddings=embeddings)

        plans = []
        for stages, b, _, _ in shape.blocks:
            waves = memory.fewest_waves(
                lambda w: block_plan(stages, w).peak <= capacity,
                most_waves([len(st) for st in stages if routed_stage(st)], workers))
            plans.append((block_plan(stages, waves), b, waves))
        return max(plans, key=lambda pbw: pbw[0].peak)
    stages, b, _, _ = max(shape.blocks, key=lambda entry: entry[3])
    per_worker = math.ceil(sum(count for _, _, count, _ in shape.blocks) / workers)
    common = {"hidden": shape.hidden, "tokens": calib.num_samples * calib.seq_len,
              "num_batches": math.ceil(calib.num_samples / calib.batch_size),
              "batch_tokens": calib.batch_size * calib.seq_len, "act_bytes": act,
              "row_block": solver.row_block, "asymmetric": asymmetric,
              "eigh_for": solver.uses_eigh, "group_size": recipe.grid.group_size,
              "embeddings": embeddings}
    if solver.schedule == "depth-parallel":
        # A worker's segments: the recipe's count (default one per worker) shared out.
        segments = math.ceil((solver.segments or workers) / workers)
        plan = round_memory.plan_segments([stages] * per_worker, segments=segments, **common)
    else:
        plan = round_memory.plan_coordinated([stages] * per_worker, **common,
                                             start=solver.coordinated_start == "sequential")
    return plan, b, 1


def _disk_and_transfers(shape: ModelShape, recipe: Recipe, workers: int, act: int
                        ) -> tuple[int, int, int]:
    """``(output, work folder, bytes moved per block)``. The output: packed codes, scales in the
    stored dtype (and packed zero points when asymmetric), everything else dense; the work
    folder: every committed block's uint8 codes and float32 scales and zero points (sequential),
    or the last two rounds' commits (:func:`_round_commits`); between workers per block, at
    most: sequential, every other worker's partial Hessians to their owner and the merged ones
    back to the other solvers (none for an expert solved whole on its owner), the block's tensors shared by the worker that read them, and the
    uint8 codes every worker puts in place; a round schedule, per round, one hand-off of the
    block's outputs on every stream and its uint8 codes."""
    grid = recipe.grid
    quantized = shape.total(lambda rows, cols: rows * cols)
    scales = shape.total(lambda rows, cols: rows * grid.num_groups(cols))
    dense = sum(count * params for _, _, count, params in shape.blocks) + shape.outside \
        - quantized
    # FP4 scales are one byte (FP8 E4M3, E8M0) and FP4 grids have no zero points.
    scale_bytes = shape.stored if grid.kind == "int" else 1
    output = int(quantized * grid.bits / 8 + scales * scale_bytes
                 + (0 if grid.symmetric or grid.kind != "int" else scales * grid.bits / 8)
                 + dense * shape.stored)
    work = (int(quantized + scales * 8) if recipe.solver.schedule == "sequential"
            else _round_commits(shape, recipe, workers, act, quantized, scales))
    asymmetric = recipe.calibration.asymmetric_strength(recipe.solver.method) > 0
    if workers == 1:
        return output, work, 0
    if recipe.solver.schedule != "sequential":
        # A round schedule keeps every Hessian with its block's owner: per round, a block
        # at the end of a worker's run hands its outputs (and the float stream's) on, and
        # its uint8 codes go to the commit.
        calib = recipe.calibration
        hand_off = (1 + asymmetric) * calib.num_samples * calib.seq_len * shape.hidden * act
        return output, work, hand_off + shape.largest_block

    def hessians(stage: list[tuple]) -> int:
        # Routed experts: H alone, and solved whole on its owner when there are at least as
        # many experts as workers (nothing handed back); the others: every statistic, merged
        # ones handed back to at most every other worker.
        routed = routed_stage(stage)
        stats = 3 if asymmetric and not routed else 1
        trips = 1 if routed and len(stage) >= workers else 2
        return trips * sum(stats * 4 * cols * cols for _, _, cols, *_ in stage)

    moved = ((workers - 1) * max(sum(map(hessians, stages)) for stages, *_ in shape.blocks)
             + (workers - 1) * shape.largest_block * shape.stored
             + workers * shape.largest_block)
    return output, work, moved


def _round_commits(shape: ModelShape, recipe: Recipe, workers: int, act: int, quantized: int,
                   scales: int) -> int:
    """The work folder of a round schedule at its fullest: the last two rounds' commits (per
    weight its uint8 codes, the coordinated schedule's uint8 last iterate and ADMM-Q's float32
    dual; float32 scales and zero points; depth-parallel: every segment's output over the
    calibration tokens), or, at round 0's commit, that round beside the coordinated sequential
    start's commits (codes and grids, and two blocks' outputs on each stream)."""
    calib, solver = recipe.calibration, recipe.solver
    coordinated = solver.schedule == "coordinated"
    tokens = calib.num_samples * calib.seq_len
    blocks = sum(count for _, _, count, _ in shape.blocks)
    segments = 0 if coordinated else min(solver.segments or workers, blocks)
    duals = 4 * quantized if solver.method == "admmq" else 0
    round_commit = (quantized * (1 + coordinated) + duals + scales * 8
                    + segments * tokens * shape.hidden * act)
    streams = 2 if calib.asymmetric_strength(solver.method) > 0 else 1
    start = (quantized + scales * 8 + 2 * streams * tokens * shape.hidden * act
             if coordinated and solver.coordinated_start == "sequential" else 0)
    return int(max(2 * round_commit, round_commit + start))


def plan_job(model: str, recipe: Recipe, *, workers: int, device_bytes: int,
             host_bytes: int | None = None, device_type: str = "cuda",
             skeleton=None, rates=None) -> JobPlan:
    """Plan quantizing ``model`` (folder or hub id; only its config is read) with the settled
    ``recipe`` on ``workers`` workers with ``device_bytes`` each (``host_bytes`` of host memory
    on the driver's machine, when given). The sequential schedule's model is measured; the round
    schedules are planned with :func:`.round_memory.plan_segments` / :func:`.round_memory.plan_coordinated`.
    With ``rates`` (:func:`.time_model.load_rates`) the job's time is modelled too."""
    if workers < 1:
        raise ValueError(f"--workers {workers} must be at least 1")
    return _plan(model_shape(model, recipe, skeleton), recipe, workers, device_bytes, host_bytes,
                 device_type, rates)


def _modelled(shape: ModelShape, recipe: Recipe, workers: int, rates, act: int,
              waves: int = 1) -> dict:
    """JobPlan's modelled-time fields (none without rates)."""
    if rates is None:
        return {}
    costs = time_model.job_seconds(
        [(stages, count) for stages, _, count, _ in shape.blocks], hidden=shape.hidden,
        recipe=recipe, workers=workers, rates=rates, experts_per_token=shape.experts_per_token,
        act_bytes=act, expert_waves=waves)
    return {"modelled_seconds": costs["total"],
            "modelled_seconds_by_phase": {p: costs[p] for p in time_model.PHASES},
            "modelled_rates": time_model.describe_rates(rates)}


def _plan(shape: ModelShape, recipe: Recipe, workers: int, device_bytes: int,
          host_bytes: int | None, device_type: str, rates=None) -> JobPlan:
    calib, sequential = recipe.calibration, recipe.solver.schedule == "sequential"
    act = 4 if device_type == "cpu" else 2
    device_plan, worst_block, waves = _device_plan(shape, recipe, workers, act,
                                                   usable(device_bytes))
    output, work, moved = _disk_and_transfers(shape, recipe, workers, act)
    # Host: a worker reads its block (mapped pages), gets the results back as uint8 codes and,
    # off a CPU, parks partial sums and statistics there (MemoryPlan.host);
    # the driver holds one block's results (every schedule streams blocks to the writer one at
    # a time), the block's tensors it shares, and the writer's shard buffer.
    worker_host = shape.largest_block * (shape.stored + 1) + device_plan.host
    driver_host = (shape.largest_block * (memory.RESULTS_BYTES_PER_WEIGHT + shape.stored)
                   + int(recipe.output.max_shard_gb * 2**30))
    problems = []
    batches = math.ceil(calib.num_samples / calib.batch_size)
    if sequential and workers > batches:
        problems.append(f"{workers} workers but only {batches} calibration batches "
                        f"({calib.num_samples} samples / batch {calib.batch_size}): use at most "
                        f"{batches} workers, or more --num-samples or a smaller --batch-size")
    if device_plan.peak > usable(device_bytes):
        problems.append(
            f"each worker needs about {device_plan.describe()} on its device, more than the "
            f"{usable(device_bytes) / 2**30:.1f} GiB usable of {device_bytes / 2**30:.0f} GiB; "
            + ("use more workers (each holds fewer calibration tokens), fewer --num-samples or "
               "a shorter --seq-len, or devices with more memory" if sequential else
               "use more workers (each holds fewer blocks) or devices with more memory"))
    if host_bytes is not None and driver_host > usable(host_bytes):
        problems.append(f"the driver needs about {driver_host / 2**30:.1f} GiB of host memory, "
                        f"more than the {usable(host_bytes) / 2**30:.1f} GiB usable")
    return JobPlan(
        model=shape.name, schedule=recipe.solver.schedule, workers=workers,
        worker_device_peak_bytes=device_plan.peak, worker_host_peak_bytes=worker_host,
        driver_host_peak_bytes=driver_host, output_bytes=output, work_bytes=work,
        bytes_moved_per_block=moved, device_capacity_bytes=device_bytes,
        host_capacity_bytes=host_bytes,
        worst=f"{shape.prefix}.{worst_block}.{device_plan.worst_stage}",
        items=dict(device_plan.items), problems=problems,
        expert_waves=waves, **_modelled(shape, recipe, workers, rates, act, waves))


def smallest_fitting(model: str, recipe: Recipe, *, device_bytes: int,
                     device_type: str = "cuda", skeleton=None) -> int | None:
    """The fewest workers with ``device_bytes`` each on which the job's device peak fits (the
    peak falls as workers are added: fewer calibration tokens, or fewer blocks, each), or None
    when even the most the job can use do not suffice."""
    shape = model_shape(model, recipe, skeleton)
    calib = recipe.calibration
    most = (math.ceil(calib.num_samples / calib.batch_size)
            if recipe.solver.schedule == "sequential"
            else sum(count for _, _, count, _ in shape.blocks))

    def fits(workers: int) -> bool:
        plan = _plan(shape, recipe, workers, device_bytes, None, device_type)
        return plan.worker_device_peak_bytes <= usable(device_bytes)

    if not fits(most):
        return None
    low, high = 1, most
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    return low


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
