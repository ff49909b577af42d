"""Who does what, decided so that nothing depends on the number of workers: calibration batches
cut into contiguous shards by global index, and each stage's layers cut into canonical row blocks
(:func:`admmq_dist.quant.solvers.rows.row_blocks`) spread over workers by cost; and the shapes
the memory plan takes for a Llama block and a worker's shard."""

from __future__ import annotations

import math

import torch

from ..model.capture import Stage
from ..quant.solvers.rows import row_blocks

# A unit of solving work: (linear, (first row, stop row), cost).
Unit = tuple[str, tuple[int, int], int]


def shard_batches(batches: list[torch.Tensor], num_workers: int) -> list[dict[int, torch.Tensor]]:
    """Contiguous shards by global batch index; worker 0 always holds batch 0."""
    if num_workers < 1:
        raise ValueError(f"workers={num_workers} must be at least 1")
    if num_workers > len(batches):
        raise ValueError(
            f"{num_workers} workers but only {len(batches)} calibration batches; use fewer "
            "workers or more --num-samples (or a smaller --batch-size)")
    bounds = [len(batches) * k // num_workers for k in range(num_workers + 1)]
    return [{i: batches[i] for i in range(bounds[k], bounds[k + 1])} for k in range(num_workers)]


def stage_units(stage: Stage, shapes: dict[str, tuple[int, int]], row_block: int) -> list[Unit]:
    """Every canonical row block of the stage's linears, costed by its size."""
    units = []
    for group in stage.groups:
        for name in group:
            rows, cols = shapes[name]
            for start, stop in row_blocks(rows, row_block):
                units.append((name, (start, stop), (stop - start) * cols))
    return units


def assign(units: list[Unit], num_workers: int) -> dict[int, list[Unit]]:
    """Longest-processing-time assignment of units: deterministic (ties go to the lowest
    worker, equal costs keep plan order)."""
    return _longest_first([[unit] for unit in units], num_workers)


def assign_whole(units: list[Unit], key_of: dict[str, object], num_workers: int
                 ) -> dict[int, list[Unit]]:
    """Longest-processing-time assignment of whole Hessians: every unit of one key (``key_of``:
    linear -> the Hessian it is solved against) to one worker, the keys' units contiguous on it.
    For stages with at least as many Hessians as workers (a mixture-of-experts stage): no
    merged Hessian is handed around, and a worker holds only its own experts' factors."""
    by_key: dict[object, list[Unit]] = {}
    for unit in units:
        by_key.setdefault(key_of[unit[0]], []).append(unit)
    return _longest_first(list(by_key.values()), num_workers)


def wave_bounds(experts: int, waves: int, workers: int) -> list[tuple[int, int]]:
    """An expert stage of ``experts`` Hessians cut into at most ``waves`` contiguous waves of
    nearly equal size, each of at least one expert per worker (so every wave is solved expert
    by expert, :func:`assign_whole`, and keeps every worker busy)."""
    waves = max(1, min(waves, experts // max(workers, 1)))
    return [(experts * k // waves, experts * (k + 1) // waves) for k in range(waves)]


def most_waves(experts: list[int], workers: int) -> int:
    """The most waves any of a block's expert stages (``experts``: their Hessian counts) can be
    captured in."""
    return max([1] + [n // max(workers, 1) for n in experts])


def expert_waves(stages: list[Stage], waves: int, workers: int) -> list[Stage]:
    """The block's stages with each expert stage captured and solved in ``waves`` waves: one
    forward pass per wave, holding only the wave's experts' partial sums and Hessians. The
    experts of a stage are independent of one another (an expert's input is the block's MLP
    input, or its own gate/up's output), so waves change no byte, only how many forward passes
    the stage takes."""
    out = []
    for stage in stages:
        if stage.experts is None:
            out.append(stage)
            continue
        out += [Stage(stage.groups[start:stop], stage.experts, stage.role)
                for start, stop in wave_bounds(len(stage.groups), waves, workers)]
    return out


def _longest_first(groups: list[list[Unit]], num_workers: int) -> dict[int, list[Unit]]:
    """Each group, costliest first (equal costs in their order), to the least loaded worker
    (ties to the lowest)."""
    load = [0] * num_workers
    out: dict[int, list] = {w: [] for w in range(num_workers)}
    for group in sorted(groups, key=lambda us: -sum(u[2] for u in us)):
        w = min(range(num_workers), key=lambda k: (load[k], k))
        load[w] += sum(u[2] for u in group)
        out[w] += group
    return out


def llama_block(hidden: int, intermediate: int, heads: int, kv_heads: int,
                head_dim: int | None = None) -> list[list[tuple[str, int, int]]]:
    """A Llama-style decoder block's stages as :func:`.memory.plan_block` takes them (with each
    Hessian's row-block units at 512 rows)."""
    head_dim = head_dim or hidden // heads
    qkv = (heads + 2 * kv_heads) * head_dim

    def units(*rows: int) -> int:
        return sum(math.ceil(r / 512) for r in rows)

    return [[("self_attn.q_proj", qkv, hidden,
              units(heads * head_dim, kv_heads * head_dim, kv_heads * head_dim))],
            [("self_attn.o_proj", hidden, heads * head_dim, units(hidden))],
            [("mlp.gate_proj", 2 * intermediate, hidden, units(intermediate, intermediate))],
            [("mlp.down_proj", hidden, intermediate, units(hidden))]]


def tokens_per_worker(samples: int, seq_len: int, batch_size: int,
                      workers: int) -> tuple[int, tuple[int, int]]:
    """The largest shard's tokens and its batch range, as :func:`shard_batches` cuts."""
    batches = math.ceil(samples / batch_size)
    bounds = [batches * k // workers for k in range(workers + 1)]
    k = max(range(workers), key=lambda w: bounds[w + 1] - bounds[w])
    count = bounds[k + 1] - bounds[k]
    return count * batch_size * seq_len, (bounds[k], bounds[k + 1])
