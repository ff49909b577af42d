"""The memory model against measurement: every cell of tests/memory_cells.py (the whole
pipeline of each schedule on tiny Llama blocks), torch's allocator peak against the plan, written to
benchmarks/results/memory_model.md. The allocator's count is deterministic: one run per cell.

    python benchmarks/memory_model.py
"""

from __future__ import annotations

import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import environment  # noqa: E402
from memory_cells import BENCHMARK_CELLS, measure_cell_apart  # noqa: E402


def main() -> None:
    commit = environment.commit()
    lines = ["# Memory model: plan against the measured peak (every schedule)", "",
             f"`python benchmarks/memory_model.py` at commit {commit}, torch {torch.__version__}, "
             f"{platform.machine()}; one run per cell (allocator counts are deterministic). "
             "Tiny Llama (and Qwen3-MoE: 8 experts, top 2, expert width = hidden), 2 blocks, "
             "intermediate 2.75 x hidden, 16 x 64 calibration tokens, "
             "batch 2, group 32, in-process workers (the plan: every worker and the driver "
             "added up); round schedules run 2 rounds.", "",
             "| model | schedule | hidden | asymmetric | workers | W-update | measured peak "
             "| plan | plan / measured |",
             "|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for cell in BENCHMARK_CELLS:
        with tempfile.TemporaryDirectory() as root:
            measured, planned = measure_cell_apart(Path(root), *cell)
        ratios.append(planned / measured)
        hidden, asymmetric, workers, w_update, schedule, model, waves = (
            *cell, *("llama", 1)[len(cell) - 5:])
        model += f" ({waves} expert waves)" if waves > 1 else ""
        lines.append(f"| {model} | {schedule} | {hidden} | {asymmetric} | {workers} | {w_update} | "
                     f"{measured / 2**20:.1f} MiB | {planned / 2**20:.1f} MiB | "
                     f"{planned / measured:.3f} |")
        print(lines[-1], flush=True)
    lines += ["", f"plan / measured: {min(ratios):.3f}–{max(ratios):.3f} over {len(ratios)} "
              "cells (the test's bound: 1–1.3)."]
    out = ROOT / "benchmarks/results/memory_model.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
