"""vLLM conformance: every layout the CLI writes without a warning goes through vLLM's own config
parsing, model classes, quantization schemes and weight loaders, and vLLM holds exactly what we
wrote (tests/vllm_conformance.py says how). Runs where vLLM is installed: CI's vLLM environment
(``pytest -m vllm``); skipped elsewhere. The kernels themselves need a GPU; their choice is made
as on an H100/H200 and an A100.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (CI runs these in .venv-vllm)")

from admmq_dist.checkpoint.serving import Layout, vllm_gaps  # noqa: E402
from admmq_dist.run.job import quantize_model  # noqa: E402
from admmq_dist.recipe import Recipe, override  # noqa: E402

from tiny import tiny_model_dir  # noqa: E402
from vllm_conformance import (  # noqa: E402
    CAPABILITIES, ConformanceError, check_with_vllm, kernels_at_real_shapes)

pytestmark = pytest.mark.vllm

FAST = {"calibration": {"dataset": None, "num_samples": 4, "seq_len": 32, "batch_size": 4},
        "report": {"html": False}}
# Wide enough for vLLM's Marlin kernels (hidden % 128), small enough for seconds per model.
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                      shared_expert_intermediate_size=256, decoder_sparse_step=1),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                      decoder_sparse_step=1, norm_topk_prob=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    # DeepSeek-V3-style: multi-head latent attention, a dense first block, shared experts, the
    # router's score-correction bias (noaux_tc), as the real configs set it.
    "deepseek_v3": dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=128, n_shared_experts=1, first_k_dense_replace=1,
                        kv_lora_rank=64, q_lora_rank=64, qk_rope_head_dim=16,
                        qk_nope_head_dim=16, v_head_dim=32, n_group=1, topk_group=1,
                        topk_method="noaux_tc", scoring_func="sigmoid"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    cache = {}

    def get(arch: str, dtype=torch.bfloat16) -> Path:
        key = (arch, dtype)
        if key not in cache:
            extra = {**SHAPE, **MOE.get(arch, {})}
            cache[key] = tiny_model_dir(root / f"{arch}-{str(dtype)[6:]}", arch, dtype=dtype,
                                        **extra)
        return cache[key]
    return get


def quantize(src: Path, out: Path, **updates) -> dict:
    recipe = override(Recipe(), {**FAST, "solver": {"method": "rtn"}, **updates})
    return quantize_model(str(src), out, recipe, device=torch.device("cpu"), progress=False)


DENSE = [("compressed-tensors", bits, gs, sym)
         for bits in (2, 3, 4, 8) for gs in (32, None) for sym in (True, False)]
DENSE += [("gptq", bits, 32, True) for bits in (4, 8)]


@pytest.mark.parametrize("fmt,bits,group_size,symmetric", DENSE)
def test_every_dense_layout_loads_into_vllm_exactly(models, tmp_path, fmt, bits, group_size,
                                                    symmetric):
    out = tmp_path / "q"
    summary = quantize(models("llama"), out, output={"format": fmt},
                       grid={"bits": bits, "group_size": group_size, "symmetric": symmetric})
    assert summary["notes"] == []  # the CLI accepts it without a warning...
    result = check_with_vllm(out)  # ...so vLLM must serve it
    assert result.refused == {}
    assert result.quantization == ("compressed-tensors" if fmt == "compressed-tensors"
                                   else "auto_gptq")
    assert result.dtype == torch.bfloat16  # a bfloat16 model is served in bfloat16
    assert result.compared_layers == 2 * 7  # q, k, v, o, gate, up, down per block
    assert result.compared_dense == 7  # embeddings, 4 block norms, final norm, lm_head


def test_gptq_with_act_order_conforms_too(models, tmp_path):
    """GPTQ's act-order changes the solve, not the layout (static groups, trivial g_idx)."""
    for act_order in (True, False):
        out = tmp_path / f"act-{act_order}"
        quantize(models("llama"), out, output={"format": "gptq"},
                 solver={"method": "gptq", "gptq": {"act_order": act_order}},
                 grid={"bits": 4, "group_size": 32})
        assert check_with_vllm(out).compared_layers == 14


@pytest.mark.parametrize("arch", list(MOE))
def test_defaults_on_every_moe_family_load_into_vllm_exactly(models, tmp_path, arch):
    """No grid flags: the defaults must be served (Qwen3-MoE's router, a TopKRouter module in
    transformers and a quantizable GateLinear in vLLM, must be named in the ignore list)."""
    out = tmp_path / "q"
    summary = quantize(models(arch), out, grid={"group_size": 32})
    result = check_with_vllm(out)
    assert result.compared_layers == summary["layers"]
    assert result.refused == {}
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert any(entry.endswith("mlp.gate") for entry in ignore)


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_every_moe_bit_width_the_cli_accepts_loads_into_vllm(models, tmp_path, arch, bits):
    """Grouped symmetric experts at every width (4 is the defaults' test above)."""
    out = tmp_path / "q"
    summary = quantize(models(arch), out, grid={"bits": bits, "group_size": 32})
    assert [n for n in summary["notes"] if "will not serve" in n] == []
    result = check_with_vllm(out)
    assert result.compared_layers == summary["layers"]
    assert result.refused == {}


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "mixtral"])
def test_fp4_checkpoints_load_into_vllm_exactly(models, tmp_path, arch, kind):
    """NVFP4 and MXFP4 (issue 28), dense and mixture-of-experts: vLLM's FP4 schemes load every
    tensor and hold exactly our weights (NVFP4: one global scale per fused linear)."""
    out = tmp_path / "q"
    summary = quantize(models(arch), out, grid={"kind": kind})
    assert [n for n in summary["notes"] if n.startswith("vLLM")] == []
    result = check_with_vllm(out)
    assert result.compared_layers == summary["layers"]
    assert result.refused == {}
    name = {"nvfp4": "NvFp4", "mxfp4": "MxFp4"}[kind]
    # Weight-only FP4 as vLLM chooses on each GPU: on sm100 NVFP4 takes FlashInfer's CuTe-DSL
    # BF16 x FP4 GEMM (its pinned flashinfer present), MXFP4 stays on Marlin.
    sm100 = {"nvfp4": "FlashInferCuteDslNvFp4W4A16LinearKernel",
             "mxfp4": "MarlinMxFp4LinearKernel"}[kind]
    assert {tuple(sorted(choice.items())) for layer, choice in result.kernels.items()
            if layer.endswith("[fp4-linear]")} == {
        ((80, f"Marlin{name}LinearKernel"), (90, f"Humming{name}LinearKernel"), (100, sm100))}
    if kind == "nvfp4" and arch != "llama":
        # FlashInfer's NVFP4 MoE kernels take FP4 activations only: Marlin on sm100 as on sm80.
        assert {tuple(sorted(choice.items())) for layer, choice in result.kernels.items()
                if layer.endswith("[fp4-moe]")} == {
            ((80, "MARLIN/MarlinExperts"), (90, "HUMMING/HummingIndexedExperts"),
             (100, "MARLIN/MarlinExperts"))}


def test_the_check_fails_on_nvfp4_fused_linears_with_different_global_scales(tmp_path,
                                                                            monkeypatch):
    """vLLM serves q/k/v with one global scale: with k_proj's weights 16x louder than q's and
    each linear written under its own, the check refuses the checkpoint."""
    from admmq_dist.checkpoint import fp4_layout
    from admmq_dist.quant import fp4
    from admmq_dist.run import layer, worker

    src = tiny_model_dir(tmp_path / "src", "llama", dtype=torch.bfloat16, **SHAPE)
    from safetensors.torch import load_file, save_file

    weights = src / "model.safetensors"
    tensors = load_file(weights)
    for name in tensors:
        if name.endswith("k_proj.weight"):
            tensors[name] = tensors[name] * 16
    save_file(tensors, weights, metadata={"format": "pt"})
    quantize(src, tmp_path / "shared", grid={"kind": "nvfp4"})
    check_with_vllm(tmp_path / "shared")
    # Each linear fitted and written under its own global scale, as a writer unaware of vLLM's
    # fusing would.
    monkeypatch.setattr(layer, "fused_global_scales",
                        lambda scales: {n: fp4.nvfp4_global_scale(s) for n, s in scales.items()})
    monkeypatch.setattr(worker, "served_grid",
                        lambda weight, recipe, dtype, name, fused=(): layer.served_grid(
                            weight, recipe, dtype, name))
    quantize(src, tmp_path / "own", grid={"kind": "nvfp4"})
    with pytest.raises(ConformanceError, match="different NVFP4 global scales"):
        check_with_vllm(tmp_path / "own")
    assert fp4_layout.FORMATS["nvfp4"] in (tmp_path / "own" / "config.json").read_text()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_asymmetric_experts_load_their_zero_points_into_vllm(models, tmp_path, arch):
    out = tmp_path / "q"
    summary = quantize(models(arch), out, grid={"bits": 4, "group_size": 32, "symmetric": False})
    assert [n for n in summary["notes"] if n.startswith("transformers will not serve")]
    result = check_with_vllm(out)
    assert result.compared_layers == summary["layers"]


def test_gptq_moe_loads_into_vllm(models, tmp_path):
    out = tmp_path / "q"
    summary = quantize(models("mixtral"), out, output={"format": "gptq"},
                       grid={"bits": 4, "group_size": 32})
    assert check_with_vllm(out).compared_layers == summary["layers"]


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_float16_models_are_served_in_float16(models, tmp_path, fmt):
    out = tmp_path / "q"
    quantize(models("qwen3", torch.float16), out, output={"format": fmt},
             grid={"bits": 4, "group_size": 32})
    assert check_with_vllm(out).dtype == torch.float16


def test_the_check_fails_on_checkpoints_vllm_would_mis_serve(models, tmp_path):
    """The check can fail: a router missing from the ignore list (the Qwen3-MoE bug), a scale
    vLLM would hold differently from ours, a tensor vLLM never loads."""
    from safetensors.torch import load_file, save_file

    good = tmp_path / "good"
    quantize(models("qwen3_moe"), good, grid={"bits": 4, "group_size": 32, "symmetric": True})
    check_with_vllm(good)

    def variant(name, edit_config=None, edit_tensors=None):
        folder = tmp_path / name
        folder.mkdir()
        for file in good.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        if edit_config:
            config = json.loads((folder / "config.json").read_text())
            edit_config(config)
            (folder / "config.json").write_text(json.dumps(config))
        if edit_tensors:
            shard = next(folder.glob("*.safetensors"))
            tensors = load_file(shard)
            edit_tensors(tensors)
            save_file(tensors, shard, metadata={"format": "pt"})
            index = folder / "model.safetensors.index.json"
            data = json.loads(index.read_text())
            data["weight_map"] = {k: shard.name for k in tensors}
            index.write_text(json.dumps(data))
        return folder

    def forget_routers(config):
        config["quantization_config"]["ignore"] = ["lm_head"]

    with pytest.raises(ConformanceError, match=r"mlp\.gate"):
        check_with_vllm(variant("routers", edit_config=forget_routers))

    # A zero point packed along the wrong dimension (the inputs' groups, not the outputs).
    asym = tmp_path / "asym"
    quantize(models("qwen3_moe"), asym, grid={"bits": 4, "group_size": 32, "symmetric": False})
    check_with_vllm(asym)
    good = asym

    def zero_points_along_groups(tensors):
        from admmq_dist.quant.packing import (pack_compressed_tensors_weight,
                                              unpack_compressed_tensors_zero_point)
        name = "model.layers.0.self_attn.o_proj"
        rows = int(tensors[f"{name}.weight_shape"][0])
        zero = unpack_compressed_tensors_zero_point(tensors[f"{name}.weight_zero_point"], 4, rows)
        tensors[f"{name}.weight_zero_point"] = pack_compressed_tensors_weight(zero, 4)

    with pytest.raises(ConformanceError, match="weight_zero_point"):
        check_with_vllm(variant("zero-points", edit_tensors=zero_points_along_groups))

    # vLLM placing a shard where another belongs (as a layout misunderstanding would): simulated
    # by swapping the k and v shards in its loader; the values then differ from ours.
    from vllm.model_executor.layers.linear import QKVParallelLinear

    original = QKVParallelLinear.weight_loader_v2

    def swapped(self, param, loaded_weight, loaded_shard_id=None):
        return original(self, param, loaded_weight,
                        {"k": "v", "v": "k"}.get(loaded_shard_id, loaded_shard_id))

    with mock.patch.object(QKVParallelLinear, "weight_loader_v2", swapped), \
            pytest.raises(ConformanceError, match="differs from ours"):
        check_with_vllm(good)

    def stray_tensor(tensors):
        tensors["model.layers.0.mlp.gate.weight_extra"] = torch.zeros(2)

    with pytest.raises(ConformanceError):
        check_with_vllm(variant("stray", edit_tensors=stray_tensor))


def test_serving_rules_match_vllm_at_real_shapes(tmp_path):
    """admmq_dist/checkpoint/serving.py (the CLI's warnings, `admmq inspect`) says exactly where
    vLLM refuses, for a dense and a mixture-of-experts model of real size."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from vllm_kernels import MODELS, layouts, quantization_config

    for name, experts in (("Llama-3.1-8B", False), ("Mixtral-8x7B", True)):
        for fmt, bits, gs, sym in layouts(quick=True):
            config = dict(MODELS[name], num_hidden_layers=1, dtype="bfloat16",
                          quantization_config=quantization_config(fmt, bits, gs, sym))
            layout = Layout(fmt, bits, sym, gs, experts)
            expected = set(vllm_gaps(layout))
            try:
                refused = set(kernels_at_real_shapes(config, tmp_path / f"{name}-{layout}")
                              .refused)
            except Exception as exc:  # refused while vLLM parses the config (GPTQ 2/3-bit)
                assert "Unsupported quantization config" in str(exc), exc
                refused = set(CAPABILITIES)
            gpus = {cap for cap, label in CAPABILITIES.items() if label in expected}
            assert refused == gpus, f"{name} {layout.describe()}: vLLM refuses on {refused}"
