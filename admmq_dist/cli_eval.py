"""`admmq eval`: perplexity and KL divergence on held-out text, or lm-evaluation-harness tasks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import PartialState

from .evaluate import perplexity
from .harness import BACKENDS, parse_model_args, run_tasks
from .model.loading import resolve_model_dir


def add_eval(sub, embedded: str) -> None:
    e = sub.add_parser("eval", help="perplexity (and KL divergence to the float model) of a "
                       "model or written checkpoint, or lm-evaluation-harness tasks")
    e.add_argument("model", nargs="?", default=None,
                   help=f"hub id or local folder (default: the {embedded})")
    e.add_argument("--dataset", metavar="PATH|ID", help="text to evaluate on (default: the first half of the "
                   "WikiText-2 test file, shipped in the package)")
    e.add_argument("--split", default="test", metavar="NAME", help="the dataset's split (test)")
    e.add_argument("--text-field", default="text", metavar="NAME", help="the dataset's text column (text)")
    e.add_argument("--seq-len", type=int, default=512, metavar="TOKENS", help="tokens per window (512)")
    e.add_argument("--max-windows", type=int, default=None, metavar="N",
                   help="evaluate at most N windows (all)")
    e.add_argument("--device", default=None, metavar="DEVICE",
                   help="cuda, cuda:1, cpu (default: cuda if present)")
    e.add_argument("--device-map", default=None, metavar="MAP",
                   help="spread a model larger than one device over all of them: auto, "
                   "balanced, sequential (transformers' device_map; default: one device)")
    e.add_argument("--max-memory", action="append", default=None, metavar="DEVICE=SIZE",
                   help="with --device-map: the most each device holds, e.g. 0=70GiB cpu=200GiB; "
                   "what does not fit is offloaded to disk (repeatable)")
    e.add_argument("--reference", nargs="?", const="", default=None, metavar="MODEL",
                   help="the float model (hub id or folder; alone: the embedded model): also "
                   "report the mean token KL divergence KL(P_reference || P_model) and the "
                   "reference's perplexity on the same windows (both models are loaded)")
    t = e.add_argument_group("lm-evaluation-harness tasks (pip install 'admmq-dist[eval]')")
    t.add_argument("--tasks", default=None, metavar="TASK[,TASK]",
                   help="run these harness tasks instead of perplexity (e.g. arc_easy,hellaswag)")
    t.add_argument("--include-path", type=Path, default=None, metavar="DIR",
                   help="a folder of task YAML files of your own (local data, no hub)")
    t.add_argument("--backend", choices=BACKENDS, default="hf",
                   help="the harness's transformers (hf, default) or vLLM (vllm) backend")
    t.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="few-shot examples per question (the task's default)")
    t.add_argument("--limit", type=float, default=None, metavar="N",
                   help="only the first N documents of each task (a fraction when below 1)")
    t.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="requests per forward (8)")
    t.add_argument("--model-args", default=None, metavar="K=V[,K=V]",
                   help="more arguments for the harness's backend, as its --model_args "
                   "(e.g. gpu_memory_utilization=0.8 for vllm)")
    e.add_argument("--json", action="store_true", help="print the result as one JSON line")


def _max_memory(items: list[str] | None) -> dict | None:
    if not items:
        return None
    out = {}
    for item in items:
        device, sep, size = item.partition("=")
        if not sep or not device or not size:
            raise ValueError(f"--max-memory {item!r}: give DEVICE=SIZE, e.g. 0=70GiB or cpu=8GiB")
        out[int(device) if device.isdigit() else device] = size
    return out


def cmd_eval(args, model: str, reference: str | None, device) -> int:
    if args.max_memory and not args.device_map:
        raise ValueError("--max-memory needs --device-map (e.g. --device-map auto)")
    if args.tasks is not None:
        return _tasks(args, model, device)
    result = perplexity(model, dataset=args.dataset, split=args.split,
                        text_field=args.text_field, seq_len=args.seq_len,
                        max_windows=args.max_windows, device=device, reference=reference,
                        device_map=args.device_map, max_memory=_max_memory(args.max_memory))
    if not PartialState().is_main_process:  # under accelerate launch: one report
        return 0
    print(f"perplexity {result['ppl']:.4f} over {result['windows']} windows of "
          f"{result['seq_len']} tokens", file=sys.stderr)
    if "kl" in result:
        print(f"KL divergence from {result['reference']}: {result['kl']:.6f} nats per token "
              f"(its perplexity {result['reference_ppl']:.4f})", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0


def _tasks(args, model: str, device) -> int:
    if args.reference is not None:
        raise ValueError("--reference is for perplexity and KL divergence; evaluate the float "
                         "model's tasks with a second `admmq eval --tasks` run")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks: name at least one task (e.g. --tasks arc_easy)")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    model_args = parse_model_args(args.model_args)
    if args.max_memory:
        raise ValueError("with --tasks, give the harness's own limits instead of --max-memory: "
                         "--model-args max_memory_per_gpu=70GiB,max_cpu_memory=200GiB")
    result = run_tasks(resolve_model_dir(model), tasks, backend=args.backend,
                       include_path=args.include_path, num_fewshot=args.num_fewshot,
                       limit=limit, batch_size=args.batch_size, device=device,
                       device_map=args.device_map, model_args=model_args)
    if not result:  # a launched process other than the first
        return 0
    for task, metrics in result["tasks"].items():
        shown = ", ".join(f"{k} {v:.4f}" + (f" ± {metrics[k + '_stderr']:.4f}"
                                             if k + "_stderr" in metrics else "")
                          for k, v in metrics.items()
                          if not k.endswith("_stderr") and k != "sample_len")
        print(f"{task}: {shown} ({metrics.get('sample_len', '?')} documents, {args.backend})",
              file=sys.stderr)
    if args.json:
        print(json.dumps({**result, "model": model}))
    return 0
