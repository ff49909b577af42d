"""Depth-parallel ADMM-Q rounds against the sequential schedule and GPTQ, and its cost model.

SmolLM2-135M at 3 bits (group 64, asymmetric), the same calibration windows for every run;
perplexity on held-out WikiText-2 windows after 0, 1, 2 and 3 correction rounds (each its own run:
a run with R rounds is round 0 plus R corrections), against sequential ADMM-Q and act-order GPTQ.
Two Ray workers, one thread each, for both ADMM-Q schedules. The cost model of
``benchmarks/scaling.py`` is extended to the depth-parallel schedule for a 70B-shaped model.

    python benchmarks/depth_parallel.py            # 64 calibration windows, 80 eval windows
    python benchmarks/depth_parallel.py --quick    # 32 and 40
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT / "benchmarks"))


def cli(*args: str) -> dict:
    cmd = [sys.executable, "-m", "admmq_dist.cli", *args, "--json"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = time.perf_counter() - t
    return out


def predict_depth_parallel(shape, gpus: int, tokens: int, iterations: int, warm_iterations: int,
                           rounds: int, row_block: int) -> dict:
    """Wall time of round 0 plus ``rounds`` corrections under scaling.py's GPU assumptions."""
    from scaling import GPU

    layers, hidden, inter, kv = shape
    linears = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden),
               (inter, hidden), (hidden, inter)]
    params = sum(m * n for m, n in linears)
    per_gpu_blocks = -(-layers // gpus)  # the busiest worker's share
    bw = GPU["intra_node_bytes_per_s"] if gpus <= GPU["gpus_per_node"] else GPU["inter_node_bytes_per_s"]

    def solve(iters):
        flops = sum(4 * iters * m * n * n for m, n in linears)
        eigh = sum(GPU["eigh_seconds_4096"] * (n / 4096) ** 3 for n in {hidden, inter}) + \
            2 * GPU["eigh_seconds_4096"] * (hidden / 4096) ** 3  # q/k/v, o, gate/up, down groups
        return per_gpu_blocks * (flops / GPU["solver_flops"] + eigh)

    # One pipelined forward per round: the whole model's work split over the GPUs, plus filling
    # the pipeline (one micro-batch through every other stage), plus the activations handed on.
    micro = 16
    forward_round = 2 * params * layers * tokens / gpus / GPU["forward_flops"]
    fill = (gpus - 1) * 2 * params * per_gpu_blocks * (tokens / micro) / GPU["forward_flops"]
    hand_off = tokens * hidden * 2 / bw
    forward = (rounds + 1) * (forward_round + fill + hand_off)
    total_solve = solve(iterations) + rounds * solve(warm_iterations)
    return {"forward": forward, "solve": total_solve, "transfer": (rounds + 1) * hand_off,
            "total": forward + total_solve}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=80)
    parser.add_argument("--rounds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--model", default=None, help="another model folder (default: SmolLM2)")
    parser.add_argument("--eval-dataset", default=None, help="evaluation text (default: WikiText-2)")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_samples, args.eval_windows = 32, 40

    from admmq_dist.model.embedded import embedded_model_folder
    from admmq_dist.quant.solvers.solve import SolverSettings

    model = args.model or str(embedded_model_folder())
    common = ["--bits", "3", "--group-size", "64", "--asym", "--num-samples",
              str(args.num_samples), "--seq-len", "512"]
    dist = ["--workers", str(args.workers), "--threads", "1"]
    evaluate = ["--seq-len", "512", "--max-windows", str(args.eval_windows)]
    if args.eval_dataset:
        evaluate += ["--dataset", args.eval_dataset]
    started = time.perf_counter()
    base = cli("eval", model, *evaluate)
    rows = []
    with tempfile.TemporaryDirectory(prefix="admmq-dp-") as tmp:
        runs = [("gptq", "sequential", None, ["--method", "gptq"]),
                ("admmq", "sequential", None, dist)]
        runs += [("admmq", "depth-parallel", r, dist + ["--schedule", "depth-parallel",
                                                        "--rounds", str(r)])
                 for r in args.rounds]
        for method, schedule, rounds, extra in runs:
            out = Path(tmp) / f"{method}-{schedule}-{rounds}"
            q = cli("quantize", model, "-o", str(out), *common, *extra)
            e = cli("eval", str(out), *evaluate)
            rows.append({"method": method, "schedule": schedule, "rounds": rounds, "ppl": e["ppl"],
                         "seconds": q["wall_seconds"], "split": q["seconds"],
                         "history": q.get("rounds")})
            print(f"{method} {schedule} {rounds}: ppl {e['ppl']:.4f}, {q['wall_seconds']:.0f}s",
                  file=sys.stderr, flush=True)
    seq = next(r for r in rows if r["method"] == "admmq" and r["schedule"] == "sequential")
    gptq = rows[0]
    lines = ["# Depth-parallel ADMM-Q: SmolLM2-135M, 3 bits", "",
             f"- calibration: {args.num_samples} x 512 tokens (shipped text); evaluation: "
             f"{base['windows']} held-out windows of 512, float perplexity {base['ppl']:.4f}",
             f"- grid: 3-bit asymmetric, group 64; ADMM-Q runs on {args.workers} Ray workers with "
             "one thread each; GPTQ (act-order) in-process", "",
             "| method | schedule | correction rounds | ppl | ppl / sequential ADMM-Q | gap / GPTQ gap "
             "| codes changed in last round | iterations (all layers, per round) | wall s "
             "| time / sequential |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hist = r["history"] or []
        changed = f"{hist[-1]['changed']:.2%}" if hist else ""
        iters = " / ".join(str(h["iterations"]) for h in hist)
        lines.append(
            f"| {r['method']} | {r['schedule']} | {'' if r['rounds'] is None else r['rounds']} "
            f"| {r['ppl']:.4f} | {r['ppl'] / seq['ppl']:.4f} "
            f"| {(r['ppl'] - base['ppl']) / (gptq['ppl'] - base['ppl']):.3f} | {changed} | {iters} "
            f"| {r['seconds']:.0f} | {r['seconds'] / seq['seconds']:.2f} |")
    lines += ["", f"Whole run {time.perf_counter() - started:.0f}s.", ""]

    from scaling import SHAPES, predict

    settings = SolverSettings()
    lines += ["## Cost model (70B-shaped, 128 x 2048 calibration tokens, assumptions of "
              "`scaling.py`)", "",
              "| GPUs | data-parallel sequential s | depth-parallel, 3 rounds s | speed-up |",
              "|---|---|---|---|"]
    model_rows = {}
    for gpus in (8, 64):
        dp = predict(SHAPES["Llama-3-70B"], gpus, 128 * 2048, settings.admm.iterations,
                     settings.row_block)
        deep = predict_depth_parallel(SHAPES["Llama-3-70B"], gpus, 128 * 2048,
                                      settings.admm.iterations, settings.round_iterations, 3,
                                      settings.row_block)
        model_rows[gpus] = dp["total"] / deep["total"]
        lines.append(f"| {gpus} | {dp['total']:.0f} | {deep['total']:.0f} | "
                     f"{dp['total'] / deep['total']:.1f}x |")
    report = "\n".join(lines) + "\n"
    print(report)
    best = min((r for r in rows if r["schedule"] == "depth-parallel"), key=lambda r: r["ppl"],
               default=None)
    print(json.dumps({"sequential_ppl": seq["ppl"], "gptq_ppl": gptq["ppl"],
                      "depth_parallel_ppl": {r["rounds"]: r["ppl"] for r in rows
                                             if r["schedule"] == "depth-parallel"},
                      "best_over_sequential": best["ppl"] / seq["ppl"] if best else None,
                      "modelled_speedup_70b": model_rows}))
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = "depth_parallel_quick.md" if args.quick else "depth_parallel.md"
        (RESULTS / name).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
