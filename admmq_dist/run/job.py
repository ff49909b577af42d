"""The main job: a model in, a quantized checkpoint out (``admmq-algorithm.md`` §6).

Settle what the recipe leaves open for this model, cut the calibration text into windows, start
the workers (in this process, or as Ray actors), run a schedule over the decoder blocks, and
stream every finished block into the checkpoint writer; the folder appears only when complete,
with the resolved recipe and the run report beside the weights.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from ..checkpoint.writer import CheckpointWriter
from ..model.calibration import calibration_batches
from ..model.loading import ModelSource, TensorIndex, build_skeleton, resolve_model_dir
from ..model.moe import has_fused_experts
from ..recipe import Recipe, to_mapping
from ..report import render_html
from .backends import LocalBackend
from .coordinated import CoordinatedSchedule
from .depth_parallel import DepthParallelSchedule
from .device_model import output_dtype, peak_memory_bytes
from .faults import RECOVERABLE, FaultLog
from .plan import shard_batches
from .preflight import preflight, settle_recipe
from .ray_backend import RayBackend
from .sequential import SequentialSchedule
from .fingerprint import fingerprints, run_environment
from .layer import stored_grids
from .workdir import (DecoderBlockOutput, check_work_folder_shared, committed_anything,
                      prepare_work_dir)

log = logging.getLogger(__name__)


@torch.no_grad()
def quantize_model(model: str, out_dir: Path, recipe: Recipe, *, device: torch.device,
                   overwrite: bool = False, progress: bool = True, workers: int | None = None,
                   address: str | None = None, threads: int | None = None,
                   resume: bool = False, on_block=None, round_checkpoints: bool = False,
                   backend=None, max_worker_restarts: int = 3, worker_device: str = "auto",
                   step_timeout: float | None = None, log_level: str = "WARNING",
                   work_dir: Path | None = None) -> dict:
    """Quantize ``model`` (hub id or folder) into a checkpoint at ``out_dir``; returns a summary.

    ``workers``/``address`` run the workers as Ray actors (a local Ray instance, or the cluster
    at ``address``, or the one running here); otherwise one worker runs in this process.
    ``threads``: each worker's CPU threads, for every backend alike (default: this process's
    torch default), so that how the job was started never changes its bytes.
    ``worker_device``: the Ray workers' device (auto: a GPU each when the cluster has GPUs);
    ``step_timeout``: seconds a Ray worker call may take before the worker counts as lost
    (default: twice the job's modelled time, at least an hour); ``log_level``: the Ray workers'.
    ``resume`` finishes an interrupted run from its committed blocks, kept in ``work_dir``
    (default: beside the output; the round schedules' workers on a cluster write it too).
    ``on_block(b)`` is called after block ``b`` is written; ``round_checkpoints``
    (depth-parallel) also writes the model as each round left it, to ``<out_dir>.round-<r>``.
    ``backend`` runs the workers instead (e.g. ``LocalBackend(2)``: two in-process workers).
    ``max_worker_restarts``: how many lost workers the run survives (each redoes the step it
    broke) before it stops with what it committed kept for ``resume``.
    """
    if backend is not None and (workers is not None or address is not None):
        raise ValueError("pass a backend or workers/address, not both")
    faults = FaultLog(max_worker_restarts)
    local = backend is not None or (workers is None and address is None)
    plan = preflight(model, Path(out_dir), recipe, device=torch.device(device),
                     overwrite=overwrite, resume=resume,
                     workers=workers if backend is None else backend.requested, local=local,
                     modelled=not local and step_timeout is None, work_dir=work_dir)
    threads = threads or torch.get_num_threads()
    model_dir, config, recipe, notes = _settled(model, recipe)
    batches = calibration_batches(model_dir, recipe)
    previous_threads = torch.get_num_threads()
    if backend is None and workers is None and address is None:
        backend = LocalBackend(1)
    if isinstance(backend, LocalBackend):
        torch.set_num_threads(threads)
    if backend is None:
        if step_timeout is None and plan.modelled_seconds:
            # A hung GPU must not hang the job forever; a deadline loose enough for rates
            # measured on a slower device than the workers'.
            step_timeout = max(3600.0, 2 * plan.modelled_seconds)
        backend = RayBackend(workers or 1, address=address, threads=threads,
                             worker_device=worker_device, max_restarts=max_worker_restarts,
                             step_timeout=step_timeout, log_level=log_level)
    job = Job(model_dir, model, Path(out_dir), recipe, batches, backend, config=config,
              device=getattr(backend, "device", None) or str(device),
              progress=progress, notes=tuple(notes), faults=faults, work_root=work_dir)
    try:
        return job.run(overwrite=overwrite, resume=resume, on_block=on_block,
                       round_checkpoints=round_checkpoints)
    finally:
        backend.shutdown()
        torch.set_num_threads(previous_threads)


def _settled(model: str, recipe: Recipe) -> tuple:
    """``(model folder, config, recipe settled for the model, notes)``; the notes logged."""
    model_dir = resolve_model_dir(model)
    config, skeleton = build_skeleton(model_dir, torch.float32)
    recipe, notes = settle_recipe(recipe, has_fused_experts(skeleton))
    for note in notes:
        log.warning("%s", note)
    return model_dir, config, recipe, notes


class Job:
    """One run: the workers, the resume folder, the schedule, the writer and the summary."""

    def __init__(self, model_dir: Path, label: str, out_dir: Path, recipe: Recipe, batches,
                 backend, *, config, device: str, progress: bool,
                 notes: tuple[str, ...], faults: FaultLog | None = None,
                 work_root: Path | None = None) -> None:
        self.model_dir, self.label, self.out_dir = model_dir, label, out_dir
        self.recipe, self.batches, self.backend, self.config = recipe, batches, backend, config
        self.device, self.progress, self.notes = device, progress, notes
        self.work_root = work_root
        self.faults = faults if faults is not None else FaultLog(3)
        self.started = time.perf_counter()
        self.timings = {"load": 0.0, "forward": 0.0, "solve": 0.0, "write": 0.0, "commit": 0.0}
        self.index = TensorIndex(model_dir, getattr(config, "model_type", None))
        # Both schedules with rounds own blocks, not batches.
        self.depth_parallel = recipe.solver.schedule in ("depth-parallel", "coordinated")

    def run(self, *, overwrite: bool, resume: bool, on_block, round_checkpoints: bool) -> dict:
        prints = fingerprints(self.model_dir, self.recipe, self.batches,
                              run_environment(self.device, self.backend), self.backend.requested)
        self.work = prepare_work_dir(self.out_dir, prints, resume, overwrite, self.work_root)
        try:
            self._start()
            writer = self._writer(self.out_dir, overwrite)
            with writer:
                summary = self._quantize(writer, on_block, round_checkpoints)
        except BaseException:
            # A run that committed nothing leaves nothing to resume: a bad group size or a
            # refused model must not make the next attempt ask for --resume or --overwrite.
            if not committed_anything(self.work):
                shutil.rmtree(self.work, ignore_errors=True)
            raise
        shutil.rmtree(self.work, ignore_errors=True)
        summary["seconds"] = self._seconds()
        return summary

    def _start(self) -> None:
        t = time.perf_counter()
        # Depth-parallel workers own blocks, not batches: every batch flows through every worker.
        shards = ([dict(enumerate(self.batches))] * self.backend.requested if self.depth_parallel
                  else shard_batches(self.batches, self.backend.requested))
        self.backend.start(ModelSource.of(self.label, self.model_dir), self.recipe, shards,
                           self.device)
        self.timings["load"] += time.perf_counter() - t
        first = lambda method: self.backend.get([self.backend.call(0, method)])[0]  # noqa: E731
        self.num_blocks = first("num_blocks")
        self.layout_prefix = first("block_prefix")
        # Everything with a 2-D weight that stays dense is named in the ignore list (exactly).
        self.dense = first("dense_modules")
        self.ignore = list(self.dense)
        if self.depth_parallel:  # their workers commit into the work folder
            check_work_folder_shared(self.work, self.backend)

    def _writer(self, target: Path, overwrite: bool) -> CheckpointWriter:
        grid, output = self.recipe.grid, self.recipe.output
        writer = CheckpointWriter(target, format=output.format, bits=grid.bits,
                                  group_size=grid.group_size, symmetric=grid.symmetric,
                                  dtype=output_dtype(self.recipe, self.model_dir),
                                  overwrite=overwrite, grid_kind=grid.kind,
                                  max_shard_bytes=int(output.max_shard_gb * 1024**3))
        writer.check_ignore_entries(list(output.skip))
        writer.check_ignore_entries([n for n, linear_in_block in self.dense.items()
                                     if linear_in_block])
        return writer

    def _quantize(self, writer: CheckpointWriter, on_block, round_checkpoints: bool) -> dict:
        report: list[dict] = []
        rounds = None
        if self.depth_parallel:
            kind = (CoordinatedSchedule if self.recipe.solver.schedule == "coordinated"
                    else DepthParallelSchedule)
            schedule = kind(self.backend, self.recipe, self.index, self.layout_prefix,
                            self.num_blocks, len(self.batches), self.timings, self.work,
                            self.faults)
            rounds = schedule.run(writer.check_width, self.progress,
                                  self._write_round if round_checkpoints else None)
            self.memory = [schedule.memory_plan]
            # Block by block from the workers into the writer: the driver holds one block.
            for b, out in schedule.blocks():
                self._write_block(writer, b, out)
                report.extend(out.report)
                del out
                if on_block is not None:
                    on_block(b)
            resumed = 0
        else:
            resumed = self._sequential(writer, report, on_block)
        t = time.perf_counter()
        self._write_outer(writer)
        summary = self._summary(report, resumed, rounds)
        if self.recipe.report.html:
            # The page's time breakdown is the run's up to here (the final renames are not in it).
            self.timings["write"] += time.perf_counter() - t
            t = time.perf_counter()
        extra = self._extra_files(report, summary)
        writer.finalize(config=self.config.to_dict(), source_dir=self.model_dir,
                        ignore=self.ignore, extra_files=extra)
        self.timings["write"] += time.perf_counter() - t
        return summary

    def _sequential(self, writer: CheckpointWriter, report: list[dict], on_block) -> int:
        """Every decoder block through the sequential schedule, each written as it finishes;
        returns how many were resumed from commits."""
        schedule = SequentialSchedule(self.backend, self.recipe, self.index, self.layout_prefix,
                                      self.num_blocks, self.timings, self.work,
                                      writer.check_width, self.faults)
        tty = sys.stderr.isatty()
        resumed = 0
        self.moved, self.memory = [], []
        # Layers below blocks: on big models a block takes minutes, and the layer bar's ETA
        # moves. Only on a terminal: in a log file a nested bar is a stream of cursor escapes.
        with tqdm(total=self.num_blocks, desc="blocks", unit="block", disable=not self.progress,
                  mininterval=1 if tty else 30) as bar, \
                tqdm(desc="layers", unit="layer", position=1, leave=False,
                     disable=not self.progress or not tty, mininterval=1) as layer_bar:
            schedule.layer_bar = layer_bar
            for b, out, was_resumed in schedule.blocks():
                resumed += was_resumed
                self.moved.append({"block": b, **out.moved})
                if out.memory:
                    self.memory.append({"block": b, **out.memory})
                self._write_block(writer, b, out)
                report.extend(out.report)
                bar.set_postfix(self._postfix(out))
                bar.update(1)
                if on_block is not None:
                    on_block(b)
        return resumed

    def _postfix(self, out: DecoderBlockOutput) -> dict:
        solved = [r["loss"] for r in out.report if r["loss"] is not None]
        postfix = {"loss": f"{sum(solved) / len(solved):.4f}"} if solved else {}
        if self.backend.size > 1 and self.progress:
            # Every worker's share of the wall time so far: the cluster's progress at a glance.
            busy = self.backend.get([self.backend.call(w, "stats")
                                     for w in range(self.backend.size)])
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            postfix["busy"] = "/".join(
                f"{(s['forward'] + s['merge'] + s['solve']) / elapsed:.0%}" for s in busy)
        return postfix

    def _write_block(self, writer: CheckpointWriter, b: int, out: DecoderBlockOutput) -> None:
        """Block ``b``'s quantized linears, and its dense tensors (norms, routers, skips)."""
        t = time.perf_counter()
        prefix = f"{self.layout_prefix}.{b}"
        for name, (codes, grid) in stored_grids(self.recipe.grid, out.quantized).items():
            writer.add_quantized(out.disk[name], codes, grid)
        written = {f"{out.disk[name]}.weight" for name in out.quantized} | set(out.consumed)
        for disk, name in zip(self.index.names(), self.index.module_names()):
            if name.startswith(prefix + ".") and disk not in written:
                writer.add_tensor(disk, self.index.read(disk))
        self.timings["write"] += time.perf_counter() - t

    def _write_outer(self, writer: CheckpointWriter) -> None:
        """Everything outside the decoder blocks (embeddings, final norm, lm_head), as it is."""
        for disk, name in zip(self.index.names(), self.index.module_names()):
            if not name.startswith(self.layout_prefix + "."):
                writer.add_tensor(disk, self.index.read(disk))

    def _write_round(self, r: int, blocks) -> None:
        """A checkpoint of the model as round ``r`` left it (``blocks``: ``(b, output)`` one at a
        time), beside the output."""
        with self._writer(self.out_dir.parent / f"{self.out_dir.name}.round-{r}", True) as extra:
            for b, out in blocks:
                self._write_block(extra, b, out)
            self._write_outer(extra)
            extra.finalize(config=self.config.to_dict(), source_dir=self.model_dir,
                           ignore=self.ignore)

    def _stats(self) -> list[dict]:
        """Every worker's figures; a lost one costs only its figures (rebuilt, it restarts)."""
        while True:
            try:
                return self.backend.get([self.backend.call(w, "stats")
                                         for w in range(self.backend.size)])
            except RECOVERABLE as exc:
                self.faults.record("summary", exc, self.backend.restarted(), "workers' figures")

    def _summary(self, report: list[dict], resumed: int, rounds) -> dict:
        grid = self.recipe.grid
        stats = self._stats()
        solved = [r for r in report if r["loss"] is not None]
        summary = {
            "model": self.label, "output": str(self.out_dir),
            "format": self.recipe.output.format, "bits": grid.bits,
            "group_size": grid.group_size, "symmetric": grid.symmetric,
            "method": self.recipe.solver.method, "layers": len(report),
            "mean_loss": sum(r["loss"] for r in solved) / max(len(solved), 1),
            "workers": self.backend.size, "resumed_blocks": resumed,
            "nodes": len({p["node"] for p in getattr(self.backend, "placement", ())}) or 1,
            # What the bytes depend on besides the inputs: the workers' device and threads.
            "threads_per_worker": getattr(self.backend, "threads", None) or torch.get_num_threads(),
            "step_timeout_seconds": getattr(self.backend, "step_timeout", None),
            "worker_busy_seconds": [{k: v for k, v in s.items() if k != "factorizations"}
                                    for s in stats],
            # Per Hessian (a layer input: q/k/v share one), at most one of each per worker.
            "factorizations": {kind: sum(s["factorizations"][kind] for s in stats)
                               for kind in ("eigh", "cholesky", "asymmetric", "hessians")},
            # Workers' compute-device peaks (host RSS for CPU workers), and the driver's RSS.
            "peak_memory_bytes": max(s["peak_memory_bytes"] for s in stats),
            "driver_peak_rss_bytes": peak_memory_bytes(torch.device("cpu")),
            "device": str(self.device), "notes": list(self.notes),
            # Every lost worker and what it cost (redone steps); empty for a clean run.
            "faults": self.faults.faults,
        }
        calibrations = [r["calibration"] for r in report if r["calibration"] != "dense"]
        if calibrations:
            summary["experts"] = {h: calibrations.count(h) for h in ("routed", "all-tokens", "rtn")}
        if rounds is not None:
            summary["schedule"] = self.recipe.solver.schedule
            summary["rounds"] = rounds
            # The work folder at its fullest: the last two rounds' commits (older ones pruned).
            summary["work_peak_bytes"] = max((h.get("work_bytes", 0) for h in rounds), default=0)
            summary["memory_plan"] = self.memory[0]
        else:
            kinds = sorted({k for row in self.moved for k in row} - {"block"})
            summary["bytes_moved"] = {
                "total": {k: sum(row.get(k, 0) for row in self.moved) for k in kinds},
                "per_block": self.moved}
            if self.memory:
                worst = max(self.memory, key=lambda row: row["peak_bytes"])
                summary["memory_plan"] = {
                    **{k: worst[k] for k in ("peak_bytes", "worst", "items")},
                    **{k: max(r.get(k, 1) for r in self.memory)
                       for k in ("in_process_peak_bytes", "expert_waves")},
                    "per_block": [{k: r[k] for k in ("block", "peak_bytes")} for r in self.memory]}
        return summary

    def _extra_files(self, report: list[dict], summary: dict) -> dict[str, str]:
        """``recipe.yaml`` (the notes as comments above the resolved settings), ``report.jsonl``
        and, unless turned off, ``report.html``."""
        recipe_yaml = "".join(f"# {note}\n" for note in self.notes) + yaml.safe_dump(
            to_mapping(self.recipe), sort_keys=False)
        extra = {"recipe.yaml": recipe_yaml,
                 "report.jsonl": "".join(json.dumps(r) + "\n" for r in report)}
        if self.recipe.report.html:
            extra["report.html"] = render_html(report, {**summary, "seconds": self._seconds()},
                                               recipe_yaml)
        return extra

    def _seconds(self) -> dict[str, float]:
        seconds = {k: round(v, 3) for k, v in self.timings.items()}
        seconds["total"] = round(time.perf_counter() - self.started, 3)
        return seconds
