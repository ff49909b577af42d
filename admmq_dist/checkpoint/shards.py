"""A checkpoint folder's files against its index: which tensor lives in which shard, read from
the headers; every disagreement (a missing or stray shard, a tensor in two shards or in none the
index names, an unreadable file) becomes one problem line. Part of ``verify``."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from admmq_dist.checkpoint.folder import read_header
from admmq_dist.checkpoint.formats import INDEX_NAME, SINGLE_NAME


class Enough(Exception):
    """Raised once ``max_problems`` problems are collected."""


class Problems:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lines: list[str] = []
        self.truncated = False

    def add(self, line: str) -> None:
        if len(self.lines) >= self.limit:
            self.truncated = True
            raise Enough
        self.lines.append(line)

    def result(self) -> list[str]:
        if self.truncated:
            return [*self.lines, (f"... more problems were not listed (stopped after "
                                  f"{self.limit}; pass a larger max_problems to see them)")]
        return list(self.lines)


class ShardFiles:
    """Where each tensor lives, its header metadata, and lazy reads (one open handle per shard)."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        self.folder = folder
        self.stack = stack
        self.meta: dict[str, tuple[tuple[int, ...], str]] = {}  # loadable tensors only
        self.where: dict[str, str] = {}                          # tensor -> shard file name
        self.reported: set[str] = set()  # tensors already named by an index/file problem
        self.all_names: set[str] = set()  # every name the index or the shards mention
        self._handles: dict[str, Any] = {}

    def read(self, name: str) -> torch.Tensor:
        shard = self.where[name]
        if shard not in self._handles:
            self._handles[shard] = self.stack.enter_context(
                safe_open(str(self.folder / shard), "pt"))
        return self._handles[shard].get_tensor(name)


class _Headers:
    """Each shard's header, read once; an unreadable shard is reported once and reads as None."""

    def __init__(self, folder: Path, problems: Problems) -> None:
        self.folder, self.problems = folder, problems
        self.read: dict[str, dict | None] = {}

    def __call__(self, shard: str):
        if shard not in self.read:
            try:
                self.read[shard] = read_header(self.folder / shard)
            except Exception as exc:  # a truncated or garbled file
                self.problems.add(f"{shard}: cannot read the safetensors file "
                                  f"({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})")
                self.read[shard] = None
        return self.read[shard]


def check_shards(folder: Path, problems: Problems, stack: ExitStack) -> ShardFiles | None:
    """Index against shards. Returns the loadable tensors, or None when there are no weights."""
    files = ShardFiles(folder, stack)
    on_disk = sorted(p.name for p in folder.glob("*.safetensors") if p.is_file())
    header = _Headers(folder, problems)
    if not (folder / INDEX_NAME).is_file():
        return _check_single_file(folder, files, on_disk, header, problems)
    weight_map = _read_weight_map(folder, problems)
    if weight_map is None:
        return None
    files.all_names.update(weight_map)
    named = list(dict.fromkeys(weight_map.values()))
    _check_named_and_stray_shards(folder, files, weight_map, named, on_disk, header, problems)
    holders: dict[str, list[str]] = {}
    for shard in named:
        if not (folder / shard).is_file():
            continue
        found = header(shard)
        if found is None:
            files.reported.update(n for n, s in weight_map.items() if s == shard)
            continue
        for name in found:
            holders.setdefault(name, []).append(shard)
        files.all_names.update(found)
    _check_holders(files, weight_map, holders, problems)
    for name, shard in sorted(weight_map.items()):
        found = header.read.get(shard)
        if found is None or name in files.reported:
            continue
        if name not in found:
            files.reported.add(name)
            problems.add(f"{name}: {INDEX_NAME} maps it to {shard}, which does not contain it")
            continue
        files.meta[name] = found[name]
        files.where[name] = shard
    return files


def _check_single_file(folder: Path, files: ShardFiles, on_disk: list[str], header: _Headers,
                       problems: Problems) -> ShardFiles | None:
    if SINGLE_NAME not in on_disk:
        problems.add(f"{folder}: no {INDEX_NAME} and no {SINGLE_NAME}; the checkpoint has no "
                     "weights a loader can find")
        return None
    for other in on_disk:
        if other != SINGLE_NAME:
            problems.add(f"{other}: not read by loaders ({SINGLE_NAME} exists and there is "
                         f"no {INDEX_NAME} naming other shards)")
    found = header(SINGLE_NAME)
    if found is not None:
        files.meta.update(found)
        files.where.update({n: SINGLE_NAME for n in found})
        files.all_names.update(found)
    return files


def _read_weight_map(folder: Path, problems: Problems) -> dict[str, str] | None:
    try:
        weight_map = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ValueError("weight_map is not a mapping of tensor names to file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            ValueError) as exc:
        problems.add(f"{INDEX_NAME}: unreadable ({type(exc).__name__}: {exc}); "
                     "no tensor can be located")
        return None
    return weight_map


def _check_named_and_stray_shards(folder: Path, files: ShardFiles, weight_map: dict[str, str],
                                  named: list[str], on_disk: list[str], header: _Headers,
                                  problems: Problems) -> None:
    for shard in named:
        if not (folder / shard).is_file():
            lost = sorted(n for n, s in weight_map.items() if s == shard)
            files.reported.update(lost)
            problems.add(f"{shard}: shard file named in {INDEX_NAME} is missing "
                         f"({len(lost)} tensors, e.g. {lost[0]})")
    for stray in on_disk:
        if stray not in named:
            found = header(stray) or {}
            files.all_names.update(found)
            problems.add(f"{stray}: safetensors file not named in {INDEX_NAME}; loaders ignore "
                         f"its {len(found)} tensors" + (f" (e.g. {min(found)})" if found else ""))


def _check_holders(files: ShardFiles, weight_map: dict[str, str], holders: dict[str, list[str]],
                   problems: Problems) -> None:
    """Each tensor in exactly one shard, the one the index names."""
    for name in sorted(holders):
        shards = holders[name]
        if len(shards) > 1:
            files.reported.add(name)
            problems.add(f"{name}: stored in more than one shard ({', '.join(sorted(shards))})")
        elif name not in weight_map:
            files.reported.add(name)
            problems.add(f"{name}: stored in {shards[0]} but missing from the weight_map of "
                         f"{INDEX_NAME}")
        elif weight_map[name] != shards[0]:
            files.reported.add(name)
            problems.add(f"{name}: stored in {shards[0]} but {INDEX_NAME} maps it to "
                         f"{weight_map[name]}")
