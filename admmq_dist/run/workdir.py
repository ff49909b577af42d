"""The resume folder beside the output (``.<out>.admmq-work``): what an interrupted run must share
with its resumption (fingerprints in ``manifest.json``), and what it has finished — one commit
per decoder block (sequential schedule), per round a marker and each re-solved segment's layer
states and output (depth-parallel). Every file appears atomically (:mod:`admmq_dist.files`), so a
run killed at any instant resumes into the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint.publish import remove_stale_partials
from ..files import save_tensors, write_text
from .fingerprint import describe_changes

log = logging.getLogger(__name__)


class ResumeError(ValueError):
    """The interrupted run cannot be resumed as asked; the message says why and what to do."""


class StorageError(OSError):
    """A worker cannot write the work folder, or writes where the driver does not read."""


def work_dir_for(out_dir: Path, root: Path | None = None) -> Path:
    """``.<out>.admmq-work`` beside the output, or in ``root`` (``--work-dir``: storage every
    node of a cluster writes). Always a folder of its own: the run removes it when done."""
    return (out_dir.parent if root is None else Path(root)) / f".{out_dir.name}.admmq-work"


def check_work_folder_shared(work: Path, backend) -> None:
    """Every worker of ``backend`` writes ``work`` and this driver sees what it wrote (storage
    shared by every node): the round schedules' workers commit there. Checked before any block
    is solved."""
    names = [f"probe-{w}.txt" for w in range(backend.size)]
    hint = "pass --work-dir on storage every node writes, at the same path (docs/clusters.md)"
    try:
        hosts = backend.get([backend.call(w, "write_probe", str(work), name)
                             for w, name in enumerate(names)])
    except OSError as exc:
        raise StorageError(f"a worker cannot write the work folder {work} "
                           f"({type(exc).__name__}: {exc}); {hint}") from None
    for w, (name, host) in enumerate(zip(names, hosts)):
        path = work / name
        if not path.is_file():
            raise StorageError(f"worker {w} on {host} wrote {path}, which this driver does not "
                               f"see: the work folder is not shared storage; {hint}")
        path.unlink()


def prepare_work_dir(out_dir: Path, prints: dict, resume: bool, overwrite: bool,
                     root: Path | None = None) -> Path:
    """The resume folder, fresh or (``resume``) the interrupted run's when it shares ``prints``."""
    work = work_dir_for(out_dir, root)
    manifest = work / "manifest.json"
    if work.exists():
        if resume and manifest.is_file():
            old = json.loads(manifest.read_text())
            changed = describe_changes(old, prints)
            if changed:
                raise ResumeError(
                    f"cannot resume into {out_dir}: {'; '.join(changed)} changed since the "
                    f"interrupted run (fingerprints in {manifest}); rerun without --resume and "
                    "with --overwrite to start over")
            for path in remove_stale_partials(out_dir):
                log.info("removed %s, left by the interrupted run", path)
            return work
        if not resume and not overwrite:
            raise ResumeError(
                f"an interrupted run left {work}; pass --resume to finish it, or --overwrite to "
                "start over")
        shutil.rmtree(work)
    elif resume:
        log.warning("nothing to resume at %s; starting from the first block", work)
    work.mkdir(parents=True)
    write_text(manifest, json.dumps(prints, indent=1))
    return work


def committed_anything(work: Path) -> bool:
    return (any(work.glob("block-*.safetensors")) or any(work.glob("round-*.done"))
            or any(work.glob("start-*.safetensors")))


# ------------------------------------------------------------------- sequential: per block


@dataclass
class DecoderBlockOutput:
    """A finished decoder block: per quantized linear its codes and grid, and the report rows."""

    # block-relative linear name -> (codes, scale, zero); ``disk`` maps it to the checkpoint name
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    disk: dict[str, str] = field(default_factory=dict)
    report: list[dict] = field(default_factory=list)
    # Checkpoint tensors the block's quantized linears replace (fused experts split on load).
    consumed: list[str] = field(default_factory=list)
    # Bytes that crossed between processes while the block was quantized, by kind (not kept in
    # the commit: a resumed block moved nothing).
    moved: dict[str, int] = field(default_factory=dict)
    # The worker's planned peak memory for the block (run.memory; not kept in the commit).
    memory: dict = field(default_factory=dict)


def commit_block(work: Path, b: int, out: DecoderBlockOutput) -> None:
    tensors = {}
    for name, (codes, scale, zero) in out.quantized.items():
        tensors[f"{name}.codes"] = codes.to(torch.uint8).contiguous()
        tensors[f"{name}.scale"] = scale.contiguous()
        tensors[f"{name}.zero"] = zero.contiguous()
    meta = {"report": json.dumps(out.report), "consumed": json.dumps(out.consumed),
            "disk": json.dumps(out.disk), "checksum": _checksum(tensors)}
    save_tensors(tensors, work / f"block-{b:05d}.safetensors", metadata=meta)


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_commit(work: Path, b: int) -> DecoderBlockOutput | None:
    """Block ``b``'s commit, or None when there is none. A commit that cannot be read or whose
    checksum fails (a disk fault: commits are written atomically) is set aside as
    ``*.corrupt`` with a warning and the block is redone — the same bytes, since a resumed run
    shares the interrupted one's code, data and environment (the fingerprints)."""
    path = work / f"block-{b:05d}.safetensors"
    if not path.is_file():
        return None
    try:
        out = DecoderBlockOutput()
        with safe_open(path, "pt") as f:
            meta = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if meta.get("checksum") != _checksum(tensors):
            raise ValueError("its checksum does not match its tensors")
        out.disk = json.loads(meta["disk"])
        for name in out.disk:
            out.quantized[name] = (tensors[f"{name}.codes"].to(torch.int32),
                                   tensors[f"{name}.scale"], tensors[f"{name}.zero"])
        out.report = json.loads(meta["report"])
        out.consumed = json.loads(meta["consumed"])
    except Exception as exc:  # any unreadable file: the block is redone, never trusted
        log.warning("the commit of block %d (%s) is unreadable (%s); set aside as .corrupt, "
                    "the block is redone", b, path, exc)
        path.replace(path.with_name(path.name + ".corrupt"))
        return None
    return out


# --------------------------------------------------------------- depth-parallel: per round


def mark_round(work: Path, r: int, marker: dict) -> None:
    """Round ``r`` is committed (its segments' files were written first)."""
    write_text(work / f"round-{r:03d}.done", json.dumps(marker))


def last_round_marker(work: Path) -> dict | None:
    """The newest readable round marker (an unreadable one, a disk fault, is skipped with a
    warning: its round is redone)."""
    for path in sorted(work.glob("round-*.done"), reverse=True):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("round marker %s is unreadable (%s); that round is redone", path, exc)
    return None


def _segment_path(folder: str | Path, r: int | str, s: int) -> Path:
    """Round ``r``'s commit of segment ``s``; ``r == "start"``: the coordinated schedule's
    sequential start."""
    if r == "start":
        return Path(folder) / f"start-segment-{s:05d}.safetensors"
    return Path(folder) / f"round-{r:03d}-segment-{s:05d}.safetensors"


_SEGMENT_FILE = re.compile(r"round-(\d+)-segment-(\d+)\.safetensors")


def round_files(work: Path, keep: int = 2) -> tuple[int, list[Path]]:
    """``(bytes of the segment files kept, files to remove)`` once the newest round is marked:
    the newest ``keep`` round markers and each segment's newest ``keep`` round files stay (a
    segment not re-solved keeps the round that last solved it); the sequential start's files go
    once a round is committed. Two, not one: an unreadable newest marker (a disk fault) falls
    back to the one before, whose files must still be there."""
    markers = sorted(work.glob("round-*.done"))
    remove = list(markers[:-keep])
    kept = 0
    by_segment: dict[int, list[tuple[int, Path]]] = {}
    for path in work.glob("round-*-segment-*.safetensors"):
        match = _SEGMENT_FILE.fullmatch(path.name)
        if match:
            by_segment.setdefault(int(match[2]), []).append((int(match[1]), path))
    for files in by_segment.values():
        files.sort()
        remove += [path for _, path in files[:-keep]]
        kept += sum(path.stat().st_size for _, path in files[-keep:])
    return kept, remove + sorted(work.glob("start-*.safetensors"))


def prune_rounds(work: Path, keep: int = 2) -> None:
    """Remove what :func:`round_files` says is no longer needed."""
    for path in round_files(work, keep)[1]:
        path.unlink(missing_ok=True)


def save_segment_round(folder: str | Path, r: int | str, s: int,
                       states: dict[tuple[int, str], dict], outputs: list[torch.Tensor]) -> None:
    """Segment ``s`` as round ``r`` left it: each layer's codes, grid and row blocks' duals
    (``states``: (block, layer) -> state), and the segment's output per batch."""
    tensors = {}
    for (b, name), st in states.items():
        key = f"{b}.{name}"
        tensors[f"{key}.codes"] = st["codes"].to(torch.uint8).cpu().contiguous()
        if st.get("last") is not None:  # the coordinated schedule's last iterate
            tensors[f"{key}.last"] = st["last"].to(torch.uint8).cpu().contiguous()
        tensors[f"{key}.scale"] = st["grid"].scale.cpu().contiguous()
        tensors[f"{key}.zero"] = st["grid"].zero.cpu().contiguous()
        if st["grid"].global_scale is not None:  # NVFP4's, shared by a fused set: kept as is
            tensors[f"{key}.global_scale"] = torch.tensor([st["grid"].global_scale],
                                                          dtype=torch.float64)
        for k, dual in enumerate(st["duals"]):
            if dual is not None:
                tensors[f"{key}.dual.{k}"] = dual.cpu().contiguous()
    for i, h in enumerate(outputs):
        tensors[f"output.{i}"] = h.cpu().contiguous()
    save_tensors(tensors, _segment_path(folder, r, s))


def load_segment_round(folder: str | Path, r: int | str, s: int, layers, num_batches: int,
                       num_row_blocks, device: torch.device):
    """What :func:`save_segment_round` wrote: ``(outputs, states)`` with ``states`` (block, layer)
    -> ``(codes, scale, zero, duals, last codes or None, NVFP4 global scale or None)`` for the
    ``layers`` asked (``(block,
    layer)`` -> weight shape); ``num_row_blocks(rows)`` says how many duals a layer of ``rows``
    rows has."""
    path = _segment_path(folder, r, s)
    try:
        return _read_segment_round(path, layers, num_batches, num_row_blocks, device)
    except Exception as exc:
        raise ResumeError(f"the commit of round {r} for segment {s} ({path}) is unreadable "
                          f"({exc}); rerun with --overwrite to start over") from exc


def _read_segment_round(path: Path, layers, num_batches: int, num_row_blocks,
                        device: torch.device):
    states = {}
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        outputs = [f.get_tensor(f"output.{i}") for i in range(num_batches)
                   if f"output.{i}" in keys]
        for (b, name), shape in layers.items():
            key = f"{b}.{name}"
            codes = f.get_tensor(f"{key}.codes").to(torch.int32).to(device)
            duals = [f.get_tensor(f"{key}.dual.{k}").to(device) if f"{key}.dual.{k}" in keys
                     else None for k in range(num_row_blocks(shape[0]))]
            last = (f.get_tensor(f"{key}.last").to(torch.int32).to(device)
                    if f"{key}.last" in keys else None)
            global_scale = (float(f.get_tensor(f"{key}.global_scale")[0])
                            if f"{key}.global_scale" in keys else None)
            states[(b, name)] = (codes, f.get_tensor(f"{key}.scale").to(device),
                                 f.get_tensor(f"{key}.zero").to(device), duals, last,
                                 global_scale)
    return outputs, states


# ------------------------------------------------- coordinated: the sequential start, per block


def _start_hidden_path(folder: str | Path, s: int) -> Path:
    return Path(folder) / f"start-hidden-{s:05d}.safetensors"


def save_start_hidden(folder: str | Path, s: int, outputs: list[torch.Tensor],
                      float_outputs: list[torch.Tensor] | None) -> None:
    """What the sequential start's block ``s`` handed on (the quantized stream's outputs and,
    under asymmetric calibration, the float stream's): the next block's input on resume. Only
    the newest two are kept — each is a whole calibration set of hidden states."""
    tensors = {f"output.{i}": h.cpu().contiguous() for i, h in enumerate(outputs)}
    for i, h in enumerate(float_outputs or []):
        tensors[f"float.{i}"] = h.cpu().contiguous()
    save_tensors(tensors, _start_hidden_path(folder, s))
    for old in Path(folder).glob("start-hidden-*.safetensors"):
        if int(old.stem.rsplit("-", 1)[1]) < s - 1:
            old.unlink(missing_ok=True)


def load_start_hidden(folder: str | Path, s: int) -> tuple[list[torch.Tensor],
                                                           list[torch.Tensor] | None]:
    with safe_open(_start_hidden_path(folder, s), "pt") as f:
        keys = set(f.keys())
        outputs = [f.get_tensor(f"output.{i}") for i in range(len(keys))
                   if f"output.{i}" in keys]
        floats = [f.get_tensor(f"float.{i}") for i in range(len(keys)) if f"float.{i}" in keys]
    return outputs, floats or None


def committed_start(work: Path, num_segments: int) -> int:
    """How many blocks of the coordinated schedule's sequential start are committed. A block's
    outputs are written before its layers' codes, so a committed block's outputs — what the next
    block goes on from — are on disk (the newest two are kept)."""
    done = 0
    while done < num_segments and _segment_path(work, "start", done).is_file():
        done += 1
    return done
