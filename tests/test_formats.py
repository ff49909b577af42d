"""checkpoint/formats.py: each layout holds exactly the quantizer's codes and grid, and its
config is what compressed-tensors' own models write."""

from __future__ import annotations

import json

import pytest
import torch

from admmq_dist.checkpoint.formats import COMPRESSED_TENSORS_LAYOUT_VERSION
from admmq_dist.quant.packing import (
    unpack_compressed_tensors_weight,
    unpack_compressed_tensors_zero_point,
    unpack_gptq_qweight,
    unpack_gptq_qzeros,
)

from checkpoints import (
    quantize,
    read_all,
    save_source,
    stored_weight,
    tiny_model,
    transformers,
    write,
)


def test_compressed_tensors_layout_and_config(tmp_path):
    """Tensor names, dtypes, shapes and the signed zero-point convention of pack-quantized."""
    model = tiny_model()
    quant = quantize(model, 4, 32, False)
    src = save_source(model, tmp_path / "src")
    out = write(model, quant, tmp_path / "q", fmt="compressed-tensors", bits=4, group_size=32,
                symmetric=False, dtype=torch.bfloat16, source=src)
    tensors = read_all(out)
    name = "model.layers.1.self_attn.k_proj"
    codes, grid = quant[name]
    n, k = codes.shape
    assert tensors[f"{name}.weight_packed"].dtype == torch.int32
    assert tuple(tensors[f"{name}.weight_packed"].shape) == (n, k * 4 // 32)
    assert tensors[f"{name}.weight_scale"].dtype == torch.bfloat16
    assert tuple(tensors[f"{name}.weight_scale"].shape) == (n, k // 32)
    assert tensors[f"{name}.weight_shape"].dtype == torch.int64
    assert tensors[f"{name}.weight_shape"].tolist() == [n, k]
    assert tensors[f"{name}.weight_zero_point"].dtype == torch.int32
    assert tuple(tensors[f"{name}.weight_zero_point"].shape) == (n * 4 // 32, k // 32)
    assert f"{name}.weight" not in tensors
    assert tensors["model.norm.weight"].dtype == torch.bfloat16
    assert torch.equal(unpack_compressed_tensors_weight(tensors[f"{name}.weight_packed"], 4, (n, k)), codes)
    zp = unpack_compressed_tensors_zero_point(tensors[f"{name}.weight_zero_point"], 4, n)
    assert torch.equal(zp, grid.zero.to(torch.int32))

    # The library's own unpacker sees signed values: q = code - 8 and zp = zero - 8.
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = helpers.unpack_from_int32(tensors[f"{name}.weight_packed"], 4, torch.Size([n, k]))
    assert torch.equal(q.to(torch.int32), codes - 8)
    zq = helpers.unpack_from_int32(tensors[f"{name}.weight_zero_point"], 4,
                                   torch.Size([n, k // 32]), packed_dim=0)
    assert torch.equal(zq.to(torch.int32), grid.zero.to(torch.int32) - 8)

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    assert qc["config_groups"]["group_0"]["weights"] == {
        "num_bits": 4, "type": "int", "symmetric": False, "group_size": 32,
        "strategy": "group", "dynamic": False,
    }
    for f in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "recipe.yaml"):
        assert (out / f).is_file(), f
    assert not (out / "quantize_config.json").exists()


@pytest.mark.parametrize("group_size,symmetric", [(32, True), (32, False), (None, True), (None, False)])
def test_compressed_tensors_config_matches_the_library_models(tmp_path, group_size, symmetric):
    """Our hand-written quantization_config is what compressed-tensors' pydantic models dump."""
    ct = pytest.importorskip("compressed_tensors.quantization")
    model = tiny_model()
    out = write(model, quantize(model, 4, group_size, symmetric), tmp_path / "q",
                fmt="compressed-tensors", bits=4, group_size=group_size, symmetric=symmetric)
    ours = json.loads((out / "config.json").read_text())["quantization_config"]
    args = ct.QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, group_size=group_size,
                               strategy="channel" if group_size is None else "group", dynamic=False)
    theirs = ct.QuantizationConfig(
        config_groups={"group_0": ct.QuantizationScheme(targets=["Linear"], weights=args)},
        format="pack-quantized", quantization_status="compressed", ignore=["lm_head"],
    )
    assert ct.QuantizationConfig.model_validate(ours).model_dump() == theirs.model_dump()
    expected_dump = theirs.model_dump(exclude=["quant_method"])
    for key, value in expected_dump.items():
        if key == "config_groups":
            continue
        assert ours[key] == value, key
    theirs_group = expected_dump["config_groups"]["group_0"]
    theirs_group.pop("format", None)  # scheme-level format: omitted for older releases
    assert ours["config_groups"]["group_0"] == theirs_group
    assert ours["version"] == COMPRESSED_TENSORS_LAYOUT_VERSION
    transformers.CompressedTensorsConfig.from_dict({"quantization_config": ours})


def test_compressed_tensors_symmetric_omits_zero_point(tmp_path):
    model = tiny_model()
    out = write(model, quantize(model, 4, None, True), tmp_path / "q", fmt="compressed-tensors",
                bits=4, group_size=None, symmetric=True)
    tensors = read_all(out)
    assert not any(k.endswith("weight_zero_point") for k in tensors)
    assert tuple(tensors["model.layers.0.mlp.down_proj.weight_scale"].shape) == (64, 1)


# ----------------------------------------------------------------------------- GPTQ layout

GPTQ_CASES = [(bits, gs) for bits in (2, 3, 4, 8) for gs in (32, None)]


@pytest.mark.parametrize("bits,group_size", GPTQ_CASES)
def test_gptq_tensors_unpack_to_the_quantized_weights(tmp_path, bits, group_size):
    model = tiny_model()
    quant = quantize(model, bits, group_size, True)
    out = write(model, quant, tmp_path / "q", fmt="gptq", bits=bits, group_size=group_size,
                symmetric=True, dtype=torch.float16)
    tensors = read_all(out)
    for name, (codes, grid) in quant.items():
        n, k = codes.shape
        qweight, qzeros = tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"]
        scales, g_idx = tensors[f"{name}.scales"], tensors[f"{name}.g_idx"]
        assert qweight.dtype == qzeros.dtype == g_idx.dtype == torch.int32
        assert scales.dtype == torch.float16
        assert tuple(scales.shape) == (grid.num_groups, n)
        assert torch.equal(g_idx, (torch.arange(k) // grid.group_size).to(torch.int32))
        got_codes = unpack_gptq_qweight(qweight, bits, k)
        got_zero = unpack_gptq_qzeros(qzeros, bits, n)
        assert torch.equal(got_codes, codes)
        assert torch.equal(got_zero, grid.zero.to(torch.int32))
        assert torch.equal(scales, grid.scale.T.to(torch.float16))
        g = g_idx.long()
        dequant = scales.float().T[:, g] * (got_codes - got_zero[:, g]).float()
        assert torch.equal(dequant, stored_weight(codes, grid, torch.float16))
        assert f"{name}.weight" not in tensors

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((out / "quantize_config.json").read_text())
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym",
                               "checkpoint_format", "lm_head", "pack_dtype")} == {
        "quant_method": "gptq", "bits": bits, "group_size": -1 if group_size is None else group_size,
        "desc_act": False, "sym": True, "checkpoint_format": "gptq", "lm_head": False,
        "pack_dtype": "int32",
    }
    config = transformers.GPTQConfig.from_dict(qc)
    assert config.bits == bits and config.format == "gptq"


def test_gptq_and_compressed_tensors_hold_the_same_words(tmp_path):
    """The identity from checkpoint-formats.md: symmetric 4-bit, K a multiple of 32."""
    model = tiny_model()
    quant = quantize(model, 4, 32, True)
    kw = dict(bits=4, group_size=32, symmetric=True, dtype=torch.float16)
    ct = read_all(write(model, quant, tmp_path / "ct", fmt="compressed-tensors", **kw))
    gq = read_all(write(model, quant, tmp_path / "gptq", fmt="gptq", **kw))
    for name in quant:
        assert torch.equal(ct[f"{name}.weight_packed"], gq[f"{name}.qweight"].T)
        assert torch.equal(ct[f"{name}.weight_scale"], gq[f"{name}.scales"].T)
