"""End to end: SmolLM2-135M quantized by RTN, act-order GPTQ and ADMM-Q, perplexity on WikiText-2.

Every method gets the same calibration windows (the text shipped with admmq-dist: the second half
of the WikiText-2 test file) and the same grid (group 64, asymmetric, compressed-tensors);
perplexity is measured on windows of the first half, held apart from the calibration text. Each
quantization runs as its own `admmq quantize` process so wall time and peak memory are its own.
Figures are ratios against act-order GPTQ and the float model measured in the same run.

    python benchmarks/e2e_perplexity.py            # 3 and 4 bits, 128 windows of 512 tokens
    python benchmarks/e2e_perplexity.py --quick    # 32 calibration windows, 40 eval windows
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import environment  # noqa: E402  (benchmarks/environment.py)


def admmq(*args: str) -> dict:
    """Run the CLI in a fresh process; returns its JSON summary line."""
    cmd = [sys.executable, "-m", "admmq_dist.cli", *args, "--json"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = time.perf_counter() - t
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--methods", nargs="+",
                        default=["rtn", "gptq", "admmq", "gptq+asym", "admmq+asym"],
                        help="METHOD, METHOD+asym (asymmetric calibration at --asymmetric; "
                        "gptq+asym is GPTAQ) or METHOD+asym=S (at strength S)")
    parser.add_argument("--asymmetric", type=float, default=0.25,
                        help="strength of the +asym variants")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=80)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--output", default=None,
                        help="results file name under benchmarks/results/ (default: "
                        "e2e_perplexity[_quick].md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_samples, args.eval_windows = 32, 40

    from admmq_dist.model.embedded import embedded_model_folder

    model = str(embedded_model_folder())
    evaluate = ["--seq-len", str(args.seq_len), "--max-windows", str(args.eval_windows)]
    started = time.perf_counter()
    base = admmq("eval", model, *evaluate)
    print(f"float perplexity {base['ppl']:.4f}", file=sys.stderr, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="admmq-e2e-") as tmp:
        for bits in args.bits:
            for method in args.methods:
                out = Path(tmp) / f"w{bits}-{method}"
                base_method, _, variant = method.partition("+")
                variant, _, strength = variant.partition("=")
                if variant not in ("", "asym"):
                    parser.error(f"unknown method variant '+{variant}' in '{method}'")
                extra = (["--asymmetric", strength or str(args.asymmetric)] if variant == "asym"
                         else [])
                q = admmq("quantize", model, "-o", str(out), "--bits", str(bits),
                          "--group-size", "64", "--asym", "--method", base_method, *extra,
                          "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len))
                e = admmq("eval", str(out), *evaluate)
                rows.append({"bits": bits, "method": method, "ppl": e["ppl"],
                             "gap": e["ppl"] - base["ppl"], "seconds": q["seconds"],
                             "wall_seconds": q["wall_seconds"],
                             "peak_memory_gib": q["peak_memory_bytes"] / 2**30,
                             "mean_layer_loss": q["mean_loss"]})
                print(f"{bits}-bit {method}: ppl {e['ppl']:.4f} (float {base['ppl']:.4f}), "
                      f"{q['wall_seconds']:.0f}s", file=sys.stderr, flush=True)
    lines = ["# End-to-end perplexity: SmolLM2-135M on WikiText-2", "",
             f"- calibration: {args.num_samples} windows of {args.seq_len} tokens from the text "
             "shipped with admmq-dist (second half of the WikiText-2 test file), the same for "
             "every method",
             f"- evaluation: {base['windows']} windows of {args.seq_len} tokens from the first half "
             f"({base['tokens']} predicted tokens); float perplexity {base['ppl']:.4f}",
             "- grid: group 64, asymmetric, compressed-tensors pack-quantized; lm_head unquantized",
             f"- `+asym`: asymmetric calibration (`--asymmetric {args.asymmetric}`, or the "
             "strength after `=`): each layer "
             "also matches the float model's outputs on the float model's activations; "
             "`gptq+asym` is GPTAQ",
             "- the model's weights passed through 4-bit GGUF (Q4_1) at the source, so 3 bits is "
             "the telling setting",
             f"- environment: {environment.describe()}", "",
             "| bits | method | ppl | gap to float | gap / gptq gap | mean layer loss | time s "
             "| time / gptq | forward s | solve s | write s | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = {"float_ppl": base["ppl"]}
    for bits in args.bits:
        by = {r["method"]: r for r in rows if r["bits"] == bits}
        g = by.get("gptq")
        for method, r in by.items():
            gap_ratio = r["gap"] / g["gap"] if g and g["gap"] > 0 else float("nan")
            time_ratio = r["wall_seconds"] / g["wall_seconds"] if g else float("nan")
            s = r["seconds"]
            lines.append(f"| {bits} | {method} | {r['ppl']:.4f} | {r['gap']:.4f} | {gap_ratio:.3f} "
                         f"| {r['mean_layer_loss']:.5f} | {r['wall_seconds']:.1f} | {time_ratio:.2f} "
                         f"| {s['forward']:.1f} | {s['solve']:.1f} | {s['write']:.1f} "
                         f"| {r['peak_memory_gib']:.2f} |")
            summary[f"w{bits}_{method}_ppl"] = r["ppl"]
            if method not in ("gptq", "rtn") and g:
                summary[f"w{bits}_{method}_gap_over_gptq_gap"] = gap_ratio
                summary[f"w{bits}_{method}_time_over_gptq"] = time_ratio
    lines.append("")
    lines.append(f"Whole run {time.perf_counter() - started:.0f}s. Time columns: forward = block "
                 "forward passes (Hessian capture and propagation), solve = grid fit + solver + "
                 "local search, write = packing and safetensors.")
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = args.output or ("e2e_perplexity_quick.md" if args.quick else "e2e_perplexity.md")
        (RESULTS / name).write_text(report)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
