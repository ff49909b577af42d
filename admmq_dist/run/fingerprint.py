"""What a resumed run must share with the interrupted one, by content: the model's tensors, the
calibration windows, the recipe, the code, and what changes float reductions (torch, the device
type, threads per worker). A mismatch names what changed.

The model is fingerprinted tensor by tensor (each tensor's bytes hashed from its safetensors
byte range, with its name, dtype and shape from the header), so a fine-tuned model of the same
shape is told apart and the message names the tensors that differ. Hashing a 70B checkpoint
reads ~140 GB, so the hashes of each file are cached under the user's cache folder, keyed by the
file's resolved path, size and modification time: a file rewritten in place gets a new entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import struct
from pathlib import Path

import torch
import yaml

from .. import __version__
from ..files import write_text
from ..recipe import Recipe, to_mapping

CHUNK = 64 << 20


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "admmq-dist"


def tensor_hashes(path: Path) -> dict[str, str]:
    """``{tensor name: hash of its dtype, shape and bytes}`` for one safetensors file (the
    format: an 8-byte header length, a JSON header, then the tensors' bytes at their offsets)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        base = 8 + length
        out = {}
        header.pop("__metadata__", None)
        # In file order, so the file is read once, front to back.
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            h = hashlib.sha256(json.dumps([info["dtype"], info["shape"]]).encode())
            start, stop = info["data_offsets"]
            f.seek(base + start)
            left = stop - start
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise ValueError(f"{path} is truncated: {name} ends past the file")
                h.update(chunk)
                left -= len(chunk)
            out[name] = h.hexdigest()[:16]
    return out


def model_hashes(model_dir: Path, cache: Path | None = None) -> dict[str, str]:
    """Every tensor of the model's safetensors files, hashed (cached per file)."""
    cache = cache or cache_dir() / "tensor-hashes.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    out, changed = {}, False
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        real = path.resolve()
        stat = real.stat()
        key = f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in known:
            known[key] = tensor_hashes(real)
            changed = True
        out.update(known[key])
    if changed:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_text(cache, json.dumps(known))
        except OSError:  # a read-only home costs only the next run's hashing
            pass
    return out


def code_version() -> str:
    """The package version and a hash of its source: an edited checkout is not the same code."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


def device_environment(device: str) -> dict:
    """What of a worker's device changes its float results: the GPU's name and compute
    capability and the CUDA and cuDNN builds (the CPU's model on a CPU)."""
    kind = torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():  # a GPU slot Ray gave without CUDA (tests)
            return {"device": "cuda", "gpu": None}
        index = torch.device(device).index or 0
        return {"device": "cuda", "gpu": torch.cuda.get_device_name(index),
                "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(index))),
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return {"device": kind, "cpu": _cpu_model()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_environment(device: str, backend) -> dict:
    """What changes float reductions besides torch: the workers' device (as they report it: a
    Ray backend's workers may sit on other machines than the driver) and the threads each worker
    uses."""
    env = getattr(backend, "environment", None)
    return {**(env if env is not None else device_environment(device)),
            "threads_per_worker": getattr(backend, "threads", None) or torch.get_num_threads()}


def fingerprints(model_dir: Path, recipe: Recipe, batches: list[torch.Tensor],
                 environment: dict, workers: int = 1) -> dict:
    """What a resumed run must share with the interrupted one; ``environment``: the workers'
    device and threads (:func:`run_environment`); ``workers``: how many (only the depth-parallel
    schedule's default segments depend on it)."""
    config = (model_dir / "config.json").read_bytes() if (model_dir / "config.json").is_file() \
        else b""
    mapping = to_mapping(recipe)
    mapping["output"] = {k: v for k, v in mapping["output"].items() if k != "max_shard_gb"}
    return {
        # Depth-parallel segments default to one per worker: a resume with other --workers
        # would cut the blocks differently, so it is named, not found unreadable.
        "segments": (recipe.solver.segments or workers)
        if recipe.solver.schedule == "depth-parallel" else None,
        "config": _sha(config),
        "model": model_hashes(model_dir),
        "recipe": _sha(yaml.safe_dump(mapping, sort_keys=True).encode()),
        "calibration": _sha(torch.cat([b.flatten() for b in batches]).numpy().tobytes()),
        "version": code_version(),
        "environment": {"torch": torch.__version__, **environment},
    }


def describe_changes(old: dict, new: dict) -> list[str]:
    """One phrase per fingerprint that differs."""
    out = []
    for key, value in new.items():
        before = old.get(key)
        if before == value:
            continue
        if key == "model" and isinstance(before, dict):
            differ = sorted(n for n in set(before) | set(value) if before.get(n) != value.get(n))
            out.append(f"the model's tensors ({len(differ)} differ: "
                       + ", ".join(differ[:3]) + (", ..." if len(differ) > 3 else "") + ")")
        elif key == "environment" and isinstance(before, dict):
            out.append("the environment (" + ", ".join(
                f"{k} {before.get(k)} -> {v}" for k, v in value.items() if before.get(k) != v)
                + ")")
        elif key == "version":
            out.append(f"the code ({before} -> {value})")
        elif key == "segments":
            out.append(f"the depth-parallel segments ({before} -> {value}: they follow --workers "
                       f"unless --segments is given; resume with --workers {before} or "
                       f"--segments {before})")
        else:
            out.append(f"the {key}")
    return out
