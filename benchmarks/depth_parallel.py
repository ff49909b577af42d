"""Depth-parallel ADMM-Q rounds against the sequential schedule and GPTQ.

SmolLM2-135M at 3 bits (group 64, asymmetric), the same calibration windows for every run;
perplexity on held-out WikiText-2 windows of the model as each round left it (rounds 0..3, from
``--round-checkpoints``), for several segment counts, against sequential ADMM-Q and act-order GPTQ.
Two Ray workers, one thread each, for both ADMM-Q schedules. What either schedule costs at Llama
shapes on 1 to 64 workers: ``benchmarks/layer_shapes.py`` (a model built from measured rates).

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


def coordinated(spec: str) -> list[str]:
    """The quantize flags of a coordinated variant ``RULE[:START][+best]``."""
    spec, best = spec.removesuffix("+best"), spec.endswith("+best")
    rule, _, start = spec.partition(":")
    return ["--schedule", "coordinated", "--refresh-dual", rule, "--coordinated-start",
            start or "float", "--round-checkpoints"] + (["--keep-best"] if best else [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--segments", type=int, nargs="*", default=[2, 6, 30],
                        help="segment counts to run (2 = one per worker; 30 = one per block)")
    parser.add_argument("--coordinated", nargs="*", default=["keep"], metavar="RULE[:START]",
                        help="coordinated-schedule runs, one per dual rule (keep, zero, "
                             "stationary), each with an optional start (:float, :sequential) "
                             "and +best (--keep-best)")
    parser.add_argument("--asymmetric", type=float, default=None, metavar="S",
                        help="also run sequential ADMM-Q and the first coordinated variant with "
                             "asymmetric calibration of strength S")
    parser.add_argument("--output", default=None, help="results file name under "
                        "benchmarks/results (default depth_parallel[_quick].md)")
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
        runs += [("admmq", "depth-parallel", segs,
                  dist + ["--schedule", "depth-parallel", "--segments", str(segs), "--rounds",
                          str(args.rounds), "--round-checkpoints"])
                 for segs in args.segments]
        runs += [("admmq", "coordinated", None, dist + coordinated(spec))
                 for spec in args.coordinated]
        if args.asymmetric is not None:
            asym = ["--asymmetric", str(args.asymmetric)]
            runs.insert(2, ("admmq", "sequential", None, dist + asym))
            if args.coordinated:
                runs.append(("admmq", "coordinated", None,
                             dist + asym + coordinated(args.coordinated[0])))
        for method, schedule, segs, extra in runs:
            asym = float(extra[extra.index("--asymmetric") + 1]) if "--asymmetric" in extra \
                else 0.0
            out = Path(tmp) / f"{method}-{schedule}-{segs}-{len(rows)}"
            q = cli("quantize", model, "-o", str(out), *common, *extra)
            # Run time without starting Ray and Python: the driver's total, or for a round of
            # the depth-parallel schedule, loading plus the rounds up to it.
            row = {"method": method, "schedule": schedule, "segments": segs, "asym": asym,
                   "seconds": q["seconds"]["total"], "split": q["seconds"]}
            if schedule == "coordinated":
                row["dual"] = extra[extra.index("--refresh-dual") + 1]
                start = extra[extra.index("--coordinated-start") + 1]
                if start != "float":
                    row["dual"] += f", {start} start"
                if "--keep-best" in extra:
                    row["dual"] += ", best kept"
            if schedule == "sequential":
                row["ppl"] = cli("eval", str(out), *evaluate)["ppl"]
                rows.append(row)
                print(f"{method} {schedule} asym {asym}: ppl {row['ppl']:.4f}, {q['wall_seconds']:.0f}s",
                      file=sys.stderr, flush=True)
                continue
            for h in q["rounds"]:
                if h["round"] == "polish":  # the written checkpoint itself
                    ppl = cli("eval", str(out), *evaluate)["ppl"]
                    rows.append({**row, "ppl": ppl, "history": {**h, "segments_solved": ""},
                                 "elapsed": q["seconds"]["total"]})
                    print(f"{method} {schedule} polished: ppl {ppl:.4f}", file=sys.stderr,
                          flush=True)
                    continue
                elapsed = q["seconds"]["load"] + h["elapsed_seconds"]
                ppl = cli("eval", str(out.parent / f"{out.name}.round-{h['round']}"),
                          *evaluate)["ppl"]
                rows.append({**row, "round": h["round"], "ppl": ppl, "history": h,
                             "elapsed": elapsed})
                print(f"{method} {schedule} segments {segs} round {h['round']}: ppl {ppl:.4f}, "
                      f"rho {h.get('rho', '')}, "
                      f"{h['changed']:.2%} changed, {elapsed:.0f}s so far", file=sys.stderr,
                      flush=True)
    import environment

    def sequential_of(r):  # the sequential ADMM-Q run with the same calibration
        return next(x for x in rows if x["method"] == "admmq" and x["schedule"] == "sequential"
                    and x["asym"] == r["asym"])

    seq = sequential_of({"asym": 0.0})
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
             f"- coordinated: up to {SolverSettings().coordinated_rounds} rounds of "
             f"{SolverSettings().coordinated_iterations} iterations per layer, every layer at "
             "once on Hessians refreshed from the current model each round, one ρ continued "
             "across rounds (column ρ: the round's); `dual`: the rule on a refresh; the last "
             "coordinated row is the written checkpoint after the polish (a local-search sweep "
             "on final inputs); `sequential start`: round 0 starts from the codes of one "
             "sequential GPTQ pass (block by block on the quantized model's inputs) instead of "
             "GPTQ on the float model's Hessians",
             f"- environment: {environment.describe()}", "",
             "- `asym`: asymmetric calibration strength; `ppl / sequential ADMM-Q` compares "
             "with the sequential run of the same strength",
             "| method | asym | schedule | segments / dual | round | ρ | segments solved | ppl "
             "| ppl / sequential ADMM-Q | gap / GPTQ gap | codes changed "
             "| solver iterations (all layers) | wall s (cumulative) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h = r.get("history")
        lines.append(
            f"| {r['method']} | {r['asym'] or ''} | {r['schedule']} "
            f"| {r['segments'] or r.get('dual', '')} "
            f"| {'' if h is None else h['round']} "
            f"| {'' if h is None or 'rho' not in h else format(h['rho'], '.3g')} "
            f"| {'' if h is None else h['segments_solved']} "
            f"| {r['ppl']:.4f} | {r['ppl'] / sequential_of(r)['ppl']:.4f} "
            f"| {(r['ppl'] - base['ppl']) / (gptq['ppl'] - base['ppl']):.3f} "
            f"| {'' if h is None else format(h['changed'], '.2%')} "
            f"| {'' if h is None else h.get('iterations', '')} "
            f"| {r.get('elapsed', r['seconds']):.0f} |")
    lines += ["", "Wall seconds: the driver's time without Python and Ray start-up; for a "
              "depth-parallel round, loading plus the float forward and the rounds up to that one "
              "(writing the per-round checkpoints excluded). "
              f"Whole benchmark {time.perf_counter() - started:.0f}s.", ""]

    report = "\n".join(lines) + "\n"
    print(report)
    final = {}
    for r in rows:
        if r["schedule"] != "sequential":
            key = r["segments"] or f"coordinated-{r['dual']}" + (
                f"-asym{r['asym']}" if r["asym"] else "")
            final.setdefault(key, {})[r["history"]["round"]] = r["ppl"]
    print(json.dumps({"sequential_ppl": seq["ppl"], "gptq_ppl": gptq["ppl"],
                      "depth_parallel_ppl": final}))
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = args.output or ("depth_parallel_quick.md" if args.quick else "depth_parallel.md")
        (RESULTS / name).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
