"""Active rows in ADMM-Q, measured at equal quality against the same run's baseline.

Every layer is solved by ADMM-Q with the shipped settings and active rows off (the baseline) and
with each variant of active rows (``row_patience`` : ``row_min_rho``), on the same grid, Hessian
and factorization. The work is counted, not timed: row-iterations (the rows each iteration's two
GEMMs, projection, dual update and loss ran on; the baseline's are ``iterations × rows``), so the
figures are deterministic; the wall time is printed as a secondary, noisy figure. Quality: ADMM-Q's
own layer loss (before the polish, which is the same for both).

    python benchmarks/active_rows.py                      # SmolLM2 blocks 0, 14, 29 and synthetic
    python benchmarks/active_rows.py --variants 5:0.5 --no-write
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from admmq_dist.quant.factors import HessianFactors  # noqa: E402
from admmq_dist.quant.grid import GridSpec, fit_grid  # noqa: E402
from admmq_dist.quant.solvers import admmq  # noqa: E402
from admmq_dist.quant.solvers.solve import SolverSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_VARIANTS = ("5:1.0",)
CACHED_BLOCKS = [0, 14, 29]
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def variant_settings(base, variant: str):
    patience, min_rho = variant.split(":")
    return dataclasses.replace(base, active_rows=True, row_patience=int(patience),
                               row_min_rho=float(min_rho))


def layers(blocks: list[int], kinds: list[str], synthetic: int) -> list[dict]:
    """The real SmolLM2 layers of ``blocks`` (benchmarks/real_layers.py, cached) and
    ``synthetic`` layers with outlier channels (tests/conftest.py)."""
    out = []
    if blocks:
        from real_layers import load_real_layers
        # The cached capture of blocks 0, 14 and 29 (real_layers.py needs WikiText-2 otherwise).
        for layer in load_real_layers(blocks=CACHED_BLOCKS):
            if layer["block"] not in blocks or layer["kind"] not in kinds:
                continue
            out.append({"name": layer["name"], "weight": layer["weight"],
                        "hessian": layer["hessian"]})
    if synthetic:
        from conftest import synthetic_layer
        for seed in range(synthetic):
            w, h, _ = synthetic_layer(384, 256, 8192, seed=seed)
            out.append({"name": f"synthetic.{seed}", "weight": w, "hessian": h})
    return out


def solve(layer: dict, factors, grid, settings, gptq_settings) -> dict:
    t = time.perf_counter()
    r = admmq(layer["weight"], layer["hessian"], grid, settings, gptq_settings=gptq_settings,
              factors=factors)
    return {"loss": r.loss, "iterations": r.iterations, "row_its": sum(r.history["rows"]),
            "seconds": time.perf_counter() - t}


def measure(items: list[dict], configs: list[tuple[int, int]], variants: list[str]) -> list[dict]:
    defaults = SolverSettings()
    rows = []
    for layer in items:
        factors = HessianFactors(layer["hessian"])
        for bits, group in configs:
            grid = fit_grid(layer["weight"], GridSpec(bits=bits, group_size=group, symmetric=False))
            row = {"layer": layer["name"], "shape": tuple(layer["weight"].shape),
                   "config": f"{bits}-bit g{group}",
                   "base": solve(layer, factors, grid, defaults.admm, defaults.gptq)}
            for v in variants:
                row[v] = solve(layer, factors, grid, variant_settings(defaults.admm, v),
                               defaults.gptq)
            rows.append(row)
            print(f"{row['layer']:36s} {row['config']:10s} " + "  ".join(
                f"{v}: loss x{row[v]['loss'] / row['base']['loss']:.5f} "
                f"work x{row[v]['row_its'] / row['base']['row_its']:.3f}" for v in variants),
                flush=True)
    return rows


def summary(rows: list[dict], variant: str, select=lambda r: True) -> dict:
    rows = [r for r in rows if select(r)]
    base_loss = statistics.mean(r["base"]["loss"] for r in rows)
    loss = statistics.mean(r[variant]["loss"] for r in rows)
    ratios = [r[variant]["loss"] / r["base"]["loss"] for r in rows]
    base_work = sum(r["base"]["row_its"] for r in rows)
    work = sum(r[variant]["row_its"] for r in rows)
    return {"layers": len(rows), "mean_loss_ratio": loss / base_loss,
            "worst_ratio": max(ratios), "best_ratio": min(ratios),
            "work_ratio": work / base_work, "saved": 1 - work / base_work,
            "base_iterations": statistics.mean(r["base"]["iterations"] for r in rows),
            "iterations": statistics.mean(r[variant]["iterations"] for r in rows),
            "time_ratio": (sum(r[variant]["seconds"] for r in rows)
                           / sum(r["base"]["seconds"] for r in rows))}


def groups(rows: list[dict]) -> list[tuple[str, object]]:
    configs = sorted({r["config"] for r in rows})
    out = []
    for c in configs:
        out.append((f"SmolLM2 {c}", lambda r, c=c: r["config"] == c
                    and not r["layer"].startswith("synthetic")))
        out.append((f"synthetic {c}", lambda r, c=c: r["config"] == c
                    and r["layer"].startswith("synthetic")))
    out.append(("all", lambda r: True))
    return [(name, sel) for name, sel in out if any(sel(r) for r in rows)]


def report(rows: list[dict], variants: list[str], chosen: str, args) -> str:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    lines = ["# Active rows in ADMM-Q: layer loss and work against the same run's baseline", "",
             f"- commit {commit}; one run (the counts and losses are deterministic; the time "
             "ratio is wall clock on a shared 2-core CPU, noisy)",
             f"- layers: SmolLM2-135M blocks {args.blocks}, linears {args.kinds} (WikiText-2 "
             f"Hessians, benchmarks/real_layers.py) and {args.synthetic} synthetic 384x256 "
             "layers with "
             "outlier channels (tests/conftest.py)",
             "- grids: asymmetric min-max, " + ", ".join(args.configs),
             f"- baseline: ADMM-Q with the shipped settings ({SolverSettings().admm}), active "
             "rows off; a variant `p:r` is active_rows=True, row_patience=p, row_min_rho=r",
             "- work: row-iterations (rows the W-update, projection, dual update and loss ran "
             "on, summed over iterations); loss: ADMM-Q's relative layer loss before the polish",
             f"- machine: {platform.machine()}, torch threads {torch.get_num_threads()}, "
             f"torch {torch.__version__}", "", "## Summary", "",
             "| variant | layers | mean loss ratio | worst layer | best layer | row-iterations "
             "ratio | work saved | iterations (base -> variant) | time ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        for name, sel in groups(rows):
            s = summary(rows, v, sel)
            lines.append(f"| {v} {name} | {s['layers']} | {s['mean_loss_ratio']:.5f} | "
                         f"{s['worst_ratio']:.5f} | {s['best_ratio']:.5f} | "
                         f"{s['work_ratio']:.3f} | {s['saved']:.1%} | "
                         f"{s['base_iterations']:.1f} -> {s['iterations']:.1f} | "
                         f"{s['time_ratio']:.2f} |")
    lines += ["", f"## Per layer: variant {chosen}", "",
              "| layer | shape | config | base loss | loss | ratio | base row-its | row-its | "
              "saved | iterations |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a = r["base"], r[chosen]
        lines.append(f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['config']} | "
                     f"{b['loss']:.6f} | {a['loss']:.6f} | {a['loss'] / b['loss']:.5f} | "
                     f"{b['row_its']} | {a['row_its']} | {1 - a['row_its'] / b['row_its']:.1%} | "
                     f"{b['iterations']} -> {a['iterations']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, nargs="*", default=[0, 14, 29])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS))
    parser.add_argument("--synthetic", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=["3:64", "4:128"],
                        help="bits:group_size")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        help="row_patience:row_min_rho")
    parser.add_argument("--chosen", default=None, help="the variant of the per-layer table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs]
    rows = measure(layers(args.blocks, args.kinds, args.synthetic), configs, args.variants)
    text = report(rows, args.variants, args.chosen or args.variants[0], args)
    print(text)
    if not args.no_write:
        (RESULTS / "active_rows.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
