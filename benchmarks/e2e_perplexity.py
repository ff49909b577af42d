"""End to end: SmolLM2-135M quantized by RTN, act-order GPTQ and ADMM-Q, perplexity on WikiText-2.

Every method gets the same calibration windows (the text shipped with admmq-dist: the second half
of the WikiText-2 test file) and the same grid (group 64, asymmetric, compressed-tensors);
perplexity is measured on the whole first half (every 512-token window), held apart from the
calibration text. Each quantization runs as its own `admmq quantize` process so wall time and
peak memory are its own. Every figure is a mean with its min–max over calibration seeds (3 by
default), and ratios are taken seed by seed against act-order GPTQ and GPTAQ calibrated on the
same windows, in the same run. Baselines: RTN, act-order GPTQ, GPTQ with ADMM-Q's local-search
sweep, GPTAQ (GPTQ + asymmetric calibration); then ADMM-Q and ADMM-Q + asymmetric calibration.

    python benchmarks/e2e_perplexity.py                    # 3 and 4 bits, 128 windows, 3 seeds
    python benchmarks/e2e_perplexity.py --bits 3 --seeds 0 # one setting, one seed (says so)
    python benchmarks/e2e_perplexity.py --quick            # 32 calibration, 40 eval windows, 1 seed
    python benchmarks/e2e_perplexity.py --bits 3 --seeds 2 --resume --output NAME.md
                                          # add a seed to NAME.md's runs (same settings)

Every finished run is also kept in ``NAME.rows.json`` beside the table, so a run cut short, or a
seed added later, carries on from it with ``--resume`` (the settings must match: calibration
windows, window length, evaluation windows, +asym strength, threads).
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
from admmq_dist.quant.solvers.solve import DEFAULT_ADMMQ_REFITS  # noqa: E402


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


METHODS = {  # name: quantize flags; the plain methods pin the strength so a default can't move them
    "rtn": ["--method", "rtn"],
    "gptq": ["--method", "gptq", "--asymmetric", "0"],
    # ADMM-Q's polish (a local-search sweep, then its scale refits), for GPTQ
    "gptq+ls": ["--method", "gptq", "--local-search-sweeps", "1",
                "--scale-refits", str(DEFAULT_ADMMQ_REFITS), "--asymmetric", "0"],
    "gptq+asym": ["--method", "gptq"],  # GPTAQ: strength from --asymmetric
    "admmq": ["--method", "admmq", "--asymmetric", "0"],
    "admmq+asym": ["--method", "admmq"],
    # the grid fitted to the float weight W, not the moved target (calibration.asymmetric_grid)
    "admmq+asym-wgrid": ["--method", "admmq", "--asymmetric-grid", "weight"],
}


def spread(values: list[float], fmt: str = ".4f") -> str:
    """Mean and min–max of ``values`` (one value: itself, marked as one run)."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:{fmt}} (1 run)"
    return f"{mean:{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        help="of " + ", ".join(METHODS) + "; METHOD+asym=S sets the strength")
    parser.add_argument("--asymmetric", type=float, default=0.25,
                        help="strength of the +asym variants")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="calibration seeds (each draws other windows from the same text)")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=None,
                        help="held-out windows to evaluate (default: the whole first half)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of each run")
    parser.add_argument("--quick", action="store_true",
                        help="32 calibration windows, 40 eval windows, one seed")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the runs kept in the output's .rows.json (same settings)")
    parser.add_argument("--note", action="append", default=[],
                        help="a line for the results file's header (kept with the runs)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--output", default=None,
                        help="results file name under benchmarks/results/ (default: "
                        "e2e_perplexity[_quick].md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_samples, args.eval_windows, args.seeds = 32, 40, args.seeds[:1]

    from admmq_dist.model.embedded import embedded_model_folder

    model = str(embedded_model_folder())
    evaluate = ["--seq-len", str(args.seq_len)]
    if args.eval_windows is not None:
        evaluate += ["--max-windows", str(args.eval_windows)]
    threads = ["--threads", str(args.threads)] if args.threads else []
    started = time.perf_counter()
    base = admmq("eval", model, *evaluate)
    print(f"float perplexity {base['ppl']:.4f} on {base['windows']} windows", file=sys.stderr,
          flush=True)
    name = args.output or ("e2e_perplexity_quick.md" if args.quick else "e2e_perplexity.md")
    settings = {"num_samples": args.num_samples, "seq_len": args.seq_len,
                "eval_windows": base["windows"], "float_ppl": round(base["ppl"], 4),
                "asymmetric": args.asymmetric, "threads": args.threads}
    rows, notes = resumed(name, settings, parser) if args.resume else ([], [])
    args.notes = notes + args.note
    with tempfile.TemporaryDirectory(prefix="admmq-e2e-") as tmp:
        for bits in args.bits:
            for seed in args.seeds:
                for method in args.methods:
                    if any((r["bits"], r["seed"], r["method"]) == (bits, seed, method)
                           for r in rows):
                        continue  # kept from an earlier run (--resume)
                    rtn = [r for r in rows if (r["bits"], r["method"]) == (bits, "rtn")]
                    if method == "rtn" and rtn:
                        # RTN codes do not depend on the calibration: one run stands for every seed.
                        rows.append({**rtn[0], "seed": seed})
                        continue
                    rows.append(run_one(model, Path(tmp), bits, seed, method, args, threads,
                                        evaluate, base, parser))
                    if not args.no_write:  # what has run so far, should a long run be cut short
                        write(name, tables(rows, base, args, started, partial=True)[0])
                        keep(name, settings, rows, args.notes)
    report, summary = tables(rows, base, args, started)
    print(report)
    if not args.no_write:
        write(name, report)
        keep(name, settings, rows, args.notes)
    if args.json:
        print(json.dumps(summary))
    return 0


def write(name: str, report: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / f".{name}.tmp"
    tmp.write_text(report)
    tmp.replace(RESULTS / name)


def rows_file(name: str) -> Path:
    return RESULTS / (Path(name).stem + ".rows.json")


def keep(name: str, settings: dict, rows: list[dict], notes: list[str]) -> None:
    """Every finished run beside the table, for --resume and for a later look at single runs."""
    tmp = RESULTS / f".{rows_file(name).name}.tmp"
    tmp.write_text(json.dumps({"settings": settings, "notes": notes, "rows": rows}, indent=1)
                   + "\n")
    tmp.replace(rows_file(name))


def resumed(name: str, settings: dict, parser) -> tuple[list[dict], list[str]]:
    """The runs and notes kept for ``name``; refuses them if they were measured under other
    settings."""
    path = rows_file(name)
    if not path.exists():
        return [], []
    kept = json.loads(path.read_text())
    differ = {k: (kept["settings"].get(k), v) for k, v in settings.items()
              if kept["settings"].get(k) != v}
    if differ:
        parser.error(f"--resume: {path} was measured under other settings "
                     + ", ".join(f"{k} {old} (now {new})" for k, (old, new) in differ.items())
                     + "; pass the same flags, or another --output")
    return kept["rows"], kept.get("notes", [])


def run_one(model, tmp: Path, bits: int, seed: int, method: str, args, threads, evaluate,
            base, parser) -> dict:
    out = tmp / f"w{bits}-{seed}-{method}"
    name, _, strength = method.partition("=")
    if name not in METHODS:
        parser.error(f"unknown method '{method}' (one of {', '.join(METHODS)})")
    extra = (["--asymmetric", strength or str(args.asymmetric)] if "+asym" in name else [])
    q = admmq("quantize", model, "-o", str(out), "--bits", str(bits), "--group-size", "64",
              "--asym", *METHODS[name], *extra, "--num-samples", str(args.num_samples),
              "--seq-len", str(args.seq_len), "--seed", str(seed), *threads)
    e = admmq("eval", str(out), *evaluate, "--reference", model)  # and KL to the float model
    print(f"{bits}-bit {method} seed {seed}: ppl {e['ppl']:.4f} (float {base['ppl']:.4f}), "
          f"{q['wall_seconds']:.0f}s", file=sys.stderr, flush=True)
    return {"bits": bits, "seed": seed, "method": method, "ppl": e["ppl"], "kl": e["kl"],
            "gap": e["ppl"] - base["ppl"], "seconds": q["seconds"],
            "wall_seconds": q["wall_seconds"], "peak_memory_gib": q["peak_memory_bytes"] / 2**30,
            "mean_layer_loss": q["mean_loss"]}


def few(recorded: list, runs: list) -> str:
    """How many of ``runs`` a column's ``recorded`` values cover, where not all."""
    return f", {len(recorded)} of {len(runs)} seeds" if 0 < len(recorded) < len(runs) else ""


def tables(rows: list[dict], base: dict, args, started: float,
           partial: bool = False) -> tuple[str, dict]:
    """The results table: per bits and method, mean and min–max over the seeds of perplexity,
    gap to float, the gap over GPTQ's and over GPTAQ's of the same seed, and time."""
    lines = ["# End-to-end perplexity: SmolLM2-135M on WikiText-2", "",
             *(["**Partial: the run is still going (or was cut short); rows so far.**", ""]
               if partial else []),
             f"- calibration: {args.num_samples} windows of {args.seq_len} tokens from the text "
             "shipped with admmq-dist (second half of the WikiText-2 test file), the same windows "
             f"for every method of a seed; seeds {sorted({r['seed'] for r in rows})} "
             "(mean and min–max over them)",
             f"- evaluation: {base['windows']} windows of {args.seq_len} tokens from the first "
             f"half ({base['tokens']} predicted tokens); float perplexity {base['ppl']:.4f}",
             "- grid: group 64, asymmetric, compressed-tensors pack-quantized; lm_head unquantized",
             "- `gptq+ls`: act-order GPTQ with the polish ADMM-Q gets (a local-search sweep, "
             f"then {DEFAULT_ADMMQ_REFITS} scale refit(s) each with a sweep); `+asym`: "
             f"asymmetric calibration (`--asymmetric {args.asymmetric}`, or the strength after "
             "`=`); `gptq+asym` is GPTAQ; `-wgrid`: the grid fitted to the float weight "
             "instead of the moved target (`--asymmetric-grid weight`)",
             "- the model's weights passed through 4-bit GGUF (Q4_1) at the source, so 3 bits is "
             "the telling setting",
             "- RTN codes do not depend on calibration data: its one run stands for every seed",
             "- mean layer loss: of the objective each run calibrated for (with `+asym` the true "
             "asymmetric one, float weights on float inputs against quantized on quantized)",
             f"- each run in-process, {args.threads or 'all'} threads; environment: "
             f"{environment.describe()}",
             *(f"- {note}" for note in getattr(args, "notes", [])), "",
             "- KL: mean token KL(P_float ‖ P_quantized) in nats on the same windows "
             "(`admmq eval --reference`), the measure quantization papers now prefer; rows "
             "measured before it was recorded have none",
             "| bits | method | ppl | gap to float | gap / gptq gap | gap / gptaq gap | KL "
             "| mean layer loss | time s | time / gptq |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    summary = {"float_ppl": base["ppl"]}
    for bits in sorted({r["bits"] for r in rows}):
        by = {}
        for r in rows:
            if r["bits"] == bits:
                by.setdefault(r["method"], {})[r["seed"]] = r
        for method, runs in by.items():
            def ratios(ref: str, key: str) -> list[float]:
                return [r[key] / by[ref][s][key] for s, r in runs.items()
                        if ref in by and s in by[ref] and by[ref][s][key] > 0]
            gap_gptq, gap_gptaq = ratios("gptq", "gap"), ratios("gptq+asym", "gap")
            time_gptq = ratios("gptq", "wall_seconds")
            values = list(runs.values())
            losses = [r["mean_layer_loss"] for r in values if r.get("mean_layer_loss") is not None]
            kls = [r["kl"] for r in values if r.get("kl") is not None]
            lines.append(
                f"| {bits} | {method} | {spread([r['ppl'] for r in values])} "
                f"| {spread([r['gap'] for r in values])} "
                f"| {spread(gap_gptq, '.3f') if gap_gptq else ''} "
                f"| {spread(gap_gptaq, '.3f') if gap_gptaq else ''} "
                f"| {spread(kls, '.4f') + few(kls, values) if kls else ''} "
                f"| {spread(losses, '.5f') if losses else ''}"
                f"{few(losses, values)} "
                f"| {spread([r['wall_seconds'] for r in values], '.0f')} "
                f"| {spread(time_gptq, '.2f') if time_gptq else ''} |")
            summary[f"w{bits}_{method}_ppl"] = [r["ppl"] for r in values]
            if gap_gptq:
                summary[f"w{bits}_{method}_gap_over_gptq_gap"] = gap_gptq
    lines += ["", f"{'So far' if partial else 'This invocation took'} "
              f"{time.perf_counter() - started:.0f}s (runs kept from earlier ones not counted). "
              "Ratios are taken seed by seed (each method against GPTQ / GPTAQ calibrated on the "
              "same windows), then summarised.", ""]
    return "\n".join(lines) + "\n", summary


if __name__ == "__main__":
    sys.exit(main())
