"""admmq_dist.checkpoint.inspect: summaries of real checkpoints written by the pipeline, and the
verifier's verdict on them and on deliberately damaged copies."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import sample_text, tiny_model_dir

from admmq_dist.checkpoint.inspect import format_inspection, inspect_checkpoint
from admmq_dist.checkpoint.manifest import MANIFEST_NAME
from admmq_dist.checkpoint.verify import verify_checkpoint
from admmq_dist.recipe import Recipe, override
from admmq_dist.run.job import quantize_model

LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down
LAYERS = 2


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    text = root / "calib.txt"
    text.write_text(sample_text())
    return {
        "text": text,
        "llama": tiny_model_dir(root / "llama", "llama"),
        # down_proj has 80 inputs: at 3 bits a row is 240 bits, so its last word has 16 padding bits.
        "llama80": tiny_model_dir(root / "llama80", "llama", intermediate_size=80),
    }


def build(sources, out: Path, model: str, grid: dict, fmt: str, **output) -> Path:
    recipe = override(Recipe(), {
        "grid": grid,
        "solver": {"method": "rtn"},
        "calibration": {"num_samples": 4, "seq_len": 32, "batch_size": 4,
                        "dataset": str(sources["text"])},
        "output": {"format": fmt, "dtype": "float16", **output},
        "report": {"html": False},
    })
    quantize_model(str(sources[model]), out, recipe, device=torch.device("cpu"), progress=False)
    return out


@pytest.fixture(scope="module")
def checkpoints(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "ct_asym4": build(sources, root / "ct_asym4", "llama",
                          {"bits": 4, "group_size": 32, "symmetric": False}, "compressed-tensors"),
        "ct_sym3": build(sources, root / "ct_sym3", "llama80",
                         {"bits": 3, "group_size": None, "symmetric": True}, "compressed-tensors"),
        # Small shards, so that one can go missing while the others stay readable.
        "gptq4": build(sources, root / "gptq4", "llama",
                       {"bits": 4, "group_size": 32, "symmetric": True}, "gptq",
                       max_shard_gb=30e3 / 1024**3),
    }


def damaged(checkpoints, name: str, tmp_path: Path) -> Path:
    """A copy to damage, without its manifest: these tests pin the layout checks' own lines, as
    on a checkpoint written before manifests (tests/test_manifest.py checks the digests)."""
    copy = tmp_path / name
    shutil.copytree(checkpoints[name], copy)
    (copy / MANIFEST_NAME).unlink()
    return copy


def shard_of(folder: Path, tensor: str) -> Path:
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return folder / weight_map[tensor]


def edit(folder: Path, tensor: str, change) -> None:
    """Rewrite ``tensor`` in its shard as ``change(tensor)`` returns it."""
    path = shard_of(folder, tensor)
    tensors = load_file(str(path))
    tensors[tensor] = change(tensors[tensor].clone()).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def source_params(folder: Path) -> int:
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys())
    return total


# ----------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("name, fmt, bits, group, symmetric", [
    ("ct_asym4", "compressed-tensors", 4, 32, False),
    ("ct_sym3", "compressed-tensors", 3, None, True),
    ("gptq4", "gptq", 4, 32, True),
])
def test_inspect_reports_the_settings_modules_and_sizes(checkpoints, sources, name, fmt, bits,
                                                       group, symmetric):
    folder = checkpoints[name]
    info = inspect_checkpoint(folder)
    assert (info["format"], info["bits"], info["group_size"], info["symmetric"]) == (
        fmt, bits, group, symmetric)
    assert info["dtype"] == "float16"
    modules = info["quantized_modules"]
    assert len(modules) == LAYERS * LINEARS_PER_LAYER and modules == sorted(modules)
    assert "model.layers.1.mlp.down_proj" in modules
    assert info["skipped_modules"] == ["lm_head"]
    if fmt == "compressed-tensors":
        assert info["ignore"] == ["lm_head"]

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert info["tensor_bytes"] == index["metadata"]["total_size"]
    assert info["num_shards"] == len(set(index["weight_map"].values()))
    assert (info["num_shards"] > 1) == (name == "gptq4")
    assert info["size_on_disk_bytes"] > info["tensor_bytes"]
    # Every source tensor is floating, so at 16 bits the model takes 2 bytes per parameter.
    model = "llama80" if name == "ct_sym3" else "llama"
    assert info["unquantized_bytes_estimate"] == 2 * source_params(sources[model])
    assert info["compression_ratio"] == pytest.approx(
        info["unquantized_bytes_estimate"] / info["tensor_bytes"])
    assert info["compression_ratio"] > 1
    assert info["recipe"]["solver"]["method"] == "rtn"
    assert info["recipe"]["grid"]["bits"] == bits

    text = format_inspection(info)
    assert fmt in text and f"{bits}-bit" in text
    assert ("per-channel" if group is None else f"group size {group}") in text
    assert ("asymmetric" if not symmetric else "symmetric") in text
    assert "14 quantized, 1 skipped (lm_head)" in text
    # What serves where, as the CLI warns and the README's table says (checkpoint/serving.py).
    reader = "transformers" if fmt == "compressed-tensors" else "transformers + GPTQModel"
    assert info["served_by"] == {"vLLM 0.33.0": "yes" if bits != 3 or fmt != "gptq" else "no",
                                 reader: "yes"}
    assert "Serves in:   vLLM 0.33.0: yes" in text
    assert f"{info['compression_ratio']:.1f}x" in text
    assert "MB" in text and "method rtn" in text


def test_format_inspection_truncates_long_lists():
    info = {"path": "x", "format": "gptq", "bits": 4, "group_size": 128, "symmetric": True,
            "dtype": "float16", "quantized_modules": ["a"] * 3,
            "skipped_modules": [f"m{i}" for i in range(40)], "ignore": [], "num_shards": 2,
            "size_on_disk_bytes": 3 * 10**9, "tensor_bytes": 2 * 10**9,
            "unquantized_bytes_estimate": 7 * 10**9, "compression_ratio": 3.5, "recipe": None}
    text = format_inspection(info)
    assert "3 quantized, 40 skipped" in text and "m39" not in text and "(34 more)" in text
    assert "3.00 GB" in text and "3.5x" in text


def test_inspect_refuses_what_is_not_a_quantized_checkpoint(sources, tmp_path):
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        inspect_checkpoint(sources["llama"])
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        verify_checkpoint(sources["llama"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inspect_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        verify_checkpoint(tmp_path / "empty")


# ----------------------------------------------------------------------------- verify


@pytest.mark.parametrize("name", ["ct_asym4", "ct_sym3", "gptq4"])
def test_verify_passes_the_pipelines_checkpoints(checkpoints, name):
    assert verify_checkpoint(checkpoints[name]) == []


def test_verify_passes_a_moe_checkpoint(sources, tmp_path):
    """Mixtral's checkpoint names (block_sparse_moe, per-expert w1/w2/w3) differ from the module
    tree transformers builds (mlp, fused experts): no false problems."""
    src = tiny_model_dir(tmp_path / "mixtral", "mixtral")
    out = build({**sources, "mixtral": src}, tmp_path / "out", "mixtral",
                {"bits": 4, "group_size": 32, "symmetric": True}, "compressed-tensors")
    assert verify_checkpoint(out) == []
    info = inspect_checkpoint(out)
    assert len(info["quantized_modules"]) == LAYERS * (4 + 4 * 3)
    assert "model.layers.0.block_sparse_moe.experts.3.w2" in info["quantized_modules"]
    assert "model.layers.0.block_sparse_moe.gate" in info["skipped_modules"]
    assert info["served_by"] == {"vLLM 0.33.0": "yes", "transformers": "yes"}
    # The Qwen3-MoE bug class: a router stored dense but missing from the ignore list.
    (out / MANIFEST_NAME).unlink()  # the layout check's lines alone, not config.json's digest
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["ignore"] = ["lm_head"]
    (out / "config.json").write_text(json.dumps(config))
    problems = verify_checkpoint(out)
    assert len(problems) == LAYERS and all("not named in the ignore list" in p for p in problems)
    assert problems[0].startswith("model.layers.0.block_sparse_moe.gate: ")


def test_a_tensor_missing_from_the_index(checkpoints, tmp_path):
    folder = damaged(checkpoints, "ct_asym4", tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.0.self_attn.q_proj.weight_scale"]
    index_path.write_text(json.dumps(index))
    problems = verify_checkpoint(folder)
    assert len(problems) == 1, problems
    assert problems[0].startswith("model.layers.0.self_attn.q_proj.weight_scale: ")
    assert "missing from the weight_map" in problems[0]


@pytest.mark.parametrize("value, words", [(-1.0, "zero or negative"), (float("nan"), "NaN")])
def test_bad_scales(checkpoints, tmp_path, value, words):
    folder = damaged(checkpoints, "ct_asym4", tmp_path)
    name = "model.layers.1.mlp.up_proj.weight_scale"

    def poison(t):
        t[3, 1] = value
        return t

    edit(folder, name, poison)
    problems = verify_checkpoint(folder)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{name}: 1 scale(s)") and words in problems[0]
    assert "[3, 1]" in problems[0]


def test_bad_gptq_scales(checkpoints, tmp_path):
    folder = damaged(checkpoints, "gptq4", tmp_path)
    name = "model.layers.0.mlp.gate_proj.scales"
    edit(folder, name, lambda t: -t)
    problems = verify_checkpoint(folder)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{name}: {2 * 128} scale(s) are zero or negative (first at [0, 0]")


def test_wrong_weight_shape(checkpoints, tmp_path):
    folder = damaged(checkpoints, "ct_asym4", tmp_path)
    name = "model.layers.0.mlp.down_proj.weight_shape"
    edit(folder, name, lambda t: torch.tensor([64, 96], dtype=torch.int64))
    problems = verify_checkpoint(folder)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{name}: holds [64, 96]") and "[64, 128]" in problems[0]


def test_garbage_padding_bits_in_a_three_bit_row(checkpoints, tmp_path):
    folder = damaged(checkpoints, "ct_sym3", tmp_path)
    name = "model.layers.1.mlp.down_proj.weight_packed"
    with safe_open(str(shard_of(folder, name)), "pt") as f:
        assert f.get_slice(name).get_shape() == [64, 8]  # 80 codes * 3 bits = 7.5 words

    def garbage(t):
        t[5, 7] |= torch.tensor(-2**31, dtype=torch.int32)  # bit 31: past code 79's bits
        return t

    edit(folder, name, garbage)
    problems = verify_checkpoint(folder)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{name}: 1 word(s) do not survive")
    assert "[5, 7]" in problems[0] and "padding bits" in problems[0]


def test_gptq_zero_points_that_are_not_symmetric(checkpoints, tmp_path):
    folder = damaged(checkpoints, "gptq4", tmp_path)
    name = "model.layers.1.self_attn.o_proj.qzeros"
    edit(folder, name, lambda t: t ^ 1)  # the first output's zero becomes 2**(bits-1) ± 1
    problems = verify_checkpoint(folder)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{name}: ") and "not 8 as a symmetric grid's are" in problems[0]


def test_a_missing_shard(checkpoints, tmp_path):
    folder = damaged(checkpoints, "gptq4", tmp_path)
    shard = shard_of(folder, "model.layers.1.mlp.up_proj.qweight")
    shard.unlink()
    problems = verify_checkpoint(folder)
    assert len(problems) == 1, problems  # its tensors are not reported once more each
    assert problems[0].startswith(f"{shard.name}: shard file named in model.safetensors.index.json "
                                  "is missing")


def test_a_scale_stored_in_the_wrong_dtype(checkpoints, tmp_path):
    folder = damaged(checkpoints, "ct_sym3", tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight_scale"
    edit(folder, name, lambda t: t.float())
    problems = verify_checkpoint(folder)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{name}: dtype F32, expected F16")


def test_a_dense_tensor_with_the_wrong_shape_or_missing(checkpoints, tmp_path):
    folder = damaged(checkpoints, "ct_asym4", tmp_path)
    edit(folder, "model.norm.weight", lambda t: t[:32])
    path = shard_of(folder, "model.layers.0.input_layernorm.weight")
    tensors = load_file(str(path))
    del tensors["model.layers.0.input_layernorm.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    problems = verify_checkpoint(folder)
    assert sorted(problems) == sorted([
        ("model.layers.0.input_layernorm.weight: model.safetensors.index.json maps it to "
         f"{path.name}, which does not contain it"),
        "model.norm.weight: shape [32], but the model built from config.json expects [64]",
    ])


def test_max_problems_caps_the_list(checkpoints, tmp_path):
    folder = damaged(checkpoints, "ct_asym4", tmp_path)
    names = [f"model.layers.{b}.mlp.{p}.weight_scale" for b in range(2)
             for p in ("gate_proj", "up_proj", "down_proj")]
    for name in names:
        edit(folder, name, lambda t: t * float("nan"))
    assert len(verify_checkpoint(folder)) == len(names)
    problems = verify_checkpoint(folder, max_problems=2)
    assert len(problems) == 3
    assert all("NaN" in p for p in problems[:2])
    assert "more problems were not listed" in problems[2]


def test_a_tensor_stored_in_two_shards(checkpoints, tmp_path):
    folder = damaged(checkpoints, "gptq4", tmp_path)
    name = "model.layers.0.self_attn.q_proj.qweight"
    home = shard_of(folder, name)
    other = next(p for p in sorted(folder.glob("*.safetensors")) if p != home)
    tensors = load_file(str(other))
    tensors[name] = load_file(str(home))[name]
    save_file(tensors, str(other), metadata={"format": "pt"})
    problems = verify_checkpoint(folder)
    assert problems == [f"{name}: stored in more than one shard "
                        f"({', '.join(sorted([home.name, other.name]))})"]


def test_the_commands_print_and_exit_as_documented(checkpoints, tmp_path, capsys):
    from admmq_dist.cli import main

    good = checkpoints["gptq4"]
    assert main(["inspect", str(good)]) == 0
    text = capsys.readouterr().out
    assert "gptq" in text and "4-bit" in text and "14 quantized" in text and "lm_head" in text
    assert main(["inspect", str(good), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["bits"] == 4 and info["group_size"] == 32 and len(info["quantized_modules"]) == 14
    assert main(["verify", str(good)]) == 0
    assert "OK" in capsys.readouterr().err
    bad = damaged(checkpoints, "ct_asym4", tmp_path)
    edit(bad, "model.layers.1.mlp.up_proj.weight_scale", lambda t: -t)
    assert main(["verify", str(bad), "--json"]) == 1
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["ok"] is False
    assert result["problems"][0].startswith("model.layers.1.mlp.up_proj.weight_scale")
    assert "failed verification" in captured.err and "up_proj.weight_scale" in captured.err
    assert main(["verify", str(tmp_path / "nothing")]) == 1
    assert "does not exist" in capsys.readouterr().err
