"""Scaling: 1 vs 2 Ray workers on this machine.

SmolLM2-135M quantized with ADMM-Q by one Ray worker and by two, each worker
limited to one thread (as each GPU worker has one device), the same calibration windows; the time
split (driver phases; per worker: forward, Hessian merge, solve; busy fraction) and the two
checkpoints' digests (they must be identical).

The whole-model cost model (Llama shapes, 1 to 64 workers, both schedules) is built from measured
rates by ``benchmarks/layer_shapes.py`` (``benchmarks/cost_model.py``).

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

    model = args.model or str(embedded_model_folder())
    runs = {}
    with tempfile.TemporaryDirectory(prefix="admmq-scaling-") as tmp:
        for workers in (1, 2):
            runs[workers] = quantize(model, Path(tmp) / f"w{workers}", workers, args)
            print(f"{workers} worker(s): {runs[workers]['wall_seconds']:.0f}s", file=sys.stderr,
                  flush=True)
    one, two = runs[1], runs[2]
    lines = ["# Scaling: one Ray worker vs two", "",
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

    report = "\n".join(lines) + "\n"
    print(report)
    summary = {"solve_speedup": one["seconds"]["solve"] / two["seconds"]["solve"],
               "end_to_end_speedup": one["wall_seconds"] / two["wall_seconds"],
               "identical": one["digest"] == two["digest"]}
    print(json.dumps(summary))
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / ("scaling_quick.md" if args.quick else "scaling.md")).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
