"""Stream a quantized model into a Hugging Face folder that vLLM and transformers load unchanged.

Two on-disk formats (shared/docs/checkpoint-formats.md describes both):

``compressed-tensors`` (``format: pack-quantized``), per quantized linear ``W [N, K]``:
  * ``weight_packed`` int32 ``[N, ceil(K*bits/32)]``: the unsigned codes, packed along the input
    dim. The library reads them as signed ``q = code - 2**(bits-1)``.
  * ``weight_scale`` in the model dtype, ``[N, G]`` (``[N, 1]`` per channel).
  * ``weight_shape`` int64 ``[N, K]``.
  * ``weight_zero_point`` int32 ``[ceil(N*bits/32), G]``, asymmetric only: the unsigned zero points
    packed along the **output** dim; the library reads them as ``zero - 2**(bits-1)``, so
    ``(q - zp) * scale == (code - zero) * scale``. Symmetric grids omit it: the library then
    dequantises ``q * scale``, which is exact because a symmetric zero is ``2**(bits-1)``.
  compressed-tensors sizes the scale with ``ceil(K / group_size)`` groups but its dequantisation
  refuses ``K % group_size != 0``, so a ragged last group cannot be stored.

``gptq`` (v1, ``checkpoint_format: "gptq"``), per quantized linear:
  * ``qweight`` int32 ``[words(K), N]``, ``qzeros`` int32 ``[G, words(N)]`` holding ``zero - 1``,
    ``scales`` float16 ``[G, N]``, ``g_idx`` int32 ``[K]`` (``i // group_size``).
  v1 readers add 1 back to every stored zero, so a zero point of 0 cannot be represented; the
  writer therefore accepts only symmetric grids for GPTQ. Readers size these tensors from
  ``K * bits / 32`` and ``N * bits / 32`` (gptqmodel 7.6 rounds up; its 3-bit unpacking walks whole
  3-word blocks), formulas that agree with the padded layout only for whole packing blocks, so
  ``K`` and ``N`` must be multiples of ``32 // bits`` (of 32 for 3-bit).

Which engines run what (checked against their sources, Nov 2026): transformers + compressed-tensors
dequantise any of 2/3/4/8 bits on CPU; vLLM's compressed-tensors W*A16 path takes 4 and 8 bits
only, while its GPTQ path also takes 2 and 3 bits (symmetric; Marlin kernels only 4/8).

Everything is written into a hidden temporary folder beside ``out_dir``; ``finalize()`` renames it
into place, so a run killed half way never leaves a folder that looks like a complete checkpoint,
and an existing checkpoint is only replaced once its successor is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Mapping

import torch
from safetensors.torch import save_file

from admmq_dist.quant.grid import Grid
from admmq_dist.quant.packing import (
    SUPPORTED_BITS,
    pack_compressed_tensors_weight,
    pack_compressed_tensors_zero_point,
    pack_gptq_qweight,
    pack_gptq_qzeros,
)

__all__ = ["CheckpointWriter", "FORMATS", "SOURCE_FILES"]

FORMATS = ("compressed-tensors", "gptq")

# The compressed-tensors release whose pack-quantized layout and config schema this writer
# reproduces; tests/test_checkpoint.py checks both against the installed library. Written into
# the config as provenance only: no reader branches on it.
COMPRESSED_TENSORS_LAYOUT_VERSION = "0.20.0"

# Files of the source model that make the quantized folder usable on its own.
SOURCE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)

CONFIG_NAME = "config.json"
GPTQ_CONFIG_NAME = "quantize_config.json"
INDEX_NAME = "model.safetensors.index.json"

_MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _shard_name(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk, so the rename in ``finalize`` publishes complete data."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some filesystems do not allow opening folders; durability is best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_default(value: Any) -> Any:
    # config.to_dict() already turns dtypes into strings, but hand-built configs may not.
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"config value {value!r} of type {type(value).__name__} is not JSON serialisable")


def _dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Delete the temporary folders killed writers left beside ``out_dir`` (only when the caller
    knows no other writer for ``out_dir`` is running, as when resuming); returns them."""
    out_dir = Path(out_dir)
    stale = sorted(out_dir.parent.glob(f".{out_dir.name}.partial-*"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _looks_like_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is something ``overwrite=True`` may delete: empty, or a model folder."""
    entries = list(folder.iterdir())
    return not entries or any(
        e.name == CONFIG_NAME or e.name.endswith(".safetensors") for e in entries
    )


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
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"format={format!r} is not supported; choose one of {FORMATS}")
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={bits!r} is not supported; choose one of {SUPPORTED_BITS}")
        if group_size is not None and (
            isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
        ):
            raise ValueError(
                f"group_size={group_size!r} must be a positive integer, or None for per-channel"
            )
        if not isinstance(symmetric, bool):
            raise ValueError(f"symmetric={symmetric!r} must be True or False")
        if dtype not in _MODEL_DTYPES:
            raise ValueError(f"dtype={dtype} is not a model dtype; choose one of {_MODEL_DTYPES}")
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes={max_shard_bytes!r} must be a positive integer")
        if format == "gptq" and not symmetric:
            # v1 stores zero - 1 and every v1 reader (vLLM, gptqmodel, AutoGPTQ) adds the 1 back,
            # so an asymmetric group whose zero point is 0 silently dequantises wrong there.
            raise ValueError(
                "GPTQ v1 stores zero-1 and cannot represent asymmetric grids whose zero point is 0; "
                "use --format compressed-tensors or --sym"
            )

        self.out_dir = Path(out_dir).absolute()
        self.format = format
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.dtype = dtype
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite

        if self.out_dir.exists() or self.out_dir.is_symlink():
            self._check_replaceable()

        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        # Hidden and named so that nobody mistakes it for the checkpoint; beside out_dir so the
        # final rename stays on one filesystem and is atomic.
        self._tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.partial-{uuid.uuid4().hex[:12]}"
        self._tmp_dir.mkdir()

        self._state: Literal["open", "finalized", "aborted"] = "open"
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shard_files: list[str] = []  # temporary shard names, in write order
        self._weight_map: dict[str, str] = {}  # tensor name -> temporary shard name
        self._total_size = 0
        self._quantized: dict[str, None] = {}  # module names, in write order (an ordered set)

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
        scale, zero = self._check_layer(module_name, codes, grid)
        rows, _cols = grid.rows, grid.cols

        if self.format == "compressed-tensors":
            tensors = self._compressed_tensors_layer(module_name, codes, grid, scale, zero)
        else:
            tensors = self._gptq_layer(module_name, codes, grid, scale, zero)

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
        ``generation_config.json`` found in ``source_dir``, and ``extra_files`` (name -> text or
        bytes); then move the folder into place as ``out_dir`` and return it.

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

    def _check_replaceable(self) -> None:
        out = self.out_dir
        if not self.overwrite:
            raise FileExistsError(
                f"{out} already exists; choose another output folder or pass overwrite=True "
                "(--overwrite) to replace it once the new checkpoint is complete"
            )
        if out.is_symlink() or not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder; remove it by hand")
        if not _looks_like_checkpoint(out):
            raise FileExistsError(
                f"{out} is not empty and holds no config.json or .safetensors files; refusing to "
                "replace a folder that does not look like a checkpoint (remove it by hand)"
            )

    def check_width(self, module: str, in_features: int) -> None:
        """Raise ValueError if a linear ``in_features`` wide cannot be stored in groups of this
        writer's group size (callers check every layer before spending time quantizing)."""
        group_size = in_features if self.group_size is None else self.group_size
        if in_features % group_size != 0:
            raise ValueError(
                f"{module}: in_features={in_features} is not divisible by group_size={group_size}; "
                f"the last group would be ragged, which {self.format} cannot store. Choose a group "
                "size that divides every quantized layer's input width, use per-channel "
                f"quantization, or add {module!r} to the ignore list"
            )

    def _check_layer(
        self, module: str, codes: torch.Tensor, grid: Grid
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check that the format can hold ``grid`` exactly; return (scale, zero) ready to store."""
        if not isinstance(grid, Grid):
            raise TypeError(
                f"{module}: grid must be an admmq_dist.quant.grid.Grid, got {type(grid).__name__}"
            )
        if grid.bits != self.bits:
            raise ValueError(f"{module}: grid has {grid.bits} bits but the writer writes {self.bits}-bit")
        rows, cols = grid.rows, grid.cols
        expected_gs = cols if self.group_size is None else self.group_size
        if grid.group_size != expected_gs:
            what = "per-channel" if self.group_size is None else f"group size {self.group_size}"
            raise ValueError(
                f"{module}: grid has group size {grid.group_size} but the writer writes {what}"
            )
        self.check_width(module, cols)
        num_groups = cols // expected_gs
        if tuple(grid.scale.shape) != (rows, num_groups) or tuple(grid.zero.shape) != (rows, num_groups):
            raise ValueError(
                f"{module}: grid scale/zero have shapes {tuple(grid.scale.shape)}/"
                f"{tuple(grid.zero.shape)}, expected ({rows}, {num_groups})"
            )
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
            raise ValueError(f"{module}: codes must be a 2-D tensor [out, in]")
        if tuple(codes.shape) != (rows, cols):
            raise ValueError(f"{module}: codes have shape {tuple(codes.shape)}, grid is ({rows}, {cols})")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"{module}: codes must have an integer dtype, got {codes.dtype}")
        maxq = 2**self.bits - 1
        cmin, cmax = int(codes.min()), int(codes.max())
        if cmin < 0 or cmax > maxq:
            raise ValueError(
                f"{module}: codes must lie in [0, {maxq}] for {self.bits}-bit, got [{cmin}, {cmax}]"
            )

        zero = grid.zero.detach().cpu()
        if not torch.equal(zero, torch.round(zero)) or float(zero.min()) < 0 or float(zero.max()) > maxq:
            raise ValueError(f"{module}: zero points must be integers in [0, {maxq}]")
        zero = zero.to(torch.int32)
        if self.symmetric and not bool((zero == 2 ** (self.bits - 1)).all()):
            raise ValueError(
                f"{module}: the writer is symmetric but the grid's zero points are not all "
                f"{2 ** (self.bits - 1)}; fit the grid with symmetric=True or write asymmetric"
            )

        scale_dtype = torch.float16 if self.format == "gptq" else self.dtype
        scale = grid.scale.detach().cpu()
        if self.format == "gptq" and self.dtype == torch.bfloat16:
            # GPTQ stores float16 scales but vLLM holds them in the model's dtype: rounded to
            # bfloat16 first, they survive both conversions exactly (bfloat16's 8-bit mantissa
            # fits float16's 11) instead of being rounded a second time as vLLM loads them.
            scale = scale.to(torch.bfloat16)
        scale = scale.to(scale_dtype)
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ValueError(
                f"{module}: some scales are not positive finite numbers once stored as {scale_dtype} "
                "(overflow or underflow); "
                + ("GPTQ stores float16 scales, use --format compressed-tensors with --dtype bfloat16"
                   if self.format == "gptq" else "write with dtype=torch.bfloat16 or torch.float32")
            )
        return scale, zero

    # ------------------------------------------------------------------------------ layouts

    def _compressed_tensors_layer(
        self, module: str, codes: torch.Tensor, grid: Grid, scale: torch.Tensor, zero: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        tensors = {
            f"{module}.weight_packed": pack_compressed_tensors_weight(codes.cpu(), self.bits),
            f"{module}.weight_scale": scale.contiguous(),
            f"{module}.weight_shape": torch.tensor([grid.rows, grid.cols], dtype=torch.int64),
        }
        if not self.symmetric:
            tensors[f"{module}.weight_zero_point"] = pack_compressed_tensors_zero_point(zero, self.bits)
        return tensors

    def _gptq_layer(
        self, module: str, codes: torch.Tensor, grid: Grid, scale: torch.Tensor, zero: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        # Readers' buffer sizes and 3-bit unpacking assume whole packing blocks (see the module
        # docstring); a layer that is not made of them would load with a shape mismatch or garbage.
        block = 32 if self.bits == 3 else 32 // self.bits
        for what, size in (("in_features", grid.cols), ("out_features", grid.rows)):
            if size % block:
                raise ValueError(
                    f"{module}: {what}={size} is not a multiple of {block}, which {self.bits}-bit "
                    "GPTQ requires; use --format compressed-tensors or add the layer to the ignore list"
                )
        return {
            f"{module}.qweight": pack_gptq_qweight(codes.cpu(), self.bits),
            f"{module}.qzeros": pack_gptq_qzeros(zero, self.bits),
            f"{module}.scales": scale.T.contiguous(),
            f"{module}.g_idx": (torch.arange(grid.cols) // grid.group_size).to(torch.int32),
        }

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
        _fsync(path)
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
        self._check_ignore(ignore)

        self._flush()
        total = len(self._shard_files)
        final_names = {tmp: _shard_name(i + 1, total) for i, tmp in enumerate(self._shard_files)}
        for tmp, final in final_names.items():
            os.rename(self._tmp_dir / tmp, self._tmp_dir / final)
        index = {
            "metadata": {"total_size": self._total_size},
            "weight_map": {name: final_names[tmp] for name, tmp in sorted(self._weight_map.items())},
        }
        written = {CONFIG_NAME, INDEX_NAME, *final_names.values()}
        self._write_text(INDEX_NAME, _dump_json(index))

        config_out = json.loads(_dump_json(dict(config)))  # a deep, JSON-clean copy
        dtype_name = str(self.dtype).removeprefix("torch.")
        config_out["dtype"] = dtype_name
        if "torch_dtype" in config_out:  # transformers 4.x spelling, still read by older engines
            config_out["torch_dtype"] = dtype_name
        if self.format == "compressed-tensors":
            config_out["quantization_config"] = self._compressed_tensors_config(ignore)
        else:
            gptq_config = self._gptq_config()
            config_out["quantization_config"] = gptq_config
            self._write_text(GPTQ_CONFIG_NAME, _dump_json(gptq_config))
            written.add(GPTQ_CONFIG_NAME)
        self._write_text(CONFIG_NAME, _dump_json(config_out))

        if source_dir is not None:
            source_dir = Path(source_dir)
            if not source_dir.is_dir():
                raise FileNotFoundError(f"source_dir {source_dir} is not a folder")
            for name in SOURCE_FILES:
                if (source_dir / name).is_file():
                    shutil.copyfile(source_dir / name, self._tmp_dir / name)
                    written.add(name)

        for name, content in (extra_files or {}).items():
            rel = PurePosixPath(name)
            if rel.is_absolute() or not rel.parts or ".." in rel.parts or str(rel) in written:
                raise ValueError(
                    f"extra file name {name!r} must be a relative path inside the checkpoint "
                    f"that does not replace a file the writer produces ({sorted(written)})"
                )
            if not isinstance(content, (str, bytes)):
                raise TypeError(f"extra file {name!r}: content must be str or bytes")
            path = self._tmp_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
            written.add(str(rel))

        _fsync(self._tmp_dir)
        self._swap_into_place()
        self._state = "finalized"
        return self.out_dir

    def check_ignore_entries(self, ignore: list[str]) -> None:
        """Raise ValueError if this format cannot keep ``ignore`` dense (callers check before
        spending time quantizing)."""
        if self.format == "gptq":
            # A GPTQ v1 config has no per-module skip list that every reader honours: transformers
            # (optimum) converts every Linear inside the decoder blocks, and lm_head is governed by
            # the "lm_head" flag. So only lm_head may stay unquantized.
            extra = [i for i in ignore if i != "lm_head"]
            if extra:
                raise ValueError(
                    f"GPTQ checkpoints cannot mark {extra} as unquantized (readers quantize every "
                    "linear in the decoder blocks); use --format compressed-tensors"
                )

    def _check_ignore(self, ignore: list[str]) -> None:
        if self.format == "gptq":
            # GPTQ configs carry no ignore list; which dense modules readers would convert (the
            # nn.Linear ones inside the blocks) only the caller knows: check_ignore_entries.
            if "lm_head" in self._quantized:
                raise ValueError("quantizing lm_head is not supported for GPTQ; keep it in the ignore list")
            return
        for module in self._quantized:
            for entry in ignore:
                matched = (
                    re.match(entry[3:], module) is not None if entry.startswith("re:") else entry == module
                )
                if matched:
                    raise ValueError(
                        f"{module} was written quantized but matches ignore entry {entry!r}; "
                        "loaders would expect a dense weight for it"
                    )

    def _compressed_tensors_config(self, ignore: list[str]) -> dict[str, Any]:
        """The ``quantization_config`` compressed-tensors' ``ModelCompressor.update_config`` writes.

        Field for field what ``QuantizationConfig(...).model_dump()`` produces (pinned by a test),
        minus the scheme-level ``format`` field: schemes forbid unknown keys, and releases before
        that field existed would refuse the config (the top level ignores unknown keys).
        """
        weights = {
            "num_bits": self.bits,
            "type": "int",
            "symmetric": self.symmetric,
            "group_size": self.group_size,
            "strategy": "channel" if self.group_size is None else "group",
            "dynamic": False,
        }
        return {
            "version": COMPRESSED_TENSORS_LAYOUT_VERSION,
            "quant_method": "compressed-tensors",
            "sparsity_config": {},
            "transform_config": {},
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": None,
                    "output_activations": None,
                }
            },
            "kv_cache_scheme": None,
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "global_compression_ratio": None,
            "ignore": ignore,
            "moe_sparsity_config": None,
        }

    def _gptq_config(self) -> dict[str, Any]:
        from admmq_dist import __version__

        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": -1 if self.group_size is None else self.group_size,
            "desc_act": False,
            "sym": True,
            "damp_percent": 0.01,  # informational; our solvers do not use GPTQ's dampening
            "true_sequential": True,
            "static_groups": False,
            "checkpoint_format": "gptq",
            "lm_head": False,
            "pack_dtype": "int32",
            "meta": {"quantizer": [f"admmq-dist:{__version__}"]},
        }

    def _write_text(self, name: str, text: str) -> None:
        path = self._tmp_dir / name
        path.write_text(text, encoding="utf-8")
        _fsync(path)

    def _swap_into_place(self) -> None:
        out = self.out_dir
        if not (out.exists() or out.is_symlink()):
            os.rename(self._tmp_dir, out)
            return
        self._check_replaceable()  # it may have appeared while we were writing
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(out, old)
        try:
            os.rename(self._tmp_dir, out)
        except BaseException:
            os.rename(old, out)  # put the previous checkpoint back
            raise
        try:
            shutil.rmtree(old)
        except OSError as err:  # the new checkpoint is in place; a leftover is only clutter
            warnings.warn(f"could not remove the replaced checkpoint {old}: {err}", stacklevel=3)
