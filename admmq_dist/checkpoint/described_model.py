"""The model a checkpoint's ``config.json`` describes, built on the meta device (experts split
per expert, as the checkpoint stores them), and the renaming between the checkpoint's tensor
names and that model's module paths — what ``verify`` sizes the stored tensors against."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from admmq_dist.checkpoint.formats import CONFIG_NAME, module_of
from admmq_dist.checkpoint.shards import Problems, ShardFiles
from admmq_dist.model.loading import checkpoint_renamer
from admmq_dist.model.moe import is_fused_experts, unfuse_experts


def _skeleton(folder: Path):
    """The model ``config.json`` describes, on the meta device."""
    config = AutoConfig.from_pretrained(folder)
    for holder in (config, getattr(config, "text_config", None)):
        if holder is not None and hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return config, model


def _renamer(model_type: str | None) -> Callable[[str], str]:
    try:
        rename = checkpoint_renamer(model_type)
    except Exception:  # older transformers, or a model type it does not know
        rename = None
    return rename or (lambda name: name)


def _unfuse(model, module_path_names: list[str]) -> list[str]:
    """Split fused expert modules into per-expert linears; return the fused paths left over."""
    left = []
    for path, module in list(model.named_modules()):
        if not is_fused_experts(module):
            continue
        owner = path.rpartition(".")[0]
        try:
            unfuse_experts(model.get_submodule(owner) if owner else model, owner,
                           module_path_names)
        except Exception:
            left.append(path)
    return left


class DescribedModel:
    """The model ``config.json`` describes (None when it cannot be built), and the renaming
    between checkpoint names and its module paths."""

    def __init__(self, folder: Path, config: dict, files: ShardFiles, quantized: list[str],
                 suffixes, problems: Problems) -> None:
        rename = _renamer(config.get("model_type"))
        self.path = lambda disk_module: rename(f"{disk_module}.weight")[: -len(".weight")]
        qset = set(quantized)
        names = [f"{self.path(m)}.weight" for m in quantized]
        names += [rename(n) for n in files.all_names if module_of(n, suffixes) not in qset]
        self.disk_of = {rename(n): n for n in files.all_names}
        self.fused_left: list[str] = []
        try:
            self.config, self.model = _skeleton(folder)
        except Exception as exc:
            problems.add(f"{CONFIG_NAME}: cannot build the model it describes "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                         "; shapes are checked only against the quantized tensors themselves")
            self.config = self.model = None
        if self.model is not None:
            self.fused_left = _unfuse(self.model, names)

    def in_fused(self, path: str) -> bool:
        return any(path.startswith(f + ".") for f in self.fused_left)

    def linear_shape(self, module: str, problems: Problems) -> tuple[int, int] | None:
        if self.model is None:
            return None
        path = self.path(module)
        try:
            weight = getattr(self.model.get_submodule(path), "weight", None)
        except AttributeError:
            weight = None
        if weight is not None and weight.dim() == 2:
            return int(weight.shape[0]), int(weight.shape[1])
        if not self.in_fused(path):
            problems.add(f"{module}: quantized, but the model built from {CONFIG_NAME} has no "
                         "linear layer of that name")
        return None


def tied_names(model, hf_config) -> set[str]:
    """Parameter names that may be absent because they share storage with another parameter."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
            tied.add(seen[id(param)])
        else:
            seen[id(param)] = name
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    if getattr(text, "tie_word_embeddings", False) or getattr(hf_config, "tie_word_embeddings", False):
        tied.add("lm_head.weight")
    return tied
