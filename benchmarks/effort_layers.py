"""`--effort fast|default|best` on real layers (issue 27 item 4): each effort's layer loss and
solve time against act-order GPTQ's on the same layer, grid and Hessian, in the same run.

Layers: every linear of SmolLM2-135M blocks 0, 12 and 24 (`real_layers.py`: float-model
Hessians from WikiText-2 windows). Grid: 3-bit g64 asymmetric min-max, fitted once per layer and
shared by every method. Each solve is the shipped `solve()` with the recipe the effort resolves
to (scales rounded to bfloat16, as a checkpoint stores them); `gptq+polish` is act-order GPTQ
with the polish ADMM-Q gets (one local-search sweep, one scale refit and its sweep) — the
cheapest way past GPTQ without ADMM-Q. One thread, so that the times compare on a shared machine.

    python benchmarks/effort_layers.py [--blocks 0 12 24] [--bits 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402
from real_layers import load_real_layers  # noqa: E402

from admmq_dist.quant.grid import GridSpec, fit_grid  # noqa: E402
from admmq_dist.quant.solvers.solve import solve  # noqa: E402
from admmq_dist.recipe import EFFORTS, Recipe, override  # noqa: E402

GPTQ_POLISHED = {"solver": {"method": "gptq", "local_search_sweeps": 1, "scale_refits": 1}}


def variants() -> dict:
    out = {"gptq": override(Recipe(), {"solver": {"method": "gptq"}}).solver,
           "gptq+polish": override(Recipe(), GPTQ_POLISHED).solver}
    out.update({f"effort {name}": override(Recipe(), {"effort": name}).solver for name in EFFORTS})
    return out


def measure(layers: list[dict], bits: int, group_size: int) -> tuple[list[dict], dict]:
    methods = variants()
    rows = []
    for layer in layers:
        grid = fit_grid(layer["weight"], GridSpec(bits=bits, group_size=group_size,
                                                  symmetric=False))
        row = {"name": layer["name"], "shape": tuple(layer["weight"].shape)}
        for name, settings in methods.items():
            start = time.perf_counter()
            result = solve(layer["weight"], layer["hessian"], grid, settings,
                           scale_dtype=torch.bfloat16)
            row[name] = {"loss": result.loss, "seconds": time.perf_counter() - start,
                         "iterations": result.iterations}
        rows.append(row)
        print(row["name"], {k: "%.4f %.2fs %d" % (v["loss"], v["seconds"], v["iterations"])
                            for k, v in row.items() if isinstance(v, dict)}, flush=True)
    return rows, methods


def summary_lines(rows: list[dict], methods: dict) -> list[str]:
    lines = ["| method | loss / GPTQ's, median (min-max) | solve time / GPTQ's, median "
             "(min-max) | total time / GPTQ's | ADMM-Q iterations, median |",
             "|---|---|---|---|---|"]
    for name in methods:
        loss = [r[name]["loss"] / r["gptq"]["loss"] for r in rows]
        secs = [r[name]["seconds"] / r["gptq"]["seconds"] for r in rows]
        total = sum(r[name]["seconds"] for r in rows) / sum(r["gptq"]["seconds"] for r in rows)
        iters = statistics.median(r[name]["iterations"] for r in rows)
        lines.append(f"| {name} | {statistics.median(loss):.4f} ({min(loss):.4f}-{max(loss):.4f})"
                     f" | {statistics.median(secs):.2f} ({min(secs):.2f}-{max(secs):.2f}) | "
                     f"{total:.2f} | {iters:g} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[0, 12, 24])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--output", default="effort_layers")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    layers = load_real_layers(blocks=args.blocks)
    rows, methods = measure(layers, args.bits, args.group_size)
    lines = [
        "# `--effort` on real SmolLM2 layers (issue 27 item 4)", "",
        f"`python benchmarks/effort_layers.py --blocks {' '.join(map(str, args.blocks))} "
        f"--bits {args.bits}` at commit {environment.commit()}; {environment.describe()}; one "
        f"thread; one run (the losses are deterministic for the inputs, the times are one "
        f"measurement on a shared 2-core machine); {time.perf_counter() - started:.0f} s in all.",
        f"Layers: the {len(rows)} linears of blocks {args.blocks}; grid {args.bits}-bit "
        f"g{args.group_size} asymmetric min-max, shared by every method; float-model Hessians. "
        "`effort NAME`: `solve()` with the recipe `--effort NAME` resolves to "
        "(`admmq_dist/recipe.py` EFFORTS); `gptq+polish`: act-order GPTQ with ADMM-Q's polish "
        "(one sweep, one scale refit and its sweep). Ratios are per layer against act-order GPTQ "
        "on the same layer.", "",
        environment.settings_record({"grid": {"bits": args.bits, "group_size": args.group_size,
                                              "symmetric": False}}, sections=("grid", "solver")),
        "", *summary_lines(rows, methods), ""]
    environment.write_results(args.output, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
