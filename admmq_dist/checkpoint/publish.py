"""A checkpoint folder appears whole or not at all: it is written as a hidden folder beside its
final name (same filesystem, so the rename is atomic) and renamed into place when complete; an
existing checkpoint is replaced only then, and only when the caller allows it."""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from admmq_dist.checkpoint.formats import CONFIG_NAME

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





def temporary_folder(out_dir: Path) -> Path:
    """A new hidden folder beside ``out_dir``, named so nobody mistakes it for the checkpoint."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Delete the temporary folders killed writers left beside ``out_dir`` (only when the caller
    knows no other writer for ``out_dir`` is running, as when resuming); returns them."""
    out_dir = Path(out_dir)
    stale = sorted(out_dir.parent.glob(f".{out_dir.name}.partial-*"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _looks_like_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is something ``overwrite`` may delete: empty, or a model folder."""
    entries = list(folder.iterdir())
    return not entries or any(
        e.name == CONFIG_NAME or e.name.endswith(".safetensors") for e in entries)


def check_replaceable(out: Path, overwrite: bool) -> None:
    """Refuse to replace ``out`` unless allowed, and never anything but a checkpoint folder."""
    if not overwrite:
        raise FileExistsError(
            f"{out} already exists; choose another output folder or pass overwrite=True "
            "(--overwrite) to replace it once the new checkpoint is complete")
    if out.is_symlink() or not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; remove it by hand")
    if not _looks_like_checkpoint(out):
        raise FileExistsError(
            f"{out} is not empty and holds no config.json or .safetensors files; refusing to "
            "replace a folder that does not look like a checkpoint (remove it by hand)")


def swap_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``, replacing an existing checkpoint only once ``tmp`` is there."""
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    check_replaceable(out, overwrite)  # it may have appeared while we were writing
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # put the previous checkpoint back
        raise
    try:
        shutil.rmtree(old)
    except OSError as err:  # the new checkpoint is in place; a leftover is only clutter
        warnings.warn(f"could not remove the replaced checkpoint {old}: {err}", stacklevel=3)


def copy_source_files(source_dir: Path, folder: Path) -> set[str]:
    """The tokenizer and generation files of the source model that make ``folder`` usable on
    its own; returns the names copied."""
    if not source_dir.is_dir():
        raise FileNotFoundError(f"source_dir {source_dir} is not a folder")
    written = set()
    for name in SOURCE_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, folder / name)
            written.add(name)
    return written

def write_extra_files(folder: Path, extra_files: Mapping[str, str | bytes],
                      written: set[str]) -> None:
    """``extra_files`` (name -> text or bytes) into ``folder``, never over ``written`` files."""
    for name, content in extra_files.items():
        rel = PurePosixPath(name)
        if rel.is_absolute() or not rel.parts or ".." in rel.parts or str(rel) in written:
            raise ValueError(
                f"extra file name {name!r} must be a relative path inside the checkpoint "
                f"that does not replace a file the writer produces ({sorted(written)})"
            )
        if not isinstance(content, (str, bytes)):
            raise TypeError(f"extra file {name!r}: content must be str or bytes")
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        written.add(str(rel))
