"""Bit packing of quantized codes into the int32 layouts inference engines load.

Codes here are unsigned integers in ``[0, 2**bits - 1]`` with an unsigned integer zero point, and
dequantise as ``scale * (code - zero)``. ``bits`` is one of 2, 3, 4, 8. Every layout below is a
little-endian bit stream: value ``i`` of a run occupies bits ``[i*bits, (i+1)*bits)`` of the run,
32 values fill exactly ``bits`` int32 words, and for 3 bits values 10 and 21 of each 32 straddle a
word boundary. The layouts differ only in which dimension is packed, how the tail is padded and
what is stored.

compressed-tensors ``pack-quantized`` (weight ``[N, K]`` = [out, in]):
  * ``weight_packed`` ``[N, ceil(K*bits/32)]``, packed along the input dim. The file format stores
    signed values ``code - 2**(bits-1)`` but its packer adds ``2**(bits-1)`` back before packing,
    so the bits in the words are the unsigned codes; the tail is zero-padded to whole words.
  * ``weight_zero_point`` ``[ceil(N*bits/32), G]``, packed along the **output** dim, same bits.
  For 2/4/8 bits ``ceil(K*bits/32) == ceil(K / (32/bits))``. For 3 bits the installed
  compressed-tensors packs densely (32 values in 3 words, values straddling words), not 10 values
  per word with 2 bits unused as older notes say; the tests pin us to the installed packer.

GPTQ v1 (``checkpoint_format: "gptq"``):
  * ``qweight`` ``[words(K), N]``, packed along the input dim (note the transpose relative to
    compressed-tensors): ``qweight[r, n] |= code[n, r*pack + j] << (bits*j)``.
  * ``qzeros`` ``[G, words(N)]``, packed along the output dim, storing ``zero - 1``.
  ``words(L)`` is ``ceil(L / (32/bits))`` for 2/4/8 bits and ``3 * ceil(L / 32)`` for 3 bits: the
  3-bit readers (AutoGPTQ, GPTQModel) walk whole 32-value / 3-word blocks, so the tail is padded
  with zero codes to a whole block. Because v1 stores ``zero - 1``, a zero point of 0 cannot be
  represented; v1 is meant for symmetric quantization (zero = ``2**(bits-1)``).

For symmetric 2/4/8-bit codes with ``K`` a multiple of 32 the two weight layouts hold the same
words: ``pack_compressed_tensors_weight(codes) == pack_gptq_qweight(codes).T``.

We pack by hand so this math layer does not depend on compressed-tensors / gptqmodel at run time;
tests/test_packing.py pins the output bit-for-bit to compressed-tensors' own packers and to a
transcription of the AutoGPTQ packing loop.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .grid import SUPPORTED_BITS

__all__ = [
    "dense_words",
    "gptq_words",
    "pack_compressed_tensors_weight",
    "unpack_compressed_tensors_weight",
    "pack_compressed_tensors_zero_point",
    "unpack_compressed_tensors_zero_point",
    "pack_gptq_qweight",
    "unpack_gptq_qweight",
    "pack_gptq_qzeros",
    "unpack_gptq_qzeros",
]

_MASK32 = (1 << 32) - 1


# ----------------------------------------------------------------------------- validation


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _check_codes(values: Tensor, bits: int, name: str, low: int = 0) -> Tensor:
    """Validate a 2-D integer tensor of values in ``[low, 2**bits - 1]``; return it as int64."""
    if not isinstance(values, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(values.shape)}")
    if values.dtype == torch.bool or values.dtype.is_floating_point or values.dtype.is_complex:
        raise ValueError(f"{name} must have an integer dtype, got {values.dtype}")
    if values.shape[0] == 0 or values.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(values.shape)}")
    values = values.to(torch.int64)
    high = (1 << bits) - 1
    vmin, vmax = int(values.min()), int(values.max())
    if vmin < low or vmax > high:
        raise ValueError(
            f"{name} must lie in [{low}, {high}] for {bits}-bit packing, "
            f"got values in [{vmin}, {vmax}]"
        )
    return values


def _check_packed(packed: Tensor, name: str, expected_shape: tuple[int, int]) -> None:
    if not isinstance(packed, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {packed.dtype}")
    if packed.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(packed.shape)}")
    if tuple(packed.shape) != tuple(expected_shape):
        raise ValueError(
            f"{name} has shape {tuple(packed.shape)}, expected {tuple(expected_shape)}"
        )


def _check_length(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# ----------------------------------------------------------------------------- bit stream


def dense_words(length: int, bits: int) -> int:
    """Words the compressed-tensors layout keeps: the stream truncated to whole words."""
    return math.ceil(length * bits / 32)


def gptq_words(length: int, bits: int) -> int:
    """Words the GPTQ layout keeps: 3-bit readers consume whole 32-value / 3-word blocks."""
    if bits == 3:
        return 3 * math.ceil(length / 32)
    return math.ceil(length / (32 // bits))


def _bit_layout(bits: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For each of the 32 values in a block: its word, its bit offset, whether it spills over."""
    start = torch.arange(32, device=device, dtype=torch.int64) * bits
    word = start // 32
    offset = start % 32
    spill = offset + bits > 32
    return word, offset, spill


def _to_int32(words: Tensor) -> Tensor:
    # Words are assembled as non-negative int64 bit patterns; a pattern with bit 31 set is a
    # negative int32, and converting an out-of-range int64 directly is not guaranteed to wrap.
    words = words & _MASK32
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


def _pack_rows(values: Tensor, bits: int, num_words: int) -> Tensor:
    """Pack each row of unsigned int64 ``values [R, L]`` into ``num_words`` int32 words."""
    rows, length = values.shape
    blocks = math.ceil(length / 32)
    assert num_words <= blocks * bits
    values = torch.nn.functional.pad(values, (0, blocks * 32 - length))
    values = values.reshape(rows, blocks, 32)
    word, offset, spill = _bit_layout(bits, values.device)

    out = torch.zeros(rows, blocks, bits, dtype=torch.int64, device=values.device)
    # The bit ranges are disjoint, so summing them is OR-ing them.
    out.scatter_add_(2, word.expand(rows, blocks, 32), (values << offset) & _MASK32)
    if bool(spill.any()):
        carried = values[..., spill] >> (32 - offset[spill])
        out.scatter_add_(2, (word[spill] + 1).expand(rows, blocks, -1), carried)
    return _to_int32(out.reshape(rows, blocks * bits)[:, :num_words])


def _unpack_rows(packed: Tensor, bits: int, length: int) -> Tensor:
    """Inverse of ``_pack_rows``: int32 ``packed [R, W]`` to unsigned values ``[R, length]``."""
    rows, num_words = packed.shape
    blocks = math.ceil(length / 32)
    words = packed.to(torch.int64) & _MASK32
    # A truncated stream (compressed-tensors) ends mid-block; the missing bits are padding.
    words = torch.nn.functional.pad(words, (0, blocks * bits - num_words))
    words = words.reshape(rows, blocks, bits)
    word, offset, spill = _bit_layout(bits, words.device)

    low = words[..., word] >> offset
    nxt = words[..., torch.clamp(word + 1, max=bits - 1)] << (32 - offset)
    values = (low | torch.where(spill, nxt, torch.zeros_like(nxt))) & ((1 << bits) - 1)
    return values.reshape(rows, blocks * 32)[:, :length].to(torch.int32)


# ----------------------------------------------------------------------------- compressed-tensors


def pack_compressed_tensors_weight(codes: Tensor, bits: int) -> Tensor:
    """Unsigned codes ``[N, K]`` to ``weight_packed`` ``[N, ceil(K*bits/32)]`` int32."""
    _check_bits(bits)
    codes = _check_codes(codes, bits, "codes")
    return _pack_rows(codes, bits, dense_words(codes.shape[1], bits))


def unpack_compressed_tensors_weight(
    packed: Tensor, bits: int, shape: tuple[int, int]
) -> Tensor:
    """``weight_packed`` back to unsigned codes of ``shape`` = ``(N, K)``, as int32."""
    _check_bits(bits)
    if len(tuple(shape)) != 2:
        raise ValueError(f"shape must be (N, K), got {tuple(shape)!r}")
    n, k = (_check_length(int(s), "shape entries") for s in shape)
    _check_packed(packed, "weight_packed", (n, dense_words(k, bits)))
    return _unpack_rows(packed, bits, k)


def pack_compressed_tensors_zero_point(zero: Tensor, bits: int) -> Tensor:
    """Unsigned zero points ``[N, G]`` to ``weight_zero_point`` ``[ceil(N*bits/32), G]`` int32."""
    _check_bits(bits)
    zero = _check_codes(zero, bits, "zero")
    return _pack_rows(zero.T, bits, dense_words(zero.shape[0], bits)).T.contiguous()


def unpack_compressed_tensors_zero_point(packed: Tensor, bits: int, num_rows: int) -> Tensor:
    """``weight_zero_point`` back to unsigned zero points ``[num_rows, G]``, as int32."""
    _check_bits(bits)
    num_rows = _check_length(num_rows, "num_rows")
    if isinstance(packed, Tensor) and packed.dim() == 2:
        expected = (dense_words(num_rows, bits), packed.shape[1])
    else:
        expected = (dense_words(num_rows, bits), -1)
    _check_packed(packed, "weight_zero_point", expected)
    return _unpack_rows(packed.T, bits, num_rows).T.contiguous()


# ----------------------------------------------------------------------------- GPTQ v1


def pack_gptq_qweight(codes: Tensor, bits: int) -> Tensor:
    """Unsigned codes ``[N, K]`` to ``qweight`` ``[words(K), N]`` int32 (see module docstring)."""
    _check_bits(bits)
    codes = _check_codes(codes, bits, "codes")
    return _pack_rows(codes, bits, gptq_words(codes.shape[1], bits)).T.contiguous()


def unpack_gptq_qweight(qweight: Tensor, bits: int, in_features: int) -> Tensor:
    """``qweight`` back to unsigned codes ``[N, in_features]``, as int32."""
    _check_bits(bits)
    in_features = _check_length(in_features, "in_features")
    if isinstance(qweight, Tensor) and qweight.dim() == 2:
        expected = (gptq_words(in_features, bits), qweight.shape[1])
    else:
        expected = (gptq_words(in_features, bits), -1)
    _check_packed(qweight, "qweight", expected)
    return _unpack_rows(qweight.T, bits, in_features)


def pack_gptq_qzeros(zero: Tensor, bits: int) -> Tensor:
    """Unsigned zero points ``[N, G]`` to v1 ``qzeros`` ``[G, words(N)]`` int32 holding zero - 1."""
    _check_bits(bits)
    if isinstance(zero, Tensor) and zero.numel() > 0 and not zero.dtype.is_floating_point:
        if bool((zero == 0).any()):
            raise ValueError(
                "GPTQ v1 cannot represent a zero point of 0 (it stores zero - 1); "
                "use symmetric quantization or the compressed-tensors format"
            )
    zero = _check_codes(zero, bits, "zero", low=1)
    return _pack_rows(zero.T - 1, bits, gptq_words(zero.shape[0], bits))


def unpack_gptq_qzeros(qzeros: Tensor, bits: int, num_rows: int) -> Tensor:
    """v1 ``qzeros`` back to zero points ``[num_rows, G]``, as int32, adding the 1 back.

    Like every v1 reader this does not wrap: a stored all-ones field (written by tools that let
    ``0 - 1`` underflow) comes back as ``2**bits``, not 0.
    """
    _check_bits(bits)
    num_rows = _check_length(num_rows, "num_rows")
    if isinstance(qzeros, Tensor) and qzeros.dim() == 2:
        expected = (qzeros.shape[0], gptq_words(num_rows, bits))
    else:
        expected = (-1, gptq_words(num_rows, bits))
    _check_packed(qzeros, "qzeros", expected)
    return (_unpack_rows(qzeros, bits, num_rows) + 1).T.contiguous()
