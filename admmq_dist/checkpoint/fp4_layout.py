"""compressed-tensors' FP4 layouts, ``nvfp4-pack-quantized`` and ``mxfp4-pack-quantized``
(weights only), as its own compressors write them. Per quantized linear ``W [N, K]``:

* ``weight_packed`` uint8 ``[N, K/2]``: two E2M1 codes a byte, column ``2j`` in the low nibble
  (a code is ``sign << 3 | magnitude index``, :mod:`admmq_dist.quant.fp4`);
* NVFP4: ``weight_scale`` float8_e4m3fn ``[N, K/16]`` and ``weight_global_scale`` float32 ``[1]``;
  a weight is ``e2m1 * weight_scale / weight_global_scale``;
* MXFP4: ``weight_scale`` uint8 ``[N, K/32]``, the E8M0 exponent (bias 127): a weight is
  ``e2m1 * 2**(weight_scale - 127)``.

No ``weight_shape`` and no zero points. The scheme is compressed-tensors' ``NVFP4A16`` /
``MXFP4A16`` preset, field for field (tests/test_fp4_layout.py checks bytes and config against the
installed library's compressors).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from admmq_dist.quant import fp4

FORMATS = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
KIND_OF_FORMAT = {v: k for k, v in FORMATS.items()}
SUFFIXES = ("weight_packed", "weight_scale", "weight_global_scale")


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K/2]`` from int codes ``[N, K]`` (``K`` even)."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 codes ``[N, 2 * packed.shape[1]]``."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=2).reshape(packed.shape[0], -1).to(torch.int32)


def layer_tensors(kind: str, module: str, codes: torch.Tensor, scale: torch.Tensor,
                  global_scale: float | None = None) -> dict[str, torch.Tensor]:
    """The tensors ``module`` stores for ``codes`` ``[N, K]`` on effective float32 ``scale``
    ``[N, groups]`` (NVFP4: under ``global_scale``, by default the scales' own); refuses scales
    the format cannot hold exactly."""
    tensors = {f"{module}.weight_packed": pack(codes.cpu())}
    scale = scale.detach().cpu().float()
    if kind == "nvfp4":
        if global_scale is None:
            global_scale = fp4.nvfp4_global_scale(scale)
        local = (scale * global_scale).to(torch.float8_e4m3fn)
        exact = torch.equal(local.float() / global_scale, scale)
        tensors[f"{module}.weight_scale"] = local
        tensors[f"{module}.weight_global_scale"] = torch.tensor([global_scale],
                                                                dtype=torch.float32)
    else:
        exponent = torch.log2(scale)
        exact = torch.equal(exponent, exponent.round()) and bool(
            ((exponent >= -127) & (exponent <= 127)).all())
        tensors[f"{module}.weight_scale"] = (exponent.round() + 127).to(torch.uint8)
    if not exact:
        raise ValueError(f"{module}: some scales are not {kind} scale numbers; fit the grid with "
                         f"kind={kind!r} (its fit and refit keep scales representable)")
    return tensors


def effective_scales(kind: str, weight_scale: torch.Tensor,
                     global_scale: torch.Tensor | None) -> torch.Tensor:
    """float32 ``[N, groups]``: what a code's E2M1 value is multiplied by."""
    if kind == "nvfp4":
        return weight_scale.float() / global_scale.float().reshape(())
    return torch.exp2(weight_scale.to(torch.float32) - 127)


def stored_weight(kind: str, tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """float32 ``[N, K]``: the weight ``module``'s stored FP4 tensors (in ``tensors``, by full
    name) hold."""
    scale = effective_scales(kind, tensors[f"{module}.weight_scale"],
                             tensors.get(f"{module}.weight_global_scale"))
    values = fp4.decode(unpack(tensors[f"{module}.weight_packed"]))
    return values * scale.repeat_interleave(values.shape[1] // scale.shape[1], dim=1)


def stored_shapes(kind: str, out: int, inn: int) -> list[tuple[str, tuple[int, ...], str, str]]:
    """``(suffix, shape, safetensors dtype, what)`` of what a quantized ``[out, inn]`` module
    stores."""
    groups = inn // fp4.GROUP_SIZES[kind]
    shapes = [("weight_packed", (out, inn // 2), "U8", "uint8 E2M1 codes, two a byte")]
    if kind == "nvfp4":
        shapes += [("weight_scale", (out, groups), "F8_E4M3", "FP8 E4M3 group scales"),
                   ("weight_global_scale", (1,), "F32", "the FP32 global scale")]
    else:
        shapes.append(("weight_scale", (out, groups), "U8", "E8M0 group scale exponents"))
    return shapes


def weights_config(kind: str) -> dict[str, Any]:
    """The scheme's ``weights`` entry, as compressed-tensors' NVFP4A16 / MXFP4A16 dump it."""
    if kind == "nvfp4":
        return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16,
                "strategy": "tensor_group", "dynamic": False,
                "scale_dtype": "torch.float8_e4m3fn"}
    return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32,
            "strategy": "group", "dynamic": False, "scale_dtype": "torch.uint8"}


def fused_global_scales(scales: dict[str, torch.Tensor]) -> dict[str, float]:
    """One NVFP4 global scale per set of linears vLLM fuses (q/k/v and gate/up of one parent,
    Mixtral's w1/w3): the smallest of the set's own (:func:`fp4.nvfp4_global_scale`). Every
    linear of a set was fitted under one shared power of two no larger than any of these
    (:func:`fp4.shared_global_scale`), so its scales stay exact under the smallest."""
    families = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
                "up_proj": "gate_up", "w1": "w13", "w3": "w13"}

    def fused_set(name: str) -> tuple[str, str]:
        parent, _, leaf = name.rpartition(".")
        return parent, families.get(leaf, leaf)

    shared: dict[tuple[str, str], float] = {}
    for name, scale in scales.items():
        key = fused_set(name)
        shared[key] = min(shared.get(key, math.inf), fp4.nvfp4_global_scale(scale))
    return {name: shared[fused_set(name)] for name in scales}
