"""Quantized checkpoints built by hand for the writer and format tests: tiny transformers models,
their linears quantized on a fitted grid, written with CheckpointWriter."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from admmq_dist.checkpoint import CheckpointWriter
from admmq_dist.quant.grid import Grid, GridSpec, fit_grid

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
