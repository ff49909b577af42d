"""Hooks around decoder blocks: the inputs every block is called with, which linears share an
input (and therefore one Hessian), and the one hook-based capture of those inputs — into Hessians
(:func:`capture_hessians`) or kept as they are (:func:`record_inputs`).

Blocks are called by the model with keyword arguments the model computes once (rotary position
embeddings, attention masks — which may differ per block, as in Gemma's sliding-window layers).
Rather than rebuild those per architecture, one forward pass runs the real embedding code with
every block replaced by a recorder that stores its call and passes the hidden states through;
block ``b`` is later run on the true hidden states with the arguments recorded for ``b``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..quant.hessian import HessianAccumulator
from .moe import expert_lists


class _StopForward(Exception):
    """Raised by the last recorder: nothing after the blocks (final norm, lm_head) is needed."""


class _Recorder(nn.Module):
    def __init__(self, inner: nn.Module, calls: list, keep_hidden: bool, last: bool) -> None:
        super().__init__()
        self.inner = inner
        self._calls = calls
        self._keep_hidden = keep_hidden
        self._last = last

    def __getattr__(self, name: str):
        # The model may read attributes of its layers (attention type, layer index).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, hidden_states, *args, **kwargs):
        self._calls.append((hidden_states if self._keep_hidden else None, args, kwargs))
        if self._last:
            raise _StopForward
        return hidden_states


@dataclass
class BlockCalls:
    """What block ``b`` is called with, per calibration batch: ``args[b][i]``, ``kwargs[b][i]``."""

    first_hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[list[tuple]] = field(default_factory=list)
    kwargs: list[list[dict]] = field(default_factory=list)


@torch.no_grad()
def record_block_calls(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor],
                       device: torch.device) -> BlockCalls:
    """Run ``model`` on each batch of token ids with the blocks replaced by recorders.

    Only the parts of the model before the blocks need real weights.
    """
    originals = list(blocks)
    calls: list[list] = [[] for _ in originals]
    try:
        for b, block in enumerate(originals):
            blocks[b] = _Recorder(block, calls[b], keep_hidden=b == 0, last=b == len(originals) - 1)
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for b, block in enumerate(originals):
            blocks[b] = block
    if any(len(c) != len(batches) for c in calls):
        raise RuntimeError("the model did not call every decoder block once per batch; "
                           "its forward pass is not a plain loop over its layers")
    return BlockCalls(first_hidden=[c[0] for c in calls[0]],
                      args=[[c[1] for c in block_calls] for block_calls in calls],
                      kwargs=[[c[2] for c in block_calls] for block_calls in calls])


def block_output(output):
    """Decoder layers return a tensor or a tuple whose first item is the hidden states."""
    return output[0] if isinstance(output, tuple) else output


@dataclass(frozen=True)
class Stage:
    """Groups of linears whose Hessians one calibration pass captures together.

    ``groups`` lists linears (block-relative names) that share an input, hence one Hessian.
    ``experts`` is the :class:`~admmq_dist.model.moe.ExpertList` path when the stage is one role
    of every expert (``role`` 0: gate/up, 1: down); experts are independent of one another, so
    all of them are captured in one pass instead of one pass per expert.
    """

    groups: list[list[str]]
    experts: str | None = None
    role: int = 0


@torch.no_grad()
def calibration_stages(block: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor,
                       args: tuple, kwargs: dict) -> list[Stage]:
    """Linears grouped by the input tensor they receive, in the order the block first calls them.

    q/k/v share the normed hidden states, gate/up the MLP input; quantizing stage by stage, each
    stage's Hessians taken after the earlier stages were quantized, is GPTQ's "true sequential".
    Experts are grouped by their structure (gate/up of each expert, then every down) rather than
    by what one sample happens to route, and placed where the block first calls them.
    """
    experts = expert_lists(block)
    in_experts = {n for n in linears for p in experts if n.startswith(p + ".")}
    seen: list[tuple[object, list[str]]] = []
    handles = []

    def hook(name):
        def pre(module, inputs):
            x = inputs[0]
            for tensor, names in seen:
                if tensor is x:
                    names.append(name)
                    return
            seen.append((x, [name]))
        return pre

    def expert_hook(path):
        def pre(module, inputs):
            if not any(key == path for key, _ in seen):
                seen.append((path, []))
        return pre

    for name, module in linears.items():
        if name not in in_experts:
            handles.append(module.register_forward_pre_hook(hook(name)))
    for path, module in experts.items():
        handles.append(module.register_forward_pre_hook(expert_hook(path)))
    try:
        block(hidden[:1], *args, **_first_sample(kwargs))
    finally:
        for handle in handles:
            handle.remove()
    stages = []
    for key, names in seen:
        if isinstance(key, str):
            stages.extend(_expert_stages(key, experts[key], linears))
        else:
            stages.append(Stage([names]))
    missing = [n for n in linears if n not in in_experts and not any(
        n in g for st in stages for g in st.groups)]
    if missing:
        # Linears the sample never reached: each is its own group (inputs unknown, not shared).
        stages.append(Stage([[n] for n in missing]))
    for path in experts:
        if not any(st.experts == path for st in stages):
            stages.extend(_expert_stages(path, experts[path], linears))
    return stages


def _expert_stages(path: str, experts, linears) -> list[Stage]:
    gate, up, down = experts.roles
    first = [[n for n in (f"{path}.{e}.{gate}", f"{path}.{e}.{up}") if n in linears]
             for e in range(len(experts))]
    second = [[f"{path}.{e}.{down}"] for e in range(len(experts)) if f"{path}.{e}.{down}" in linears]
    return [st for st in (Stage([g for g in first if g], path, 0), Stage(second, path, 1))
            if st.groups]


def input_groups(block: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor,
                 args: tuple, kwargs: dict) -> list[list[str]]:
    """The groups of :func:`calibration_stages`, flattened in order."""
    return [g for st in calibration_stages(block, linears, hidden, args, kwargs) for g in st.groups]


def _first_sample(kwargs: dict) -> dict:
    """Batch-first tensors sliced to one sample, so the grouping pass is cheap."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] > 1:
            out[key] = value[:1]
        elif isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            out[key] = tuple(v[:1] if v.dim() > 0 and v.shape[0] > 1 else v for v in value)
        else:
            out[key] = value
    return out


@torch.no_grad()
def capture_hessians(block: nn.Module,
                     inputs_of: dict[str, tuple[nn.Module, int, list | None]],
                     hidden: list[torch.Tensor], args: list[tuple], kwargs: list[dict],
                     batch_ids: list[int], device: torch.device, in_order: bool = False
                     ) -> dict[str, HessianAccumulator]:
    """Run ``block`` on every local batch (``hidden[i]`` with ``args[i]``/``kwargs[i]``; its global
    index ``batch_ids[i]`` orders the sums canonically) and accumulate, per key of ``inputs_of``
    (``(module, input width, per-batch reference inputs or None)``), the module's input into a
    Hessian — with GPTAQ's cross term against the references when the entry carries them.
    ``in_order``: the batches are every batch, in order, and each statistic keeps one running sum
    (:class:`HessianAccumulator`'s ``in_order``) instead of the canonical tree."""
    accumulators, handles = {}, []
    batch = {"index": 0, "local": 0}

    def hook(acc: HessianAccumulator, references: list | None):
        if references is None:
            return lambda module, inputs: acc.add(inputs[0], batch["index"])
        return lambda module, inputs: acc.add(inputs[0], batch["index"],
                                              references[batch["local"]])

    for key, (module, width, references) in inputs_of.items():
        accumulators[key] = HessianAccumulator(width, device, cross=references is not None,
                                               in_order=in_order)
        handles.append(module.register_forward_pre_hook(hook(accumulators[key], references)))
    try:
        for i, h in enumerate(hidden):
            batch["index"], batch["local"] = batch_ids[i], i
            block(h, *args[i], **kwargs[i])
    finally:
        for handle in handles:
            handle.remove()
    return accumulators


@torch.no_grad()
def record_inputs(block: nn.Module, modules: dict[str, nn.Module], hidden: list[torch.Tensor],
                  args: list[tuple], kwargs: list[dict]) -> tuple[dict[str, list], list]:
    """Run ``block`` on every local batch, keeping what each of ``modules`` receives per batch
    (None where a batch never reaches it; modules sharing an input share the tensor) and the
    block's outputs."""
    inputs: dict[str, list] = {n: [] for n in modules}
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(
        lambda module, a, name=n: seen.setdefault(name, a[0])) for n, m in modules.items()]
    outputs = []
    try:
        for i, h in enumerate(hidden):
            seen.clear()
            outputs.append(block_output(block(h, *args[i], **kwargs[i])))
            for n in modules:
                inputs[n].append(seen.get(n))
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs
