"""Stream a quantized model into a Hugging Face folder that vLLM and transformers load unchanged.

The layouts themselves (which tensors a quantized linear stores, how they are packed, the
``quantization_config``) are :mod:`admmq_dist.checkpoint.formats`'s; this module validates what
it is handed, buffers tensors into shards and publishes the folder.

Everything is written into a hidden temporary folder beside ``out_dir``; ``finalize()`` renames it
into place, so a run killed half way never leaves a folder that looks like a complete checkpoint,
and an existing checkpoint is only replaced once its successor is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from safetensors.torch import save_file

from admmq_dist import __version__
from admmq_dist.checkpoint.formats import (
    CONFIG_NAME,
    FORMATS,
    GPTQ_CONFIG_NAME,
    INDEX_NAME,
    quantization_config,
)
from admmq_dist.checkpoint.manifest import MANIFEST_NAME, Digests, write_manifest
from admmq_dist.checkpoint.publish import (
    check_replaceable,
    copy_source_files,
    swap_into_place,
    temporary_folder,
    write_extra_files,
)
from admmq_dist.checkpoint.stored import (
    check_ignore,
    check_ignore_entries,
    check_settings,
    check_width,
    quantized_tensors,
)
from admmq_dist.files import fsync
from admmq_dist.quant.grid import Grid

__all__ = ["CheckpointWriter", "FORMATS"]

def _shard_name(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def _json_default(value: Any) -> Any:
    # config.to_dict() already turns dtypes into strings, but hand-built configs may not.
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"config value {value!r} of type {type(value).__name__} is not JSON serialisable")


def _dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


class CheckpointWriter:
    """Streams a quantized checkpoint into a temporary folder beside ``out_dir``; ``finalize()``
    renames it into place (atomic: a killed run never leaves a folder that looks complete).

    Usage::

        with CheckpointWriter(out, format="compressed-tensors", bits=4, group_size=128,
                              symmetric=True) as writer:
            writer.add_tensor("model.embed_tokens.weight", emb)
            writer.add_quantized("model.layers.0.self_attn.q_proj", codes, grid)
            ...
            writer.finalize(config=model.config.to_dict(), source_dir=src, ignore=["lm_head"])

    Leaving the ``with`` block without ``finalize()`` (an exception, or simply forgetting) removes
    the temporary folder; a killed process leaves only the hidden ``.<name>.partial-*`` folder
    beside ``out_dir``, which is safe to delete. Tensors are buffered in memory until about
    ``max_shard_bytes`` have accumulated, then written as one shard; a single tensor larger than
    that gets a shard of its own. The tensors of one quantized module always land in the same shard.
    """

    def __init__(
        self,
        out_dir: Path | str,
        *,
        format: Literal["compressed-tensors", "gptq"],
        bits: int,
        group_size: int | None,
        symmetric: bool,
        dtype: torch.dtype = torch.float16,
        max_shard_bytes: int = 2 * 1024**3,
        overwrite: bool = False,
        grid_kind: str = "int",
    ) -> None:
        check_settings(format, bits, group_size, symmetric, dtype, max_shard_bytes, grid_kind)
        self.grid_kind = grid_kind
        self.out_dir = Path(out_dir).absolute()
        self.format = format
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.dtype = dtype
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite

        if self.out_dir.exists() or self.out_dir.is_symlink():
            check_replaceable(self.out_dir, overwrite)

        self._tmp_dir = temporary_folder(self.out_dir)

        self._state: Literal["open", "finalized", "aborted"] = "open"
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shard_files: list[str] = []  # temporary shard names, in write order
        self._weight_map: dict[str, str] = {}  # tensor name -> temporary shard name
        self._total_size = 0
        self._quantized: dict[str, None] = {}  # module names, in write order (an ordered set)
        self._digests = Digests()  # shards' SHA-256, hashed in the background as written

    # ------------------------------------------------------------------------------ public API

    @property
    def temp_dir(self) -> Path:
        """The folder being written; it becomes ``out_dir`` at ``finalize()``."""
        return self._tmp_dir

    @property
    def quantized_modules(self) -> list[str]:
        return list(self._quantized)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Add an unquantized tensor (embeddings, norms, ``lm_head``, biases) under ``name``.

        Floating tensors are stored in the writer's ``dtype``; integer and bool tensors as they are.
        """
        self._check_open()
        self._check_name(name)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        if name.endswith(".weight") and name.removesuffix(".weight") in self._quantized:
            raise ValueError(
                f"{name}: module {name.removesuffix('.weight')!r} was already written quantized; "
                "skip its dense weight"
            )
        self._add_group({name: self._own(tensor, cast=tensor.is_floating_point())})

    def add_quantized(
        self,
        module_name: str,
        codes: torch.Tensor,
        grid: Grid,
        bias: torch.Tensor | None = None,
    ) -> None:
        """Write the format's tensors for the linear ``module_name`` (e.g. ``model.layers.0.mlp.up_proj``).

        ``codes`` are the unsigned integer codes ``[out, in]`` on ``grid``; the stored weight
        dequantises to ``grid.dequantize(codes)`` with the scales rounded to the stored dtype.
        ``bias`` (``[out]``), when the layer has one, is stored in the writer's ``dtype``.
        """
        self._check_open()
        if not isinstance(module_name, str) or not module_name or module_name.endswith(".weight"):
            raise ValueError(
                f"module_name={module_name!r} must be the module's qualified name, "
                "e.g. 'model.layers.0.self_attn.q_proj' (without '.weight')"
            )
        if module_name in self._quantized:
            raise ValueError(f"{module_name}: already written")
        if f"{module_name}.weight" in self._weight_map or f"{module_name}.weight" in self._pending:
            raise ValueError(
                f"{module_name}: its dense weight was already added with add_tensor; "
                "skip the weights of quantized modules"
            )
        rows = grid.rows
        tensors = quantized_tensors(self.format, self.grid_kind, self.bits, self.group_size,
                                    self.symmetric, self.dtype, module_name, codes, grid)

        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (rows,):
                shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"{module_name}: bias must be a tensor of shape ({rows},), got {shape}")
            tensors[f"{module_name}.bias"] = self._own(bias, cast=True)
        for name in tensors:
            self._check_name(name)
        self._add_group(tensors)
        self._quantized[module_name] = None

    def finalize(
        self,
        *,
        config: Mapping[str, Any],
        source_dir: Path | str | None,
        ignore: list[str],
        extra_files: Mapping[str, str | bytes] | None = None,
    ) -> Path:
        """Write the remaining shard, the index, ``config.json`` (``config`` plus
        ``quantization_config``; for GPTQ also ``quantize_config.json``), the tokenizer files and
        ``generation_config.json`` found in ``source_dir``, ``extra_files`` (name -> text or
        bytes) and, last, ``admmq-manifest.json`` (every other file's size and SHA-256; nothing
        is written after it); then move the folder into place as ``out_dir`` and return it.

        ``ignore`` lists the modules left unquantized (``"lm_head"``, routers; compressed-tensors
        also takes ``"re:<regex>"`` entries); a GPTQ config has no such list, so for GPTQ callers
        check the dense linears readers would convert with :meth:`check_ignore_entries` first.
        Any failure removes the temporary folder and leaves an existing ``out_dir`` untouched.
        """
        self._check_open()
        try:
            return self._finalize(config, source_dir, ignore, extra_files)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Remove the temporary folder; safe to call more than once and after ``finalize()``."""
        if self._state == "finalized":
            return
        self._state = "aborted"
        self._pending.clear()
        self._digests.close()
        shutil.rmtree(self._tmp_dir, ignore_errors=True)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._state == "open":
            self.abort()

    # ------------------------------------------------------------------------------ validation

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"this CheckpointWriter is {self._state}; start a new one")

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name {name!r} must be a non-empty string")
        if name in self._weight_map or name in self._pending:
            raise ValueError(f"tensor {name!r} was already written")

    # ------------------------------------------------------------------------------ shards

    def _own(self, tensor: torch.Tensor, *, cast: bool) -> torch.Tensor:
        """A contiguous CPU copy: safetensors refuses tensors that share memory (tied weights)."""
        tensor = tensor.detach().to("cpu")
        if cast:
            tensor = tensor.to(self.dtype)
        return tensor.contiguous().clone()

    def _add_group(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending.update(tensors)
        self._pending_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        # The final "-of-N" name is only known at finalize; shards are renamed then.
        name = f"shard-{len(self._shard_files) + 1:05d}.partial.safetensors"
        path = self._tmp_dir / name
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._digests.add(path)  # hashed from the page cache while fsync flushes it to disk
        fsync(path)
        for tensor_name, tensor in self._pending.items():
            self._weight_map[tensor_name] = name
            self._total_size += tensor.numel() * tensor.element_size()
        self._shard_files.append(name)
        self._pending = {}
        self._pending_bytes = 0

    # ------------------------------------------------------------------------------ finalize

    def _finalize(
        self,
        config: Mapping[str, Any],
        source_dir: Path | str | None,
        ignore: list[str],
        extra_files: Mapping[str, str | bytes] | None,
    ) -> Path:
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict (model.config.to_dict()), got {type(config).__name__}")
        if "quantization_config" in config:
            raise ValueError(
                "config already has a quantization_config; pass the unquantized model's config"
            )
        if isinstance(ignore, str) or not all(isinstance(i, str) and i for i in ignore):
            raise ValueError(f"ignore must be a list of module names, got {ignore!r}")
        ignore = list(ignore)
        if not self._quantized:
            raise ValueError("no quantized module was added; nothing to write as a quantized checkpoint")
        check_ignore(self.format, list(self._quantized), ignore)

        written = self._write_shards_and_index()
        written |= self._write_configs(config, ignore)
        if source_dir is not None:
            written |= copy_source_files(Path(source_dir), self._tmp_dir)
        write_extra_files(self._tmp_dir, extra_files or {}, written | {MANIFEST_NAME})
        write_manifest(self._tmp_dir, self._digests, f"admmq-dist {__version__}")
        fsync(self._tmp_dir)
        swap_into_place(self._tmp_dir, self.out_dir, self.overwrite)
        self._state = "finalized"
        return self.out_dir

    def _write_shards_and_index(self) -> set[str]:
        self._flush()
        total = len(self._shard_files)
        final_names = {tmp: _shard_name(i + 1, total) for i, tmp in enumerate(self._shard_files)}
        for tmp, final in final_names.items():
            os.rename(self._tmp_dir / tmp, self._tmp_dir / final)
            self._digests.rename(tmp, final)
        index = {
            "metadata": {"total_size": self._total_size},
            "weight_map": {name: final_names[tmp] for name, tmp in sorted(self._weight_map.items())},
        }
        self._write_text(INDEX_NAME, _dump_json(index))
        return {INDEX_NAME, *final_names.values()}

    def _write_configs(self, config: Mapping[str, Any], ignore: list[str]) -> set[str]:
        written = {CONFIG_NAME}
        config_out = json.loads(_dump_json(dict(config)))  # a deep, JSON-clean copy
        dtype_name = str(self.dtype).removeprefix("torch.")
        config_out["dtype"] = dtype_name
        if "torch_dtype" in config_out:  # transformers 4.x spelling, still read by older engines
            config_out["torch_dtype"] = dtype_name
        config_out["quantization_config"] = quantization_config(
            self.format, self.bits, self.group_size, self.symmetric, ignore, self.grid_kind)
        if self.format == "gptq":
            self._write_text(GPTQ_CONFIG_NAME, _dump_json(config_out["quantization_config"]))
            written.add(GPTQ_CONFIG_NAME)
        self._write_text(CONFIG_NAME, _dump_json(config_out))
        return written

    def check_width(self, module: str, in_features: int) -> None:
        """Raise ValueError if a linear ``in_features`` wide cannot be stored in groups of this
        writer's group size (callers check every layer before spending time quantizing)."""
        check_width(self.format, self.group_size, module, in_features)

    def check_ignore_entries(self, ignore: list[str]) -> None:
        """Raise ValueError if this format cannot keep ``ignore`` dense (callers check before
        spending time quantizing)."""
        check_ignore_entries(self.format, ignore)

    def _write_text(self, name: str, text: str) -> None:
        path = self._tmp_dir / name
        path.write_text(text, encoding="utf-8")
        fsync(path)
