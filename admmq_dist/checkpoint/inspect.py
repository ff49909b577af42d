"""Reading quantized checkpoints back: what a folder holds, and whether it is internally consistent.

``inspect_checkpoint`` summarises a compressed-tensors ``pack-quantized`` or GPTQ folder from its
``config.json`` and the safetensors headers (no tensor data is read except each quantized module's
tiny ``weight_shape``); ``format_inspection`` renders that summary for people.

``verify_checkpoint`` checks what a loader would trip over, one module at a time so memory stays
bounded: the index against the shards, every tensor's shape and dtype against the model that
``config.json`` describes (built on the meta device), the packed words (codes, zero points, zero
padding bits) and the scales (finite, positive). It returns one line per problem.

This module reads only: it imports nothing of Ray, the coordinator or the workers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from admmq_dist.checkpoint.serving import Layout, served_by
from admmq_dist.quant.packing import (
    SUPPORTED_BITS,
    _dense_words,
    _gptq_words,
    pack_compressed_tensors_weight,
    pack_compressed_tensors_zero_point,
    pack_gptq_qweight,
    pack_gptq_qzeros,
    unpack_compressed_tensors_weight,
    unpack_compressed_tensors_zero_point,
    unpack_gptq_qweight,
    unpack_gptq_qzeros,
)

__all__ = ["format_inspection", "inspect_checkpoint", "verify_checkpoint"]

CONFIG_NAME = "config.json"
GPTQ_CONFIG_NAME = "quantize_config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
RECIPE_NAME = "recipe.yaml"

# Tensors a quantized module stores instead of its dense ``weight`` (its ``bias`` stays dense).
CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
_MARKER = {"compressed-tensors": "weight_packed", "gptq": "qweight"}
_SUFFIXES = {"compressed-tensors": CT_SUFFIXES, "gptq": GPTQ_SUFFIXES}

# safetensors header dtype -> bytes per element.
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"}
# config.json dtype name -> safetensors header dtype.
_CONFIG_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}
_EMBEDDING_PARTS = ("embed", "wte", "wpe")


# ----------------------------------------------------------------------------- config


def _load_config(folder: Path) -> dict:
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is a file; pass the checkpoint's folder")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {CONFIG_NAME}; pass the folder of a Hugging Face checkpoint")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return config


def _quantization_config(folder: Path, config: dict) -> dict:
    qc = config.get("quantization_config")
    if not qc and (folder / GPTQ_CONFIG_NAME).is_file():  # older AutoGPTQ folders
        try:
            qc = json.loads((folder / GPTQ_CONFIG_NAME).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            qc = None
        if isinstance(qc, dict):
            qc.setdefault("quant_method", "gptq")
    if not qc or not isinstance(qc, dict):
        raise ValueError(
            f"{folder} is not a quantized checkpoint: its {CONFIG_NAME} has no "
            "quantization_config (quantize it first, or pass the quantized output folder)")
    return qc


def _settings(folder: Path, config: dict) -> dict:
    """Format, bits, group size, symmetry, dtype and ignore list from ``config.json``."""
    qc = _quantization_config(folder, config)
    method = str(qc.get("quant_method", "")).lower().replace("_", "-")
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype is None and isinstance(config.get("text_config"), dict):
        dtype = config["text_config"].get("dtype") or config["text_config"].get("torch_dtype")
    if isinstance(dtype, str):
        dtype = dtype.removeprefix("torch.")
    if method == "compressed-tensors":
        weights = None
        for group in (qc.get("config_groups") or {}).values():
            if isinstance(group, dict) and isinstance(group.get("weights"), dict):
                weights = group["weights"]
                break
        if weights is None:
            raise ValueError(f"{folder}: the compressed-tensors quantization_config has no "
                             "config_groups with weight settings")
        strategy = weights.get("strategy")
        group_size = weights.get("group_size")
        if strategy == "channel" or group_size in (None, -1, 0):
            group_size = None
        return {
            "format": "compressed-tensors",
            "checkpoint_format": qc.get("format"),
            "bits": weights.get("num_bits"),
            "group_size": group_size,
            "symmetric": bool(weights.get("symmetric", True)),
            "dtype": dtype,
            "ignore": list(qc.get("ignore") or []),
            "gptq_v2": False,
        }
    if method == "gptq":
        group_size = qc.get("group_size")
        fmt = qc.get("checkpoint_format") or "gptq"
        return {
            "format": "gptq",
            "checkpoint_format": fmt,
            "bits": qc.get("bits"),
            "group_size": None if group_size in (None, -1, 0) else group_size,
            "symmetric": bool(qc.get("sym", True)),
            "dtype": dtype,
            "ignore": list(qc.get("ignore") or qc.get("modules_to_not_convert") or []),
            "gptq_v2": fmt == "gptq_v2",
        }
    raise ValueError(
        f"{folder}: quant_method {qc.get('quant_method')!r} is not one this tool reads "
        "(compressed-tensors pack-quantized, or gptq)")


# ----------------------------------------------------------------------------- files


def _dtype_bytes(dtype: str) -> float:
    if dtype == "F4":
        return 0.5
    return _DTYPE_BYTES.get(dtype, 1)


def _nbytes(shape, dtype: str) -> int:
    return int(math.prod(shape) * _dtype_bytes(dtype))


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{tensor: (shape, dtype)}`` of one safetensors file, from its header only."""
    out = {}
    with safe_open(str(path), "pt") as f:
        for name in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
            piece = f.get_slice(name)
            out[name] = (tuple(int(s) for s in piece.get_shape()), str(piece.get_dtype()))
    return out


def _shard_files(folder: Path) -> tuple[dict[str, str] | None, list[str]]:
    """The index's weight map (None without an index) and the shard files it names, in order."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return weight_map, list(dict.fromkeys(weight_map.values()))
    if (folder / SINGLE_NAME).is_file():
        return None, [SINGLE_NAME]
    raise FileNotFoundError(f"{folder} has no {INDEX_NAME} or {SINGLE_NAME}")


def _module_of(name: str, suffixes) -> str | None:
    module, _, leaf = name.rpartition(".")
    return module if module and leaf in suffixes else None


def _is_embedding(module: str) -> bool:
    return any(part in module.lower() for part in _EMBEDDING_PARTS)


# ----------------------------------------------------------------------------- inspect


def inspect_checkpoint(folder) -> dict:
    """Summarise the quantized checkpoint in ``folder`` (reads the config and tensor headers).

    Keys: ``path``, ``format`` ("compressed-tensors" or "gptq"), ``checkpoint_format``
    ("pack-quantized", "gptq", ...), ``bits``, ``group_size`` (None per channel), ``symmetric``,
    ``dtype``, ``model_type``, ``architectures``, ``quantized_modules`` (sorted),
    ``skipped_modules`` (2-D linear weights left dense, sorted), ``ignore`` (from the config),
    ``num_tensors``, ``num_shards``, ``missing_shards``, ``size_on_disk_bytes`` (all files),
    ``tensor_bytes``, ``unquantized_bytes_estimate`` (quantized modules at 16 bits, the rest as
    stored), ``compression_ratio`` (estimate / tensor bytes), ``recipe`` (``recipe.yaml``
    parsed, or None) and ``served_by`` (engine -> "yes" or why not: :mod:`.serving`).

    Raises FileNotFoundError for a missing folder or ``config.json`` and ValueError for a folder
    that is not a quantized checkpoint.
    """
    folder = Path(folder)
    config = _load_config(folder)
    settings = _settings(folder, config)
    weight_map, shards = _shard_files(folder)
    meta: dict[str, tuple[tuple[int, ...], str]] = {}
    missing = []
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            missing.append(shard)
            continue
        meta.update(_read_header(path))

    fmt = settings["format"]
    marker, suffixes = _MARKER[fmt], _SUFFIXES[fmt]
    quantized = sorted({m for n in meta if (m := _module_of(n, (marker,)))})
    qset = set(quantized)
    tensor_bytes = sum(_nbytes(shape, dtype) for shape, dtype in meta.values())
    estimate = 0
    for name, (shape, dtype) in meta.items():
        module = _module_of(name, suffixes)
        if module is None or module not in qset:
            estimate += _nbytes(shape, dtype)
    files = {n: folder / (weight_map[n] if weight_map else SINGLE_NAME) for n in meta}
    for module in quantized:
        out, inn = _dense_shape(module, fmt, settings["bits"], meta, files)
        estimate += out * inn * 2

    skipped = sorted(
        name[: -len(".weight")] for name, (shape, _) in meta.items()
        if name.endswith(".weight") and len(shape) == 2
        and name[: -len(".weight")] not in qset
        and not _is_embedding(name[: -len(".weight")]) and "norm" not in name.lower())

    served = None
    if settings["bits"] in SUPPORTED_BITS and isinstance(settings["symmetric"], bool):
        served = served_by(Layout(fmt, settings["bits"], settings["symmetric"],
                                  settings["group_size"],
                                  experts=any(".experts." in m for m in quantized)))

    size_on_disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    recipe = None
    if (folder / RECIPE_NAME).is_file():
        import yaml

        recipe = yaml.safe_load((folder / RECIPE_NAME).read_text(encoding="utf-8"))

    return {
        "path": str(folder),
        "format": fmt,
        "checkpoint_format": settings["checkpoint_format"],
        "bits": settings["bits"],
        "group_size": settings["group_size"],
        "symmetric": settings["symmetric"],
        "dtype": settings["dtype"],
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "quantized_modules": quantized,
        "skipped_modules": skipped,
        "ignore": settings["ignore"],
        "num_tensors": len(meta),
        "num_shards": len(shards),
        "missing_shards": missing,
        "size_on_disk_bytes": size_on_disk,
        "tensor_bytes": tensor_bytes,
        "unquantized_bytes_estimate": estimate,
        "compression_ratio": estimate / tensor_bytes if tensor_bytes else None,
        "recipe": recipe,
        "served_by": served,
    }


def _dense_shape(module: str, fmt: str, bits, meta, files) -> tuple[int, int]:
    """The ``(out, in)`` of a quantized module, from its stored tensors."""
    if fmt == "compressed-tensors":
        name = f"{module}.weight_shape"
        if name in meta and meta[name][0] == (2,):
            try:
                with safe_open(str(files[name]), "pt") as f:
                    out, inn = (int(v) for v in f.get_tensor(name).tolist())
                return out, inn
            except Exception:  # unreadable: fall back to the packed shape below
                pass
        shape = meta.get(f"{module}.weight_packed", ((0, 0), ""))[0]
        if len(shape) == 2 and isinstance(bits, int) and bits > 0:
            return shape[0], shape[1] * 32 // bits
        return 0, 0
    qweight = meta.get(f"{module}.qweight", ((0, 0), ""))[0]
    g_idx = meta.get(f"{module}.g_idx", ((), ""))[0]
    out = qweight[1] if len(qweight) == 2 else 0
    if len(g_idx) == 1:
        return out, g_idx[0]
    if len(qweight) == 2 and isinstance(bits, int) and bits > 0:
        return out, qweight[0] * 32 // bits
    return out, 0


def _size(num_bytes: int) -> str:
    if num_bytes >= 1e9:
        return f"{num_bytes / 1e9:.2f} GB"
    return f"{num_bytes / 1e6:.2f} MB"


def _names(names: list[str], limit: int = 6) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", ... ({len(names) - limit} more)"


def format_inspection(info: dict) -> str:
    """A short human-readable summary of :func:`inspect_checkpoint`'s result."""
    group = "per-channel" if info.get("group_size") is None else f"group size {info['group_size']}"
    sym = "symmetric" if info.get("symmetric") else "asymmetric"
    fmt = info.get("format")
    if info.get("checkpoint_format") and info["checkpoint_format"] != fmt:
        fmt = f"{fmt} ({info['checkpoint_format']})"
    lines = [
        f"Checkpoint:  {info.get('path')}",
        f"Format:      {fmt}, {info.get('bits')}-bit, {group}, {sym}, dtype {info.get('dtype')}",
    ]
    quantized, skipped = info.get("quantized_modules", []), info.get("skipped_modules", [])
    modules = f"Modules:     {len(quantized)} quantized, {len(skipped)} skipped"
    if skipped:
        modules += f" ({_names(skipped)})"
    lines.append(modules)
    if info.get("ignore"):
        lines.append(f"Ignore list: {_names(info['ignore'])}")
    ratio = info.get("compression_ratio")
    shards = info.get("num_shards", 0)
    size = (f"Size:        {_size(info.get('size_on_disk_bytes', 0))} on disk in {shards} "
            f"shard{'s' if shards != 1 else ''}; tensors {_size(info.get('tensor_bytes', 0))}, "
            f"about {_size(info.get('unquantized_bytes_estimate', 0))} at 16-bit")
    if ratio:
        size += f" ({ratio:.1f}x compression)"
    lines.append(size)
    if info.get("missing_shards"):
        lines.append(f"Missing:     {_names(info['missing_shards'])}")
    for engine, verdict in (info.get("served_by") or {}).items():
        lines.append(f"Serves in:   {engine}: {verdict}")
    recipe = info.get("recipe")
    if isinstance(recipe, dict):
        lines.append(f"Recipe:      {_recipe_summary(recipe)}")
    return "\n".join(lines)


def _recipe_summary(recipe: dict) -> str:
    parts = []
    solver = recipe.get("solver") if isinstance(recipe.get("solver"), dict) else {}
    grid = recipe.get("grid") if isinstance(recipe.get("grid"), dict) else {}
    calib = recipe.get("calibration") if isinstance(recipe.get("calibration"), dict) else {}
    if solver.get("method"):
        method = str(solver["method"])
        if solver.get("schedule") and solver["schedule"] != "sequential":
            method += f" ({solver['schedule']})"
        parts.append(f"method {method}")
    if grid.get("range_search"):
        parts.append(f"range search {grid['range_search']}")
    if calib:
        source = calib.get("dataset") or "built-in text"
        parts.append(f"calibration {calib.get('num_samples')} x {calib.get('seq_len')} tokens "
                     f"from {source}")
    return ", ".join(parts) if parts else "(no key settings)"


# ----------------------------------------------------------------------------- verify


class _Enough(Exception):
    """Raised once ``max_problems`` problems are collected."""


class _Problems:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lines: list[str] = []
        self.truncated = False

    def add(self, line: str) -> None:
        if len(self.lines) >= self.limit:
            self.truncated = True
            raise _Enough
        self.lines.append(line)

    def result(self) -> list[str]:
        if self.truncated:
            return [*self.lines, (f"... more problems were not listed (stopped after "
                                  f"{self.limit}; pass a larger max_problems to see them)")]
        return list(self.lines)


class _Files:
    """Where each tensor lives, its header metadata, and lazy reads (one open handle per shard)."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        self.folder = folder
        self.stack = stack
        self.meta: dict[str, tuple[tuple[int, ...], str]] = {}  # loadable tensors only
        self.where: dict[str, str] = {}                          # tensor -> shard file name
        self.reported: set[str] = set()  # tensors already named by an index/file problem
        self.all_names: set[str] = set()  # every name the index or the shards mention
        self._handles: dict[str, Any] = {}

    def read(self, name: str) -> torch.Tensor:
        shard = self.where[name]
        if shard not in self._handles:
            self._handles[shard] = self.stack.enter_context(
                safe_open(str(self.folder / shard), "pt"))
        return self._handles[shard].get_tensor(name)


def verify_checkpoint(folder, max_problems: int = 20) -> list[str]:
    """Check the quantized checkpoint in ``folder``; return its problems, one line each.

    An empty list means the checkpoint is consistent: the index and the shards agree; every
    tensor has the shape and dtype the model in ``config.json`` and the quantization settings
    call for; the packed codes and zero points unpack and repack to the stored words (so padding
    bits are zero); symmetric GPTQ zero points are ``2**(bits-1)``; scales are finite and
    positive. After ``max_problems`` problems a last line says that more were not listed.

    Raises FileNotFoundError for a missing folder or ``config.json`` and ValueError for a folder
    that is not a quantized checkpoint.
    """
    if isinstance(max_problems, bool) or not isinstance(max_problems, int) or max_problems < 1:
        raise ValueError(f"max_problems={max_problems!r} must be a positive integer")
    folder = Path(folder)
    config = _load_config(folder)
    settings = _settings(folder, config)
    problems = _Problems(max_problems)
    with ExitStack() as stack:
        try:
            files = _check_files(folder, problems, stack)
            if files is not None:
                _check_tensors(folder, config, settings, files, problems)
                _check_ignore_covers_dense(settings, files, problems)
        except _Enough:
            pass
    return problems.result()


def _check_ignore_covers_dense(settings: dict, files: _Files, problems: _Problems) -> None:
    """compressed-tensors: every module stored with a dense 2-D weight must be named in the
    ignore list, or engines (vLLM) build it quantized and fail on its dense weight."""
    if settings["format"] != "compressed-tensors":
        return
    ignore = settings["ignore"]

    def ignored(module: str) -> bool:
        return any(re.match(e[3:], module) if e.startswith("re:") else e == module
                   for e in ignore)

    for name in sorted(files.all_names):
        module = name[: -len(".weight")]
        if (name.endswith(".weight") and name in files.meta and len(files.meta[name][0]) == 2
                and f"{module}.weight_packed" not in files.all_names
                and not _is_embedding(module) and not ignored(module)):
            problems.add(f"{module}: stored dense but not named in the ignore list; vLLM builds "
                         "it quantized and fails to load its weight")


def _check_files(folder: Path, problems: _Problems, stack: ExitStack) -> _Files | None:
    """Index against shards. Returns the loadable tensors, or None when there are no weights."""
    files = _Files(folder, stack)
    index_path = folder / INDEX_NAME
    on_disk = sorted(p.name for p in folder.glob("*.safetensors") if p.is_file())
    headers: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}

    def header(shard: str):
        if shard not in headers:
            try:
                headers[shard] = _read_header(folder / shard)
            except Exception as exc:  # a truncated or garbled file
                problems.add(f"{shard}: cannot read the safetensors file ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})")
                headers[shard] = None
        return headers[shard]

    if not index_path.is_file():
        if SINGLE_NAME not in on_disk:
            problems.add(f"{folder}: no {INDEX_NAME} and no {SINGLE_NAME}; the checkpoint has no "
                         "weights a loader can find")
            return None
        for other in on_disk:
            if other != SINGLE_NAME:
                problems.add(f"{other}: not read by loaders ({SINGLE_NAME} exists and there is "
                             f"no {INDEX_NAME} naming other shards)")
        found = header(SINGLE_NAME)
        if found is not None:
            files.meta.update(found)
            files.where.update({n: SINGLE_NAME for n in found})
            files.all_names.update(found)
        return files

    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ValueError("weight_map is not a mapping of tensor names to file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            ValueError) as exc:
        problems.add(f"{INDEX_NAME}: unreadable ({type(exc).__name__}: {exc}); "
                     "no tensor can be located")
        return None
    files.all_names.update(weight_map)
    named = list(dict.fromkeys(weight_map.values()))
    for shard in named:
        if not (folder / shard).is_file():
            lost = sorted(n for n, s in weight_map.items() if s == shard)
            files.reported.update(lost)
            problems.add(f"{shard}: shard file named in {INDEX_NAME} is missing "
                         f"({len(lost)} tensors, e.g. {lost[0]})")
    for stray in on_disk:
        if stray not in named:
            found = header(stray) or {}
            files.all_names.update(found)
            problems.add(f"{stray}: safetensors file not named in {INDEX_NAME}; loaders ignore "
                         f"its {len(found)} tensors" + (f" (e.g. {min(found)})" if found else ""))

    holders: dict[str, list[str]] = {}
    for shard in named:
        if not (folder / shard).is_file():
            continue
        found = header(shard)
        if found is None:
            files.reported.update(n for n, s in weight_map.items() if s == shard)
            continue
        for name in found:
            holders.setdefault(name, []).append(shard)
        files.all_names.update(found)
    for name in sorted(holders):
        shards = holders[name]
        if len(shards) > 1:
            files.reported.add(name)
            problems.add(f"{name}: stored in more than one shard ({', '.join(sorted(shards))})")
        elif name not in weight_map:
            files.reported.add(name)
            problems.add(f"{name}: stored in {shards[0]} but missing from the weight_map of "
                         f"{INDEX_NAME}")
        elif weight_map[name] != shards[0]:
            files.reported.add(name)
            problems.add(f"{name}: stored in {shards[0]} but {INDEX_NAME} maps it to "
                         f"{weight_map[name]}")
    for name, shard in sorted(weight_map.items()):
        found = headers.get(shard)
        if found is None or name in files.reported:
            continue
        if name not in found:
            files.reported.add(name)
            problems.add(f"{name}: {INDEX_NAME} maps it to {shard}, which does not contain it")
            continue
        files.meta[name] = found[name]
        files.where[name] = shard
    return files


# ----------------------------------------------------------------------------- skeleton


def _skeleton(folder: Path):
    """The model ``config.json`` describes, on the meta device, with fused experts split."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    for holder in (config, getattr(config, "text_config", None)):
        if holder is not None and hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return config, model


def _renamer(model_type: str | None) -> Callable[[str], str]:
    try:
        from admmq_dist.model.loading import _checkpoint_renamings

        rename = _checkpoint_renamings(model_type)
    except Exception:  # older transformers, or a model type it does not know
        rename = None
    return rename or (lambda name: name)


def _unfuse(model, module_path_names: list[str]) -> list[str]:
    """Split fused expert modules into per-expert linears; return the fused paths left over."""
    from admmq_dist.model.moe import _is_fused_experts, unfuse_experts

    left = []
    for path, module in list(model.named_modules()):
        if not _is_fused_experts(module):
            continue
        owner = path.rpartition(".")[0]
        try:
            unfuse_experts(model.get_submodule(owner) if owner else model, owner,
                           module_path_names)
        except Exception:
            left.append(path)
    return left


def _check_tensors(folder: Path, config: dict, settings: dict, files: _Files,
                   problems: _Problems) -> None:
    fmt, bits = settings["format"], settings["bits"]
    if fmt == "compressed-tensors" and settings["checkpoint_format"] not in (None, "pack-quantized"):
        problems.add(f"{CONFIG_NAME}: compressed-tensors format {settings['checkpoint_format']!r} "
                     "is not checked (only pack-quantized)")
        return
    if bits not in SUPPORTED_BITS:
        problems.add(f"{CONFIG_NAME}: quantization bits={bits!r} is not one of {SUPPORTED_BITS}")
        return
    group = settings["group_size"]
    if group is not None and (not isinstance(group, int) or group < 1):
        problems.add(f"{CONFIG_NAME}: quantization group_size={group!r} is not a positive integer")
        return
    dtype = _CONFIG_DTYPES.get(settings["dtype"]) if settings["dtype"] else None

    marker, suffixes = _MARKER[fmt], _SUFFIXES[fmt]
    quantized = sorted({m for n in files.all_names if (m := _module_of(n, (marker,)))})
    qset = set(quantized)
    rename = _renamer(config.get("model_type"))

    def module_path(disk_module: str) -> str:
        return rename(f"{disk_module}.weight")[: -len(".weight")]

    module_names = [f"{module_path(m)}.weight" for m in quantized]
    module_names += [rename(n) for n in files.all_names if _module_of(n, suffixes) not in qset]
    disk_of = {rename(n): n for n in files.all_names}

    try:
        hf_config, model = _skeleton(folder)
    except Exception as exc:
        problems.add(f"{CONFIG_NAME}: cannot build the model it describes ({type(exc).__name__}: "
                     f"{str(exc).splitlines()[0] if str(exc) else ''}); shapes are checked only "
                     "against the quantized tensors themselves")
        hf_config = model = None
    fused_left: list[str] = []
    if model is not None:
        fused_left = _unfuse(model, module_names)

    for module in quantized:
        shape = None
        path = module_path(module)
        if model is not None:
            try:
                linear = model.get_submodule(path)
                weight = getattr(linear, "weight", None)
            except AttributeError:
                weight = None
            if weight is not None and weight.dim() == 2:
                shape = (int(weight.shape[0]), int(weight.shape[1]))
            elif not any(path.startswith(f + ".") for f in fused_left):
                problems.add(f"{module}: quantized, but the model built from {CONFIG_NAME} has no "
                             "linear layer of that name")
        if f"{module}.weight" in files.meta:
            problems.add(f"{module}.weight: dense weight stored beside the quantized tensors of "
                         f"{module}")
        if fmt == "compressed-tensors":
            _check_ct_module(module, shape, settings, dtype, files, problems)
        else:
            _check_gptq_module(module, shape, settings, dtype, files, problems)

    if model is None:
        return
    tied_ok = _tied_names(model, hf_config)
    quantized_weights = {f"{module_path(m)}.weight" for m in quantized}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in quantized_weights:
            continue
        disk = disk_of.get(name, name)
        if any(name.startswith(f + ".") for f in fused_left):
            continue
        if disk not in files.meta:
            if disk in files.reported or name in tied_ok:
                continue
            problems.add(f"{disk}: missing from the checkpoint (the model built from "
                         f"{CONFIG_NAME} has it, shape {list(param.shape)})")
            continue
        stored_shape, stored_dtype = files.meta[disk]
        if stored_shape != tuple(param.shape):
            problems.add(f"{disk}: shape {list(stored_shape)}, but the model built from "
                         f"{CONFIG_NAME} expects {list(param.shape)}")
        elif dtype and stored_dtype in _FLOAT_DTYPES and stored_dtype != dtype:
            problems.add(f"{disk}: dtype {stored_dtype}, but {CONFIG_NAME} says "
                         f"{settings['dtype']} ({dtype})")


def _tied_names(model, hf_config) -> set[str]:
    """Parameter names that may be absent because they share storage with another parameter."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
            tied.add(seen[id(param)])
        else:
            seen[id(param)] = name
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    if getattr(text, "tie_word_embeddings", False) or getattr(hf_config, "tie_word_embeddings", False):
        tied.add("lm_head.weight")
    return tied


# ----------------------------------------------------------------------------- per-module checks


def _expect(files: _Files, problems: _Problems, name: str, shape, dtypes: tuple[str, ...],
            what: str) -> bool:
    """Check ``name`` is stored with ``shape`` and one of ``dtypes``; True when it is."""
    if name not in files.meta:
        if name not in files.reported:
            problems.add(f"{name}: missing ({what} expected, shape {list(shape)})")
        return False
    stored_shape, stored_dtype = files.meta[name]
    ok = True
    if stored_shape != tuple(shape):
        problems.add(f"{name}: shape {list(stored_shape)}, expected {list(shape)} ({what})")
        ok = False
    if stored_dtype not in dtypes:
        problems.add(f"{name}: dtype {stored_dtype}, expected {' or '.join(dtypes)} ({what})")
        ok = False
    return ok


def _check_scales(name: str, scale: torch.Tensor, problems: _Problems) -> None:
    scale = scale.float()
    finite = torch.isfinite(scale)
    bad = int((~finite).sum())
    if bad:
        first = tuple(int(i) for i in (~finite).nonzero()[0])
        problems.add(f"{name}: {bad} scale(s) are NaN or infinite (first at {list(first)})")
    low = finite & (scale <= 0)
    bad = int(low.sum())
    if bad:
        first = tuple(int(i) for i in low.nonzero()[0])
        problems.add(f"{name}: {bad} scale(s) are zero or negative (first at {list(first)}, "
                     f"value {float(scale[first])})")


def _check_roundtrip(name: str, stored: torch.Tensor, repacked: torch.Tensor,
                     problems: _Problems, what: str) -> None:
    differ = stored != repacked
    count = int(differ.sum())
    if count:
        first = [int(i) for i in differ.nonzero()[0]]
        problems.add(f"{name}: {count} word(s) do not survive unpacking and repacking (first at "
                     f"{first}): {what}")


def _scale_dtypes(dtype: str | None, fmt: str) -> tuple[str, ...]:
    if fmt == "gptq":  # v1 readers expect float16 scales; accept the model dtype as well
        return tuple(dict.fromkeys(("F16", dtype or "F16")))
    return (dtype,) if dtype else ("F16", "BF16", "F32")


def _check_ct_module(module: str, shape, settings: dict, dtype: str | None, files: _Files,
                     problems: _Problems) -> None:
    bits, group, symmetric = settings["bits"], settings["group_size"], settings["symmetric"]
    shape_name = f"{module}.weight_shape"
    stored = None
    if _expect(files, problems, shape_name, (2,), ("I64",), "[out, in]"):
        stored = tuple(int(v) for v in files.read(shape_name).tolist())
        if shape is not None and stored != shape:
            problems.add(f"{shape_name}: holds {list(stored)}, but the model built from "
                         f"{CONFIG_NAME} has [out, in] = {list(shape)}")
    if shape is None:
        if stored is None or min(stored) < 1:
            if stored is not None:
                problems.add(f"{shape_name}: holds {list(stored)}, not a positive [out, in]")
            return  # nothing to size the other tensors by
        shape = stored
    out, inn = shape
    groups = 1 if group is None else math.ceil(inn / group)
    if group is not None and inn % group:
        problems.add(f"{module}: in_features {inn} is not a multiple of group_size {group}; "
                     "compressed-tensors cannot dequantise a ragged last group")

    packed_name = f"{module}.weight_packed"
    if _expect(files, problems, packed_name, (out, _dense_words(inn, bits)), ("I32",),
               f"int32 codes packed {bits}-bit along the input dim"):
        packed = files.read(packed_name)
        codes = unpack_compressed_tensors_weight(packed, bits, (out, inn))
        _check_roundtrip(packed_name, packed, pack_compressed_tensors_weight(codes, bits),
                         problems, "the padding bits after the last code of a row are not zero")
        del packed, codes

    scale_name = f"{module}.weight_scale"
    if _expect(files, problems, scale_name, (out, groups), _scale_dtypes(dtype, "ct"),
               f"scales in the model dtype {settings['dtype']}"):
        _check_scales(scale_name, files.read(scale_name), problems)

    zero_name = f"{module}.weight_zero_point"
    if symmetric:
        if zero_name in files.meta:
            problems.add(f"{zero_name}: present although {CONFIG_NAME} says symmetric "
                         "(loaders would not expect it)")
        return
    if _expect(files, problems, zero_name, (_dense_words(out, bits), groups), ("I32",),
               f"int32 zero points packed {bits}-bit along the output dim"):
        stored_zero = files.read(zero_name)
        zero = unpack_compressed_tensors_zero_point(stored_zero, bits, out)
        high = int(zero.max())
        if int(zero.min()) < 0 or high >= 2 ** bits:  # cannot happen after masking; kept as a guard
            problems.add(f"{zero_name}: zero points outside [0, {2 ** bits - 1}]")
        _check_roundtrip(zero_name, stored_zero, pack_compressed_tensors_zero_point(zero, bits),
                         problems, "the padding bits after the last zero point are not zero")


def _check_gptq_module(module: str, shape, settings: dict, dtype: str | None, files: _Files,
                       problems: _Problems) -> None:
    bits, group, symmetric = settings["bits"], settings["group_size"], settings["symmetric"]
    qweight_name, qzeros_name = f"{module}.qweight", f"{module}.qzeros"
    scales_name, g_idx_name = f"{module}.scales", f"{module}.g_idx"
    if shape is None:  # size from the stored tensors themselves
        qweight_shape = files.meta.get(qweight_name, ((), ""))[0]
        g_idx_shape = files.meta.get(g_idx_name, ((), ""))[0]
        if len(qweight_shape) != 2 or len(g_idx_shape) != 1:
            for name in (qweight_name, g_idx_name):
                if name not in files.meta and name not in files.reported:
                    problems.add(f"{name}: missing")
            return
        shape = (qweight_shape[1], g_idx_shape[0])
    out, inn = shape
    groups = 1 if group is None else math.ceil(inn / group)

    if _expect(files, problems, qweight_name, (_gptq_words(inn, bits), out), ("I32",),
               f"int32 codes packed {bits}-bit along the input dim, [words(in), out]"):
        qweight = files.read(qweight_name)
        codes = unpack_gptq_qweight(qweight, bits, inn)
        _check_roundtrip(qweight_name, qweight, pack_gptq_qweight(codes, bits), problems,
                         "the padding bits after the last code of a column are not zero")
        del qweight, codes

    if _expect(files, problems, qzeros_name, (groups, _gptq_words(out, bits)), ("I32",),
               f"int32 zero points minus one packed {bits}-bit, [groups, words(out)]"):
        qzeros = files.read(qzeros_name)
        zero = unpack_gptq_qzeros(qzeros, bits, out)  # adds v1's 1 back
        if settings["gptq_v2"]:
            zero = zero - 1
        if symmetric:
            bad = zero != 2 ** (bits - 1)
            what = f"not {2 ** (bits - 1)} as a symmetric grid's are"
        else:
            bad = (zero < (0 if settings["gptq_v2"] else 1)) | (zero >= 2 ** bits)
            what = f"outside [{0 if settings['gptq_v2'] else 1}, {2 ** bits - 1}]"
        count = int(bad.sum())
        if count:
            first = [int(i) for i in bad.nonzero()[0]]
            problems.add(f"{qzeros_name}: {count} zero point(s) {what} (first at [out, group] = "
                         f"{first}, value {int(zero[tuple(first)])})")
        elif not settings["gptq_v2"]:
            _check_roundtrip(qzeros_name, qzeros, pack_gptq_qzeros(zero, bits), problems,
                             "the padding bits after the last zero point are not zero")
        del qzeros, zero

    if _expect(files, problems, scales_name, (groups, out), _scale_dtypes(dtype, "gptq"),
               "scales, [groups, out]"):
        _check_scales(scales_name, files.read(scales_name), problems)

    if _expect(files, problems, g_idx_name, (inn,), ("I32",), "int32 group of each input"):
        g_idx = files.read(g_idx_name)
        bad = (g_idx < 0) | (g_idx >= groups)
        count = int(bad.sum())
        if count:
            first = int(bad.nonzero()[0][0])
            problems.add(f"{g_idx_name}: {count} group index(es) outside [0, {groups}) (first "
                         f"at input {first}, value {int(g_idx[first])})")
