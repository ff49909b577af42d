"""What a quantized checkpoint folder holds: ``inspect_checkpoint`` summarises a compressed-tensors
``pack-quantized`` or GPTQ folder from its ``config.json`` and the safetensors headers (no tensor
data is read except each quantized module's tiny ``weight_shape``), including which engines serve
it; ``format_inspection`` renders that for people. Checking a folder is :mod:`.verify`'s job.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from safetensors import safe_open

from admmq_dist.checkpoint.folder import (
    is_embedding,
    load_config,
    nbytes,
    read_header,
    shard_files,
)
from admmq_dist.checkpoint.formats import (
    MARKER,
    RECIPE_NAME,
    SINGLE_NAME,
    SUFFIXES,
    module_of,
    read_settings,
)
from admmq_dist.checkpoint.serving import Layout, served_by
from admmq_dist.quant.grid import SUPPORTED_BITS

__all__ = ["format_inspection", "inspect_checkpoint"]


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
    config = load_config(folder)
    settings = read_settings(folder, config)
    weight_map, shards = shard_files(folder)
    meta: dict[str, tuple[tuple[int, ...], str]] = {}
    missing = []
    for shard in shards:
        if (folder / shard).is_file():
            meta.update(read_header(folder / shard))
        else:
            missing.append(shard)
    fmt = settings["format"]
    quantized = sorted({m for n in meta if (m := module_of(n, (MARKER[fmt],)))})
    files = {n: folder / (weight_map[n] if weight_map else SINGLE_NAME) for n in meta}
    tensor_bytes = sum(nbytes(shape, dtype) for shape, dtype in meta.values())
    estimate = _bytes_at_16_bits(meta, quantized, settings, files)
    recipe = None
    if (folder / RECIPE_NAME).is_file():
        recipe = yaml.safe_load((folder / RECIPE_NAME).read_text(encoding="utf-8"))
    return {
        "path": str(folder), "format": fmt, "checkpoint_format": settings["checkpoint_format"],
        "bits": settings["bits"], "group_size": settings["group_size"],
        "symmetric": settings["symmetric"], "dtype": settings["dtype"],
        "model_type": config.get("model_type"), "architectures": config.get("architectures"),
        "quantized_modules": quantized, "skipped_modules": _skipped(meta, set(quantized)),
        "ignore": settings["ignore"], "num_tensors": len(meta), "num_shards": len(shards),
        "missing_shards": missing,
        "size_on_disk_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
        "tensor_bytes": tensor_bytes, "unquantized_bytes_estimate": estimate,
        "compression_ratio": estimate / tensor_bytes if tensor_bytes else None,
        "recipe": recipe, "served_by": _served_by(settings, quantized),
    }


def _bytes_at_16_bits(meta, quantized: list[str], settings: dict, files) -> int:
    """Quantized modules at 2 bytes per weight, every other tensor as stored."""
    fmt, qset = settings["format"], set(quantized)
    estimate = 0
    for name, (shape, dtype) in meta.items():
        module = module_of(name, SUFFIXES[fmt])
        if module is None or module not in qset:
            estimate += nbytes(shape, dtype)
    for module in quantized:
        out, inn = _dense_shape(module, fmt, settings["bits"], meta, files)
        estimate += out * inn * 2
    return estimate


def _skipped(meta, qset: set[str]) -> list[str]:
    """Modules stored with a dense 2-D weight (embeddings and norms left out)."""
    return sorted(
        name[: -len(".weight")] for name, (shape, _) in meta.items()
        if name.endswith(".weight") and len(shape) == 2
        and name[: -len(".weight")] not in qset
        and not is_embedding(name[: -len(".weight")]) and "norm" not in name.lower())


def _served_by(settings: dict, quantized: list[str]) -> dict[str, str] | None:
    if settings["bits"] not in SUPPORTED_BITS or not isinstance(settings["symmetric"], bool):
        return None
    return served_by(Layout(settings["format"], settings["bits"], settings["symmetric"],
                            settings["group_size"],
                            experts=any(".experts." in m for m in quantized),
                            kind=settings.get("kind", "int")))


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
