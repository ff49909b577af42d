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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..quant.solvers.scales import COLUMN_CHUNK

# Working arrays per row block and input column, in float32: ADMM-Q's W0, W, Z, dual and their
# rotated copies, the projection's temporaries and the best iterate (14); GPTQ's start and the
# local-search gradient reuse them.
SOLVER_ARRAYS = 14
# The CG W-update's own: W0 H, W H, the residual, the preconditioned residual, the direction, its
# product with H and the preconditioner (7).
CG_ARRAYS = 7
# An eigendecomposition holds the scaled Hessian and its eigenvectors in float64 plus LAPACK's
# workspace (3 x 8 bytes per entry) while it runs, and keeps two float32 rotations (8).
EIGH_TRANSIENT, EIGH_KEPT = 24, 8
# The scale refit (quant/solvers/scales.py), per row block: float64 [rows, cols] arrays, float64
# [COLUMN_CHUNK, cols] Hessian blocks (the block and BLAS's transposed copies) and [rows, G, G]
# systems, in its two phases — forming the systems chunk by chunk, then solving them (the systems
# and their LU copy) — as measured by torch's allocator: tests/test_memory.py holds every tested
# shape within [1, 1.3] of it.
REFIT_FORM = (4.5, 4.25, 1)   # (row arrays, Hessian blocks, systems) while forming
REFIT_SOLVE = (3.5, 0, 2)     # while solving
# GPTQ's factor: the damped and permuted copies, the factor and the inverse (4 x 4) while it
# runs, and keeps one upper factor (4).
CHOLESKY_TRANSIENT, CHOLESKY_KEPT = 16, 4


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
    worst-case sum (held items plus the largest stage's working set)."""

    items: dict[str, int] = field(default_factory=dict)
    peak: int = 0
    worst_stage: str = ""

    def on(self, device: torch.device) -> dict:
        """What a worker reports: the plan's figures and what ``device`` can hold."""
        return {"peak": self.peak, "items": self.items, "worst": self.worst_stage,
                "describe": self.describe(), "capacity": device_capacity(device)}

    def describe(self) -> str:
        top = sorted(self.items.items(), key=lambda kv: -kv[1])[:3]
        return (f"{self.peak / 2**30:.1f} GiB (largest: "
                + ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in top) + ")")


def plan_block(groups: list[list[tuple[str, int, int]]], *, hidden: int, tokens: int,
               batch_range: tuple[int, int], act_bytes: int, row_block: int,
               asymmetric: bool, workers: int = 1,
               eigh_for: Callable[[int], bool] = lambda cols: True) -> MemoryPlan:
    """Plan one decoder block on one worker.

    ``groups``: per true-sequential stage, ``(linear, rows, cols)`` of every linear whose
    Hessian is its own group's (one entry per Hessian: q/k/v count once, with the rows of all
    three); ``tokens``: this worker's calibration tokens; ``batch_range``: its global batches;
    ``act_bytes``: bytes per element of activations and weights; ``workers``: how many workers'
    partial sums the owner of a Hessian receives; ``eigh_for(cols)``: whether a Hessian that
    wide gets ADMM-Q's eigendecomposition (the exact W-update) or none (CG, GPTQ).
    """
    plan = MemoryPlan()
    streams = 2 if asymmetric else 1
    # [cols, cols] statistics per Hessian: the Hessian, and under asymmetric calibration the cross
    # term and the deviation (the report's true loss).
    stats = 3 if asymmetric else 1
    # Held through the block: the hidden states (the float stream too), the next block's
    # inputs while propagating, and the block's weights.
    plan.items["hidden states"] = (streams + 1) * tokens * hidden * act_bytes
    plan.items["block weights"] = sum(rows * cols for stage in groups
                                      for _, rows, cols in stage) * act_bytes
    if asymmetric:
        plan.items["float inputs"] = sum(tokens * cols for stage in groups
                                         for _, _, cols in stage) * act_bytes
    held = sum(plan.items.values())
    pieces = dyadic_pieces(*batch_range)
    worst = 0
    for stage in groups:
        capture = sum(stats * pieces * cols * cols * 4 for _, _, cols in stage)
        # The owner folds the other workers' partial sums in one at a time.
        merge = max(stats * pieces * cols * cols * 4 for _, _, cols in stage) \
            if workers > 1 else 0
        kept = sum((stats * 4 + CHOLESKY_KEPT + EIGH_KEPT * eigh_for(cols)) * cols * cols
                   for _, _, cols in stage)
        factor = max((EIGH_TRANSIENT if eigh_for(cols) else CHOLESKY_TRANSIENT) * cols * cols
                     for _, _, cols in stage)
        solve = max((SOLVER_ARRAYS + CG_ARRAYS * (not eigh_for(cols))) * min(rows, row_block)
                    * cols * 4 for _, rows, cols in stage)
        need = max(capture + merge, kept + max(factor, solve))
        if need > worst:
            worst, plan.worst_stage = need, stage[0][0]
            plan.items["Hessians and factorizations"] = kept + factor
            plan.items["partial sums"] = capture + merge
            plan.items["row-block solve"] = solve
    plan.peak = held + worst
    return plan


def plan_segments(blocks: list[list[list[tuple[str, int, int]]]], *, hidden: int, tokens: int,
                  num_batches: int, act_bytes: int, row_block: int, segments: int,
                  asymmetric: bool = False,
                  eigh_for: Callable[[int], bool] = lambda cols: True) -> MemoryPlan:
    """Plan a depth-parallel worker: it holds its ``blocks`` (each as :func:`plan_block` takes
    it) for the whole run with every layer's float copy, codes and duals, and each of its
    ``segments``' input and output over all ``tokens`` (and under asymmetric calibration the float
    model's input); then one block's work at a time."""
    plan = MemoryPlan()
    weights = sum(rows * cols for block in blocks for stage in block for _, rows, cols in stage)
    # The weights, their float32 copies, int32 codes and float32 duals (4 + 4 + 4).
    plan.items["segment weights, codes and duals"] = weights * (act_bytes + 12)
    plan.items["segment inputs and outputs"] = (2 + asymmetric) * segments * tokens * hidden \
        * act_bytes
    held = sum(plan.items.values())
    worst = None
    for block in blocks:
        p = plan_block(block, hidden=hidden, tokens=tokens, batch_range=(0, num_batches),
                       act_bytes=act_bytes, row_block=row_block, asymmetric=asymmetric,
                       eigh_for=eigh_for)
        if worst is None or p.peak - p.items["block weights"] > worst.peak - \
                worst.items["block weights"]:
            worst = p
    if worst is not None:
        plan.items.update({k: v for k, v in worst.items.items() if k != "block weights"})
        plan.worst_stage = worst.worst_stage
        held += worst.peak - worst.items["block weights"]
    plan.peak = held
    return plan


def plan_coordinated(blocks: list[list[list[tuple[str, int, int]]]], *, hidden: int,
                     batch_tokens: int, act_bytes: int, row_block: int,
                     asymmetric: bool,
                     eigh_for: Callable[[int], bool] = lambda cols: True) -> MemoryPlan:
    """Plan a coordinated-schedule worker: it holds its ``blocks`` for the whole run with every
    layer's float copy, best codes, last iterate and duals; while a round captures, every owned
    Hessian's partial sums at once (and cross terms under asymmetric calibration) and one batch's
    hidden states per stream; then one Hessian's factorizations and one row block's solve."""
    plan = MemoryPlan()
    streams = 2 if asymmetric else 1
    shapes = [(rows, cols) for block in blocks for stage in block for _, rows, cols in stage]
    # Weights, float32 copies, int32 best codes and last iterate, float32 duals (4 * 4).
    plan.items["blocks' weights, codes and duals"] = sum(r * c for r, c in shapes) * (
        act_bytes + 16)
    # Every batch arrives, in order: one running sum per Hessian (and cross term and deviation),
    # no tree.
    stats = 3 if asymmetric else 1
    plan.items["every owned Hessian while capturing"] = sum(stats * c * c * 4 for _, c in shapes)
    plan.items["a batch in flight"] = (streams + 1) * batch_tokens * hidden * act_bytes
    plan.items["factorization and row-block solve"] = max(
        ((EIGH_TRANSIENT + EIGH_KEPT if eigh_for(c) else CHOLESKY_TRANSIENT) * c * c
         + (SOLVER_ARRAYS + CG_ARRAYS * (not eigh_for(c))) * min(r, row_block) * c * 4)
        for r, c in shapes)
    plan.peak = sum(plan.items.values())
    plan.worst_stage = "capture and iterate"
    return plan


def largest_fitting(plans: list[dict], needs: Callable[[int, dict], str], advice: str) -> int:
    """The worker with the largest of ``plans`` (as :meth:`MemoryPlan.on` reports them), after
    refusing the first that its device cannot hold: ``needs(worker, plan)`` says what needs the
    memory, ``advice`` what to do about it."""
    for k, p in enumerate(plans):
        if p["peak"] > p["capacity"]:
            raise MemoryError(f"{needs(k, p)}, more than the {p['capacity'] / 2**30:.1f} GiB its "
                              f"device has; {advice}")
    return max(range(len(plans)), key=lambda w: plans[w]["peak"])


def device_capacity(device: torch.device) -> int:
    """Bytes a worker may use on ``device``: the GPU's total memory, or this host's available
    memory (MemAvailable) for CPU workers."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def llama_block(hidden: int, intermediate: int, heads: int, kv_heads: int,
                head_dim: int | None = None) -> list[list[tuple[str, int, int]]]:
    """A Llama-style decoder block's stages as :func:`plan_block` takes them."""
    head_dim = head_dim or hidden // heads
    qkv = (heads + 2 * kv_heads) * head_dim
    return [[("self_attn.q_proj", qkv, hidden)], [("self_attn.o_proj", hidden, heads * head_dim)],
            [("mlp.gate_proj", 2 * intermediate, hidden)], [("mlp.down_proj", hidden,
                                                             intermediate)]]


def tokens_per_worker(samples: int, seq_len: int, batch_size: int,
                      workers: int) -> tuple[int, tuple[int, int]]:
    """The largest shard's tokens and its batch range, as :func:`plan.shard_batches` cuts."""
    batches = math.ceil(samples / batch_size)
    bounds = [batches * k // workers for k in range(workers + 1)]
    k = max(range(workers), key=lambda w: bounds[w + 1] - bounds[w])
    count = bounds[k + 1] - bounds[k]
    return count * batch_size * seq_len, (bounds[k], bounds[k + 1])
