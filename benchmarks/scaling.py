"""Scaling: 1 vs 2 Ray workers on this machine, and a cost model for Llama-3-shaped models.

Part 1 (measured): SmolLM2-135M quantized with ADMM-Q by one Ray worker and by two, each worker
limited to one thread (as each GPU worker has one device), the same calibration windows; the time
split (driver phases; per worker: forward, Hessian merge, solve; busy fraction) and the two
checkpoints' digests (they must be identical).

Part 2 (model): the per-layer solver cost and the forward cost fitted to part 1's one-worker run,
rescaled to GPU throughput by stated assumptions, predict the wall time of the data-parallel
schedule for Llama-3-8B-, 70B- and 405B-shaped models on 1-64 GPUs, beside llm-compressor's
published data-parallel GPTQ figures for Llama-3-8B (745 s, 372 s, 264 s on 1, 2, 4 GPUs).

    python benchmarks/scaling.py            # 32 calibration windows of 512 tokens
    python benchmarks/scaling.py --quick    # 8 windows of 256 tokens, 2 blocks' worth of checks
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

# Assumptions for the GPU prediction (H100 SXM), stated rather than measured: no GPU was lent.
GPU = {
    "solver_flops": 30e12,      # float32 GEMMs of the ADMM-Q loop (no TF32): ~45% of 67 TFLOP/s
    "eigh_seconds_4096": 0.6,   # one float64 eigendecomposition of a 4096 x 4096 Hessian
    "forward_flops": 300e12,    # bf16 forward passes: ~30% of 990 TFLOP/s
    "intra_node_bytes_per_s": 150e9,   # NVLink, Hessian parts and weight broadcasts
    "inter_node_bytes_per_s": 20e9,    # 200 Gb/s InfiniBand per node
    "gpus_per_node": 8,
}
SHAPES = {
    # layers, hidden, intermediate, kv width (8 KV heads x 128)
    "Llama-3-8B": (32, 4096, 14336, 1024),
    "Llama-3-70B": (80, 8192, 28672, 1024),
    "Llama-3-405B": (126, 16384, 53248, 1024),
}
LLMCOMPRESSOR_8B = {1: 745.0, 2: 372.0, 4: 264.0}


def quantize(model: str, out: Path, workers: int, args) -> dict:
    cmd = [sys.executable, "-m", "admmq_dist.cli", "quantize", model, "-o", str(out),
           "--bits", "3", "--group-size", "64", "--asym", "--num-samples", str(args.num_samples),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--workers", str(workers), "--threads", "1", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    summary["wall_seconds"] = time.perf_counter() - t
    summary["report"] = [json.loads(x) for x in (out / "report.jsonl").read_text().splitlines()]
    h = hashlib.sha256()
    for path in sorted(out.glob("*.safetensors")):
        h.update(path.read_bytes())
    summary["digest"] = h.hexdigest()[:16]
    return summary


def fit_costs(run: dict, hidden: int, num_blocks: int, tokens: int, params_per_block: int,
              iterations: int) -> dict:
    """Least squares for solver seconds = c_gemm * iters*rows*cols^2 + c_eigh * cols^3 per layer,
    and forward seconds per (token x block parameter x pass)."""
    import torch

    rows = [(r["shape"][0], r["shape"][1], r["seconds"]) for r in run["report"]]
    a = torch.tensor([[iterations * m * n * n, n ** 3] for m, n, _ in rows], dtype=torch.float64)
    b = torch.tensor([s for _, _, s in rows], dtype=torch.float64)
    coef = torch.linalg.lstsq(a, b).solution.clamp(min=0)
    stages = 4
    passes = num_blocks * (stages + 1)
    fwd = run["seconds"]["forward"] / (tokens * params_per_block * passes)
    return {"c_gemm": float(coef[0]), "c_eigh": float(coef[1]), "forward_per_token_param": fwd}


def predict(shape: tuple, gpus: int, tokens: int, iterations: int, row_block: int) -> dict:
    """Wall time of the data-parallel schedule under the GPU assumptions."""
    from admmq_dist.run.plan import assign
    from admmq_dist.quant.solvers.rows import row_blocks

    layers, hidden, inter, kv = shape
    stages = [[("q", hidden, hidden), ("k", kv, hidden), ("v", kv, hidden)],
              [("o", hidden, hidden)],
              [("gate", inter, hidden), ("up", inter, hidden)],
              [("down", hidden, inter)]]
    params = sum(m * n for st in stages for _, m, n in st)
    bw = GPU["intra_node_bytes_per_s"] if gpus <= GPU["gpus_per_node"] else GPU["inter_node_bytes_per_s"]
    forward = solve = comm = 0.0
    for st in stages:
        # One capture pass per stage, plus the propagation pass below; batches split over GPUs.
        forward += 2 * params * tokens / gpus / GPU["forward_flops"]
        units = [(name, blk, 4 * iterations * (blk[1] - blk[0]) * n * n)
                 for name, m, n in st for blk in row_blocks(m, row_block)]
        plan = assign(units, gpus)
        n = st[0][2]
        eigh = GPU["eigh_seconds_4096"] * (n / 4096) ** 3
        solve += max(sum(u[2] for u in plan[w]) / GPU["solver_flops"] + (eigh if plan[w] else 0)
                     for w in plan)
        if gpus > 1:
            # Each solver receives every other worker's partial Hessian (float32, ~2 tree nodes);
            # the driver sends the solved layers (float32) to every worker.
            comm += 2 * (gpus - 1) * n * n * 4 / bw
            comm += sum(m * nn * 4 for _, m, nn in st) * gpus / GPU["inter_node_bytes_per_s"]
    forward += 2 * params * tokens / gpus / GPU["forward_flops"]
    per_block = {"forward": forward, "solve": solve, "transfer": comm}
    return {k: v * layers for k, v in per_block.items()} | {
        "total": (forward + solve + comm) * layers}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--model", default=None, help="another model folder (default: SmolLM2)")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_samples, args.seq_len = 8, 256

    from admmq_dist.model.embedded import embedded_model_folder
    from admmq_dist.quant.solvers.admmq import ADMMSettings
    from admmq_dist.quant.solvers.solve import SolverSettings

    model = args.model or str(embedded_model_folder())
    runs = {}
    with tempfile.TemporaryDirectory(prefix="admmq-scaling-") as tmp:
        for workers in (1, 2):
            runs[workers] = quantize(model, Path(tmp) / f"w{workers}", workers, args)
            print(f"{workers} worker(s): {runs[workers]['wall_seconds']:.0f}s", file=sys.stderr,
                  flush=True)
    one, two = runs[1], runs[2]
    lines = ["# Scaling: one Ray worker vs two, and a cost model", "",
             f"SmolLM2-135M, ADMM-Q 3-bit asym g64, {args.num_samples} x {args.seq_len} "
             f"calibration tokens, batches of {args.batch_size}; each worker one thread "
             f"(`--threads 1`), {os.cpu_count()} cores here. Same run, same machine.", "",
             "| | 1 worker | 2 workers | speed-up |", "|---|---|---|---|"]
    for key in ("forward", "solve", "write", "commit", "load"):
        a, b = one["seconds"][key], two["seconds"][key]
        lines.append(f"| driver: {key} s | {a:.1f} | {b:.1f} | {a / b if b else float('nan'):.2f}x |")
    lines.append(f"| end to end (process wall) s | {one['wall_seconds']:.1f} | "
                 f"{two['wall_seconds']:.1f} | {one['wall_seconds'] / two['wall_seconds']:.2f}x |")
    lines.append(f"| checkpoint digest | `{one['digest']}` | `{two['digest']}` | "
                 f"{'identical' if one['digest'] == two['digest'] else 'DIFFERENT'} |")
    lines += ["", "Per worker (busy seconds; busy fraction of the driver's total):", "",
              "| run | worker | forward | Hessian merge | solve | busy |", "|---|---|---|---|---|---|"]
    for n, run in runs.items():
        for w, busy in enumerate(run["worker_busy_seconds"]):
            total = busy["forward"] + busy["merge"] + busy["solve"]
            lines.append(f"| {n} | {w} | {busy['forward']:.1f} | {busy['merge']:.2f} | "
                         f"{busy['solve']:.1f} | {total / run['seconds']['total']:.0%} |")
    lines += ["", "Driver `solve` spans the solver calls of a stage including the transfer of "
              "Hessian partial sums and results (Ray object store) and the wait for the slower "
              "worker; `forward` spans the capture and propagation passes on all workers.", ""]

    # ---- cost model
    cfg = json.loads((Path(model) / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    params_per_block = sum(r["shape"][0] * r["shape"][1] for r in one["report"]) // layers
    tokens = args.num_samples * args.seq_len
    iterations = ADMMSettings().iterations
    costs = fit_costs(one, hidden, layers, tokens, params_per_block, iterations)
    cpu_flops = 4 / costs["c_gemm"] if costs["c_gemm"] > 0 else float("nan")
    row_block = SolverSettings().row_block
    lines += ["## Cost model", "",
              f"Fitted to the one-worker run: solver layer time = c1 x iters x rows x cols^2 + "
              f"c2 x cols^3 with c1 = {costs['c_gemm']:.3e} s (an effective "
              f"{cpu_flops / 1e9:.1f} GFLOP/s on one core here), c2 = {costs['c_eigh']:.3e} s; "
              f"forward {costs['forward_per_token_param']:.3e} s per token x parameter x pass. "
              "GPU prediction: the same operation counts at assumed H100 rates "
              f"({', '.join(f'{k} {v:g}' for k, v in GPU.items())}); "
              f"{iterations} ADMM-Q iterations (an upper bound: early stopping ends most layers "
              f"sooner), row blocks of {row_block}, 128 x 2048 calibration tokens, 4 capture "
              "passes + 1 propagation pass per block.", "",
              "| model | GPUs | forward s | solve s | transfer s | total s | total min |",
              "|---|---|---|---|---|---|---|"]
    predictions = {}
    for name, shape in SHAPES.items():
        for gpus in (1, 2, 4, 8, 64):
            if name != "Llama-3-8B" and gpus in (2, 4):
                continue
            p = predict(shape, gpus, 128 * 2048, iterations, row_block)
            predictions[f"{name}@{gpus}"] = p
            lines.append(f"| {name} | {gpus} | {p['forward']:.0f} | {p['solve']:.0f} | "
                         f"{p['transfer']:.0f} | {p['total']:.0f} | {p['total'] / 60:.1f} |")
    lines += ["", "llm-compressor, data-parallel GPTQ, Llama-3-8B (published): "
              + ", ".join(f"{g} GPU{'s' if g > 1 else ''}: {s:.0f} s" for g, s in
                          LLMCOMPRESSOR_8B.items())
              + ". Predicted ADMM-Q / their GPTQ: "
              + ", ".join(f"{g}: {predictions[f'Llama-3-8B@{g}']['total'] / s:.2f}x"
                          for g, s in LLMCOMPRESSOR_8B.items()) + ".", ""]
    report = "\n".join(lines) + "\n"
    print(report)
    summary = {"solve_speedup": one["seconds"]["solve"] / two["seconds"]["solve"],
               "end_to_end_speedup": one["wall_seconds"] / two["wall_seconds"],
               "identical": one["digest"] == two["digest"],
               "predicted_minutes": {k: round(v["total"] / 60, 1) for k, v in predictions.items()}}
    print(json.dumps(summary))
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / ("scaling_quick.md" if args.quick else "scaling.md")).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
