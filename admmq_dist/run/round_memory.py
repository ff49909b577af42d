"""How much memory a worker of the round schedules needs, planned before round 0.

A depth-parallel or coordinated worker holds its blocks for the whole run — weights, float
copies, codes, iterates and duals — beside what any worker holds (the embeddings, the final norm,
``lm_head`` and the arguments every block is called with). On top of that, one phase at a time:
a depth-parallel worker solves one block of a segment as the sequential schedule would
(:func:`.memory.plan_block`, on every calibration token); a coordinated worker solves one block
at a time in its sequential start (GPTQ), then each round captures every owned Hessian at once
and iterates one Hessian's layers at a time. Phases are kept apart (``MemoryPlan.phases``) so that
workers sharing one process add up (:func:`.memory.in_process_peak`). Measured against torch's
allocator on real blocks: tests/test_memory.py, benchmarks/results/memory_model.md.
"""

from __future__ import annotations

from collections.abc import Callable

from .memory import (ASYMMETRIC_KEPT_ARRAYS, CHOLESKY_KEPT, EIGH_KEPT, FORWARD_ARRAYS,
                     MemoryPlan, _solve_transient, plan_block, results_bytes)
from .memory import in_process_peak as memory_in_process

Shapes = list[list[list[tuple[str, int, int]]]]  # per block, per stage, (linear, rows, cols)

# Bytes per weight a depth-parallel worker holds beside the weight itself: its float32 copy,
# int32 codes and float32 duals; a coordinated worker also keeps its last iterate's codes.
SEGMENT_BYTES_PER_WEIGHT, COORDINATED_BYTES_PER_WEIGHT = 12, 16


def _weights(blocks: Shapes) -> int:
    return sum(rows * cols for block in blocks for stage in block for _, rows, cols, *_ in stage)


def _widest_square(blocks: Shapes) -> int:
    """Bytes of one float32 ``[cols, cols]`` statistic of the widest input."""
    return 4 * max(cols for block in blocks for stage in block for _, _, cols, *_ in stage) ** 2


def _worst_block(blocks: Shapes, **kwargs) -> tuple[MemoryPlan, int]:
    """The plan (:func:`.memory.plan_block`) of the block needing the most beyond its weights,
    and its weights' bytes."""
    plans = [plan_block(block, **kwargs) for block in blocks]
    worst = max(plans, key=lambda p: p.peak - p.items["block weights"])
    return worst, worst.items["block weights"]


def _rebased(plan: MemoryPlan, held: int, block_weights: int, prefix: str = "",
             hidden_states: bool = True, deviation: int = 0) -> dict:
    """A block plan's phases on a round worker that holds ``held`` for the whole run (the
    block's weights among it, and the block's hidden states unless ``hidden_states``): what the
    block's phase holds beyond those (float inputs, partial sums) is working set, alive on one
    worker at a time when workers share a process — a round worker's calls run one after another
    and free it. ``deviation``: bytes of the asymmetric deviation a round worker keeps beside
    each Hessian while solving (for the report's true loss; the sequential schedule folds it into
    loss terms when merging)."""
    beside = block_weights + (0 if hidden_states else plan.items["hidden states"])
    return {prefix + name: (held, kept + deviation * name.startswith("solve"),
                            phase_held - beside + transient, units)
            for name, (phase_held, kept, transient, units) in plan.phases.items()}


def _peak(plan: MemoryPlan) -> int:
    return max(held + kept + transient for held, kept, transient, _ in plan.phases.values())


def plan_segments(blocks: Shapes, *, hidden: int, tokens: int, num_batches: int,
                  act_bytes: int, row_block: int, segments: int, asymmetric: bool = False,
                  eigh_for: Callable[[int], bool] = lambda cols: True,
                  group_size: int | None = 128, batch_tokens: int = 0, embeddings: int = 0,
                  host: bool | None = None) -> MemoryPlan:
    """Plan a depth-parallel worker: it holds its ``blocks`` for the whole run with every layer's
    float copy, codes and duals, each of its ``segments``' input and output over all ``tokens``
    (and under asymmetric calibration the float model's input), and ``embeddings`` (bytes of the
    embeddings, norm, ``lm_head`` and block call arguments); then one block's work at a time, as
    :func:`.memory.plan_block` plans it on every token."""
    plan = MemoryPlan()
    plan.items["segment weights, codes and duals"] = _weights(blocks) * (
        act_bytes + SEGMENT_BYTES_PER_WEIGHT)
    # Each segment's inputs and outputs, both streams under asymmetric calibration: what the
    # block being solved reads and writes is among them.
    plan.items["segment inputs and outputs"] = (1 + asymmetric) * 2 * segments * tokens \
        * hidden * act_bytes
    if embeddings:
        plan.items["embeddings and lm_head"] = embeddings
    held = sum(plan.items.values())
    worst, block_weights = _worst_block(
        blocks, hidden=hidden, tokens=tokens, batch_range=(0, num_batches), act_bytes=act_bytes,
        row_block=row_block, asymmetric=asymmetric, eigh_for=eigh_for, group_size=group_size,
        batch_tokens=batch_tokens, host=host)
    plan.items.update({k: v for k, v in worst.items.items() if k != "block weights"})
    del plan.items["hidden states"]
    plan.phases = _rebased(worst, held, block_weights, hidden_states=False,
                           deviation=_widest_square(blocks) * asymmetric)
    plan.worst_stage, plan.host = worst.worst_stage, worst.host
    plan.peak = _peak(plan)
    return plan


def plan_coordinated(blocks: Shapes, *, hidden: int, tokens: int, num_batches: int,
                     batch_tokens: int, act_bytes: int, row_block: int, asymmetric: bool,
                     eigh_for: Callable[[int], bool] = lambda cols: True,
                     group_size: int | None = 128, embeddings: int = 0, start: bool = False,
                     host: bool | None = None) -> MemoryPlan:
    """Plan a coordinated-schedule worker: it holds its ``blocks`` for the whole run with every
    layer's float copy, best codes, last iterate and duals, and ``embeddings``; with the
    sequential ``start``, one GPTQ block at a time on every token; in each round, every owned
    Hessian's running sum at once (cross terms and deviations under asymmetric calibration) while
    one batch flows through, then per Hessian its totals, factorizations and targets and one row
    block's solve or the final scale refit."""
    plan = MemoryPlan()
    plan.items["blocks' weights, codes and duals"] = _weights(blocks) * (
        act_bytes + COORDINATED_BYTES_PER_WEIGHT)
    if embeddings:
        plan.items["embeddings and lm_head"] = embeddings
    held = sum(plan.items.values())
    stats = 3 if asymmetric else 1
    groups = [entry[1:3] for block in blocks for stage in block for entry in stage]
    sums = sum(stats * cols * cols * 4 for _, cols in groups)
    plan.items["every owned Hessian while capturing"] = sums
    widest = max([hidden] + [cols for _, cols in groups])
    # The quantized and float streams, the block's output, and the block's forward pass.
    flight = ((2 + asymmetric) + FORWARD_ARRAYS * widest / hidden) * batch_tokens * hidden \
        * act_bytes
    plan.items["a batch in flight"] = int(flight)
    # GPTQ's factor only for layers without a state yet: none after the sequential start.
    kept = max((stats * 4 + CHOLESKY_KEPT * (not start) + EIGH_KEPT * eigh_for(c)) * c * c
               + ASYMMETRIC_KEPT_ARRAYS * asymmetric * r * c * 4 for r, c in groups)
    transient = max(_solve_transient(r, c, row_block, group_size, asymmetric, eigh_for(c), bool(host),
                                     act_bytes) for r, c in groups)
    plan.items["Hessian totals, factors and targets"] = kept
    plan.items["row-block solve or refit"] = transient
    plan.phases = {"capture": (held + sums, 0, int(flight), 1),
                   "iterate": (held + sums, kept, transient, 1)}
    plan.worst_stage = "capture and iterate"
    if start:
        worst, block_weights = _worst_block(
            blocks, hidden=hidden, tokens=tokens, batch_range=(0, num_batches),
            act_bytes=act_bytes, row_block=row_block, asymmetric=asymmetric,
            eigh_for=lambda cols: False, group_size=group_size, batch_tokens=batch_tokens,
            host=host, in_order=True)
        # No layer has duals or a last iterate of its own yet (GPTQ's codes are both).
        plan.phases.update(_rebased(worst, held - 8 * _weights(blocks), block_weights, "start ",
                                    deviation=_widest_square(blocks) * asymmetric))
        plan.items["sequential start (one block on every token)"] = \
            worst.peak - block_weights
        plan.host = worst.host
    plan.peak = _peak(plan)
    if start and plan.peak > held + sums + kept + transient:
        plan.worst_stage = f"sequential start {worst.worst_stage}"
    return plan


def driver_bytes(blocks: Shapes, *, tokens: int, hidden: int, asymmetric: bool
                 ) -> dict[str, int]:
    """What the driver of a round schedule holds at a time: one block's results on their way to
    the writer (after the rounds), or the hidden states it hands from one worker to the next
    (every token of each stream: a segment's inputs between rounds, or a block's outputs while
    the next block's sequential start runs)."""
    return {"results": max(results_bytes(block) for block in blocks),
            "handoff": (1 + asymmetric) * tokens * hidden * 4}


def in_process_peak(plans: list[dict]) -> int:
    """The peak of a round schedule's workers and driver in one process (the in-process
    backend): the workers' phases added up (:func:`.memory.in_process_peak`; what the driver
    hands on is then the receiving worker's input itself, not a copy), or what every worker holds
    with the driver's largest."""
    phases = [p["phases"] for p in plans]
    driver = max(max(p["driver"].values()) for p in plans)
    held = sum(max(h for h, *_ in phase.values()) for phase in phases)
    return max(memory_in_process(phases), held + driver)
