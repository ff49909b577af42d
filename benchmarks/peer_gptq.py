"""Issue 27 item 3: llm-compressor's GPTQ beside `admmq quantize`, same model, grid and calibration
windows, in the same run: the wall time from process start to a written checkpoint, and the
quality of what each wrote.

Methods (each a fresh process, one after another):

* ``llmc-gptq``: llm-compressor's ``oneshot`` with a ``GPTQModifier`` (its defaults: act-order
  "static", dampening 0.01), run by the Python of a venv of its own (``--llmc-python``; it pins
  its own transformers), on the very token windows `admmq` calibrates with, saved compressed;
* ``llmc-rtn-mse`` (with ``--grid nvfp4|mxfp4`` by default): its ``QuantizationModifier`` (round
  to nearest) with its MSE observer, which its release notes find better than its GPTQ on NVFP4;
* ``admmq``: `admmq quantize` at its defaults; ``admmq-fast``, ``admmq-best``: ``--effort``;
* ``gptq``, ``gptaq``: `admmq quantize --method gptq` with asymmetric calibration off / at its
  default (GPTAQ); ``rtn``: `--method rtn`.

Every checkpoint is scored by the same code: perplexity on held-out windows of the evaluation
text, and (the slice) the last block's output error against the float model
(``benchmarks/schedules.py``'s). Ratios are to llm-compressor's in the same run; the gap is
``ppl / float ppl − 1``.

    python -m venv /work/venvs/llmc && /work/venvs/llmc/bin/pip install torch==2.13.0 llmcompressor
    python benchmarks/peer_gptq.py --llmc-python /work/venvs/llmc/bin/python --target slice
    python benchmarks/peer_gptq.py --llmc-python ... --target whole --grid nvfp4 --seeds 0 1 2 \
        --output peer_nvfp4_whole
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402
from schedules import cli, forward, held_out, output_error, slice_model, spread  # noqa: E402

from admmq_dist.model.calibration import calibration_batches  # noqa: E402
from admmq_dist.model.embedded import embedded_model_folder  # noqa: E402
from admmq_dist.recipe import Recipe, override  # noqa: E402

RUNNER = '''
import json, sys, time, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from compressed_tensors.quantization import (QuantizationArgs, QuantizationScheme,
                                             preset_name_to_scheme)

model_dir, windows_file, out, spec = sys.argv[1:5]
spec = json.loads(spec)
windows = torch.load(windows_file)
ds = Dataset.from_dict({"input_ids": windows.tolist(),
                        "attention_mask": torch.ones_like(windows).tolist()})
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
if spec["grid"] == "int":
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=spec["bits"], type="int", symmetric=spec["symmetric"], strategy="group",
        group_size=spec["group_size"]))
else:  # its own preset, NVFP4A16 / MXFP4A16
    scheme = preset_name_to_scheme(spec["grid"].upper() + "A16", ["Linear"])
if spec["observer"]:
    scheme.weights.observer = spec["observer"]
modifier = GPTQModifier if spec["modifier"] == "gptq" else QuantizationModifier
recipe = modifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=windows.shape[1],
        num_calibration_samples=windows.shape[0])
model.save_pretrained(out, save_compressed=True)
AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
'''
METHODS = ("llmc-gptq", "llmc-rtn-mse", "admmq", "admmq-fast", "admmq-best", "gptaq", "gptq",
           "rtn")
# The rows run unless --methods says otherwise: llm-compressor's MSE observer is the issue 28
# baseline (its release notes: better than its GPTQ on NVFP4), so FP4 runs add it.
DEFAULT_METHODS = [m for m in METHODS if m != "llmc-rtn-mse"]


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llmc-python", required=True, help="a Python with llmcompressor installed")
    p.add_argument("--target", choices=("slice", "whole"), default="slice")
    p.add_argument("--slice-blocks", type=int, default=8)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="several calibration seeds, one after another: each seed's rows are kept "
                        "in NAME.rows.json as it ends (a rerun skips the seeds there) and NAME.md "
                        "gives every figure as mean (min-max, n)")
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "peer_gptq")
    p.add_argument("--output", default=None, help="results name (default peer_gptq_TARGET)")
    p.add_argument("--grid", choices=("int", "nvfp4", "mxfp4"), default="int",
                   help="FP4: both tools write their NVFP4A16 / MXFP4A16 (bits and group size "
                        "are the format's)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help="llmc-gptq first: the ratios are to it")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="also run `admmq quantize` with these flags as method NAME (e.g. "
                        "fast-norefit='--effort fast --scale-refits 0'); repeatable")
    args = p.parse_args(argv)
    args.variants = {}
    for v in args.variant:
        name, sep, flags = v.partition("=")
        if not sep or not name or name in METHODS:
            p.error(f"--variant {v!r}: give NAME=FLAGS with a NAME of its own")
        args.variants[name] = shlex.split(flags)
    args.seeds = args.seeds or [args.seed]
    args.name = args.output or f"peer_gptq_{args.target}"
    if args.methods is None:
        args.methods = DEFAULT_METHODS + (["llmc-rtn-mse"] if args.grid != "int" else [])
    if args.grid != "int":
        args.bits, args.group_size = 4, {"nvfp4": 16, "mxfp4": 32}[args.grid]
    return args


def run_llmc(args, method: str, model: Path, out: Path, log: Path) -> float:
    """llm-compressor on admmq's own calibration windows; the process's wall time."""
    recipe = override(Recipe(), {"calibration": {
        "num_samples": args.num_samples, "seq_len": args.seq_len, "seed": args.seed}})
    windows = torch.cat(calibration_batches(model, recipe))
    args.scratch.mkdir(parents=True, exist_ok=True)
    torch.save(windows, args.scratch / "windows.pt")
    (args.scratch / "llmc_runner.py").write_text(RUNNER)
    spec = {"grid": args.grid, "bits": args.bits, "group_size": args.group_size,
            "symmetric": args.grid != "int",
            "modifier": "gptq" if method == "llmc-gptq" else "rtn",
            "observer": "mse" if method == "llmc-rtn-mse" else None}
    started = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run([args.llmc_python, str(args.scratch / "llmc_runner.py"),
                               str(model), str(args.scratch / "windows.pt"), str(out),
                               json.dumps(spec)],
                              stdout=err, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError("llm-compressor failed:\n" + log.read_text()[-4000:])
    return time.perf_counter() - started


def run_admmq(args, method: str, model: Path, out: Path, log: Path) -> float:
    flags = {**args.variants,
             "admmq": [], "admmq-fast": ["--effort", "fast"], "admmq-best": ["--effort", "best"],
             "gptaq": ["--method", "gptq"],
             "gptq": ["--method", "gptq", "--asymmetric", "0"], "rtn": ["--method", "rtn"]}
    grid = (["--bits", str(args.bits), "--group-size", str(args.group_size), "--asym"]
            if args.grid == "int" else ["--grid", args.grid])
    summary = cli("quantize", str(model), "-o", str(out), *grid, "--num-samples",
                  str(args.num_samples), "--seq-len", str(args.seq_len), "--seed",
                  str(args.seed), *flags[method], log=log)
    return summary["wall_seconds"]


def dense_copy(folder: Path) -> Path:
    """A dense float32 copy of an FP4 checkpoint, decoded by admmq's reader (bit for bit
    compressed-tensors' own decompressor: tests/test_fp4.py), beside it. transformers cannot run
    FP4 checkpoints in float32 (compressed-tensors decompresses FP4 weights to bfloat16, which
    then meet float32 activations), and evaluating every row in float32 keeps them comparable
    with the float model; the weights are exact in either dtype."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from admmq_dist.checkpoint.fp4_layout import KIND_OF_FORMAT, stored_weight

    config = json.loads((folder / "config.json").read_text())
    kind = KIND_OF_FORMAT[config.pop("quantization_config")["format"]]
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    dense = {}
    for name, value in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight_packed":
            dense[f"{module}.weight"] = stored_weight(kind, tensors, module)
        elif leaf not in ("weight_scale", "weight_global_scale"):
            dense[name] = value.float() if value.is_floating_point() else value
    out = folder.with_name(folder.name + "-dense")
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir()
    for item in folder.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in (
                "config.json", "model.safetensors.index.json"):
            (out / item.name).write_bytes(item.read_bytes())
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config))
    save_file(dense, out / "model.safetensors", metadata={"format": "pt"})
    return out


def solver_share(out: Path) -> dict:
    """From an admmq run's report: its layers' solve seconds (the rest of its wall time is
    start-up, calibration, forward passes and writing) and their median iterations."""
    report = out / "report.jsonl"
    if not report.exists():  # llm-compressor's
        return {"solver_seconds": None, "median_iterations": None}
    layers = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
    return {"solver_seconds": sum(layer["seconds"] for layer in layers),
            "median_iterations": statistics.median(layer["iterations"] for layer in layers)}


def main(argv=None) -> int:
    args = parse(argv)
    if args.methods[0] != "llmc-gptq":
        raise SystemExit("--methods: llmc-gptq must come first (every ratio is to it)")
    model = (slice_model(args.scratch, args.slice_blocks) if args.target == "slice"
             else embedded_model_folder())
    ids = held_out(model, args.eval_windows, args.eval_seq_len)
    # A slice's logits mean nothing (its last block is not the model's): output error only.
    ppl = args.target == "whole"
    reference = forward(model, ids, ppl)
    state = load_state(args)
    for seed in args.seeds:
        if str(seed) in state["seeds"]:
            print(f"seed {seed}: kept from {args.name}.rows.json", flush=True)
            continue
        args.seed = seed
        state["seeds"][str(seed)] = run_seed(args, model, ids, ppl, reference)
        state["float_ppl"] = reference["ppl"]
        save_state(args, state)
        write(args, state)
    return 0


def run_seed(args, model: Path, ids, ppl: bool, reference: dict) -> list[dict]:
    rows = []
    for method in [*args.methods, *args.variants]:
        out = args.scratch / f"out-{method}"
        # The output and the resume folder a cut-short run of an earlier invocation left.
        subprocess.run(["rm", "-rf", str(out), str(out.parent / f".{out.name}.admmq-work")],
                       check=True)
        log = args.scratch / f"{method}.log"
        seconds = (run_llmc(args, method, model, out, log) if method.startswith("llmc")
                   else run_admmq(args, method, model, out, log))
        got = forward(out if args.grid == "int" else dense_copy(out), ids, ppl)
        rows.append({"method": method, "wall_seconds": seconds, "ppl": got["ppl"],
                     "output_error": output_error(got["hidden"], reference["hidden"]),
                     **solver_share(out)})
        print(json.dumps({"seed": args.seed, **rows[-1]}), flush=True)
    return rows


def settings_of(args) -> dict:
    return {"commit": environment.commit(), "target": args.target, "grid": args.grid,
            **{k: getattr(args, k) for k in ("bits", "group_size", "num_samples", "seq_len",
                                             "eval_windows", "eval_seq_len", "slice_blocks",
                                             "methods", "variants")}}


def load_state(args) -> dict:
    """The seeds an earlier invocation of the same settings and commit finished."""
    path = environment.RESULTS / f"{args.name}.rows.json"
    state = {"settings": settings_of(args), "seeds": {}, "float_ppl": None}
    if path.exists():
        kept = json.loads(path.read_text())
        if kept["settings"] != state["settings"]:
            raise SystemExit(f"{path} holds another run's rows (other settings or commit): "
                             "use another --output, or remove it")
        state = kept
    return state


def save_state(args, state: dict) -> None:
    path = environment.RESULTS / f"{args.name}.rows.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(path)


def write(args, state: dict) -> None:
    commit = environment.commit()
    # llmcompressor logs to stdout on import: the versions are the last line.
    llmc_version = subprocess.run(
        [args.llmc_python, "-c", "import llmcompressor, transformers, compressed_tensors as c; "
         "print(llmcompressor.__version__, transformers.__version__, c.__version__)"],
        capture_output=True, text=True).stdout.strip().splitlines()[-1].split()
    seeds = sorted(state["seeds"], key=int)
    float_ppl = state["float_ppl"]
    runs = (f"One run (seed {seeds[0]})" if len(seeds) == 1 else
            f"Calibration seeds {', '.join(seeds)}, one run each; the first table gives each "
            "figure as mean (min–max, n) over the seeds, the ratios taken within each seed")
    lines = [
        "# llm-compressor's GPTQ beside `admmq quantize` (issue 27 item 3; FP4: issue 28)", "",
        f"`python benchmarks/peer_gptq.py --target {args.target}"
        + (f" --grid {args.grid}" if args.grid != "int" else "") + f"` at commit {commit}; "
        f"llm-compressor {llmc_version[0]} (its own venv: transformers {llmc_version[1]}, "
        f"compressed-tensors {llmc_version[2]}), "
        f"torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads. {runs}; wall times are "
        "each process from start to a written checkpoint on a shared 2-core machine (noisy).",
        f"Model: {'the first %d blocks of ' % args.slice_blocks if args.target == 'slice' else ''}"
        f"SmolLM2-135M; "
        + (f"{args.bits}-bit g{args.group_size} asymmetric grid" if args.grid == "int" else
           f"{args.grid} (both tools' {args.grid.upper()}A16 layout)") + " for every method; "
        f"calibration: the same {args.num_samples} x {args.seq_len} windows of the shipped text "
        f"(per seed); evaluation: {args.eval_windows} held-out windows of "
        f"{args.eval_seq_len} tokens"
        + ("" if float_ppl is None else f"; float perplexity {float_ppl:.3f}") + ". Output "
        "error: ||Y_q - Y_f||² / ||Y_f||² of the last block's output over the windows"
        + (" (a slice's logits mean nothing: no perplexity)." if float_ppl is None else "."),
        "`llmc-rtn-mse` is llm-compressor's round to nearest (`QuantizationModifier`) with its "
        "MSE observer. "
        "Each `admmq` row is `admmq quantize` with the recipe below and its row's flags "
        "(`admmq-fast`: `--effort fast`, `admmq-best`: `--effort best`, `gptaq`: `--method gptq`, "
        "`gptq`: `--method gptq --asymmetric 0`, `rtn`: `--method rtn`"
        + "".join(f", `{k}`: `{' '.join(v)}`" for k, v in args.variants.items()) + ").", "",
        environment.settings_record({
            "grid": ({"bits": args.bits, "group_size": args.group_size, "symmetric": False}
                     if args.grid == "int" else {"kind": args.grid}),
            "calibration": {"num_samples": args.num_samples, "seq_len": args.seq_len,
                            **({"seed": int(seeds[0])} if len(seeds) == 1 else {})}}), ""]
    per_seed = {seed: table_cells(state["seeds"][seed], float_ppl) for seed in seeds}
    header = ["| method | wall s | / llm-compressor | solver s | ADMM-Q iterations (median) | "
              "perplexity | gap | gap / llm-compressor's | output error | / llm-compressor |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    if len(seeds) > 1:
        lines += [f"Over seeds {', '.join(seeds)}:", "", *header]
        for i, method in enumerate(r["method"] for r in state["seeds"][seeds[0]]):
            columns = zip(*(per_seed[seed][i][1:] for seed in seeds))
            lines.append(f"| {method} | " + " | ".join(
                spread([v for _, v in col if v is not None], col[0][0]) for col in columns)
                + " |")
        lines.append("")
    for seed in seeds:
        if len(seeds) > 1:
            lines += [f"Seed {seed}:", ""]
        lines += [*header, *("| " + " | ".join([row[0], *(
            "" if v is None else format(v, fmt) for fmt, v in row[1:])]) + " |"
            for row in per_seed[seed]), ""]
    environment.write_results(args.name, lines[:-1])


def table_cells(rows: list[dict], float_ppl: float | None) -> list[list]:
    """Each row's cells as (format, value) pairs after the method's name, ratios to the first."""
    peer = rows[0]

    def gap(row: dict) -> float | None:
        return None if float_ppl is None else row["ppl"] / float_ppl - 1
    return [[r["method"], (".1f", r["wall_seconds"]),
             (".2f", r["wall_seconds"] / peer["wall_seconds"]),
             (".1f", r.get("solver_seconds")), ("g", r.get("median_iterations")),
             (".3f", r["ppl"]), (".4f", gap(r)),
             (".3f", None if gap(r) is None else gap(r) / gap(peer)),
             (".4f", r["output_error"]), (".3f", r["output_error"] / peer["output_error"])]
            for r in rows]


if __name__ == "__main__":
    sys.exit(main())
