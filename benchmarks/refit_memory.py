"""The scale refit's peak memory at real widths, measured by torch's allocator (tests/alloc.py),
against the plan (run/memory.py refit_bytes) and against the refit it replaced, which built two
``[rows, G, cols]`` float64 arrays and float64 copies of the whole Hessian.

    python benchmarks/refit_memory.py                 # 70B's down_proj: 512 x 28672, group 128
    python benchmarks/refit_memory.py --shapes 512x8192x128 --old

Writes benchmarks/results/refit_memory.md (one run per shape: the allocator's count does not
vary between runs; the time does, and is this machine's). The Hessian is random low-rank plus
identity, built in float32 like the pipeline's; the refit's cost does not depend on its values.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from alloc import peak_allocated  # noqa: E402

from admmq_dist.quant.grid import GridSpec, fit_grid  # noqa: E402
from admmq_dist.quant.solvers.scales import refit_scales  # noqa: E402
from admmq_dist.run.memory import refit_bytes  # noqa: E402


def old_refit_bytes(rows: int, cols: int, groups: int, group_size: int) -> int:
    """The replaced refit's two [rows, G, padded] float64 arrays and two float64 Hessians."""
    padded = groups * group_size
    return 8 * (2 * rows * groups * padded + 2 * padded * cols)


def measure(rows: int, cols: int, group_size: int, old: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=g)
    x = torch.randn(cols, 128, generator=g)
    hessian = x @ x.T
    hessian.diagonal().add_(1.0)
    del x
    grid = fit_grid(weight, GridSpec(bits=3, group_size=group_size))
    codes = grid.codes(weight)
    start = time.perf_counter()
    _, peak = peak_allocated(lambda: refit_scales(weight, hessian, grid, codes, torch.bfloat16))
    row = {"shape": f"{rows} x {cols}, g{group_size}", "peak": peak,
           "plan": refit_bytes(rows, cols, grid.num_groups), "seconds": time.perf_counter() - start,
           "old_formula": old_refit_bytes(rows, cols, grid.num_groups, grid.group_size),
           "old_measured": None}
    if old and row["old_formula"] < 10 * 2**30:  # this machine has 24 GiB
        sys.path.insert(0, str(Path("/tmp")))
        import old_scales  # the replaced module, written there by hand (git show)

        _, row["old_measured"] = peak_allocated(
            lambda: old_scales.refit_scales(weight, hessian, grid, codes, torch.bfloat16))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["512x28672x128", "512x8192x128"])
    parser.add_argument("--old", action="store_true",
                        help="also measure the replaced refit where its formula is under 10 GiB "
                        "(import old_scales from /tmp)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/refit_memory.md"))
    args = parser.parse_args()
    rows = []
    for shape in args.shapes:
        r, c, gs = (int(v) for v in shape.split("x"))
        rows.append(measure(r, c, gs, args.old))
        print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    gib = 2**30
    lines = ["# Scale refit: peak memory beyond its inputs", "",
             f"`python benchmarks/refit_memory.py {' '.join(sys.argv[1:])}` at commit {commit}, "
             f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; "
             "one run per shape (the allocator's count is deterministic; the time is not).", "",
             "| row block | measured peak | plan (`refit_bytes`) | plan / measured | "
             "replaced refit (its formula) | replaced refit (measured) | seconds |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        old = "—" if row["old_measured"] is None else f"{row['old_measured'] / gib:.2f} GiB"
        lines.append(f"| {row['shape']} | {row['peak'] / gib:.3f} GiB | {row['plan'] / gib:.3f} GiB"
                     f" | {row['plan'] / row['peak']:.3f} | {row['old_formula'] / gib:.1f} GiB | "
                     f"{old} | {row['seconds']:.1f} |")
    lines += ["", "The replaced refit's formula counts only its two `[rows, G, cols]` arrays and two "
              "float64 Hessians; measured it also held their einsum temporaries."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
