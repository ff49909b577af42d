"""The two checkpoint layouts, described once: what a quantized linear stores in each, how its
codes and zero points are packed, and the ``quantization_config`` engines read. The writer builds
tensors and configs from here; ``inspect`` and ``verify`` read them back with the same knowledge.

``compressed-tensors`` (``format: pack-quantized``), per quantized linear ``W [N, K]``:
  * ``weight_packed`` int32 ``[N, ceil(K*bits/32)]``: the unsigned codes, packed along the input
    dim as one bit stream per row (3-bit values straddle words). The library reads them as signed
    ``q = code - 2**(bits-1)``.
  * ``weight_scale`` in the model dtype, ``[N, G]`` (``[N, 1]`` per channel).
  * ``weight_shape`` int64 ``[N, K]``.
  * ``weight_zero_point`` int32 ``[ceil(N*bits/32), G]``, asymmetric only: the unsigned zero points
    packed along the **output** dim; read as ``zero - 2**(bits-1)``, so ``(q - zp) * scale ==
    (code - zero) * scale``. Symmetric grids omit it (their zero is ``2**(bits-1)``).
  compressed-tensors sizes the scale with ``ceil(K / group_size)`` groups but its dequantisation
  refuses ``K % group_size != 0``, so a ragged last group cannot be stored.

``gptq`` (v1, ``checkpoint_format: "gptq"``), per quantized linear:
  * ``qweight`` int32 ``[words(K), N]``, ``qzeros`` int32 ``[G, words(N)]`` holding ``zero - 1``,
    ``scales`` float16 ``[G, N]``, ``g_idx`` int32 ``[K]`` (``i // group_size``).
  v1 readers add 1 back to every stored zero, so a zero point of 0 cannot be represented: GPTQ
  holds symmetric grids only. Readers size these tensors from ``K * bits / 32`` and
  ``N * bits / 32`` (gptqmodel rounds up; its 3-bit unpacking walks whole 3-word blocks), formulas
  that agree with the padded layout only for whole packing blocks, so ``K`` and ``N`` must be
  multiples of ``32 // bits`` (of 32 for 3-bit).

Which engine serves which layout is :mod:`admmq_dist.checkpoint.serving`'s business.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from admmq_dist import __version__
from admmq_dist.checkpoint import fp4_layout
from admmq_dist.quant.packing import (
    dense_words,
    gptq_words,
    pack_compressed_tensors_weight,
    pack_compressed_tensors_zero_point,
    pack_gptq_qweight,
    pack_gptq_qzeros,
    unpack_compressed_tensors_weight,
    unpack_compressed_tensors_zero_point,
    unpack_gptq_qweight,
    unpack_gptq_qzeros,
)

FORMATS = ("compressed-tensors", "gptq")
CONFIG_NAME = "config.json"
GPTQ_CONFIG_NAME = "quantize_config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
RECIPE_NAME = "recipe.yaml"

# The compressed-tensors release whose pack-quantized layout and config schema the writer
# reproduces (tests/test_formats.py checks both against the installed library). Written into the
# config as provenance only: no reader branches on it.
COMPRESSED_TENSORS_LAYOUT_VERSION = "0.20.0"

# Tensors a quantized module stores instead of its dense ``weight`` (its ``bias`` stays dense),
# and the one that marks a module as quantized.
SUFFIXES = {
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point",
                           "weight_g_idx", "weight_global_scale"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
}
MARKER = {"compressed-tensors": "weight_packed", "gptq": "qweight"}
# config.json dtype name -> safetensors header dtype.
HEADER_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}


@dataclass(frozen=True)
class Stored:
    """One tensor a quantized module stores: its name suffix, shape, accepted safetensors dtypes
    and what it holds (for messages)."""

    suffix: str
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]
    what: str


def gptq_block(bits: int) -> int:
    """GPTQ readers need widths that are whole packing blocks (see the module docstring)."""
    return 32 if bits == 3 else 32 // bits


def layer_tensors(fmt: str, module: str, codes: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor, bits: int, symmetric: bool, group_size: int
                  ) -> dict[str, torch.Tensor]:
    """The tensors ``module`` stores: unsigned ``codes`` ``[out, in]``, ``scale`` as stored
    ``[out, groups]``, integer ``zero`` ``[out, groups]``."""
    rows, cols = codes.shape
    if fmt == "compressed-tensors":
        tensors = {
            f"{module}.weight_packed": pack_compressed_tensors_weight(codes.cpu(), bits),
            f"{module}.weight_scale": scale.contiguous(),
            f"{module}.weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
        }
        if not symmetric:
            tensors[f"{module}.weight_zero_point"] = pack_compressed_tensors_zero_point(zero, bits)
        return tensors
    block = gptq_block(bits)
    for what, size in (("in_features", cols), ("out_features", rows)):
        if size % block:
            raise ValueError(
                f"{module}: {what}={size} is not a multiple of {block}, which {bits}-bit GPTQ "
                "requires; use --format compressed-tensors or add the layer to the ignore list")
    return {
        f"{module}.qweight": pack_gptq_qweight(codes.cpu(), bits),
        f"{module}.qzeros": pack_gptq_qzeros(zero, bits),
        f"{module}.scales": scale.T.contiguous(),
        f"{module}.g_idx": (torch.arange(cols) // group_size).to(torch.int32),
    }


def stored_tensors(fmt: str, out: int, inn: int, bits: int, group_size: int | None,
                   symmetric: bool, dtype: str | None) -> list[Stored]:
    """What a quantized ``[out, inn]`` module stores (``dtype``: the config's, a header name)."""
    groups = 1 if group_size is None else -(-inn // group_size)
    if fmt == "compressed-tensors":
        out_list = [
            Stored("weight_shape", (2,), ("I64",), "[out, in]"),
            Stored("weight_packed", (out, dense_words(inn, bits)), ("I32",),
                   f"int32 codes packed {bits}-bit along the input dim"),
            Stored("weight_scale", (out, groups), (dtype,) if dtype else ("F16", "BF16", "F32"),
                   "scales in the model dtype"),
        ]
        if not symmetric:
            out_list.append(Stored("weight_zero_point", (dense_words(out, bits), groups),
                                   ("I32",), f"int32 zero points packed {bits}-bit along the "
                                   "output dim"))
        return out_list
    return [
        Stored("qweight", (gptq_words(inn, bits), out), ("I32",),
               f"int32 codes packed {bits}-bit along the input dim, [words(in), out]"),
        Stored("qzeros", (groups, gptq_words(out, bits)), ("I32",),
               f"int32 zero points minus one packed {bits}-bit, [groups, words(out)]"),
        # v1 readers expect float16 scales; the model dtype is accepted as well.
        Stored("scales", (groups, out), tuple(dict.fromkeys(("F16", dtype or "F16"))),
               "scales, [groups, out]"),
        Stored("g_idx", (inn,), ("I32",), "int32 group of each input"),
    ]


def unpack_codes(fmt: str, packed: torch.Tensor, bits: int, out: int, inn: int) -> torch.Tensor:
    """Unsigned codes ``[out, inn]`` from ``weight_packed`` / ``qweight``."""
    if fmt == "compressed-tensors":
        return unpack_compressed_tensors_weight(packed, bits, (out, inn))
    return unpack_gptq_qweight(packed, bits, inn)


def pack_codes(fmt: str, codes: torch.Tensor, bits: int) -> torch.Tensor:
    if fmt == "compressed-tensors":
        return pack_compressed_tensors_weight(codes, bits)
    return pack_gptq_qweight(codes, bits)


def unpack_zeros(fmt: str, stored: torch.Tensor, bits: int, out: int) -> torch.Tensor:
    """Zero points ``[out, groups]`` (GPTQ: v1's stored ``zero - 1`` with the 1 added back)."""
    if fmt == "compressed-tensors":
        return unpack_compressed_tensors_zero_point(stored, bits, out)
    return unpack_gptq_qzeros(stored, bits, out)


def pack_zeros(fmt: str, zero: torch.Tensor, bits: int) -> torch.Tensor:
    if fmt == "compressed-tensors":
        return pack_compressed_tensors_zero_point(zero, bits)
    return pack_gptq_qzeros(zero, bits)


def quantization_config(fmt: str, bits: int, group_size: int | None, symmetric: bool,
                        ignore: list[str], kind: str = "int") -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json`` (GPTQ: also ``quantize_config.json``);
    ``kind``: the grid's (FP4 grids: compressed-tensors' FP4 layouts, :mod:`.fp4_layout`)."""
    if fmt == "gptq":
        return {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": -1 if group_size is None else group_size,
            "desc_act": False,
            "sym": True,
            # Informational: readers do not use it (the run's own damping is in recipe.yaml).
            "damp_percent": 0.01,
            "true_sequential": True,
            "static_groups": False,
            "checkpoint_format": "gptq",
            "lm_head": False,
            "pack_dtype": "int32",
            "meta": {"quantizer": [f"admmq-dist:{__version__}"]},
        }
    # Field for field what compressed-tensors' QuantizationConfig(...).model_dump() produces
    # (pinned by a test), minus the scheme-level ``format`` field: schemes forbid unknown keys,
    # and releases before that field existed would refuse the config.
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric,
               "group_size": group_size,
               "strategy": "channel" if group_size is None else "group", "dynamic": False}
    if kind != "int":
        weights = fp4_layout.weights_config(kind)
    return {
        "version": COMPRESSED_TENSORS_LAYOUT_VERSION,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": None, "output_activations": None}},
        "kv_cache_scheme": None,
        "format": fp4_layout.FORMATS.get(kind, "pack-quantized"),
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": ignore,
        "moe_sparsity_config": None,
    }


def read_settings(folder: Path, config: dict) -> dict:
    """Format, bits, group size, symmetry, dtype and ignore list of the checkpoint ``config``
    (``config.json``, or an older AutoGPTQ folder's ``quantize_config.json``)."""
    qc = config.get("quantization_config")
    if not qc and (folder / GPTQ_CONFIG_NAME).is_file():
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
    method = str(qc.get("quant_method", "")).lower().replace("_", "-")
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype is None and isinstance(config.get("text_config"), dict):
        dtype = config["text_config"].get("dtype") or config["text_config"].get("torch_dtype")
    if isinstance(dtype, str):
        dtype = dtype.removeprefix("torch.")
    if method == "compressed-tensors":
        weights = next((g["weights"] for g in (qc.get("config_groups") or {}).values()
                        if isinstance(g, dict) and isinstance(g.get("weights"), dict)), None)
        if weights is None:
            raise ValueError(f"{folder}: the compressed-tensors quantization_config has no "
                             "config_groups with weight settings")
        group_size = weights.get("group_size")
        if weights.get("strategy") == "channel" or group_size in (None, -1, 0):
            group_size = None
        return {"format": "compressed-tensors", "checkpoint_format": qc.get("format"),
                "kind": fp4_layout.KIND_OF_FORMAT.get(qc.get("format"), "int"),
                "bits": weights.get("num_bits"), "group_size": group_size,
                "symmetric": bool(weights.get("symmetric", True)), "dtype": dtype,
                "ignore": list(qc.get("ignore") or []), "gptq_v2": False}
    if method == "gptq":
        group_size = qc.get("group_size")
        fmt = qc.get("checkpoint_format") or "gptq"
        return {"format": "gptq", "checkpoint_format": fmt, "kind": "int", "bits": qc.get("bits"),
                "group_size": None if group_size in (None, -1, 0) else group_size,
                "symmetric": bool(qc.get("sym", True)), "dtype": dtype,
                "ignore": list(qc.get("ignore") or qc.get("modules_to_not_convert") or []),
                "gptq_v2": fmt == "gptq_v2"}
    raise ValueError(
        f"{folder}: quant_method {qc.get('quant_method')!r} is not one this tool reads "
        "(compressed-tensors pack-quantized, or gptq)")


def module_of(name: str, suffixes) -> str | None:
    """The module a stored tensor belongs to, when its leaf is one of ``suffixes``."""
    module, _, leaf = name.rpartition(".")
    return module if module and leaf in suffixes else None


def matches_ignore(module: str, ignore: list[str]) -> str | None:
    """The ignore entry that names ``module``, as compressed-tensors and vLLM match them (an
    exact name, or ``re:<pattern>`` matched from the start), or None."""
    for entry in ignore:
        if re.match(entry[3:], module) if entry.startswith("re:") else entry == module:
            return entry
    return None
