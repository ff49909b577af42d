"""What every worker holds: the model on one device with its calibration shard.

The model is built with empty weights; the embeddings (and everything outside the decoder
blocks) are read from the checkpoint, each decoder block only while it is worked on. One forward
pass through the embeddings records what every decoder block is called with, per calibration
batch (:func:`admmq_dist.model.capture.record_block_calls`), so a block can later run alone.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import time
from pathlib import Path

import torch

from ..files import write_text
from ..model.arch import find_blocks, target_linears, weight_modules
from ..model.capture import block_output, record_block_calls
from ..model.loading import TensorIndex, build_skeleton, materialize, source_dtype
from ..model.moe import expert_lists, is_router, unfuse_experts
from ..recipe import Recipe

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

log = logging.getLogger(__name__)


def output_dtype(recipe: Recipe, model_dir: Path) -> torch.dtype:
    """The dtype of the checkpoint's scales and dense tensors: the recipe's, or with ``auto`` the
    one the model was saved in (a bfloat16 model stays bfloat16)."""
    if recipe.output.dtype != "auto":
        return DTYPES[recipe.output.dtype]
    return source_dtype(Path(model_dir))


def peak_memory_bytes(device: torch.device) -> int:
    """The device's peak allocated memory (CUDA), or this process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB


def tied_names(model) -> dict[str, str]:
    """Output embeddings that share the input embeddings' weight are absent from the files."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if out_emb is None or in_emb is None:
        return {}
    return {f"{names[id(out_emb)]}.weight": f"{names[id(in_emb)]}.weight"}


def block_linears(block: torch.nn.Module, skip: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    """The linears of ``block`` to quantize: routers stay dense in mixture-of-experts blocks."""
    linears = target_linears(block, skip)
    if expert_lists(block):
        linears = {n: m for n, m in linears.items() if not is_router(n)}
    return linears


class DeviceModel:
    """The model on ``device`` with the calibration batches ``batches`` (global batch index ->
    token ids; the indices order Hessian sums canonically, which makes results independent of
    how batches are sharded over workers). Base of every schedule's workers."""

    def __init__(self, model_dir: str, recipe: Recipe, batches: dict[int, torch.Tensor],
                 device: str, threads: int | None = None) -> None:
        if "ADMMQ_LOG_LEVEL" in os.environ:
            # A Ray worker's process: its records go to its stderr, which Ray forwards to the
            # driver's terminal prefixed with the worker.
            logging.basicConfig(level=os.environ["ADMMQ_LOG_LEVEL"],
                                format="%(levelname)s %(name)s: %(message)s")
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.recipe = recipe
        self.model_dir = Path(model_dir)
        self.config, self.model = build_skeleton(self.model_dir, torch.float32)
        self.index = TensorIndex(self.model_dir, getattr(self.config, "model_type", None))
        self.dtype = (torch.float32 if self.device.type == "cpu"
                      else output_dtype(recipe, self.model_dir))
        # The checkpoint's dtype: grids are solved with their scales as it stores them.
        self.scale_dtype = output_dtype(recipe, self.model_dir)
        self.layout, self.blocks = find_blocks(self.model)
        for b in range(self.layout.num_blocks):
            unfuse_experts(self.blocks[b], self.layout.block_prefix(b), self.index.module_names())
        materialize(self.model, "", self.index, self.device, self.dtype,
                    tied=tied_names(self.model), exclude=(self.layout.prefix,))
        self.batch_ids = sorted(batches)
        self.seq_len = int(batches[self.batch_ids[0]].shape[1])
        calls = record_block_calls(self.model, self.blocks,
                                   [batches[i] for i in self.batch_ids], self.device)
        self.first_hidden = [h.to(self.dtype) for h in calls.first_hidden]
        self.args, self.kwargs = calls.args, calls.kwargs
        self.busy = {"forward": 0.0, "merge": 0.0, "solve": 0.0}
        # Factorizations computed (per Hessian: at most one of each kind on this worker).
        self.factorizations = {"eigh": 0, "cholesky": 0, "asymmetric": 0, "hessians": 0}
        self.token = f"{os.getpid()}-{time.time_ns()}"
        log.debug("worker ready on %s: model %s on %s, %d calibration batches, %d threads",
                  socket.gethostname(), self.model_dir, self.device, len(self.batch_ids),
                  torch.get_num_threads())

    @torch.no_grad()
    def forward(self, b: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Decoder block ``b`` on every local batch's hidden states (its weights in place)."""
        t = time.perf_counter()
        out = [block_output(self.blocks[b](h, *self.args[b][i], **self.kwargs[b][i]))
               for i, h in enumerate(hidden)]
        self.busy["forward"] += time.perf_counter() - t
        return out

    def resident_bytes(self) -> int:
        """What this worker holds whatever it works on: the weights outside the decoder blocks
        (embeddings, final norm, ``lm_head``), the first block's inputs and the tensors every
        block is called with per batch (position embeddings, masks; shared between blocks,
        counted once)."""
        seen = {id(h): h.numel() * h.element_size() for h in self.first_hidden}
        for per_block in (self.args, self.kwargs):
            for calls in per_block:
                for call in calls:
                    for value in (call.values() if isinstance(call, dict) else call):
                        for t in (value if isinstance(value, (tuple, list)) else (value,)):
                            if isinstance(t, torch.Tensor):
                                seen[id(t)] = t.numel() * t.element_size()
        return self.outside_bytes() + sum(seen.values())

    def outside_bytes(self, block: int | None = None) -> int:
        """Bytes of the weights in place outside the decoder blocks (or outside block ``block``
        only)."""
        inside = {id(t) for b, blk in enumerate(self.blocks) if block in (None, b)
                  for t in blk.parameters()}
        return sum(t.numel() * t.element_size() for t in self.model.parameters()
                   if t.device.type != "meta" and id(t) not in inside)

    def num_blocks(self) -> int:
        return self.layout.num_blocks

    def block_prefix(self) -> str:
        return self.layout.prefix

    def dense_modules(self) -> dict[str, bool]:
        """Every module with a 2-D weight that the run leaves dense — ``lm_head``, the recipe's
        skips, routers and shared-expert gates whatever their class, projectors — by checkpoint
        name (and module path where transformers renames it, since each engine matches its own
        names), mapped to whether it is an ``nn.Linear`` inside the decoder blocks. The ignore
        list names them all, exactly: engines match names, not substrings."""
        solved = {f"{self.layout.block_prefix(b)}.{n}"
                  for b in range(self.layout.num_blocks)
                  for n in block_linears(self.blocks[b], self.recipe.output.skip)}
        inside = self.layout.prefix + "."
        out = {}
        for name, is_linear in weight_modules(self.model).items():
            if name not in solved:
                disk = self.index.disk_name(f"{name}.weight")[: -len(".weight")]
                for entry in {name, disk}:
                    out[entry] = is_linear and name.startswith(inside)
        return dict(sorted(out.items()))

    def write_probe(self, work: str, name: str) -> str:
        """Write ``name`` into the work folder (round schedules' workers commit there); returns
        this worker's host, for the driver to name it when it does not see the file."""
        write_text(Path(work) / name, self.token)
        return socket.gethostname()

    def ping(self) -> str:
        """A token that changes when the worker is rebuilt (a restarted Ray actor)."""
        return self.token

    def count_factorizations(self, factors) -> None:
        """Add a Hessian's factorizations (a retired :class:`HessianFactors`) to the tally."""
        for kind, count in factors.counts.items():
            self.factorizations[kind] += count
        self.factorizations["hessians"] += 1

    def stats(self) -> dict:
        """Busy seconds per activity, factorizations computed, and this worker's peak memory
        (device, or host RSS)."""
        return {**self.busy, "factorizations": dict(self.factorizations),
                "peak_memory_bytes": peak_memory_bytes(self.device)}
