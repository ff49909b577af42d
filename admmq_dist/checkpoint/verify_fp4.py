"""``verify``'s per-module check of compressed-tensors' FP4 layouts (:mod:`.fp4_layout`): every
tensor's shape and dtype, scales that are the format's positive finite numbers, and the NVFP4
global scale."""

from __future__ import annotations

import torch

from admmq_dist.checkpoint.fp4_layout import effective_scales, stored_shapes
from admmq_dist.checkpoint.shards import Problems, ShardFiles
from admmq_dist.quant import fp4


def fp4_shape(module: str, shape, files: ShardFiles, problems: Problems):
    """``[out, in]``: the model's, else from ``weight_packed`` (two codes a byte)."""
    if shape is not None:
        return shape
    packed = files.meta.get(f"{module}.weight_packed", ((), ""))[0]
    if len(packed) == 2:
        return packed[0], packed[1] * 2
    if f"{module}.weight_packed" not in files.reported:
        problems.add(f"{module}.weight_packed: missing")
    return None


def check_fp4_module(module: str, shape, kind: str, files: ShardFiles, problems: Problems,
                     expect) -> None:
    """Check ``module``'s FP4 tensors; ``expect`` is verify's shape-and-dtype check."""
    shape = fp4_shape(module, shape, files, problems)
    if shape is None:
        return
    out, inn = shape
    if inn % fp4.GROUP_SIZES[kind]:
        problems.add(f"{module}: in_features {inn} is not a multiple of {kind}'s group size "
                     f"{fp4.GROUP_SIZES[kind]}")
        return
    present = {}
    for suffix, size, dtype, what in stored_shapes(kind, out, inn):
        name = f"{module}.{suffix}"
        if expect(files, problems, name, size, (dtype,), what):
            present[suffix] = files.read(name)
    for extra in ("weight_shape", "weight_zero_point"):
        if f"{module}.{extra}" in files.meta:
            problems.add(f"{module}.{extra}: present, but {kind} layouts store none")
    if "weight_scale" not in present or (kind == "nvfp4" and "weight_global_scale" not in present):
        return
    if kind == "mxfp4" and bool((present["weight_scale"] == 255).any()):
        problems.add(f"{module}.weight_scale: holds 255, E8M0's NaN")
    scale = effective_scales(kind, present["weight_scale"], present.get("weight_global_scale"))
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        first = [int(i) for i in bad.nonzero()[0]]
        problems.add(f"{module}.weight_scale: {int(bad.sum())} scale(s) are not positive finite "
                     f"numbers (first at {first})")
