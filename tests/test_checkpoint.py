"""Tests for admmq_dist.checkpoint: folders written by CheckpointWriter load through the consuming
libraries (transformers + compressed-tensors on CPU; transformers + gptqmodel when installed) and
reproduce the in-memory quantized model; the layouts unpack to exactly the quantizer's weights;
writing is atomic and never destroys an existing checkpoint."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from admmq_dist.checkpoint import CheckpointWriter
from admmq_dist.checkpoint.writer import COMPRESSED_TENSORS_LAYOUT_VERSION
from admmq_dist.quant.grid import Grid, GridSpec, fit_grid
from admmq_dist.quant.packing import (
    unpack_compressed_tensors_weight,
    unpack_compressed_tensors_zero_point,
    unpack_gptq_qweight,
    unpack_gptq_qzeros,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

VOCAB = 256
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    # Larger than the 0.02 default so the logits are O(1) and differences are visible.
    initializer_range=0.08,
)


# ----------------------------------------------------------------------------- helpers


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    sizes = {**TINY, **overrides}
    if arch == "llama":
        config = transformers.LlamaConfig(**sizes, tie_word_embeddings=False)
    elif arch == "qwen2":  # biases on q/k/v, tied embeddings
        config = transformers.Qwen2Config(**sizes, tie_word_embeddings=True)
    elif arch == "mistral":
        config = transformers.MistralConfig(**sizes, tie_word_embeddings=False, sliding_window=None)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def save_source(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    return folder


def quantized_linears(model):
    """``{module name: nn.Linear}`` for the linears inside the decoder layers (not lm_head)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    }


def quantize(model, bits: int, group_size: int | None, symmetric: bool):
    """RTN codes on a min-max grid for every decoder linear: ``{name: (codes, grid)}``."""
    spec = GridSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    out = {}
    for name, module in quantized_linears(model).items():
        grid = fit_grid(module.weight.detach(), spec)
        out[name] = (grid.codes(module.weight.detach()), grid)
    return out


def write(model, quant, out: Path, *, fmt: str, bits: int, group_size, symmetric: bool,
          dtype=torch.float16, source: Path | None = None, **kwargs) -> Path:
    skip = set()
    for name in quant:
        skip.add(f"{name}.weight")
        skip.add(f"{name}.bias")
    modules = dict(model.named_modules())
    with CheckpointWriter(out, format=fmt, bits=bits, group_size=group_size,
                          symmetric=symmetric, dtype=dtype, **kwargs) as writer:
        for name, tensor in model.state_dict().items():
            if name not in skip:
                writer.add_tensor(name, tensor)
        for name, (codes, grid) in quant.items():
            writer.add_quantized(name, codes, grid, bias=modules[name].bias)
        return writer.finalize(config=model.config.to_dict(), source_dir=source,
                               ignore=["lm_head"], extra_files={"recipe.yaml": "bits: 4\n"})


def stored_weight(codes, grid: Grid, scale_dtype: torch.dtype) -> torch.Tensor:
    """What a reader reconstructs: ``(code - zero) * scale`` with the scale as stored."""
    g = grid.group_index()
    scale = grid.scale.to(scale_dtype).float()[:, g]
    return scale * (codes.float() - grid.zero[:, g])


def reference(model, quant, dtype, *, exact_scales: bool):
    """The in-memory quantized model as the checkpoint stores it: every tensor rounded to
    ``dtype``, quantized weights replaced by their dequantised codes."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())
        modules = dict(ref.named_modules())
        for name, (codes, grid) in quant.items():
            if exact_scales:
                w = stored_weight(codes, grid, dtype)
            else:  # the brief's reference: dequantise in float32, then round to the model dtype
                w = grid.dequantize(codes).to(dtype).float()
            modules[name].weight.copy_(w)
    return ref


def logits(model) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def load_ct(folder: Path):
    pytest.importorskip("compressed_tensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------- compressed-tensors loads

CT_CASES = [
    (bits, gs, sym)
    for bits in (2, 3, 4, 8)
    for gs in (32, None)
    for sym in (True, False)
]


@pytest.mark.parametrize("bits,group_size,symmetric", CT_CASES)
def test_compressed_tensors_loads_through_transformers_float32(tmp_path, bits, group_size, symmetric):
    """Written in float32, the loaded model is the in-memory quantized model, bit for bit."""
    model = tiny_model()
    quant = quantize(model, bits, group_size, symmetric)
    out = write(model, quant, tmp_path / "q", fmt="compressed-tensors", bits=bits,
                group_size=group_size, symmetric=symmetric, dtype=torch.float32)
    loaded = load_ct(out)
    # The decompressed weights are the quantizer's dequantised weights, bit for bit.
    loaded(input_ids=torch.zeros(1, 1, dtype=torch.long))  # decompresses on the first forward
    loaded_modules = dict(loaded.named_modules())
    for name, (codes, grid) in quant.items():
        torch.testing.assert_close(loaded_modules[name].weight.data, grid.dequantize(codes),
                                   rtol=0, atol=0)
    ref = reference(model, quant, torch.float32, exact_scales=True)
    assert rel_err(logits(loaded), logits(ref)) < 1e-6  # measured: bit-identical logits


def test_asymmetric_loading_fix_is_what_newer_transformers_need(tmp_path):
    """transformers >= 5.23 with compressed-tensors <= 0.20.1 refuses asymmetric pack-quantized
    checkpoints (an upstream bug, admmq_dist/checkpoint/compat.py); the fix makes them load, and
    on older releases loading works either way. Each side runs in a fresh process: the tests'
    own process has the fix in place (conftest)."""
    import subprocess
    import sys

    from packaging.version import Version

    model = tiny_model()
    quant = quantize(model, 4, 32, False)
    out = write(model, quant, tmp_path / "q", fmt="compressed-tensors", bits=4, group_size=32,
                symmetric=False, dtype=torch.float32)
    script = ("import sys, torch, transformers\n"
              "if sys.argv[2] == 'fix':\n"
              "    from admmq_dist.checkpoint.compat import fix_asymmetric_loading\n"
              "    assert fix_asymmetric_loading()\n"
              "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], "
              "dtype=torch.float32)\n"
              "m(input_ids=torch.zeros(1, 1, dtype=torch.long))\n")
    runs = {how: subprocess.run([sys.executable, "-c", script, str(out), how],
                                capture_output=True, text=True, timeout=300)
            for how in ("plain", "fix")}
    assert runs["fix"].returncode == 0, runs["fix"].stderr[-2000:]
    if Version(transformers.__version__) >= Version("5.23"):
        assert runs["plain"].returncode != 0 and "weight_zero_point" in runs["plain"].stderr, (
            "transformers now loads asymmetric checkpoints unaided: the upstream bug is fixed, "
            "retire admmq_dist/checkpoint/compat.py")
    else:
        assert runs["plain"].returncode == 0, runs["plain"].stderr[-2000:]


@pytest.mark.parametrize("bits,group_size,symmetric,dtype", [
    (4, 32, True, torch.float16), (4, 32, False, torch.float16), (8, None, False, torch.float16),
    (2, None, True, torch.float16), (3, 32, False, torch.bfloat16), (4, None, True, torch.bfloat16),
])
def test_compressed_tensors_loads_through_transformers_half(tmp_path, bits, group_size, symmetric, dtype):
    """Written in float16/bfloat16 (scales and dense tensors rounded), loaded in float32."""
    model = tiny_model(seed=bits)
    quant = quantize(model, bits, group_size, symmetric)
    out = write(model, quant, tmp_path / "q", fmt="compressed-tensors", bits=bits,
                group_size=group_size, symmetric=symmetric, dtype=dtype)
    got = logits(load_ct(out))
    # Against a reference with the scales rounded exactly as stored: identical weights
    # (measured: bit-identical logits).
    assert rel_err(got, logits(reference(model, quant, dtype, exact_scales=True))) < 1e-6
    # Against float32 dequantisation rounded to the dtype afterwards, one more rounding per weight
    # (measured up to 1.5e-3 for float16, 9e-3 for bfloat16).
    bound = 5e-3 if dtype == torch.float16 else 3e-2
    assert rel_err(got, logits(reference(model, quant, dtype, exact_scales=False))) < bound


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_compressed_tensors_other_architectures(tmp_path, arch):
    """Qwen2 (q/k/v biases, tied embeddings written twice) and Mistral load too."""
    model = tiny_model(arch)
    quant = quantize(model, 4, 32, False)
    out = write(model, quant, tmp_path / "q", fmt="compressed-tensors", bits=4, group_size=32,
                symmetric=False, dtype=torch.float32)
    ref = reference(model, quant, torch.float32, exact_scales=True)
    assert rel_err(logits(load_ct(out)), logits(ref)) < 1e-6
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in read_all(out)


@pytest.mark.parametrize("bits", [3, 4])
def test_compressed_tensors_per_channel_odd_widths(tmp_path, bits):
    """intermediate_size=100: packed rows and zero-point columns end mid-word; still exact."""
    model = tiny_model(intermediate_size=100)
    quant = quantize(model, bits, None, False)
    out = write(model, quant, tmp_path / "q", fmt="compressed-tensors", bits=bits, group_size=None,
                symmetric=False, dtype=torch.float32)
    ref = reference(model, quant, torch.float32, exact_scales=True)
    assert rel_err(logits(load_ct(out)), logits(ref)) < 1e-6


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


@pytest.mark.gptqmodel
@pytest.mark.parametrize("bits,group_size", [
    (4, 32), (4, None),
    # 6-10 s each here: gptqmodel runs these through its generic TorchLinear kernel.
    pytest.param(3, 32, marks=pytest.mark.slow),
    pytest.param(2, None, marks=pytest.mark.slow),
    pytest.param(8, 32, marks=pytest.mark.slow),
])
def test_gptq_folder_loads_through_transformers(tmp_path, bits, group_size):
    """A real consumer: transformers + optimum + gptqmodel, which picks a CPU kernel."""
    pytest.importorskip("optimum", reason="optimum is not installed (transformers needs it for GPTQ)")
    pytest.importorskip("gptqmodel", reason="gptqmodel is not installed (optional; see the README)")
    model = tiny_model()
    quant = quantize(model, bits, group_size, True)
    src = save_source(model, tmp_path / "src")
    out = write(model, quant, tmp_path / "q", fmt="gptq", bits=bits, group_size=group_size,
                symmetric=True, dtype=torch.float16, source=src)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16,
                                                               device_map="cpu").eval()
    modules = dict(loaded.named_modules())
    for name, (codes, grid) in quant.items():
        module = modules[name]
        assert hasattr(module, "qweight"), f"{name} was not converted to a GPTQ layer"
        if hasattr(module, "dequantize_weight"):  # gptqmodel's own unpacking: [in, out]
            weight = module.dequantize_weight().float().T
            assert torch.equal(weight, stored_weight(codes, grid, torch.float16).half().float())
    ref = reference(model, quant, torch.float16, exact_scales=True)
    # float16 kernel arithmetic against a float32 reference (measured 1e-3 to 9e-3).
    assert rel_err(logits(loaded), logits(ref)) < 2e-2


# ----------------------------------------------------------------------------- refusals


def test_refuses_gptq_asymmetric(tmp_path):
    with pytest.raises(ValueError, match="GPTQ v1 stores zero-1.*--format compressed-tensors or --sym"):
        CheckpointWriter(tmp_path / "q", format="gptq", bits=4, group_size=32, symmetric=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bits", [1, 5, 16, True, 4.0])
def test_refuses_bad_bits(tmp_path, bits):
    with pytest.raises(ValueError, match="bits"):
        CheckpointWriter(tmp_path / "q", format="compressed-tensors", bits=bits, group_size=32,
                         symmetric=True)


def test_refuses_bad_arguments(tmp_path):
    kw = dict(bits=4, group_size=32, symmetric=True)
    with pytest.raises(ValueError, match="format"):
        CheckpointWriter(tmp_path / "q", format="awq", **kw)
    with pytest.raises(ValueError, match="group_size"):
        CheckpointWriter(tmp_path / "q", format="gptq", bits=4, group_size=0, symmetric=True)
    with pytest.raises(ValueError, match="dtype"):
        CheckpointWriter(tmp_path / "q", format="gptq", dtype=torch.int8, **kw)
    with pytest.raises(ValueError, match="max_shard_bytes"):
        CheckpointWriter(tmp_path / "q", format="gptq", max_shard_bytes=0, **kw)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_refuses_ragged_groups_naming_the_layer(tmp_path, fmt):
    weight = torch.randn(32, 80)  # 80 = 2 * 32 + 16: a ragged last group of 16
    grid = fit_grid(weight, GridSpec(bits=4, group_size=32, symmetric=True))
    with CheckpointWriter(tmp_path / "q", format=fmt, bits=4, group_size=32, symmetric=True) as w:
        with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.down_proj.*in_features=80.*ragged"):
            w.add_quantized("model.layers.3.mlp.down_proj", grid.codes(weight), grid)
    assert not (tmp_path / "q").exists()


def test_refuses_grids_the_writer_does_not_describe(tmp_path):
    weight = torch.randn(32, 64)
    asym = fit_grid(weight, GridSpec(bits=4, group_size=32, symmetric=False))
    other_gs = fit_grid(weight, GridSpec(bits=4, group_size=64, symmetric=True))
    other_bits = fit_grid(weight, GridSpec(bits=8, group_size=32, symmetric=True))
    with CheckpointWriter(tmp_path / "q", format="compressed-tensors", bits=4, group_size=32,
                          symmetric=True) as w:
        with pytest.raises(ValueError, match="zero points are not all 8"):
            w.add_quantized("a", asym.codes(weight), asym)
        with pytest.raises(ValueError, match="group size 64"):
            w.add_quantized("a", other_gs.codes(weight), other_gs)
        with pytest.raises(ValueError, match="8 bits"):
            w.add_quantized("a", other_bits.codes(weight), other_bits)
        sym = fit_grid(weight, GridSpec(bits=4, group_size=32, symmetric=True))
        with pytest.raises(ValueError, match="codes must lie in"):
            w.add_quantized("a", sym.codes(weight) + 16, sym)
        with pytest.raises(ValueError, match="shape"):
            w.add_quantized("a", sym.codes(weight)[:, :32], sym)
        with pytest.raises(ValueError, match="without '.weight'"):
            w.add_quantized("a.weight", sym.codes(weight), sym)


def test_refuses_gptq_dimensions_that_are_not_whole_packing_blocks(tmp_path):
    weight = torch.randn(36, 64)  # 36 output rows: not a multiple of 8 nibbles per word
    grid = fit_grid(weight, GridSpec(bits=4, group_size=32, symmetric=True))
    with CheckpointWriter(tmp_path / "q", format="gptq", bits=4, group_size=32, symmetric=True) as w:
        with pytest.raises(ValueError, match="layer0.*out_features=36"):
            w.add_quantized("layer0", grid.codes(weight), grid)


def test_refuses_duplicates_and_dense_weights_of_quantized_modules(tmp_path):
    weight = torch.randn(32, 64)
    grid = fit_grid(weight, GridSpec(bits=4, group_size=32, symmetric=True))
    with CheckpointWriter(tmp_path / "q", format="compressed-tensors", bits=4, group_size=32,
                          symmetric=True) as w:
        w.add_tensor("x.weight", weight)
        with pytest.raises(ValueError, match="already written"):
            w.add_tensor("x.weight", weight)
        with pytest.raises(ValueError, match="dense weight was already added"):
            w.add_quantized("x", grid.codes(weight), grid)
        w.add_quantized("y", grid.codes(weight), grid)
        with pytest.raises(ValueError, match="already written quantized"):
            w.add_tensor("y.weight", weight)
        with pytest.raises(ValueError, match="already written"):
            w.add_quantized("y", grid.codes(weight), grid)


# ----------------------------------------------------------------------------- atomicity and safety


def small_writer(out: Path, **kwargs) -> CheckpointWriter:
    kwargs.setdefault("format", "compressed-tensors")
    return CheckpointWriter(out, bits=4, group_size=32, symmetric=True, **kwargs)


def fill(writer: CheckpointWriter, layers: int = 3) -> None:
    gen = torch.Generator().manual_seed(0)
    writer.add_tensor("model.embed_tokens.weight", torch.randn(VOCAB, 64, generator=gen))
    for i in range(layers):
        weight = torch.randn(64, 64, generator=gen)
        grid = fit_grid(weight, GridSpec(bits=4, group_size=32, symmetric=True))
        writer.add_quantized(f"model.layers.{i}.mlp.up_proj", grid.codes(weight), grid)
        writer.add_tensor(f"model.layers.{i}.input_layernorm.weight", torch.ones(64))


def finalize(writer: CheckpointWriter, **kwargs) -> Path:
    kwargs.setdefault("ignore", ["lm_head"])
    return writer.finalize(config={"model_type": "llama"}, source_dir=None, **kwargs)


def test_abort_and_unfinished_writes_leave_no_out_dir(tmp_path):
    out = tmp_path / "q"
    writer = small_writer(out, max_shard_bytes=1000)
    fill(writer)
    assert writer.temp_dir.is_dir() and any(writer.temp_dir.glob("*.safetensors"))
    # Not finalized (a killed run): only a hidden temporary folder exists, with no config.json.
    assert not out.exists()
    assert writer.temp_dir.name.startswith(".") and not (writer.temp_dir / "config.json").exists()
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    writer.abort()  # idempotent
    with pytest.raises(RuntimeError, match="aborted"):
        writer.add_tensor("z", torch.ones(1))

    with pytest.raises(KeyError):
        with small_writer(out) as w:
            fill(w)
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_out_dir_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        small_writer(out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        small_writer(tmp_path / "file", overwrite=True)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="does not look like a checkpoint"):
        small_writer(tmp_path / "home", overwrite=True)


def test_overwrite_replaces_the_old_checkpoint_only_at_finalize(tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "old-marker").write_text("old")

    writer = small_writer(out, overwrite=True)
    fill(writer)
    assert (out / "old-marker").read_text() == "old"
    writer.abort()  # a failed run: the old checkpoint survives
    assert (out / "old-marker").read_text() == "old"

    # A failure inside finalize (here: a quantized module listed in ignore) also keeps it.
    writer = small_writer(out, overwrite=True)
    fill(writer)
    with pytest.raises(ValueError, match="matches ignore entry"):
        finalize(writer, ignore=["lm_head", "re:.*up_proj"])
    assert (out / "old-marker").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]

    writer = small_writer(out, overwrite=True)
    fill(writer)
    assert finalize(writer) == out.absolute()
    assert not (out / "old-marker").exists()
    assert (out / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no leftovers beside it


def test_small_max_shard_bytes_gives_several_consistent_shards(tmp_path):
    out = tmp_path / "q"
    writer = small_writer(out, max_shard_bytes=3000)
    fill(writer, layers=4)
    finalize(writer, extra_files={"report.jsonl": '{"layer": 0}\n', "bin/blob": b"\x00\x01"})
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 4
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors, where = {}, {}
    for shard in shards:
        with safe_open(out / shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
                where[key] = shard
    assert index["weight_map"] == where
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for i in range(4):  # a module's tensors stay together
        m = f"model.layers.{i}.mlp.up_proj"
        assert where[f"{m}.weight_packed"] == where[f"{m}.weight_scale"] == where[f"{m}.weight_shape"]
    assert (out / "report.jsonl").read_text() == '{"layer": 0}\n'
    assert (out / "bin" / "blob").read_bytes() == b"\x00\x01"
    assert not any(p.name.endswith(".partial.safetensors") for p in out.iterdir())


def test_finalize_validates_its_inputs(tmp_path):
    writer = small_writer(tmp_path / "q")
    with pytest.raises(ValueError, match="no quantized module"):
        finalize(writer)
    writer = small_writer(tmp_path / "q")
    fill(writer)
    with pytest.raises(ValueError, match="extra file name"):
        finalize(writer, extra_files={"config.json": "{}"})
    assert list(tmp_path.iterdir()) == []
    writer = small_writer(tmp_path / "q")
    fill(writer)
    with pytest.raises(ValueError, match="already has a quantization_config"):
        writer.finalize(config={"quantization_config": {}}, source_dir=None, ignore=[])
    # GPTQ configs have no ignore list: readers convert every linear in the blocks, so callers
    # check the dense ones they would keep before any work.
    writer = small_writer(tmp_path / "q", format="gptq")
    with pytest.raises(ValueError, match="use --format compressed-tensors"):
        writer.check_ignore_entries(["lm_head", "model.layers.0.mlp.down_proj"])
    writer.check_ignore_entries(["lm_head"])
    writer.abort()
    assert list(tmp_path.iterdir()) == []
