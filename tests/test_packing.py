"""Tests for admmq_dist.quant.packing: round trips, hand-computed words, and bit-exact agreement
with compressed-tensors' own packers and with a transcription of AutoGPTQ's packing loop."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from admmq_dist.quant.packing import (
    pack_compressed_tensors_weight,
    pack_compressed_tensors_zero_point,
    pack_gptq_qweight,
    pack_gptq_qzeros,
    unpack_compressed_tensors_weight,
    unpack_compressed_tensors_zero_point,
    unpack_gptq_qweight,
    unpack_gptq_qzeros,
)

BITS = (2, 3, 4, 8)
KS = (1, 7, 10, 31, 32, 33, 64, 100)
NS = (1, 3, 8, 13, 32)
SHAPES = list(itertools.product(NS, KS))


def random_codes(shape, bits, seed, low=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, 1 << bits, shape, generator=gen, dtype=torch.int64)


def ct_words(length, bits):
    return math.ceil(length * bits / 32)


def gptq_words(length, bits):
    return 3 * math.ceil(length / 32) if bits == 3 else math.ceil(length / (32 // bits))


def as_uint32(t):
    return t.numpy().view(np.uint32)


@pytest.fixture(scope="module")
def ct_ref():
    pytest.importorskip("compressed_tensors")
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import (
            pack_to_int32,
            unpack_from_int32,
        )
    except ImportError:  # older compressed-tensors layout
        from compressed_tensors.compressors.quantized_compressors.pack_quantized import (
            pack_to_int32,
            unpack_from_int32,
        )
    return pack_to_int32, unpack_from_int32


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("bits", BITS)
def test_compressed_tensors_weight_round_trip(bits):
    for i, (n, k) in enumerate(SHAPES):
        codes = random_codes((n, k), bits, seed=100 * bits + i)
        packed = pack_compressed_tensors_weight(codes, bits)
        assert packed.dtype == torch.int32
        assert packed.shape == (n, ct_words(k, bits))
        out = unpack_compressed_tensors_weight(packed, bits, (n, k))
        assert out.dtype == torch.int32
        assert torch.equal(out, codes.to(torch.int32)), (n, k)


@pytest.mark.parametrize("bits", BITS)
def test_compressed_tensors_zero_point_round_trip(bits):
    for i, (n, g) in enumerate(SHAPES):
        zero = random_codes((n, g), bits, seed=200 * bits + i)
        packed = pack_compressed_tensors_zero_point(zero, bits)
        assert packed.dtype == torch.int32
        assert packed.shape == (ct_words(n, bits), g)
        out = unpack_compressed_tensors_zero_point(packed, bits, n)
        assert torch.equal(out, zero.to(torch.int32)), (n, g)


@pytest.mark.parametrize("bits", BITS)
def test_gptq_qweight_round_trip(bits):
    for i, (n, k) in enumerate(SHAPES):
        codes = random_codes((n, k), bits, seed=300 * bits + i)
        qweight = pack_gptq_qweight(codes, bits)
        assert qweight.dtype == torch.int32
        assert qweight.shape == (gptq_words(k, bits), n)
        out = unpack_gptq_qweight(qweight, bits, k)
        assert out.dtype == torch.int32
        assert torch.equal(out, codes.to(torch.int32)), (n, k)


@pytest.mark.parametrize("bits", BITS)
def test_gptq_qzeros_round_trip(bits):
    for i, (n, g) in enumerate(SHAPES):
        zero = random_codes((n, g), bits, seed=400 * bits + i, low=1)
        qzeros = pack_gptq_qzeros(zero, bits)
        assert qzeros.dtype == torch.int32
        assert qzeros.shape == (g, gptq_words(n, bits))
        out = unpack_gptq_qzeros(qzeros, bits, n)
        assert torch.equal(out, zero.to(torch.int32)), (n, g)


@pytest.mark.parametrize("bits", BITS)
def test_extreme_codes_round_trip_and_set_the_sign_bit(bits):
    # All-max codes fill whole words with ones: the int32 words must be -1, not overflow.
    top = (1 << bits) - 1
    codes = torch.full((3, 64), top, dtype=torch.int64)
    packed = pack_compressed_tensors_weight(codes, bits)
    assert torch.all(packed == -1)
    assert torch.all(pack_gptq_qweight(codes, bits) == -1)
    assert torch.equal(unpack_compressed_tensors_weight(packed, bits, (3, 64)), codes.int())
    assert torch.all(pack_compressed_tensors_weight(torch.zeros_like(codes), bits) == 0)


def test_accepts_any_integer_dtype():
    codes = random_codes((4, 40), 4, seed=7)
    ref = pack_compressed_tensors_weight(codes, 4)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        assert torch.equal(pack_compressed_tensors_weight(codes.to(dtype), 4), ref)


# --------------------------------------------------------------------------- compressed-tensors ref


@pytest.mark.parametrize("bits", BITS)
def test_weight_matches_compressed_tensors(ct_ref, bits):
    pack_to_int32, unpack_from_int32 = ct_ref
    offset = 1 << (bits - 1)
    for i, (n, k) in enumerate(SHAPES):
        codes = random_codes((n, k), bits, seed=500 * bits + i)
        signed = (codes - offset).to(torch.int8)
        ref = pack_to_int32(signed, bits)
        ours = pack_compressed_tensors_weight(codes, bits)
        assert ours.dtype == ref.dtype == torch.int32
        assert ours.shape == ref.shape, (n, k)
        assert torch.equal(ours, ref), (n, k)
        # Cross-unpack in both directions.
        assert torch.equal(unpack_compressed_tensors_weight(ref, bits, (n, k)), codes.int())
        back = unpack_from_int32(ours, bits, torch.Size((n, k)))
        assert torch.equal(back, signed), (n, k)


@pytest.mark.parametrize("bits", BITS)
def test_zero_point_matches_compressed_tensors(ct_ref, bits):
    pack_to_int32, unpack_from_int32 = ct_ref
    offset = 1 << (bits - 1)
    for i, (n, g) in enumerate(SHAPES):
        zero = random_codes((n, g), bits, seed=600 * bits + i)
        signed = (zero - offset).to(torch.int8)
        ref = pack_to_int32(signed, bits, packed_dim=0)
        ours = pack_compressed_tensors_zero_point(zero, bits)
        assert ours.shape == ref.shape, (n, g)
        assert torch.equal(ours, ref), (n, g)
        assert torch.equal(unpack_compressed_tensors_zero_point(ref, bits, n), zero.int())
        back = unpack_from_int32(ours, bits, torch.Size((n, g)), packed_dim=0)
        assert torch.equal(back, signed), (n, g)


# ----------------------------------------------------------------------------- AutoGPTQ reference


def autogptq_pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Transcription of AutoGPTQ's QuantLinear.pack loop: packs dim 0 of uint32 ``values [L, C]``
    (L a multiple of 32) into ``[L // 32 * bits, C]`` words, value by value."""
    values = values.astype(np.uint32)
    out = np.zeros((values.shape[0] // 32 * bits, values.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < out.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                out[row] |= values[j] << np.uint32(bits * (j - i))
            i += 32 // bits
            row += 1
        else:
            for j in range(i, i + 10):
                out[row] |= values[j] << np.uint32(3 * (j - i))
            i += 10
            out[row] |= values[i] << np.uint32(30)
            row += 1
            out[row] |= (values[i] >> np.uint32(2)) & np.uint32(1)
            i += 1
            for j in range(i, i + 10):
                out[row] |= values[j] << np.uint32(3 * (j - i) + 1)
            i += 10
            out[row] |= values[i] << np.uint32(31)
            row += 1
            out[row] |= (values[i] >> np.uint32(1)) & np.uint32(0x3)
            i += 1
            for j in range(i, i + 10):
                out[row] |= values[j] << np.uint32(3 * (j - i) + 2)
            i += 10
            row += 1
    return out


@pytest.mark.parametrize("bits", BITS)
def test_gptq_qweight_matches_autogptq_loop(bits):
    for i, (n, k) in enumerate(itertools.product((1, 5, 16), (32, 64, 96))):
        codes = random_codes((n, k), bits, seed=700 * bits + i)
        ref = autogptq_pack_rows(codes.T.numpy(), bits)
        assert np.array_equal(as_uint32(pack_gptq_qweight(codes, bits)), ref), (n, k)


@pytest.mark.parametrize("bits", BITS)
def test_gptq_qzeros_match_autogptq_loop(bits):
    for i, (n, g) in enumerate(itertools.product((32, 64, 96), (1, 3, 8))):
        zero = random_codes((n, g), bits, seed=800 * bits + i, low=1)
        # AutoGPTQ: zeros is [G, N]; it subtracts 1 and packs along N.
        ref = autogptq_pack_rows((zero - 1).numpy(), bits).T
        assert np.array_equal(as_uint32(pack_gptq_qzeros(zero, bits)), ref), (n, g)


# ----------------------------------------------------------------------------- hand-computed words


def test_hand_computed_4bit_word():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    # Value i in bits [4i, 4i+4): 0x87654321, whose top bit makes it a negative int32.
    expected = 0x87654321 - (1 << 32)
    assert pack_compressed_tensors_weight(codes, 4).tolist() == [[expected]]
    assert pack_gptq_qweight(codes, 4).tolist() == [[expected]]
    assert pack_gptq_qweight(codes.T.expand(8, 2).T.contiguous(), 4).tolist() == [
        [expected, expected]
    ]
    # Zero points pack along the output dim.
    assert pack_compressed_tensors_zero_point(codes.T, 4).tolist() == [[expected]]
    assert pack_gptq_qzeros(codes.T + 1, 4).tolist() == [[expected]]


def test_hand_computed_2bit_and_8bit_words():
    assert pack_gptq_qweight(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]
    assert pack_gptq_qweight(torch.tensor([[0x01, 0x02, 0x03, 0xF4]]), 8).tolist() == [
        [0xF4030201 - (1 << 32)]
    ]


def test_hand_computed_3bit_gptq_straddles_word_boundaries():
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, 0] = 0b111  # bits 0..2 of word 0
    codes[0, 10] = 0b101  # bits 30..32: low two bits (01) end word 0, high bit starts word 1
    codes[0, 21] = 0b011  # bits 63..65: low bit (1) ends word 1, high two bits (01) start word 2
    codes[0, 31] = 0b100  # bits 93..95: the top of word 2
    qweight = pack_gptq_qweight(codes, 3)
    word0 = 0b111 | (0b01 << 30)
    word1 = 0b1 | (0b1 << 31)
    word2 = 0b01 | (0b100 << 29)
    expected = [[w - (1 << 32) if w >= 1 << 31 else w] for w in (word0, word1, word2)]
    assert qweight.tolist() == expected
    assert unpack_gptq_qweight(qweight, 3, 32).tolist() == codes.tolist()


def test_3bit_tail_padding():
    codes = random_codes((2, 33), 3, seed=11)
    # GPTQ pads to whole 3-word blocks; compressed-tensors truncates to ceil(33*3/32) = 4 words.
    assert pack_gptq_qweight(codes, 3).shape == (6, 2)
    assert pack_compressed_tensors_weight(codes, 3).shape == (2, 4)
    padded = torch.nn.functional.pad(codes, (0, 31))
    assert torch.equal(pack_gptq_qweight(codes, 3), pack_gptq_qweight(padded, 3))


# ----------------------------------------------------------------------------- identity


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", (32, 64, 128))
def test_symmetric_compressed_tensors_equals_gptq_transposed(bits, k):
    # The doc's identity holds for 2/4/8 bits; the installed compressed-tensors packs 3 bits
    # densely like GPTQ, so for whole 32-value blocks it holds there too.
    codes = random_codes((13, k), bits, seed=900 + bits + k)
    ct = pack_compressed_tensors_weight(codes, bits)
    assert torch.equal(ct, pack_gptq_qweight(codes, bits).T)


# ----------------------------------------------------------------------------- refusals


def test_gptq_qzeros_refuses_zero_point_zero():
    zero = torch.full((8, 2), 8)
    zero[3, 1] = 0
    with pytest.raises(ValueError, match="GPTQ v1 cannot represent a zero point of 0"):
        pack_gptq_qzeros(zero, 4)


PACKERS = (
    pack_compressed_tensors_weight,
    pack_compressed_tensors_zero_point,
    pack_gptq_qweight,
    pack_gptq_qzeros,
)


@pytest.mark.parametrize("packer", PACKERS)
@pytest.mark.parametrize("bits", BITS)
def test_refuses_out_of_range_codes(packer, bits):
    too_big = torch.ones(4, 8, dtype=torch.int64)
    too_big[1, 2] = 1 << bits
    with pytest.raises(ValueError, match="must lie in"):
        packer(too_big, bits)
    negative = torch.ones(4, 8, dtype=torch.int64)
    negative[0, 0] = -1
    with pytest.raises(ValueError, match="must lie in"):
        packer(negative, bits)


@pytest.mark.parametrize("packer", PACKERS)
def test_refuses_bad_bits_dims_and_dtypes(packer):
    codes = torch.ones(4, 8, dtype=torch.int64)
    for bits in (1, 5, 16, 0):
        with pytest.raises(ValueError, match="bits must be one of"):
            packer(codes, bits)
    with pytest.raises(ValueError, match="2-D"):
        packer(torch.ones(8, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="2-D"):
        packer(torch.ones(2, 4, 8, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="integer dtype"):
        packer(torch.ones(4, 8), 4)
    with pytest.raises(ValueError, match="non-empty"):
        packer(torch.ones(0, 8, dtype=torch.int64), 4)


def test_unpackers_refuse_bad_inputs():
    packed = pack_compressed_tensors_weight(random_codes((4, 40), 4, seed=3), 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        unpack_compressed_tensors_weight(packed, 5, (4, 40))
    with pytest.raises(ValueError, match="int32"):
        unpack_compressed_tensors_weight(packed.to(torch.int64), 4, (4, 40))
    with pytest.raises(ValueError, match="expected"):
        unpack_compressed_tensors_weight(packed, 4, (4, 100))
    with pytest.raises(ValueError, match="shape must be"):
        unpack_compressed_tensors_weight(packed, 4, (4,))
    with pytest.raises(ValueError, match="2-D"):
        unpack_compressed_tensors_zero_point(packed.flatten(), 4, 4)
    with pytest.raises(ValueError, match="expected"):
        unpack_compressed_tensors_zero_point(packed, 4, 100)
    qweight = pack_gptq_qweight(random_codes((4, 40), 3, seed=4), 3)
    with pytest.raises(ValueError, match="expected"):
        unpack_gptq_qweight(qweight, 3, 100)
    with pytest.raises(ValueError, match="in_features"):
        unpack_gptq_qweight(qweight, 3, 0)
    qzeros = pack_gptq_qzeros(random_codes((40, 2), 4, seed=5, low=1), 4)
    with pytest.raises(ValueError, match="expected"):
        unpack_gptq_qzeros(qzeros, 4, 100)
