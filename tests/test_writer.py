"""checkpoint/writer.py: folders written by CheckpointWriter load through the consuming libraries
(transformers + compressed-tensors on CPU; transformers + gptqmodel when installed) and reproduce
the in-memory quantized model; bad input is refused; writing is atomic and never destroys an
existing checkpoint. (The layouts themselves: test_formats.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from admmq_dist.checkpoint import CheckpointWriter
from admmq_dist.quant.grid import GridSpec, fit_grid

from checkpoints import (
    VOCAB,
    load_ct,
    logits,
    quantize,
    read_all,
    reference,
    rel_err,
    save_source,
    stored_weight,
    tiny_model,
    transformers,
    write,
)

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
