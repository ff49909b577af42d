"""Finding the decoder blocks of a causal LM and the linears to quantize inside them.

Found generically rather than by a table of architectures: the blocks are the ``nn.ModuleList``
with ``config.num_hidden_layers`` entries, and the targets are the ``nn.Linear`` modules inside a
block. Which linears share an input (and so one Hessian) is observed from a forward pass
(:mod:`admmq_dist.model.capture`), not assumed from names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class UnsupportedModelError(ValueError):
    """The model's structure is not one this tool can quantize; the message says why."""


@dataclass(frozen=True)
class BlockLayout:
    """Where the decoder blocks live: ``prefix`` is the ModuleList's qualified name."""

    prefix: str
    num_blocks: int

    def block_prefix(self, index: int) -> str:
        return f"{self.prefix}.{index}"


def find_blocks(model: nn.Module) -> tuple[BlockLayout, nn.ModuleList]:
    """The decoder blocks: the ModuleList whose length is ``config.num_hidden_layers``."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    expected = getattr(text_config, "num_hidden_layers", None)
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) > 0
                  and (expected is None or len(module) == expected)]
    if not candidates:
        raise UnsupportedModelError(
            f"cannot find the decoder blocks of {type(model).__name__}: no list of "
            f"{expected} layers; is this a causal language model?")
    # The shallowest such list is the decoder's (vision towers nest deeper or differ in length).
    name, blocks = min(candidates, key=lambda item: item[0].count("."))
    return BlockLayout(name, len(blocks)), blocks


def target_linears(block: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of one block, by name relative to the block, in module order.

    Expert tensors are expected split per expert already (:func:`admmq_dist.model.moe.
    unfuse_experts`); a 3-D parameter left means a fused layout that could not be split.
    """
    for name, param in block.named_parameters():
        if param.dim() == 3:
            raise UnsupportedModelError(
                f"parameter '{name}' is a fused {tuple(param.shape)} expert tensor this version "
                "cannot split into per-expert linears")
    linears = {name: module for name, module in block.named_modules()
               if isinstance(module, nn.Linear) and not any(s and s in name for s in skip)}
    if not linears:
        raise UnsupportedModelError("the decoder block has no nn.Linear layers to quantize")
    return linears


def weight_modules(model: nn.Module) -> dict[str, bool]:
    """Every module that holds a 2-D ``weight`` of its own, by qualified name, mapped to whether
    it is an ``nn.Linear``; embeddings are left out.

    Not only ``nn.Linear``: transformers 5 builds mixture-of-experts routers as ``…TopKRouter``
    modules and vision projectors as custom classes, while engines (vLLM) build any of them as a
    linear layer with the checkpoint's quantization scheme unless the ignore list names it.
    """
    out = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if (weight is not None and weight.dim() == 2 and weight.is_floating_point()
                and not isinstance(module, nn.Embedding)):
            out[name] = isinstance(module, nn.Linear)
    return out
