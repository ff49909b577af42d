"""Loading a Hugging Face causal LM one piece at a time.

The model is built with empty (meta) weights through accelerate, and each piece — the embeddings,
then one decoder block at a time — is read from the safetensors files when it is needed, so the
whole model never sits on the compute device (or in host memory) at once.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn

from .moe import expert_lists, load_fused_into

# What a quantization run needs from a hub repository (no optimizer states, no other formats).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


class ModelLoadError(ValueError):
    """The model cannot be found or read; the message says what to do."""


def resolve_model_dir(model: str) -> Path:
    """A local folder, or a hub id downloaded (or found in the cache when ``HF_HUB_OFFLINE=1``)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{model!r} is a file; pass the model's folder or a hub id")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model folder {model!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # the hub client raises many types; all mean "not available"
        raise ModelLoadError(
            f"cannot find model {model!r}: it is not a local folder and the hub answered: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Pass a local folder, or check the name, your network and HF_HUB_OFFLINE") from None


def storage_print(model_dir: Path) -> dict[str, str]:
    """What identifies the model's files without reading their weights: per file (config,
    tokenizer, safetensors), its size and — for a hub download — the blob's name (the content's
    SHA-256 for weights), else a safetensors file's header (names, dtypes, shapes, offsets) or a
    small file's bytes, hashed."""
    out = {}
    for path in sorted(Path(model_dir).iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        real = path.resolve()
        h = hashlib.sha256(str(real.stat().st_size).encode())
        if real.parent.name == "blobs":
            h.update(real.name.encode())
        elif path.suffix == ".safetensors":
            with open(real, "rb") as f:
                head = f.read(8)
                h.update(head + f.read(struct.unpack("<Q", head)[0] if len(head) == 8 else 0))
        elif real.stat().st_size <= 64 << 20:
            h.update(real.read_bytes())
        out[path.name] = h.hexdigest()[:16]
    return out


@dataclass(frozen=True)
class ModelSource:
    """The model as the driver resolved it, for workers on other machines to find for
    themselves: the driver's folder where their node sees the same files there, else the hub id
    at the driver's revision from their own cache (``HF_HOME``) or the hub. ``content``: the
    files' :func:`storage_print`; a worker refuses any other files."""

    name: str
    path: str
    revision: str | None
    content: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, name: str, model_dir: Path) -> "ModelSource":
        model_dir = Path(model_dir)
        revision = model_dir.name if model_dir.parent.name == "snapshots" else None
        return cls(name, str(model_dir), revision, tuple(storage_print(model_dir).items()))

    def _differs(self, folder: Path) -> str | None:
        """How ``folder`` differs from the driver's files (None: it does not)."""
        here, there = storage_print(folder), dict(self.content)
        files = sorted(set(here) | set(there), key=lambda f: (f not in there, f))
        diff = [f for f in files if here.get(f) != there.get(f)]
        if not diff:
            return None
        f = diff[0]
        what = "is missing" if f not in here else "is not the driver's" if f in there else \
            "is not in the driver's folder"
        return f"{f} {what}" + (f" (and {len(diff) - 1} more files differ)" if len(diff) > 1
                                 else "")

    def locate(self) -> Path:
        """The folder holding the driver's files on this machine."""
        folder, why = Path(self.path), None
        if folder.is_dir():
            why = self._differs(folder)
            if why is None:
                return folder
            why = f"{folder} here holds other files: {why}"
        else:
            why = f"{folder} does not exist here"
        if self.revision is not None:
            from huggingface_hub import snapshot_download

            try:
                folder = Path(snapshot_download(self.name, revision=self.revision,
                                                allow_patterns=HUB_PATTERNS))
            except Exception as exc:  # the hub client raises many types; all mean "not here"
                why += f"; {self.name}@{self.revision[:12]} is not in this machine's hub cache " \
                    f"nor downloadable ({type(exc).__name__})"
            else:
                diff = self._differs(folder)
                if diff is None:
                    return folder
                why += f"; this machine's copy of {self.name}@{self.revision[:12]} differs: {diff}"
        raise ModelLoadError(
            f"a worker on {socket.gethostname()} cannot find the model the driver read: {why}. "
            "Put the model on storage every node mounts at the same path, or pass a hub id "
            "with HF_HOME on shared storage (docs/clusters.md)")


def located(model: "str | ModelSource") -> str:
    """A worker's model folder: ``model`` itself, or a :class:`ModelSource` located here."""
    return str(model.locate()) if isinstance(model, ModelSource) else model


def checkpoint_renamer(model_type: str | None):
    """transformers' key renamings for ``model_type`` (checkpoint name -> module path).

    Read from transformers rather than copied: it owns the table (Mixtral's ``block_sparse_moe``
    is ``mlp`` in the module tree, for one). Only plain renamings are used; the fused-expert
    converters are undone by :mod:`admmq_dist.model.moe` instead.
    """
    if not model_type:
        return None
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # older transformers: checkpoint names are module paths
        return None
    renamings = [t for t in get_checkpoint_conversion_mapping(model_type) or []
                 if isinstance(t, WeightRenaming)]
    if not renamings:
        return None
    return lambda name: rename_source_key(name, renamings, [])[0]


class TensorIndex:
    """Where every tensor of a safetensors checkpoint lives; reads tensors one at a time.

    Tensors are looked up by module path (what ``state_dict()`` of the built model says);
    :meth:`disk_name` gives the name in the files, which the writer keeps so that engines that
    follow the original layout (vLLM) find them.
    """

    def __init__(self, model_dir: Path, model_type: str | None = None) -> None:
        self.model_dir = model_dir
        index_file = model_dir / "model.safetensors.index.json"
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            self.files = {name: model_dir / file for name, file in weight_map.items()}
        else:
            single = model_dir / "model.safetensors"
            if not single.is_file():
                raise ModelLoadError(
                    f"{model_dir} has no model.safetensors or model.safetensors.index.json; "
                    "only safetensors checkpoints can be quantized (convert .bin files first)")
            with safe_open(single, "pt") as f:
                self.files = {name: single for name in f.keys()}
        rename = checkpoint_renamer(model_type)
        self._disk = {(rename(n) if rename else n): n for n in self.files}

    def __contains__(self, name: str) -> bool:
        """Whether the module-path tensor ``name`` is in the checkpoint."""
        return name in self._disk

    def names(self) -> list[str]:
        """Checkpoint (disk) names."""
        return list(self.files)

    def module_names(self) -> list[str]:
        """Module-path names, in the order of :meth:`names`."""
        return list(self._disk)

    def disk_name(self, name: str) -> str:
        """The checkpoint name of module-path tensor ``name`` (itself when not renamed)."""
        return self._disk.get(name, name)

    def read(self, name: str) -> torch.Tensor:
        """A tensor by module path or checkpoint name."""
        disk = name if name in self.files else self._disk[name]
        with safe_open(self.files[disk], "pt") as f:
            return f.get_tensor(disk)


_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_HEADER_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def source_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the model was saved in: what its ``config.json`` says (``dtype``, the older
    ``torch_dtype``, or its text config's), else the floating dtype holding most bytes in the
    safetensors files. Read from the files, not from a built model: building one (as
    :func:`build_skeleton` does, in float32) rewrites ``config.dtype``."""
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    for section in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            name = section.get(key)
            if isinstance(name, str) and name.removeprefix("torch.") in _DTYPE_NAMES:
                return _DTYPE_NAMES[name.removeprefix("torch.")]
    index = TensorIndex(model_dir)
    sizes: dict[torch.dtype, int] = {}
    for path in sorted(set(index.files.values())):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                dtype = _HEADER_DTYPES.get(piece.get_dtype())
                if dtype is not None:
                    numel = 1
                    for dim in piece.get_shape():
                        numel *= dim
                    sizes[dtype] = sizes.get(dtype, 0) + numel * dtype.itemsize
    if not sizes:
        raise ModelLoadError(f"{model_dir} holds no float16/bfloat16/float32 tensors and its "
                             "config names no dtype; pass --dtype")
    return max(sizes, key=sizes.get)


def build_skeleton(model_dir: Path, dtype: torch.dtype):
    """``(config, model)`` with every parameter on the meta device (buffers are real)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the config of {model_dir}: {exc}") from None
    heads = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith(heads) for a in architectures):
        raise ModelLoadError(
            f"{model_dir} holds a {', '.join(architectures)}, not a causal language model; "
            "admmq quantizes decoder LLMs (…ForCausalLM checkpoints)")
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as exc:
        raise ModelLoadError(
            f"{model_dir} is not a causal language model transformers can build "
            f"(model_type {getattr(config, 'model_type', '?')!r}): {str(exc).splitlines()[0]}"
        ) from None
    model.eval()
    return config, model


def materialize(module: nn.Module, prefix: str, index: TensorIndex, device: torch.device,
                dtype: torch.dtype, tied: dict[str, str] | None = None,
                exclude: tuple[str, ...] = ()) -> None:
    """Load ``module``'s parameters and persistent buffers from ``index`` onto ``device``.

    ``prefix`` is the module's qualified name in the checkpoint; ``tied`` maps a missing tensor
    to the one it shares storage with (a tied ``lm_head`` reading the embeddings); names under a
    module path in ``exclude`` are left alone (the decoder blocks, loaded one at a time later).
    Buffers that are not saved (rotary frequencies) are moved to ``device`` as they are.
    """
    skip = tuple(e + "." for e in exclude)
    for name, buffer in list(module.named_buffers()):
        if not name.startswith(skip) and buffer.device != device:
            owner, _, leaf = name.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            target._buffers[leaf] = buffer.to(device)
    for name, tensor in list(module.state_dict(keep_vars=True).items()):
        if skip and name.startswith(skip):
            continue
        full = f"{prefix}.{name}" if prefix else name
        source = full if full in index else (tied or {}).get(full)
        if source is None or source not in index:
            raise ModelLoadError(f"tensor {full!r} is missing from the checkpoint files")
        value = index.read(source)
        if value.is_floating_point():
            bad = value.numel() - int(torch.isfinite(value).sum())
            if bad:
                raise ModelLoadError(
                    f"tensor {source!r} holds {bad} NaN or Inf values; the checkpoint is damaged "
                    "or was saved in a dtype that overflowed — repair the weights before "
                    "quantizing")
            value = value.to(dtype)
            if not bool(torch.isfinite(value).all()):
                raise ModelLoadError(
                    f"tensor {source!r} overflows when cast to {dtype}: its values exceed that "
                    "dtype's range; quantize on a device where it loads in float32 or bfloat16")
        set_module_tensor_to_device(module, name, device, value=value)


def load_block(block: torch.nn.Module, prefix: str, index: TensorIndex, device: torch.device,
               dtype: torch.dtype, state: dict[str, torch.Tensor] | None = None) -> set[str]:
    """Materialize one block from ``state`` (module-path names, as a worker that read the block shares
    it) or from the checkpoint files. Experts stored fused are split as they load.

    Returns the checkpoint names of fused tensors consumed that way (written back per expert).
    """
    def read(name):
        return state[name] if state is not None else index.read(name)

    def has(name):
        return name in state if state is not None else name in index

    fused, consumed = [], set()
    for path, experts in expert_lists(block).items():
        first = f"{prefix}.{path}.0.{experts.roles[0]}.weight"
        if not has(first) and has(f"{prefix}.{path}.gate_up_proj"):
            load_fused_into(experts, read(f"{prefix}.{path}.gate_up_proj").to(device, dtype),
                            read(f"{prefix}.{path}.down_proj").to(device, dtype))
            fused.append(path)
            consumed |= {index.disk_name(f"{prefix}.{path}.{p}") for p in ("gate_up_proj", "down_proj")}
    if state is None:
        materialize(block, prefix, index, device, dtype, exclude=tuple(fused))
    else:
        skip = tuple(f + "." for f in fused)
        for name, _ in list(block.state_dict(keep_vars=True).items()):
            if skip and name.startswith(skip):
                continue
            value = state[f"{prefix}.{name}"]
            value = value.to(dtype) if value.is_floating_point() else value
            set_module_tensor_to_device(block, name, device, value=value)
        for name, buffer in list(block.named_buffers()):
            if buffer.device != device:
                owner, _, leaf = name.rpartition(".")
                (block.get_submodule(owner) if owner else block)._buffers[leaf] = buffer.to(device)
    return consumed


def release(module: nn.Module) -> None:
    """Return a module's memory: its parameters go back to the meta device."""
    module.to_empty(device="meta")
