"""A model's decoder blocks and true-sequential stages from its ``config.json`` alone: the
skeleton built on the meta device (no weights), each block's stages inferred from its linears'
names — q/k/v (or an MLA's two down projections) share the attention's input, gate/up the MLP's,
each expert's gate/up one Hessian, every expert's down one stage — where the run observes them
from a forward pass (:func:`..model.capture.calibration_stages`). A linear whose name no rule
covers is its own stage, which can only add Hessians to a plan."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..model.arch import find_blocks
from ..model.loading import ModelLoadError, resolve_model_dir, source_dtype
from ..model.moe import is_router
from ..recipe import Recipe
from .memory import routed_expert
from .plan import wave_bounds

# Leaf names of the linears that read the attention's input, and the MLP's.
ATTENTION_INPUT = {"q_proj", "k_proj", "v_proj", "qkv_proj", "q_a_proj", "kv_a_proj_with_mqa",
                   "query_key_value", "W_pack", "c_attn", "Wqkv"}
MLP_INPUT = {"gate_proj", "up_proj", "w1", "w3", "fc1", "c_fc", "gate_up_proj"}


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def block_stages(block: nn.Module, skip: tuple[str, ...], row_block: int
                 ) -> list[list[tuple[str, int, int, int]]]:
    """The block's true-sequential stages as :func:`.memory.plan_block` takes them: per stage,
    ``(name, rows, cols, row-block units)`` of every Hessian (linears sharing an input count
    once, their rows added)."""
    entries: list[tuple[str, int, int, int]] = []  # (name, rows, cols, experts)
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and not is_router(name) \
                and not any(s and s in name for s in skip):
            entries.append((name, module.out_features, module.in_features, 1))
    for name, param in block.named_parameters():
        if param.dim() == 3 and not any(s and s in name for s in skip):  # fused experts
            entries.append((name, int(param.shape[1]), int(param.shape[2]), int(param.shape[0])))
    stages: list[list[tuple[str, int, int, int]]] = []
    attention: list[tuple[str, int, int, int]] = []
    experts_in: list[tuple[str, int, int, int]] = []
    experts_out: list[tuple[str, int, int, int]] = []
    pending: tuple[str, list] | None = None  # an MLP-input group being gathered
    for name, rows, cols, count in entries:
        parent, leaf = name.rpartition(".")[0], _leaf(name.removesuffix(".weight"))
        per_expert = re.search(r"experts\.(\d+)\.", name)
        units = count * math.ceil(rows / row_block)
        if count > 1 or per_expert:
            target = experts_in if leaf in MLP_INPUT else experts_out
            if count > 1:
                target += [(f"{name}[{e}]", rows, cols, math.ceil(rows / row_block))
                           for e in range(count)]
            else:
                target.append((name, rows, cols, units))
            continue
        if leaf in ATTENTION_INPUT:
            attention.append((name, rows, cols, units))
            continue
        if leaf in MLP_INPUT:
            if pending and pending[0] == parent:
                pending[1].append((name, rows, cols, units))
            else:
                pending = (parent, [(name, rows, cols, units)])
                stages.append(pending[1])
            continue
        stages.append([(name, rows, cols, units)])
    out = []
    if attention:
        out.append([(attention[0][0], sum(e[1] for e in attention), attention[0][2],
                     sum(e[3] for e in attention))])
    for stage in stages:
        out.append([(stage[0][0], sum(e[1] for e in stage), stage[0][2], sum(e[3] for e in stage))])
    # Experts' gate/up of one expert share an input: pair them by expert.
    if experts_in:
        merged: dict[str, list] = {}
        for name, rows, cols, units in experts_in:
            key = re.sub(r"\.(gate_proj|up_proj|w1|w3)(\.weight)?$", "", name)
            entry = merged.setdefault(key, [name, 0, cols, 0])
            entry[1] += rows
            entry[3] += units
        out.append([tuple(v) for v in merged.values()])
    if experts_out:
        out.append(experts_out)
    # The attention's input comes first, the MLP's last, as the block calls them.
    return out


def config_folder(model: str) -> Path:
    """The folder holding the model's ``config.json``: a local folder, or for a hub id only that
    file fetched (nothing else is downloaded). Mistakes are worded as the run words them."""
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        folder = resolve_model_dir(model)  # a local path: its own errors
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{model} has no config.json; point at a Hugging Face model "
                                 "folder")
        return folder
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model, "config.json")).parent
    except Exception as exc:  # offline, unknown id, gated: all mean "not available"
        raise ModelLoadError(
            f"cannot find model {model!r}: it is not a local folder and the hub answered: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Pass a local folder, or check the name, your network and HF_HUB_OFFLINE") from None


def meta_skeleton(config_dir: Path):
    """``(config, model)`` with every parameter and buffer on the meta device: nothing is
    allocated, even for fused expert tensors that ``init_empty_weights`` would first create in
    host memory (DeepSeek-V3's are 30 GB each in float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        except ValueError as exc:
            raise ValueError(f"{config_dir} is not a causal language model transformers can "
                             f"build: {str(exc).splitlines()[0]}") from None
    return config, model


def source_bytes(config_dir: Path) -> int:
    """Bytes per element the model's weights are stored in (2 when nothing says)."""
    try:
        return source_dtype(config_dir).itemsize
    except Exception:
        return 2


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: its distinct blocks (stages, first index, how many), the
    parameters outside the blocks, and its dimensions."""

    name: str
    prefix: str
    hidden: int
    blocks: list[tuple[list, int, int, int]]  # (stages, first block, count, parameters)
    outside: int
    stored: int
    experts_per_token: int | None = None  # routed experts per token (MoE), for the time model

    def total(self, per_entry) -> int:
        return sum(count * sum(per_entry(rows, cols) for stage in stages
                               for _, rows, cols, *_ in stage)
                   for stages, _, count, _ in self.blocks)

    @property
    def largest_block(self) -> int:
        return max(params for *_, params in self.blocks)


def model_shape(model: str, recipe: Recipe, skeleton=None) -> ModelShape:
    """``model``'s shape (folder or hub id; only its config is read), its stages as ``recipe``
    skips and cuts them; ``skeleton``: an already built ``(config, meta model)``."""
    config_dir = config_folder(model)
    config, module = skeleton or meta_skeleton(config_dir)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layout, blocks = find_blocks(module)
    distinct: dict[tuple, list] = {}
    for b, block in enumerate(blocks):
        stages = block_stages(block, tuple(recipe.output.skip), recipe.solver.row_block)
        key = tuple(map(tuple, stages))
        if key not in distinct:
            distinct[key] = [stages, b, 0, sum(p.numel() for p in block.parameters())]
        distinct[key][2] += 1
    in_blocks = sum(count * params for _, _, count, params in distinct.values())
    return ModelShape(model, layout.prefix, int(text.hidden_size),
                  [tuple(v) for v in distinct.values()],
                  sum(p.numel() for p in module.parameters()) - in_blocks,
                  source_bytes(config_dir), getattr(text, "num_experts_per_tok", None))


def routed_stage(stage: list[tuple]) -> bool:
    return any(routed_expert(name) for name, *_ in stage)


def stages_in_waves(stages: list[list[tuple]], waves: int, workers: int) -> list[list[tuple]]:
    """:func:`.plan.expert_waves` on :func:`.model_shape.block_stages`'s stages."""
    return [part for stage in stages for part in (
        [stage[start:stop] for start, stop in wave_bounds(len(stage), waves, workers)]
        if routed_stage(stage) else [stage])]
