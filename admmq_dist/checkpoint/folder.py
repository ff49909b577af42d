"""Reading a checkpoint folder: its config, its quantization settings and its shards' headers
(no tensor data), for ``inspect`` and ``verify``."""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors import safe_open

from admmq_dist.checkpoint.formats import CONFIG_NAME, INDEX_NAME, SINGLE_NAME

# safetensors header dtype -> bytes per element.
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"}
_EMBEDDING_PARTS = ("embed", "wte", "wpe")


def load_config(folder: Path) -> dict:
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


def dtype_bytes(dtype: str) -> float:
    if dtype == "F4":
        return 0.5
    return _DTYPE_BYTES.get(dtype, 1)


def nbytes(shape, dtype: str) -> int:
    return int(math.prod(shape) * dtype_bytes(dtype))


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{tensor: (shape, dtype)}`` of one safetensors file, from its header only."""
    out = {}
    with safe_open(str(path), "pt") as f:
        for name in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
            piece = f.get_slice(name)
            out[name] = (tuple(int(s) for s in piece.get_shape()), str(piece.get_dtype()))
    return out


def shard_files(folder: Path) -> tuple[dict[str, str] | None, list[str]]:
    """The index's weight map (None without an index) and the shard files it names, in order."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return weight_map, list(dict.fromkeys(weight_map.values()))
    if (folder / SINGLE_NAME).is_file():
        return None, [SINGLE_NAME]
    raise FileNotFoundError(f"{folder} has no {INDEX_NAME} or {SINGLE_NAME}")


def is_embedding(module: str) -> bool:
    return any(part in module.lower() for part in _EMBEDDING_PARTS)
