"""The memory model's measured cells: the whole pipeline of each schedule on real (tiny) Llama
blocks, its peak of live tensor bytes (tests/alloc.py) against the plan for the same run (every
in-process worker and the driver added up). Shared by tests/test_memory.py and
benchmarks/memory_model.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from alloc import peak_allocated
from tiny import tiny_model_dir

from admmq_dist.recipe import Recipe, override
from admmq_dist.run.backends import LocalBackend
from admmq_dist.run.job import quantize_model

# (hidden, asymmetric, workers, W-update, schedule[, model type: llama unless named])
CELLS = [(hidden, asymmetric, workers, "exact", "sequential") for hidden in (128, 256)
         for asymmetric in (0.0, 0.25) for workers in (1, 2)] + [
    (512, 0.25, 2, "exact", "sequential"), (256, 0.0, 2, "cg", "sequential")]
# Each round schedule at two or three widths, 1 and 2 workers, both objectives, both W-updates
# (the test's), and the same shapes for the other (the benchmark's as well: CI's time is kept).
ROUND_CELLS = [(128, 0.0, 1, "exact", "depth-parallel"), (256, 0.25, 1, "cg", "depth-parallel"),
               (128, 0.25, 2, "exact", "coordinated"), (256, 0.0, 2, "exact", "coordinated"),
               (512, 0.0, 1, "exact", "coordinated")]
# 512 wide, 30-55 s each under the allocation tracker: the benchmark's only (the test keeps two
# cells at that width, sequential asymmetric on 2 workers and coordinated; depth-parallel and the
# CG update are tested at 128 and 256).
MORE_WIDE_CELLS = [(512, 0.0, 1, "exact", "sequential"), (512, 0.25, 1, "cg", "sequential"),
                   (512, 0.25, 2, "exact", "depth-parallel")]
MORE_ROUND_CELLS = [(128, 0.0, 1, "exact", "coordinated"), (128, 0.25, 2, "exact", "depth-parallel"),
                    (256, 0.0, 2, "exact", "depth-parallel"), (256, 0.25, 1, "cg", "coordinated"),
                    (512, 0.25, 2, "exact", "coordinated")]
# A mixture-of-experts block (Qwen3-MoE, 8 experts, top 2): routed experts are calibrated on the
# plain objective whatever the recipe says, so their float inputs and asymmetric statistics must
# not be planned (they were: plan 1.86 x measured at 128 wide).
MOE_CELLS = [(128, 0.25, 2, "exact", "sequential", "qwen3_moe")]
# The last: its expert stages captured in four waves of two experts (.plan.expert_waves).
MORE_MOE_CELLS = [(128, 0.25, 1, "exact", "sequential", "qwen3_moe"),
                  (256, 0.0, 1, "exact", "sequential", "qwen3_moe"),
                  (256, 0.25, 2, "exact", "sequential", "qwen3_moe"),
                  (256, 0.25, 2, "exact", "sequential", "qwen3_moe", 4)]
# FP4 grids (issue 28; the same cells with the grid's kind last): the E2M1 projection runs on
# every ADMM-Q iteration, so its temporaries are the plan's business (three [rows, cols] arrays
# before it was rewritten to one: the 256-wide sequential cell measured 1.4% over its plan).
FP4_CELLS = [(256, 0.25, 1, "exact", "sequential", "llama", 1, "nvfp4"),
             (256, 0.0, 2, "exact", "coordinated", "llama", 1, "nvfp4"),
             (128, 0.0, 1, "cg", "sequential", "llama", 1, "mxfp4")]
TEST_CELLS = CELLS + ROUND_CELLS + MOE_CELLS
BENCHMARK_CELLS = TEST_CELLS + MORE_WIDE_CELLS + MORE_ROUND_CELLS + MORE_MOE_CELLS
# Rounds of the round schedules: round 0 (cold) and a warm round, enough to reach every phase.
ROUNDS = 2


def measure_cell(root: Path, hidden: int, asymmetric: float, workers: int, w_update: str,
                 schedule: str = "sequential", model_type: str = "llama", waves: int = 1,
                 grid: str = "int") -> tuple[int, int]:
    """``(measured peak, planned peak)`` of one cell (``waves``: its expert stages captured in
    that many waves, as a device too small for one would make the schedule choose; ``grid``:
    the grid's kind, an FP4 format at its own group size). The source
    is bfloat16 so that the float32 weights a CPU worker computes with are allocations the
    tracker sees (float32 weights would stay mapped from the file)."""
    from admmq_dist.run import memory

    if waves > 1:  # the schedule's choice, as on a device that holds only this many waves
        memory.fewest_waves = lambda fits, most: min(waves, most)
    experts = {} if model_type == "llama" else {"num_experts": 8, "moe_intermediate_size": hidden}
    src = tiny_model_dir(root / "src", model_type, dtype=torch.bfloat16, hidden_size=hidden,
                         intermediate_size=int(2.75 * hidden), num_attention_heads=4,
                         num_key_value_heads=2, **experts)
    solver = {"admm": {"iterations": 10, "w_update": w_update}, "schedule": schedule}
    solver.update({"depth-parallel": {"rounds": ROUNDS},
                   "coordinated": {"coordinated_rounds": ROUNDS}}.get(schedule, {}))
    recipe = override(Recipe(), {
        "grid": {"group_size": 32} if grid == "int" else {"kind": grid}, "report": {"html": False},
        "calibration": {"dataset": None, "num_samples": 16, "seq_len": 64, "batch_size": 2,
                        "asymmetric": asymmetric},
        "solver": solver})
    summary, measured = peak_allocated(lambda: quantize_model(
        str(src), root / "out", recipe, device=torch.device("cpu"), progress=False,
        backend=LocalBackend(workers)))
    return measured, summary["memory_plan"]["in_process_peak_bytes"]


def measure_cell_apart(root: Path, *cell) -> tuple[int, int]:
    """:func:`measure_cell` in a process of its own: the profiler's record of a whole run takes
    gigabytes that the allocator does not hand back, and the runs after it (whose memory plans
    check the host's available memory) must not pay for it."""
    here = Path(__file__).resolve().parent
    code = ("import json, sys; from pathlib import Path; from memory_cells import measure_cell; "
            "print(json.dumps(measure_cell(Path(sys.argv[1]), *json.loads(sys.argv[2]))))")
    proc = subprocess.run([sys.executable, "-c", code, str(root), json.dumps(cell)], cwd=here,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              p for p in (str(here), os.environ.get("PYTHONPATH")) if p)})
    if proc.returncode != 0:
        raise RuntimeError(f"memory cell {cell} failed:\n{proc.stderr[-3000:]}")
    measured, planned = json.loads(proc.stdout.strip().splitlines()[-1])
    return measured, planned
