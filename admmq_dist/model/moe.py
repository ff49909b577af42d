"""Mixture-of-experts blocks: fused expert tensors split back into one ``nn.Linear`` per expert.

transformers 5 stores the experts of Mixtral, Qwen-MoE, OLMoE, DeepSeek and their relatives as two
3-D parameters (``gate_up_proj``: experts x 2·intermediate x hidden, ``down_proj``: experts x hidden
x intermediate) while their checkpoints — and vLLM — keep one linear per expert
(``experts.{e}.w1``/``w3``/``w2`` for Mixtral, ``experts.{e}.gate_proj``/``up_proj``/``down_proj``
for the others). Each expert is its own quantization problem with its own Hessian (built from the
tokens the router sends it), so the fused module is replaced by :class:`ExpertList`, whose
children carry the checkpoint's names: the generic linear discovery, Hessian hooks, weight loading
and the writer then treat experts like any other linear.

Experts that see few calibration tokens get a Hessian from every token that reaches the MoE block
(``calibrate_all``: the expert runs on all tokens, only the routed rows reach the output) — the
"all-token" calibration llm-compressor and GPTQModel use — or round-to-nearest; the pipeline
decides and the report says which.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .arch import UnsupportedModelError

# Per-expert linear names of the checkpoint layouts transformers fuses: gate, up, down.
EXPERT_NAMINGS = {
    "w1": ("w1", "w3", "w2"),             # Mixtral, MiniMax
    "gate_proj": ("gate_proj", "up_proj", "down_proj"),  # Qwen-MoE, OLMoE, DeepSeek, ...
}


class Expert(nn.Module):
    """One expert's gated MLP with the checkpoint's linear names."""

    def __init__(self, hidden: int, intermediate: int, names: tuple[str, str, str],
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.names = names
        gate, up, down = names
        kw = {"bias": False, "dtype": dtype, "device": device}
        self.add_module(gate, nn.Linear(hidden, intermediate, **kw))
        self.add_module(up, nn.Linear(hidden, intermediate, **kw))
        self.add_module(down, nn.Linear(intermediate, hidden, **kw))

    def linears(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return tuple(getattr(self, n) for n in self.names)  # type: ignore[return-value]


class ExpertList(nn.Module):
    """Drop-in for a fused experts module: the same ``forward(hidden, top_k_index, top_k_weights)``.

    ``calibrate_all`` names experts that run on every token during a calibration pass (their
    hooks then see all tokens); the block's output is unchanged because only routed rows are
    added. ``routed_tokens`` counts, per expert, the tokens routed to it since the last
    :meth:`reset_counts`.
    """

    def __init__(self, experts: list[Expert], act_fn) -> None:
        super().__init__()
        for e, expert in enumerate(experts):
            # Children named 0, 1, ... give the checkpoint's paths: experts.{e}.w1.
            self.add_module(str(e), expert)
        self._experts = tuple(experts)
        self.act_fn = act_fn
        self.num_experts = len(experts)
        self.calibrate_all: frozenset[int] = frozenset()
        self.routed_tokens = [0] * len(experts)

    def __len__(self) -> int:
        return len(self._experts)

    def __iter__(self):
        return iter(self._experts)

    def __getitem__(self, e: int) -> Expert:
        return self._experts[e]

    def reset_counts(self) -> None:
        self.routed_tokens = [0] * self.num_experts

    @property
    def roles(self) -> tuple[str, str, str]:
        return self[0].names

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, top_k_pos = torch.where(top_k_index == e)
            self.routed_tokens[e] += int(token_idx.numel())
            every = e in self.calibrate_all
            if token_idx.numel() == 0 and not every:
                continue
            gate, up, down = expert.linears()
            x = hidden_states if every else hidden_states[token_idx]
            y = down(self.act_fn(gate(x)) * up(x))
            if every:
                y = y[token_idx]
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return "gate_up_proj" in params and "down_proj" in params and any(
        p.dim() == 3 for p in params.values())


def has_fused_experts(model: nn.Module) -> bool:
    """Whether ``model`` (a transformers 5 model, meta weights are fine) has mixture-of-experts
    layers: transformers fuses every expert list into 3-D tensors."""
    return any(is_fused_experts(m) for m in model.modules())


def _checkpoint_naming(names, container: str) -> tuple[str, str, str] | None:
    """The per-expert linear names the checkpoint uses under ``container`` (a module path)."""
    pattern = re.compile(re.escape(container) + r"\.0\.(\w+)\.weight$")
    leaves = {m.group(1) for n in names if (m := pattern.match(n))}
    for first, naming in EXPERT_NAMINGS.items():
        if first in leaves:
            return naming
    return None


def unfuse_experts(block: nn.Module, block_prefix: str, checkpoint_names) -> list[str]:
    """Replace every fused experts module inside ``block`` by an :class:`ExpertList`.

    ``block_prefix`` is the block's module path and ``checkpoint_names`` the checkpoint's tensor
    names as module paths (after renamings such as Mixtral's ``block_sparse_moe`` → ``mlp``): they
    tell which per-expert names to use. Returns the module paths (relative to the block) replaced.
    Refuses fused layouts other than the gated ``gate_up_proj``/``down_proj`` pair without biases.
    """
    replaced = []
    for name, module in list(block.named_modules()):
        if not is_fused_experts(module):
            continue
        params = dict(module.named_parameters(recurse=False))
        gate_up, down = params["gate_up_proj"], params["down_proj"]
        extra = sorted(set(params) - {"gate_up_proj", "down_proj"})
        num_experts, two_inter, hidden = gate_up.shape
        if (extra or down.dim() != 3 or down.shape != (num_experts, hidden, two_inter // 2)
                or getattr(module, "is_transposed", False) or not hasattr(module, "act_fn")):
            raise UnsupportedModelError(
                f"the experts of {type(module).__name__} ({name}) use a fused layout this version "
                f"cannot split (parameters {sorted(params)}; expected gate_up_proj "
                "[experts, 2*intermediate, hidden] and down_proj [experts, hidden, intermediate] "
                "without biases)")
        naming = _checkpoint_naming(checkpoint_names, f"{block_prefix}.{name}")
        if naming is None:
            # A checkpoint that stores the fused tensors itself: write the most common layout.
            naming = EXPERT_NAMINGS["gate_proj"]
        experts = [Expert(hidden, two_inter // 2, naming, gate_up.dtype, gate_up.device)
                   for _ in range(num_experts)]
        owner, _, leaf = name.rpartition(".")
        parent = block.get_submodule(owner) if owner else block
        setattr(parent, leaf, ExpertList(experts, module.act_fn))
        replaced.append(name)
    return replaced


def load_fused_into(expert_list: ExpertList, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """Fill an :class:`ExpertList` from fused tensors (a checkpoint that stores them fused)."""
    inter = gate_up.shape[1] // 2
    for e, expert in enumerate(expert_list):
        gate, up, dn = expert.linears()
        gate.weight = nn.Parameter(gate_up[e, :inter].clone(), requires_grad=False)
        up.weight = nn.Parameter(gate_up[e, inter:].clone(), requires_grad=False)
        dn.weight = nn.Parameter(down[e].clone(), requires_grad=False)


def expert_lists(block: nn.Module) -> dict[str, ExpertList]:
    return {name: m for name, m in block.named_modules() if isinstance(m, ExpertList)}


def is_router(name: str) -> bool:
    """Router and shared-expert gate linears: tiny, precision-critical, and left unquantized by
    every engine (vLLM builds them without a quantization method)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "gate" or leaf.endswith("_gate")
