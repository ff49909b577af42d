"""A checkpoint verifiable to the byte: the writer records the size and SHA-256 of every file it
puts in the folder in ``admmq-manifest.json``, written last; ``verify`` checks them first, so a
flipped bit (bit rot, a bad copy between nodes) is named even where the layout checks cannot see
it (a low mantissa bit of a scale, one code in a packed word).

Shards are hashed in a background thread as they are written (hashlib and file reads release
the GIL), so a shard is hashed while the next one fills; the small files are hashed at the end.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from admmq_dist.files import write_text

MANIFEST_NAME = "admmq-manifest.json"
ALGORITHM = "sha256"
_CHUNK = 1 << 20


def _digest_open(handle: BinaryIO) -> tuple[int, str]:
    """``(size, hex digest)`` of what ``handle`` reads to its end; closes it."""
    with handle:
        digest, size = hashlib.new(ALGORITHM), 0
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def digest_file(path: Path) -> tuple[int, str]:
    """``(size, hex SHA-256)`` of the file at ``path``."""
    return _digest_open(open(path, "rb"))


class Digests:
    """Files hashed in the background as they are written; ``take(name)`` waits for one.

    The file is opened when it is added, so renaming it afterwards (the writer names shards
    ``-of-N`` only at the end) does not disturb a hash still queued or running."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, tuple[Future, BinaryIO]] = {}

    def add(self, path: Path) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="admmq-sha256")
        handle = open(path, "rb")
        self._pending[path.name] = (self._pool.submit(_digest_open, handle), handle)

    def rename(self, old: str, new: str) -> None:
        self._pending[new] = self._pending.pop(old)

    def take(self, name: str) -> tuple[int, str] | None:
        """The ``(size, digest)`` of the added file now called ``name``; None if not added."""
        entry = self._pending.pop(name, None)
        return None if entry is None else entry[0].result()

    def close(self) -> None:
        """Stop hashing (a failed or finished write); idempotent."""
        for future, handle in self._pending.values():
            if future.cancel():
                handle.close()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def listed_files(folder: Path) -> list[str]:
    """Every file under ``folder`` but the manifest, as sorted relative POSIX names."""
    return sorted(name for p in folder.rglob("*") if p.is_file()
                  and (name := p.relative_to(folder).as_posix()) != MANIFEST_NAME)


def write_manifest(folder: Path, digests: Digests, tool: str) -> None:
    """``MANIFEST_NAME`` in ``folder``: the size and SHA-256 of every other file there (those in
    ``digests`` as hashed in the background, the rest now). Call it last: it lists the folder as
    it is, and appears atomically (written beside, then renamed)."""
    try:
        files = {}
        for name in listed_files(folder):
            size, digest = digests.take(name) or digest_file(folder / name)
            if size != (folder / name).stat().st_size:  # changed after it was added: hash again
                size, digest = digest_file(folder / name)
            files[name] = {"size": size, ALGORITHM: digest}
    finally:
        digests.close()
    manifest = {"tool": tool, "algorithm": ALGORITHM, "files": files}
    write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


def _read_manifest(path: Path) -> dict[str, dict]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("algorithm") != ALGORITHM:
        raise ValueError(f"algorithm is not {ALGORITHM!r}")
    files = data.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int)
            and isinstance(e.get(ALGORITHM), str) for e in files.values()):
        raise ValueError(f"'files' is not a mapping of file names to size and {ALGORITHM}")
    return files


def check_manifest(folder: Path, problems, notes: list[str]) -> None:
    """Every file the manifest lists is there, with its size and digest: one ``problems.add``
    line per file that differs; files it does not list, or no manifest at all, are ``notes``."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        notes.append(f"no {MANIFEST_NAME}: file contents are not checked against digests (an "
                     "older admmq or another tool wrote it); layout checks only")
        return
    try:
        listed = _read_manifest(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        problems.add(f"{MANIFEST_NAME}: unreadable ({type(exc).__name__}: {exc}); file contents "
                     "cannot be checked")
        return
    for name, entry in sorted(listed.items()):
        rel = PurePosixPath(name)
        if rel.is_absolute() or not rel.parts or ".." in rel.parts:
            problems.add(f"{name}: listed in {MANIFEST_NAME} but not a path inside the folder")
        elif not (folder / rel).is_file():
            problems.add(f"{name}: missing ({MANIFEST_NAME} lists it, {entry['size']} bytes)")
        elif (size := (folder / rel).stat().st_size) != entry["size"]:
            problems.add(f"{name}: {size} bytes, but {MANIFEST_NAME} says {entry['size']} "
                         "(truncated or replaced)")
        elif digest_file(folder / rel)[1] != entry[ALGORITHM]:
            problems.add(f"{name}: SHA-256 differs from {MANIFEST_NAME}; its bytes "
                         "changed after it was written (bit rot or a bad copy)")
    for name in sorted(set(listed_files(folder)) - set(listed)):
        notes.append(f"{name}: not listed in {MANIFEST_NAME} (added after the checkpoint was "
                     "written); not checked")
