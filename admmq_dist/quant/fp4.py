"""FP4 (E2M1) grids: NVFP4 and MXFP4, the 4-bit formats of current GPUs.

Every weight is ``scale * v`` with ``v`` one of the E2M1 values ``0, ±0.5, ±1, ±1.5, ±2, ±3, ±4,
±6`` and one scale per group of consecutive input columns:

* **NVFP4**: groups of 16; the scale is an FP8 E4M3 number divided by one FP32 global scale per
  tensor. Here the global scale is a power of two, ``2**floor(log2(448 / max(scale)))``, so it can
  be read back from the scales alone (a layer's row blocks, workers and writer agree on it without
  carrying it) and dividing by it is exact. llm-compressor takes ``448 * 6 / amax`` instead; the
  power of two gives up less than one bit of the E4M3 range at its top, where every normal E4M3
  number has the same relative precision.
* **MXFP4**: groups of 32; the scale is a power of two (E8M0).

Codes are the 4-bit encodings the checkpoints store, ``sign << 3 | magnitude index`` (index into
``0, 0.5, 1, 1.5, 2, 3, 4, 6``); +0 is code 0 and code 8 (-0) is never produced. A scale is
representable by construction wherever one is made (the fit, its range search and the scale
refit), so what is calibrated is what is stored.

Written here because neither torch nor compressed-tensors offers the in-place nearest-E2M1
rounding the solvers' inner loops need (compressed-tensors' ``cast_to_fp4`` allocates and
compiles per call); compressed-tensors' compressors pack the same codes (tests compare bytes).
"""

from __future__ import annotations

import math

import torch

MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_MAX = 6.0
E4M3_MAX = 448.0
# E4M3's smallest positive (subnormal) number, 2**-9.
E4M3_TINY = 2.0**-9
# E8M0 holds 2**e for e in [-127, 127]; -127 is a float32 subnormal, so one above it.
E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT = -126, 127
GROUP_SIZES = {"nvfp4": 16, "mxfp4": 32}
KINDS = ("int", "nvfp4", "mxfp4")
# 2|v| -> magnitude index, for the exact E2M1 values (|v| in MAGNITUDES).
_INDEX_OF_DOUBLED = (0, 1, 2, 3, 4, -1, 5, -1, 6, -1, -1, -1, 7)


def values_table(device: torch.device | str | None = None) -> torch.Tensor:
    """``[16]`` float32: the value of every code (code 8, -0, reads as 0)."""
    table = torch.tensor(MAGNITUDES + tuple(-m for m in MAGNITUDES), dtype=torch.float32)
    return table.to(device)


def round_e2m1_(t: torch.Tensor) -> torch.Tensor:
    """Round ``t`` in place to the nearest E2M1 value, saturating at ±6; ties to the even
    mantissa, as the hardware converts (``torch.round``'s half-to-even on the steps below).
    One temporary of ``t``'s size: this is ADMM-Q's projection, run on every iteration."""
    # The spacing of E2M1 values: 0.5 below 2, 1 in [2, 4), 2 from 4 — 2**(floor(log2 a) - 1)
    # clamped to [0.5, 2]. Near a boundary log2 may round up to it; both spacings then round
    # to the boundary value.
    step = t.abs().clamp_(max=FP4_MAX).log2_().floor_().sub_(1).clamp_(-1, 1).exp2_()
    return t.clamp_(-FP4_MAX, FP4_MAX).div_(step).round_().mul_(step)


def encode(values: torch.Tensor) -> torch.Tensor:
    """int32 codes of exact E2M1 ``values`` (any shape), in int32 throughout (int64 index
    tensors would be six float arrays at the peak)."""
    doubled = values.abs().mul_(2).to(torch.int32)
    codes = torch.tensor(_INDEX_OF_DOUBLED, dtype=torch.int32, device=values.device)[doubled]
    del doubled
    return codes.add_(values < 0, alpha=8)  # the sign bit (index < 8); -0.0 codes as +0


def decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 E2M1 values of int ``codes`` (any shape)."""
    return values_table(codes.device)[codes.long()]


def nvfp4_global_scale(scale: torch.Tensor) -> float:
    """The power-of-two global scale under which every one of a tensor's effective ``scale``
    values is at most E4M3's maximum (see the module docstring)."""
    top = float(scale.max()) if scale.numel() else 0.0
    if not top > 0 or not math.isfinite(top):
        return 1.0
    return 2.0 ** math.floor(math.log2(E4M3_MAX / top))


def snap_e4m3(scale: torch.Tensor, global_scale: float) -> torch.Tensor:
    """float32 effective scales ``e4m3(scale * G) / G``: the nearest E4M3 number (round to
    nearest even) within E4M3's positive range, exact because ``G`` is a power of two."""
    local = (scale.float() * global_scale).clamp_(min=E4M3_TINY, max=E4M3_MAX)
    return local.to(torch.float8_e4m3fn).float() / global_scale


def power_of_two(scale: torch.Tensor, up: bool = False) -> torch.Tensor:
    """float32 powers of two within E8M0's range: the nearest to ``scale`` by value, or with
    ``up`` the smallest at or above it."""
    s = scale.float().clamp(min=2.0**E8M0_MIN_EXPONENT)
    low = torch.exp2(torch.floor(torch.log2(s)))
    # log2 of a float32 just below a power of two can round up to it: keep low <= s.
    low = torch.where(low > s, low / 2, low)
    if up:
        snapped = torch.where(low < s, low * 2, low)
    else:
        snapped = torch.where(s - low > 2 * low - s, low * 2, low)
    return snapped.clamp_(min=2.0**E8M0_MIN_EXPONENT, max=2.0**E8M0_MAX_EXPONENT)


def snap(kind: str, scale: torch.Tensor, global_scale: float | None) -> torch.Tensor:
    """``scale`` made representable in ``kind``'s scale format (the refit's last step)."""
    if kind == "nvfp4":
        return snap_e4m3(scale, global_scale)
    return power_of_two(scale)


def shared_global_scale(weights: list[torch.Tensor]) -> float:
    """One NVFP4 global scale for linears that engines fuse (q/k/v, gate/up: vLLM takes one
    global scale for the fused weight): from the largest magnitude among ``weights``, with a
    factor 2 of headroom for a target that moves past the weight (asymmetric calibration)."""
    top = max((float(w.abs().max()) for w in weights if w.numel()), default=0.0)
    return nvfp4_global_scale(torch.tensor([2 * top / FP4_MAX]))


def fit_scales(groups: torch.Tensor, valid: torch.Tensor, kind: str, range_search: str,
               mse_norm: float, mse_steps: int, mse_max_shrink: float,
               global_scale: float | None = None) -> tuple[torch.Tensor, float | None]:
    """Group scales of ``groups`` (``[rows, G, group]``, padding excluded by ``valid``) and the
    NVFP4 global scale (None for MXFP4; ``global_scale`` if given, else from these weights):
    min-max, or GPTQ's range search over shrunk maxima with every candidate snapped to the format
    (the search compares the scales that would be stored).

    Min-max maps a group's largest magnitude to 6: for NVFP4 the nearest E4M3 scale (as
    llm-compressor's min-max), for MXFP4 the smallest power of two that does not clip.
    """
    amax = groups.abs().amax(dim=2)
    # An all-zero group still needs a positive scale: any one codes it exactly.
    amax = torch.where(amax > 0, amax, torch.full_like(amax, FP4_MAX))
    if kind != "nvfp4":
        global_scale = None
    elif global_scale is None:
        global_scale = nvfp4_global_scale(amax / FP4_MAX)

    def candidate(shrink: float) -> torch.Tensor:
        target = amax * shrink / FP4_MAX
        return snap_e4m3(target, global_scale) if kind == "nvfp4" else power_of_two(target, up=True)

    scale = candidate(1.0)
    if range_search == "mse":
        best = torch.full_like(scale, float("inf"))
        for k in range(int(mse_max_shrink * mse_steps)):
            s1 = candidate(1.0 - k / mse_steps)
            q = round_e2m1_(groups / s1[..., None]).mul_(s1[..., None])
            err = ((q - groups).abs_().pow_(mse_norm) * valid).sum(dim=2)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
    return scale.contiguous(), global_scale
