"""Which vLLM kernel serves each checkpoint layout we write, at real model shapes.

Run in the vLLM environment (``.venv-vllm``, see ``.ci/run``): for every combination the writer
can produce — compressed-tensors 2/3/4/8-bit x symmetric/asymmetric x group 32/64/128/channel,
GPTQ 2/3/4/8-bit — and for dense and mixture-of-experts models of real size (one decoder block
of each, built on the meta device, so nothing is allocated), it records vLLM's kernel choice per
layer kind as on an H100/H200 (sm90) and an A100 (sm80), or why vLLM refuses. The shapes matter:
kernels take or refuse layers by their widths, which is why the tests' tiny models cannot answer
this. ``admmq_dist/checkpoint/serving.py`` encodes the result for the CLI's warnings; a test
(``tests/test_vllm.py``) checks that file against a quick subset of this table.

    .venv-vllm/bin/python benchmarks/vllm_kernels.py           # writes results/vllm_kernels.md
    .venv-vllm/bin/python benchmarks/vllm_kernels.py --quick   # two models, fewer layouts
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

# Real configurations (the fields vLLM's model classes read), one decoder block each.
MODELS = {
    "Llama-3.1-70B": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=8192,
        intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
        vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192),
    "Llama-3.1-8B": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
        intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192),
    "Mixtral-8x7B": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096,
        intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
        num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
        max_position_embeddings=32768),
    "Qwen3-30B-A3B": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
        intermediate_size=6144, moe_intermediate_size=768, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128,
        num_experts_per_tok=8, decoder_sparse_step=1, norm_topk_prob=True,
        max_position_embeddings=40960, rms_norm_eps=1e-6),
    "DeepSeek-V2-Lite": dict(
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", hidden_size=2048,
        intermediate_size=10944, moe_intermediate_size=1408, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=102400, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1, kv_lora_rank=512,
        q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        scoring_func="softmax", routed_scaling_factor=1.0, rms_norm_eps=1e-6,
        max_position_embeddings=4096, rope_theta=10000.0),
}
MOE = {"Mixtral-8x7B", "Qwen3-30B-A3B", "DeepSeek-V2-Lite"}


def layouts(quick: bool) -> list[tuple[str, int, int | None, bool]]:
    """``(format, bits, group size or None, symmetric)``."""
    groups = (128, None) if quick else (32, 64, 128, None)
    out = [("compressed-tensors", bits, gs, sym)
           for bits in (2, 3, 4, 8) for gs in groups for sym in (True, False)]
    out += [("gptq", bits, gs, True) for bits in (2, 3, 4, 8) for gs in (128, None)]
    return out


def quantization_config(fmt: str, bits: int, group_size: int | None, symmetric: bool) -> dict:
    """What our writer puts in ``config.json`` (routers named in ``ignore`` as it names them)."""
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group_size or -1,
                "desc_act": False, "sym": symmetric, "checkpoint_format": "gptq",
                "lm_head": False, "pack_dtype": "int32"}
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric,
               "group_size": group_size, "strategy": "group" if group_size else "channel",
               "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "sparsity_config": {}, "kv_cache_scheme": None,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None,
                                          "output_activations": None}},
            "ignore": ["lm_head", "re:.*\\.mlp\\.gate$"]}


def describe(result, capability: int) -> str:
    """The kernels of one build, by layer kind, or why vLLM refused it."""
    if capability in result.refused:
        return "refused: " + result.refused[capability].split(": ", 1)[-1][:90]
    kinds: dict[str, set[str]] = {}
    for layer, choices in result.kernels.items():
        kind = layer.rsplit("[", 1)[1].rstrip("]")
        if kind == "marlin":
            continue  # GPTQ's platform check; the kernel is in the linear row
        kinds.setdefault(kind, set()).add(choices.get(capability, "?").replace("LinearKernel", "")
                                          .replace("Experts", ""))
    return "; ".join(f"{kind}: {'/'.join(sorted(v))}" for kind, v in sorted(kinds.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two models, fewer layouts")
    parser.add_argument("--output", type=Path,
                        default=ROOT / "benchmarks" / "results" / "vllm_kernels.md")
    args = parser.parse_args()

    import logging

    logging.disable(logging.WARNING)
    from environment import describe as versions
    from vllm import __version__ as vllm_version
    from vllm_conformance import CAPABILITIES, kernels_at_real_shapes

    models = ["Llama-3.1-70B", "Mixtral-8x7B"] if args.quick else list(MODELS)
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            for fmt, bits, gs, sym in layouts(args.quick):
                config = dict(MODELS[name], num_hidden_layers=2 if name in MOE else 1,
                              dtype="bfloat16",
                              quantization_config=quantization_config(fmt, bits, gs, sym))
                folder = Path(tmp) / f"{name}-{fmt}-{bits}-{gs}-{sym}"
                try:
                    result = kernels_at_real_shapes(config, folder)
                    cells = [describe(result, cap) for cap in CAPABILITIES]
                except Exception as exc:  # vLLM refuses the config itself (GPTQ 3-bit)
                    first = (str(exc).splitlines() or [""])[0]
                    if "validation error" in first:
                        first = str(exc).splitlines()[-2 if len(str(exc).splitlines()) > 2 else -1]
                    cells = [f"refused at startup: {first.strip()[:90]}"] * len(CAPABILITIES)
                layout = (f"{fmt} {bits}-bit {'sym' if sym else 'asym'} "
                          f"{'group ' + str(gs) if gs else 'channel'}")
                rows.append((name, layout, *cells))
                print(" | ".join(rows[-1]), flush=True)
    seconds = time.perf_counter() - started
    header = ["model", "layout", *CAPABILITIES.values()]
    lines = [f"# vLLM {vllm_version}: kernels for the layouts admmq-dist writes, at real shapes",
             "",
             f"Built with `benchmarks/vllm_kernels.py{' --quick' if args.quick else ''}` "
             f"({seconds:.0f} s; {versions()}, vllm {vllm_version}). One decoder block of each "
             "model (two for MoE models whose first block is dense), built by vLLM's own model "
             "class on the meta device with the platform reporting CUDA at the named compute "
             "capability while kernels are chosen; tensor parallel size 1. 'refused' is vLLM "
             "failing to build the model on that GPU (at `vllm serve` startup).",
             "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
