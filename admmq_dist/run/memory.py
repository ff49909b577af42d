"""How much memory a worker needs for one decoder block, planned before the block's work, and
the refusal when its device cannot hold it.

A worker holds its shard's hidden states (and, with asymmetric calibration, the float model's and
each dense linear's float inputs), the block's weights, and per stage: the Hessians' trees of
partial sums while capturing, then the merged Hessians with their factorizations and one row
block's solver state at a time. The plan counts those tensors from the shapes; it is an estimate
of the peak (allocator slack and framework buffers come on top), good to a few tens of percent,
and it is what a 70B run needs to know before it starts.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..quant.factors import PERMUTE_ROWS
from ..quant.solvers.scales import COLUMN_CHUNK

# Working arrays per row block and input column, in float32, while ADMM-Q runs: W0, W, Z, the
# dual and their rotated copies, the expanded grid (scale and zero per column, twice), the
# projection's temporaries, the best iterate, GPTQ's start and the loss's delta (measured by
# torch's allocator at the peak of real blocks: 20 [rows, cols] float32 arrays).
SOLVER_ARRAYS = 20
# The CG W-update's own: W0 H, W H, the residual, the preconditioned residual, the direction, its
# product with H and the preconditioner (7).
CG_ARRAYS = 7
# An eigendecomposition (float32, quant/factors.py) holds the scaled Hessian and its eigenvectors
# while it runs, then the eigenvectors and an unordered rotation while the two float32 rotations it
# keeps are made (8 beyond the 8 kept: measured by torch's allocator at n = 1024). Its float64
# retry, should LAPACK not converge in float32 (24 + 8), is not planned.
EIGH_TRANSIENT, EIGH_KEPT = 8, 8
# Moving the asymmetric targets of every linear reading an input (hessian.asymmetric_targets):
# the float64 factor and cholesky_solve's copy of it, or the float64 cross term (16 per entry);
# per weight, float64 corrections and a solve's output less the targets made (3 float32 arrays);
# kept after, the float32 targets alone (1 array): the factor is dropped.
ASYMMETRIC_TRANSIENT, ASYMMETRIC_TARGET_ARRAYS, ASYMMETRIC_KEPT_ARRAYS = 16, 3, 1
# GPTQ's factor, computed in place (quant/factors.py): the factor it keeps (4), and two
# [PERMUTE_ROWS, cols] blocks of the permutation.
CHOLESKY_TRANSIENT, CHOLESKY_KEPT = 4, 4
# The block's forward pass on one batch, per token and per column of the widest input: the MLP's
# gate, up and product and the attention's projections (float32 on the compute device).
FORWARD_ARRAYS = 4
# The driver, per weight of a block: its codes as int32 (the writer's input) and as uint8 (what
# every worker puts in place), the combined layer's dequantized weight while its report row is
# made, and the packed tensors while the block is written.
RESULTS_BYTES_PER_WEIGHT = 8


# The scale refit (quant/solvers/scales.py), per row block: float64 [rows, cols] arrays, float64
# [COLUMN_CHUNK, cols] Hessian blocks (the block and BLAS's transposed copies) and [rows, G, G]
# systems, in its two phases — forming the systems chunk by chunk, then solving them (the systems
# and their LU copy) — as measured by torch's allocator: tests/test_memory.py holds every tested
# shape within [1, 1.3] of it.
REFIT_FORM = (4.5, 4.25, 1)   # (row arrays, Hessian blocks, systems) while forming
REFIT_SOLVE = (3.5, 0, 2)     # while solving


def refit_bytes(rows: int, cols: int, groups: int) -> int:
    """Peak bytes the scale refit allocates beyond its inputs for one ``[rows, cols]`` row block
    with ``groups`` groups per row."""
    return int(8 * max(arrays * rows * cols + blocks * COLUMN_CHUNK * cols
                       + systems * rows * groups * groups
                       for arrays, blocks, systems in (REFIT_FORM, REFIT_SOLVE)))


def dyadic_pieces(start: int, stop: int) -> int:
    """How many canonical partial sums (aligned power-of-two batch ranges) a worker holding
    batches ``[start, stop)`` keeps: its accumulator's tree before the merge."""
    pieces, i = 0, start
    while i < stop:
        size = 1
        while i % (size * 2) == 0 and i + size * 2 <= stop:
            size *= 2
        pieces += 1
        i += size
    return pieces


@dataclass
class MemoryPlan:
    """Planned bytes, by item, for one worker and one decoder block; ``peak`` is their
    worst-case sum (held items plus the largest stage's working set). ``phases``: per phase of
    the block (``"capture <stage>"``, ``"solve <stage>"``), ``(held, factorizations, transient,
    units)`` — what stays alive through it, the Hessians and factors it keeps, the largest
    working set of one call inside it, and how many row-block units share the factors — so that
    workers sharing one device or process can be added up (:func:`in_process_peak`). ``host``:
    the most a GPU worker parks in host memory meanwhile (:func:`plan_block`)."""

    items: dict[str, int] = field(default_factory=dict)
    peak: int = 0
    host: int = 0
    worst_stage: str = ""
    phases: dict[str, tuple[int, int]] = field(default_factory=dict)

    def on(self, device: torch.device) -> dict:
        """What a worker reports: the plan's figures and what ``device`` can hold."""
        return {"peak": self.peak, "host": self.host, "items": self.items,
                "worst": self.worst_stage,
                "describe": self.describe(), "capacity": device_capacity(device),
                "phases": self.phases}

    def describe(self) -> str:
        top = sorted(self.items.items(), key=lambda kv: -kv[1])[:3]
        return (f"{self.peak / 2**30:.1f} GiB (largest: "
                + ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in top) + ")")


def plan_block(groups: list[list[tuple[str, int, int]]], *, hidden: int, tokens: int,
               batch_range: tuple[int, int], act_bytes: int, row_block: int,
               asymmetric: bool, workers: int = 1,
               eigh_for: Callable[[int], bool] = lambda cols: True,
               group_size: int | None = 128, batch_tokens: int = 0,
               embeddings: int = 0, host: bool | None = None, in_order: bool = False
               ) -> MemoryPlan:
    """Plan one decoder block on one worker of the sequential schedule. ``groups``: per
    true-sequential stage, ``(linear, rows, cols)`` of every linear whose Hessian is its own
    group's (one entry per Hessian: q/k/v count once, with the rows of all three); ``tokens``:
    this worker's calibration tokens; ``batch_range``: its global batches; ``act_bytes``: bytes
    per element of activations and weights; ``workers``: how many workers' partial sums the owner
    of a Hessian receives; ``eigh_for(cols)``: whether a Hessian that wide gets ADMM-Q's
    eigendecomposition (the exact W-update) or none (CG, GPTQ); ``group_size``: the grid's (None:
    per channel), for the scale refit; ``batch_tokens``: tokens per calibration batch (the
    forward pass's); ``embeddings``: bytes of the embeddings, final norm and ``lm_head`` every
    worker holds; ``host``: whether what waits on the host (:func:`_host_bytes`) is off the
    device (None: ``act_bytes < 4``: CPU workers use float32); ``in_order``: one running sum."""
    host = act_bytes < 4 if host is None else host
    plan = MemoryPlan(items=_held_through_block(groups, hidden, tokens, act_bytes, asymmetric,
                                                embeddings))
    held = sum(plan.items.values())
    pieces, (start, stop) = dyadic_pieces(*batch_range), batch_range
    # Partial sums per statistic while the batches are added (in place): the pieces so far.
    growing = 1 if in_order else max(dyadic_pieces(start, i) for i in range(start + 1, stop + 1))
    widest = max(cols for stage in groups for _, _, cols, *_ in stage)
    forward = FORWARD_ARRAYS * batch_tokens * max(widest, hidden) * act_bytes
    worst = 0
    for stage in groups:
        name = stage[0][0]
        # [cols, cols] statistics per Hessian: H and, asymmetric, the cross term and the
        # deviation (kept as row blocks' loss terms); routed experts: H alone, no moved targets.
        routed = any(routed_expert(n) for n, *_ in stage)
        asym = asymmetric and not routed
        stats, kept_stats = (3, 2) if asym else (1, 1)
        # Row-block units of the stage: at most this many workers solve (and factorize) it.
        units, stage = _units(stage, row_block), [entry[:3] for entry in stage]
        squares = [4 * cols * cols for _, _, cols in stage]  # one float32 [cols, cols] each
        # Capturing: every Hessian's tree and one new product, beside the forward pass.
        trees = stats * growing * sum(squares) + max(squares)
        # An owner folds the others' partial sums in node by node (its trees, the node arriving,
        # a waiting sibling back from the host); finishing needs no more.
        merge = stats * pieces * sum(squares) + 2 * max(squares) if workers > 1 else 0
        kept = _kept(stage, kept_stats, asym, eigh_for, workers if routed else 0)
        transient = max(_solve_transient(r, c, row_block, group_size, asym, eigh_for(c),
                                         host, act_bytes) for _, r, c in stage)
        plan.phases[f"capture {name}"] = (held, 0, max(trees + forward, merge), 1)
        # Partial sums handed to an owner stay until the next capture (a retried merge asks
        # for them again): on the host, off a CPU.
        handed = stats * pieces * sum(squares) if workers > 1 and not host else 0
        plan.phases[f"solve {name}"] = (held + handed, kept, transient, units)
        need = max(trees + forward, merge, handed + kept + transient)
        plan.host = max(plan.host, host * _host_bytes(
            squares, stats, kept_stats, pieces, asym, workers * (stop - start), workers))
        if need > worst:
            worst, plan.worst_stage = need, name
            plan.items.update({"Hessians and factorizations": kept, "row-block solve": transient,
                               "partial sums": max(trees, merge, handed), "forward pass": forward})
    plan.peak = held + worst
    return plan


def _kept(stage: list[tuple], kept_stats: int, asym: bool, eigh_for: Callable[[int], bool],
          expert_workers: int) -> int:
    """What a stage keeps while it is solved: every Hessian with its factors (and, asymmetric,
    its targets and loss terms) — or, for an expert stage with at least ``expert_workers``
    Hessians (solved expert by expert: :func:`.plan.assign_whole`), the merged Hessians of a
    worker's share of the experts and one expert's factors at a time."""
    if expert_workers and len(stage) >= expert_workers:
        share = math.ceil(len(stage) / expert_workers)
        return (share * max(kept_stats * 4 * c * c for _, _, c in stage)
                + max((CHOLESKY_KEPT + EIGH_KEPT * eigh_for(c)) * c * c for _, _, c in stage))
    return sum((kept_stats * 4 + CHOLESKY_KEPT + EIGH_KEPT * eigh_for(c)) * c * c
               + ASYMMETRIC_KEPT_ARRAYS * r * c * 4 * asym for _, r, c in stage)


def _units(stage: list[tuple], row_block: int) -> int:
    return sum(entry[3] if len(entry) > 3 else math.ceil(entry[1] / row_block) for entry in stage)


def _host_bytes(squares: list[int], stats: int, kept_stats: int, pieces: int,
                asymmetric: bool, batches: int, workers: int) -> int:
    """What a GPU worker parks on the host in a stage with Hessians of ``squares`` bytes: the
    partial sums it handed to an owner (till the next capture), and either the nodes its merge
    as an owner leaves waiting for a sibling (at most one per level of the ``batches`` merged in
    ascending order, and its own pieces) or H and the cross term with their float64 copies
    while the targets move; and as an owner, the merged copy handed to the other solvers."""
    big = max(squares)
    moving = (kept_stats + 2) * big if asymmetric else 0
    if workers == 1:
        return moving
    levels = batches.bit_length() + pieces
    return (stats * pieces * sum(squares) + kept_stats * big
            + max(stats * levels * big, moving))


def routed_expert(name: str) -> bool:
    """Whether a Hessian entry is a routed expert's (``experts.3.gate_proj`` as the run names
    it, or a fused ``experts.gate_up_proj[3]`` as :func:`.model_shape.block_stages` does)."""
    return bool(re.search(r"experts\.\d+\.", name)) or name.endswith("]")


def _held_through_block(groups: list, hidden: int, tokens: int, act_bytes: int,
                        asymmetric: bool, embeddings: int) -> dict[str, int]:
    """Each stream's hidden states and the block's outputs for it, the block's weights, under
    asymmetric calibration every dense linear's float inputs, and the embeddings."""
    streams = 2 if asymmetric else 1
    items = {"hidden states": 2 * streams * tokens * hidden * act_bytes,
             "block weights": sum(rows * cols for stage in groups
                                  for _, rows, cols, *_ in stage) * act_bytes}
    if asymmetric:  # the float pass records dense linears' inputs only
        items["float inputs"] = sum(tokens * cols for stage in groups
                                    for name, _, cols, *_ in stage
                                    if not routed_expert(name)) * act_bytes
    if embeddings:
        items["embeddings and lm_head"] = embeddings
    return items


def _solve_transient(rows: int, cols: int, row_block: int, group_size: int | None,
                     asymmetric: bool, eigh: bool, host: bool = False,
                     act_bytes: int = 4) -> int:
    """The largest working set of one call solving rows of a ``[rows, cols]`` linear beyond what
    the stage keeps: a factorization (a GPU's cuSOLVER inverts a copy of GPTQ's factor), moving
    the targets (first, before the stage's factors exist; H and the cross term on the host if
    ``host``), a row block's solver state beside the float32 weight (a copy unless
    ``act_bytes`` is 4), or its scale refit."""
    block, squares = min(rows, row_block), cols * cols
    weight = rows * cols * 4 if act_bytes < 4 else 0
    targets = (ASYMMETRIC_TRANSIENT * squares + ASYMMETRIC_TARGET_ARRAYS * rows * cols * 4
               - (8 * host + CHOLESKY_KEPT + EIGH_KEPT * eigh) * squares) if asymmetric else 0
    groups = 1 if group_size is None else math.ceil(cols / group_size)
    return max(EIGH_TRANSIENT * squares * eigh, targets,
               (CHOLESKY_TRANSIENT - CHOLESKY_KEPT + 4 * host) * squares
               + 2 * PERMUTE_ROWS * cols * 4,
               (SOLVER_ARRAYS + CG_ARRAYS * (not eigh)) * block * cols * 4 + weight,
               refit_bytes(block, cols, groups) + SOLVER_ARRAYS // 2 * block * cols * 4 + weight)


def stage_entries(stages, shapes: dict[str, tuple[int, int]], row_block: int
                  ) -> list[list[tuple[str, int, int, int]]]:
    """The stages of a block (each with ``.groups``: the names of the linears sharing one
    Hessian) as :func:`plan_block` takes them, from ``{linear: (rows, cols)}``."""
    return [[(g[0], sum(shapes[n][0] for n in g), shapes[g[0]][1],
              sum(math.ceil(shapes[n][0] / row_block) for n in g)) for g in stage.groups]
            for stage in stages]


def results_bytes(groups: list[list[tuple[str, int, int]]]) -> int:
    """What the driver holds of one block's results until it is written."""
    return RESULTS_BYTES_PER_WEIGHT * sum(rows * cols for stage in groups
                                          for _, rows, cols, *_ in stage)


def in_process_peak(phases: list[dict[str, tuple]], driver: int = 0) -> int:
    """The peak of workers that share one process (or device) and run one call at a time, and of
    the driver beside them, from each worker's :attr:`MemoryPlan.phases`: per phase, every
    worker's held bytes, the factorizations of as many workers as the stage has row-block units
    (only a worker that solves rows of a Hessian factorizes it), and the largest working set."""
    def peak(phase: str) -> int:
        # A worker without this phase (round workers own different blocks) holds what it holds.
        rows = [p.get(phase) or (max(held for held, *_ in p.values()), 0, 0, 0) for p in phases]
        solvers = min(len(rows), max(r[3] for r in rows))
        return (sum(r[0] for r in rows) + solvers * max(r[1] for r in rows)
                + max(r[2] for r in rows))
    return driver + max(peak(phase) for phase in {name for p in phases for name in p})


def largest_fitting(plans: list[dict], needs: Callable[[int, dict], str], advice: str) -> int:
    """The worker with the largest of ``plans`` (as :meth:`MemoryPlan.on` reports them), after
    refusing the first that its device cannot hold: ``needs(worker, plan)`` says what needs the
    memory, ``advice`` what to do about it."""
    for k, p in enumerate(plans):
        if p["peak"] > p["capacity"]:
            raise MemoryError(f"{needs(k, p)}, more than the {p['capacity'] / 2**30:.1f} GiB its "
                              f"device has; {advice}")
    return max(range(len(plans)), key=lambda w: plans[w]["peak"])


def fewest_waves(fits: Callable[[int], bool], most: int) -> int:
    """The fewest waves (1, 2, 4, ... up to ``most``) an expert stage is captured in for which
    ``fits(waves)`` (:func:`.plan.expert_waves`); ``most`` when none fits. Each wave costs one
    forward pass of the block, so the fewest that fit are taken."""
    waves = 1
    while waves < most and not fits(waves):
        waves = min(2 * waves, most)
    return waves


# What a device keeps for itself beyond the plan's tensors: the CUDA context, the allocator's
# fragmentation and cached blocks, kernels' workspaces (on a CPU: the interpreter and libraries).
RESERVE_FRACTION, RESERVE_MIN = 0.05, 2 * 2**30


def usable(capacity: int) -> int:
    """What a worker may plan to use of ``capacity`` bytes: less the reserve (5%, at least
    2 GiB)."""
    return capacity - max(RESERVE_MIN, int(RESERVE_FRACTION * capacity))


def device_capacity(device: torch.device, reserve: bool = True) -> int:
    """Bytes a worker may use on ``device``: what is free on the GPU now (another process's
    memory is not ours to plan with), or this host's available memory (MemAvailable) for CPU
    workers — less the reserve unless ``reserve`` is False."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = _host_available()
    return usable(free) if reserve else free


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
