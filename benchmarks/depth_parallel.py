"""Depth-parallel ADMM-Q rounds against the sequential schedule and GPTQ, and its cost model.

SmolLM2-135M at 3 bits (group 64, asymmetric), the same calibration windows for every run;
perplexity on held-out WikiText-2 windows of the model as each round left it (rounds 0..3, from
``--round-checkpoints``), for several segment counts, against sequential ADMM-Q and act-order GPTQ.
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
                           rounds: int) -> dict:
    """Wall time of round 0 plus ``rounds`` corrections, one segment per GPU, under scaling.py's
    GPU assumptions: the busiest GPU quantizes its segment sequentially every round (4 capture
    passes and 1 propagation pass per block over every calibration token, and the block's
    solves), after one pipelined float forward that fills the segments' inputs; between rounds
    each segment's output goes to the next GPU. Every round waits for a cold solve: in round r
    the segment whose input just became final gets the full schedule (the others warm
    corrections, which finish earlier), so a round costs what round 0 does."""
    from scaling import GPU

    layers, hidden, inter, kv = shape
    linears = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden),
               (inter, hidden), (hidden, inter)]
    params = sum(m * n for m, n in linears)
    per_gpu_blocks = -(-layers // gpus)  # the busiest worker's segment
    bw = GPU["intra_node_bytes_per_s"] if gpus <= GPU["gpus_per_node"] else GPU["inter_node_bytes_per_s"]

    def solve(iters):
        flops = sum(4 * iters * m * n * n for m, n in linears)
        eigh = sum(GPU["eigh_seconds_4096"] * (n / 4096) ** 3 for n in {hidden, inter}) + \
            2 * GPU["eigh_seconds_4096"] * (hidden / 4096) ** 3  # q/k/v, o, gate/up, down groups
        return per_gpu_blocks * (flops / GPU["solver_flops"] + eigh)

    block_pass = 2 * params * tokens / GPU["forward_flops"]
    micro = 16
    float_forward = layers * block_pass / gpus + (gpus - 1) * per_gpu_blocks * block_pass / micro
    hand_off = tokens * hidden * 2 / bw
    per_round_forward = per_gpu_blocks * 5 * block_pass
    forward = float_forward + (rounds + 1) * per_round_forward
    # The critical path of every round is the cold segment; warm_iterations is what the other
    # GPUs spend, within that time.
    assert warm_iterations <= iterations
    total_solve = (rounds + 1) * solve(iterations)
    transfer = (rounds + 1) * hand_off
    return {"forward": forward, "solve": total_solve, "transfer": transfer,
            "total": forward + total_solve + transfer}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--segments", type=int, nargs="+", default=[2, 6, 30],
                        help="segment counts to run (2 = one per worker; 30 = one per block)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cost-model-only", action="store_true",
                        help="print the cost model and stop (it needs no measurement)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--model", default=None, help="another model folder (default: SmolLM2)")
    parser.add_argument("--eval-dataset", default=None, help="evaluation text (default: WikiText-2)")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_samples, args.eval_windows = 32, 40

    from admmq_dist.model.embedded import embedded_model_folder
    from admmq_dist.quant.solvers.solve import SolverSettings

    if args.cost_model_only:
        lines, _ = cost_model(args.rounds)
        print("\n".join(lines))
        return 0
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
        runs += [("admmq", "depth-parallel", segs,
                  dist + ["--schedule", "depth-parallel", "--segments", str(segs), "--rounds",
                          str(args.rounds), "--round-checkpoints"])
                 for segs in args.segments]
        for method, schedule, segs, extra in runs:
            out = Path(tmp) / f"{method}-{schedule}-{segs}"
            q = cli("quantize", model, "-o", str(out), *common, *extra)
            # Run time without starting Ray and Python: the driver's total, or for a round of
            # the depth-parallel schedule, loading plus the rounds up to it.
            row = {"method": method, "schedule": schedule, "segments": segs,
                   "seconds": q["seconds"]["total"], "split": q["seconds"]}
            if schedule == "sequential":
                row["ppl"] = cli("eval", str(out), *evaluate)["ppl"]
                rows.append(row)
                print(f"{method} {schedule}: ppl {row['ppl']:.4f}, {q['wall_seconds']:.0f}s",
                      file=sys.stderr, flush=True)
                continue
            for h in q["rounds"]:
                elapsed = q["seconds"]["load"] + h["elapsed_seconds"]
                ppl = cli("eval", str(out.parent / f"{out.name}.round-{h['round']}"),
                          *evaluate)["ppl"]
                rows.append({**row, "round": h["round"], "ppl": ppl, "history": h,
                             "elapsed": elapsed})
                print(f"{method} {schedule} segments {segs} round {h['round']}: ppl {ppl:.4f}, "
                      f"{h['changed']:.2%} changed, {elapsed:.0f}s so far", file=sys.stderr,
                      flush=True)
    import environment

    seq = next(r for r in rows if r["method"] == "admmq" and r["schedule"] == "sequential")
    gptq = rows[0]
    lines = ["# Depth-parallel ADMM-Q: SmolLM2-135M, 3 bits", "",
             f"- calibration: {args.num_samples} x 512 tokens (shipped text); evaluation: "
             f"{base['windows']} held-out windows of 512, float perplexity {base['ppl']:.4f}",
             f"- grid: 3-bit asymmetric, group 64; ADMM-Q runs on {args.workers} Ray workers with "
             "one thread each; GPTQ (act-order) in-process",
             f"- depth-parallel: up to {args.rounds} correction rounds of "
             f"{SolverSettings().round_iterations} warm iterations; each row is the model as that "
             "round left it (`--round-checkpoints`); `segments` 2 is one per worker here, 30 is "
             "one per block (what a run on 30+ GPUs does)",
             f"- environment: {environment.describe()}", "",
             "| method | schedule | segments | round | segments solved | ppl | ppl / sequential "
             "ADMM-Q | gap / GPTQ gap | codes changed | solver iterations (all layers) "
             "| wall s (cumulative) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h = r.get("history")
        lines.append(
            f"| {r['method']} | {r['schedule']} | {r['segments'] or ''} "
            f"| {'' if h is None else h['round']} | {'' if h is None else h['segments_solved']} "
            f"| {r['ppl']:.4f} | {r['ppl'] / seq['ppl']:.4f} "
            f"| {(r['ppl'] - base['ppl']) / (gptq['ppl'] - base['ppl']):.3f} "
            f"| {'' if h is None else format(h['changed'], '.2%')} "
            f"| {'' if h is None else h['iterations']} "
            f"| {r.get('elapsed', r['seconds']):.0f} |")
    lines += ["", "Wall seconds: the driver's time without Python and Ray start-up; for a "
              "depth-parallel round, loading plus the float forward and the rounds up to that one "
              "(writing the per-round checkpoints excluded). "
              f"Whole benchmark {time.perf_counter() - started:.0f}s.", ""]

    model_lines, model_rows = cost_model(args.rounds)
    lines += model_lines
    report = "\n".join(lines) + "\n"
    print(report)
    final = {}
    for r in rows:
        if r["schedule"] == "depth-parallel":
            final.setdefault(r["segments"], {})[r["history"]["round"]] = r["ppl"]
    print(json.dumps({"sequential_ppl": seq["ppl"], "gptq_ppl": gptq["ppl"],
                      "depth_parallel_ppl": final, "modelled_speedup_70b": model_rows}))
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = "depth_parallel_quick.md" if args.quick else "depth_parallel.md"
        (RESULTS / name).write_text(report)
    return 0


def cost_model(rounds: int) -> tuple[list[str], dict[int, float]]:
    """The cost model's table lines and its speed-up by GPU count (no measurement needed)."""
    from admmq_dist.quant.solvers.solve import SolverSettings
    from scaling import SHAPES, predict

    settings = SolverSettings()
    lines = ["## Cost model (70B-shaped, 128 x 2048 calibration tokens, assumptions of "
              "`scaling.py`)", "",
              "| GPUs | data-parallel sequential s | depth-parallel, one segment per GPU, "
              f"{rounds} rounds s | speed-up |", "|---|---|---|---|"]
    model_rows = {}
    for gpus in (8, 64):
        dp = predict(SHAPES["Llama-3-70B"], gpus, 128 * 2048, settings.admm.iterations,
                     settings.row_block)
        deep = predict_depth_parallel(SHAPES["Llama-3-70B"], gpus, 128 * 2048,
                                      settings.admm.iterations, settings.round_iterations,
                                      rounds)
        model_rows[gpus] = dp["total"] / deep["total"]
        lines.append(f"| {gpus} | {dp['total']:.0f} | {deep['total']:.0f} | "
                     f"{dp['total'] / deep['total']:.1f}x |")
    return lines, model_rows


if __name__ == "__main__":
    sys.exit(main())
