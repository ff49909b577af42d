"""Files that appear whole or not at all: write beside, flush to disk, rename into place.

Every file a run leaves behind — a checkpoint's shards and configs, the resume folder's commits,
manifest and round markers — is written through here, so that a run killed at any instant never
leaves a file that looks complete but is not. The rename is atomic on one filesystem, which is
why the temporary file always sits beside its final name.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def fsync(path: Path) -> None:
    """Flush a file or folder to disk (best effort: some filesystems refuse folders)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_text(path: Path, text: str) -> None:
    """``text`` at ``path``, atomically."""
    path = Path(path)
    tmp = _temporary(path)
    tmp.write_text(text, encoding="utf-8")
    fsync(tmp)
    os.replace(tmp, path)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path,
                 metadata: dict[str, str] | None = None) -> None:
    """A safetensors file at ``path``, atomically."""
    path = Path(path)
    tmp = _temporary(path)
    save_file(tensors, str(tmp), metadata=metadata)
    fsync(tmp)
    os.replace(tmp, path)
