"""The coordinator: drives workers through the data-parallel sequential schedule, owns the plan,
the results and the checkpoint writer, commits finished blocks, and resumes.

Per decoder block (``architecture.md``, "Across GPUs and nodes"): the block's owner reads it from
safetensors and shares it with the other workers; every worker accumulates Hessians over its
shard of the calibration batches, stage by stage (true sequential); each linear's row blocks are
spread over workers by cost, each solver merges the partial Hessians it needs (exactly, whatever
the sharding: :class:`~admmq_dist.quant.hessian.HessianAccumulator`), the coordinator assembles
and broadcasts the quantized weights, and every worker propagates its own shard. Activations
never move. Nothing the coordinator decides depends on the number of workers, so one worker, two
workers and the in-process run write the same bytes.

The coordinator imports no Ray: a *backend* runs the workers — :class:`LocalBackend` here, in
this process; :class:`admmq_dist.cluster.RayBackend` as Ray actors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import CheckpointWriter
from .checkpoint.writer import remove_stale_partials
from .model.capture import Stage
from .model.loading import TensorIndex
from .quant.grid import Grid
from .quant.solvers.rows import combine, layer_history, row_blocks
from .recipe import Recipe, to_mapping
from .worker import ALL_TOKENS, ShardWorker, Worker

log = logging.getLogger(__name__)


class WorkerLost(RuntimeError):
    """A worker died (its process or node); the backend restarts it and the block is redone."""


class ResumeError(ValueError):
    """The interrupted run cannot be resumed as asked; the message says why and what to do."""


class LocalBackend:
    """Workers in this process, called one after another (tests, single-GPU runs)."""

    def __init__(self, workers: int = 1) -> None:
        self.requested = workers
        self.workers: list[Worker] = []

    def start(self, model_dir: str, recipe: Recipe, shards: list[dict[int, torch.Tensor]],
              device: str, threads: int | None = None) -> None:
        cls = ShardWorker if recipe.solver.schedule == "depth-parallel" else Worker
        self.workers = [cls(model_dir, recipe, shard, device, None) for shard in shards]

    @property
    def size(self) -> int:
        return len(self.workers)

    def call(self, w: int, method: str, *args):
        return getattr(self.workers[w], method)(*args)

    def get(self, futures):
        return futures

    def restarted(self) -> list[int]:
        return []

    def shutdown(self) -> None:
        self.workers = []


def shard_batches(batches: list[torch.Tensor], num_workers: int) -> list[dict[int, torch.Tensor]]:
    """Contiguous shards by global batch index; worker 0 always holds batch 0."""
    if num_workers < 1:
        raise ValueError(f"workers={num_workers} must be at least 1")
    if num_workers > len(batches):
        raise ValueError(
            f"{num_workers} workers but only {len(batches)} calibration batches; use fewer "
            "workers or more --num-samples (or a smaller --batch-size)")
    bounds = [len(batches) * k // num_workers for k in range(num_workers + 1)]
    return [{i: batches[i] for i in range(bounds[k], bounds[k + 1])} for k in range(num_workers)]


def assign(units: list[tuple[str, tuple[int, int], int]], num_workers: int) -> dict[int, list]:
    """Longest-processing-time assignment of ``(linear, rows, cost)`` units: deterministic (ties
    go to the lowest worker, equal costs keep plan order)."""
    load = [0] * num_workers
    out: dict[int, list] = {w: [] for w in range(num_workers)}
    for unit in sorted(units, key=lambda u: -u[2]):
        w = min(range(num_workers), key=lambda k: (load[k], k))
        load[w] += unit[2]
        out[w].append(unit)
    return out


# ---------------------------------------------------------------------------- fingerprints


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprints(model_dir: Path, recipe: Recipe, batches: list[torch.Tensor]) -> dict[str, str]:
    """What a resumed run must share with the interrupted one."""
    files = sorted((p.name, p.stat().st_size) for p in model_dir.glob("*.safetensors"))
    config = (model_dir / "config.json").read_bytes() if (model_dir / "config.json").is_file() else b""
    mapping = to_mapping(recipe)
    mapping["output"] = {k: v for k, v in mapping["output"].items() if k != "max_shard_gb"}
    return {
        "model": _sha(config + json.dumps(files).encode()),
        "recipe": _sha(yaml.safe_dump(mapping, sort_keys=True).encode()),
        "calibration": _sha(torch.cat([b.flatten() for b in batches]).numpy().tobytes()),
        "version": __version__,
    }


def work_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.admmq-work"


@dataclass
class BlockOutput:
    """A finished block: per quantized linear its codes and grid, and the report rows."""

    # block-relative linear name -> (codes, scale, zero); ``disk`` maps it to the checkpoint name
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    disk: dict[str, str] = field(default_factory=dict)
    report: list[dict] = field(default_factory=list)
    consumed: list[str] = field(default_factory=list)


def commit_block(work: Path, b: int, out: BlockOutput) -> None:
    """Write block ``b``'s results atomically (temp file, fsync, rename)."""
    tensors = {}
    for name, (codes, scale, zero) in out.quantized.items():
        tensors[f"{name}.codes"] = codes.to(torch.uint8).contiguous()
        tensors[f"{name}.scale"] = scale.contiguous()
        tensors[f"{name}.zero"] = zero.contiguous()
    meta = {"report": json.dumps(out.report), "consumed": json.dumps(out.consumed),
            "disk": json.dumps(out.disk)}
    final = work / f"block-{b:05d}.safetensors"
    tmp = work / f".block-{b:05d}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def read_commit(work: Path, b: int) -> BlockOutput | None:
    path = work / f"block-{b:05d}.safetensors"
    if not path.is_file():
        return None
    out = BlockOutput()
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        out.disk = json.loads(meta["disk"])
        for name in out.disk:
            out.quantized[name] = (f.get_tensor(f"{name}.codes").to(torch.int32),
                                   f.get_tensor(f"{name}.scale"), f.get_tensor(f"{name}.zero"))
    out.report = json.loads(meta["report"])
    out.consumed = json.loads(meta["consumed"])
    return out


def prepare_work_dir(out_dir: Path, prints: dict[str, str], resume: bool, overwrite: bool) -> Path:
    work = work_dir_for(out_dir)
    manifest = work / "manifest.json"
    if work.exists():
        if resume and manifest.is_file():
            old = json.loads(manifest.read_text())
            changed = [k for k in prints if old.get(k) != prints[k]]
            if changed:
                raise ResumeError(
                    f"cannot resume into {out_dir}: the {', '.join(changed)} changed since the "
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
    tmp = work / "manifest.json.tmp"
    tmp.write_text(json.dumps(prints, indent=1))
    os.replace(tmp, manifest)
    return work


# ------------------------------------------------------------------------------- the loop


class Coordinator:
    """One quantization run over a backend's workers."""

    def __init__(self, backend, recipe: Recipe, index: TensorIndex, block_prefix,
                 timings: dict[str, float]) -> None:
        self.backend = backend
        self.recipe = recipe
        self.index = index
        self.block_prefix = block_prefix
        self.timings = timings
        # Per expert list (block-relative path): how each expert is calibrated and its routed
        # tokens, decided at the gate/up stage and used again at the down stage.
        self._expert_how: dict[str, dict[int, str]] = {}
        self._expert_tokens: dict[str, list[int]] = {}
        # A tqdm bar over every linear of the run (its total is set from the first block's plan).
        self.layer_bar = None
        # check_width(module, in_features) from the writer: run on a block's linears before any
        # of its forward passes, so a group size the format cannot hold fails in seconds.
        self.check_width = None

    def _get(self, futures):
        return self.backend.get(futures)

    def owner(self, b: int, num_blocks: int) -> int:
        """Workers own contiguous shards of blocks."""
        return b * self.backend.size // num_blocks

    def load(self, b: int, num_blocks: int) -> list[str]:
        """The owner reads block ``b`` from safetensors and shares it with the other workers."""
        owner = self.owner(b, num_blocks)
        n = self.backend.size
        if n == 1:
            return self._get([self.backend.call(0, "load_block", b)])[0]
        state = self.backend.call(owner, "block_state", b)
        return self._get([self.backend.call(w, "load_block", b, None if w == owner else state)
                          for w in range(n)])[owner]

    def replay(self, b: int, num_blocks: int, out: BlockOutput, workers: list[int]) -> None:
        weights = self.weights(out)
        owner = self.owner(b, num_blocks)
        state = None if workers == [owner] or self.backend.size == 1 else \
            self.backend.call(owner, "block_state", b)
        self._get([self.backend.call(w, "replay", b, weights, None if w == owner else state)
                   for w in workers])

    def weights(self, out: BlockOutput) -> dict[str, torch.Tensor]:
        """The dequantized weights every worker puts in place, computed once from codes and
        grid: the same bytes in a first run, after a resume and after a worker restart."""
        spec = self.recipe.grid
        result = {}
        for name, (codes, scale, zero) in out.quantized.items():
            grid = Grid(spec.bits, spec.effective_group_size(codes.shape[1]), codes.shape[1],
                        spec.symmetric, scale, zero)
            result[name] = grid.dequantize(codes)
        return result

    def run_block(self, b: int, num_blocks: int) -> BlockOutput:
        """Quantize block ``b`` on every worker; returns its results (workers keep it loaded and
        propagated)."""
        t = time.perf_counter()
        consumed = self.load(b, num_blocks)
        self.timings["load"] += time.perf_counter() - t
        plan = self._get([self.backend.call(0, "plan")])[0]
        if self.layer_bar is not None and not self.layer_bar.total:
            per_block = sum(len(g) for st in plan["stages"] for g in st.groups)
            self.layer_bar.reset(total=per_block * num_blocks)
            self.layer_bar.update(per_block * b)  # blocks resumed from commits
        prefix = self.block_prefix(b)
        if self.check_width is not None:
            for name, (_, cols) in plan["shapes"].items():
                if name not in plan["skipped"]:
                    self.check_width(f"{prefix}.{name}", cols)
        out = BlockOutput(consumed=consumed)
        n = self.backend.size
        rb = self.recipe.solver.row_block
        for stage in plan["stages"]:
            how = self._capture(stage, plan, out)
            units = []
            for group in stage.groups:
                for name in group:
                    rows, cols = plan["shapes"][name]
                    for start, stop in row_blocks(rows, rb):
                        units.append((name, (start, stop), (stop - start) * cols))
            assignment = assign(units, n)
            t = time.perf_counter()
            calls = {}
            part_refs: dict[str, list] = {}
            for w in range(n):
                by_name: dict[str, list] = {}
                for name, rows, _ in assignment[w]:
                    by_name.setdefault(name, []).append(rows)
                for name, rows in by_name.items():
                    key = how[name]["key"]
                    if key is not None and key not in part_refs:
                        part_refs[key] = [self.backend.call(k, "hessian_part", key)
                                          for k in range(n)]
                    parts = part_refs[key] if key is not None else []
                    calls[(w, name)] = self.backend.call(w, "solve", name, key, rows, *parts)
            results = dict(zip(calls, self._get(list(calls.values()))))
            self.timings["solve"] += time.perf_counter() - t
            stage_weights = {}
            for group in stage.groups:
                for name in group:
                    blocks, grid_state, tokens = [], None, None
                    for (w, nm), r in results.items():
                        if nm == name:
                            blocks += r["blocks"]
                            grid_state = r["grid"] or grid_state
                            tokens = r["tokens"] if tokens is None else tokens
                    codes = torch.cat([blk.codes for blk in sorted(blocks, key=lambda x: x.start)])
                    full = f"{prefix}.{name}"
                    disk = self.index.disk_name(f"{full}.weight")[: -len(".weight")]
                    out.quantized[name] = (codes, grid_state["scale"], grid_state["zero"])
                    out.disk[name] = disk
                    spec = self.recipe.grid
                    grid = Grid(spec.bits, spec.effective_group_size(codes.shape[1]),
                                codes.shape[1], spec.symmetric, grid_state["scale"],
                                grid_state["zero"])
                    result = combine(blocks, grid)
                    stage_weights[name] = grid.dequantize(codes)
                    solved = how[name]["key"] is not None
                    out.report.append({
                        "layer": full, "block": b, "method": result.method,
                        "shape": list(codes.shape), "loss": result.loss if solved else None,
                        "iterations": result.iterations, "seconds": round(result.seconds, 4),
                        "calibration": how[name]["calibration"],
                        "tokens": how[name]["tokens"] if how[name]["tokens"] is not None else tokens,
                        "group": group, **layer_history(blocks)})
            self._get([self.backend.call(w, "set_weights", stage_weights) for w in range(n)])
            if self.layer_bar is not None:
                self.layer_bar.update(len(stage_weights))
        t = time.perf_counter()
        self._get([self.backend.call(w, "propagate") for w in range(n)])
        self.timings["forward"] += time.perf_counter() - t
        return out

    def _capture(self, stage: Stage, plan: dict, out: BlockOutput) -> dict[str, dict]:
        """Capture the stage on every worker; for each linear: the Hessian key its solver merges
        (None: round to nearest), how it was calibrated and on how many tokens."""
        n = self.backend.size
        calibrate_all: list[int] = []
        if stage.experts is not None and stage.role == 1:
            calibrate_all = sorted(e for e, how in self._expert_how.get(stage.experts, {}).items()
                                   if how == "all-tokens")
        t = time.perf_counter()
        captured = self._get([self.backend.call(w, "capture", stage, calibrate_all)
                              for w in range(n)])
        self.timings["forward"] += time.perf_counter() - t
        result = {}
        if stage.experts is None:
            for group in stage.groups:
                for name in group:
                    result[name] = {"key": group[0], "calibration": "dense", "tokens": None}
            return result
        if stage.role == 0:
            routed = [sum(c["routed"][e] for c in captured) for e in range(len(captured[0]["routed"]))]
            cal = self.recipe.calibration
            hidden = plan["shapes"][stage.groups[0][0]][1]
            threshold = hidden if cal.min_expert_tokens is None else cal.min_expert_tokens
            self._expert_how[stage.experts] = {
                e: "routed" if n_e >= threshold and n_e > 0 else cal.expert_fallback
                for e, n_e in enumerate(routed)}
            self._expert_tokens[stage.experts] = routed
        how_by_expert = self._expert_how[stage.experts]
        for group in stage.groups:
            e = int(group[0][len(stage.experts) + 1:].split(".")[0])
            how = how_by_expert[e]
            key = group[0]
            if how == "rtn":
                key = None
            elif how == "all-tokens" and stage.role == 0:
                key = ALL_TOKENS + stage.experts
            for name in group:
                result[name] = {"key": key, "calibration": how,
                                "tokens": self._expert_tokens[stage.experts][e]}
        return result


def run(model_dir: Path, model_label: str, out_dir: Path, recipe: Recipe, batches, backend,
        *, device: str, threads: int | None, config, overwrite: bool, resume: bool,
        progress: bool, on_block=None, round_checkpoints: bool = False,
        notes: tuple[str, ...] = ()) -> dict:
    """The whole job; ``on_block(b)`` is called after block ``b`` is committed;
    ``round_checkpoints`` (depth-parallel) also writes ``<out>.round-<r>`` after every round;
    ``notes`` (choices made for the user, engines that will not serve the layout) head the
    checkpoint's ``recipe.yaml`` as comments and go into the summary."""
    started = time.perf_counter()
    timings = {"load": 0.0, "forward": 0.0, "solve": 0.0, "write": 0.0, "commit": 0.0}
    index = TensorIndex(model_dir, getattr(config, "model_type", None))
    prints = fingerprints(model_dir, recipe, batches)
    work = prepare_work_dir(out_dir, prints, resume, overwrite)
    try:
        return _run(model_dir, model_label, out_dir, recipe, batches, backend, device=device,
                    threads=threads, config=config, overwrite=overwrite, progress=progress,
                    on_block=on_block, started=started, timings=timings, index=index,
                    work=work, round_checkpoints=round_checkpoints, notes=notes)
    except BaseException:
        # A run that committed nothing leaves nothing to resume: a bad group size or a refused
        # model must not make the next attempt ask for --resume or --overwrite.
        if not any(work.glob("block-*.safetensors")) and not any(work.glob("round-*.done")):
            shutil.rmtree(work, ignore_errors=True)
        raise


def _run(model_dir: Path, model_label: str, out_dir: Path, recipe: Recipe, batches, backend,
         *, device: str, threads: int | None, config, overwrite: bool, progress: bool, on_block,
         started: float, timings: dict, index: TensorIndex, work: Path,
         round_checkpoints: bool = False, notes: tuple[str, ...] = ()) -> dict:
    from .pipeline import output_dtype, peak_memory_bytes

    grid_spec = recipe.grid
    t = time.perf_counter()
    depth_parallel = recipe.solver.schedule == "depth-parallel"
    # Depth-parallel workers own blocks, not batches: every batch flows through every worker.
    shards = ([dict(enumerate(batches))] * backend.requested if depth_parallel
              else shard_batches(batches, backend.requested))
    backend.start(str(model_dir), recipe, shards, device, threads)
    timings["load"] += time.perf_counter() - t
    num_blocks = backend.get([backend.call(0, "num_blocks")])[0]
    layout_prefix = backend.get([backend.call(0, "block_prefix")])[0]
    # Everything with a 2-D weight that stays dense is named in the ignore list (exactly).
    dense = backend.get([backend.call(0, "dense_modules")])[0]
    coord = Coordinator(backend, recipe, index, lambda b: f"{layout_prefix}.{b}", timings)
    writer = CheckpointWriter(out_dir, format=recipe.output.format, bits=grid_spec.bits,
                              group_size=grid_spec.group_size, symmetric=grid_spec.symmetric,
                              dtype=output_dtype(recipe, model_dir), overwrite=overwrite,
                              max_shard_bytes=int(recipe.output.max_shard_gb * 1024**3))
    coord.check_width = writer.check_width
    writer.check_ignore_entries(list(recipe.output.skip))
    writer.check_ignore_entries([name for name, linear_in_block in dense.items() if linear_in_block])
    report: list[dict] = []
    ignore = list(dense)
    resumed = 0
    rounds = None
    try:
        if depth_parallel:
            def write_round(r: int, outputs: dict[int, BlockOutput]) -> None:
                """A checkpoint of the model as round ``r`` left it, beside the output."""
                target = out_dir.parent / f"{out_dir.name}.round-{r}"
                extra = CheckpointWriter(target, format=recipe.output.format,
                                         bits=grid_spec.bits, group_size=grid_spec.group_size,
                                         symmetric=grid_spec.symmetric,
                                         dtype=output_dtype(recipe, model_dir), overwrite=True,
                                         max_shard_bytes=int(recipe.output.max_shard_gb * 1024**3))
                with extra:
                    for b, out in outputs.items():
                        _write_block(extra, index, f"{layout_prefix}.{b}", out, recipe)
                    for disk, name in zip(index.names(), index.module_names()):
                        if not name.startswith(layout_prefix + "."):
                            extra.add_tensor(disk, index.read(disk))
                    extra.finalize(config=config.to_dict(), source_dir=model_dir, ignore=ignore)

            done, rounds = _depth_parallel(backend, recipe, index, f"{layout_prefix}.",
                                           num_blocks, len(batches), timings, progress, work,
                                           writer.check_width,
                                           write_round if round_checkpoints else None)
        bar = tqdm(range(num_blocks), desc="blocks", unit="block",
                   disable=not progress or depth_parallel,
                   mininterval=1 if sys.stderr.isatty() else 30)
        # Layers below blocks: on big models a block takes minutes, and the layer bar's ETA moves.
        # Only on a terminal: in a log file a nested bar is a stream of cursor escapes.
        coord.layer_bar = tqdm(desc="layers", unit="layer", position=1, leave=False,
                               disable=not progress or depth_parallel or not sys.stderr.isatty(),
                               mininterval=1 if sys.stderr.isatty() else 30)
        for b in bar:
            out = done[b] if depth_parallel else read_commit(work, b)
            if out is not None and not depth_parallel:
                resumed += 1
                t = time.perf_counter()
                coord.replay(b, num_blocks, out, list(range(backend.size)))
                timings["forward"] += time.perf_counter() - t
            elif out is None:
                out = _run_block_with_restarts(coord, b, num_blocks, work)
                t = time.perf_counter()
                commit_block(work, b, out)
                timings["commit"] += time.perf_counter() - t
                backend.get([backend.call(w, "release_block") for w in range(backend.size)])
            t = time.perf_counter()
            _write_block(writer, index, f"{layout_prefix}.{b}", out, recipe)
            timings["write"] += time.perf_counter() - t
            report.extend(out.report)
            solved = [r["loss"] for r in out.report if r["loss"] is not None]
            postfix = {"loss": f"{sum(solved) / len(solved):.4f}"} if solved else {}
            if backend.size > 1 and progress:
                # Every worker's share of the wall time so far: the cluster's progress at a glance.
                busy = backend.get([backend.call(w, "stats") for w in range(backend.size)])
                elapsed = max(time.perf_counter() - started, 1e-9)
                postfix["busy"] = "/".join(
                    f"{(s['forward'] + s['merge'] + s['solve']) / elapsed:.0%}" for s in busy)
            bar.set_postfix(postfix)
            if on_block is not None:
                on_block(b)
        coord.layer_bar.close()
        t = time.perf_counter()
        for disk, name in zip(index.names(), index.module_names()):
            if not name.startswith(layout_prefix + "."):
                writer.add_tensor(disk, index.read(disk))
        stats = backend.get([backend.call(w, "stats") for w in range(backend.size)])
        solved = [r for r in report if r["loss"] is not None]
        summary = {
            "model": model_label, "output": str(out_dir), "format": recipe.output.format,
            "bits": grid_spec.bits, "group_size": grid_spec.group_size,
            "symmetric": grid_spec.symmetric, "method": recipe.solver.method,
            "layers": len(report),
            "mean_loss": sum(r["loss"] for r in solved) / max(len(solved), 1),
            "workers": backend.size, "resumed_blocks": resumed,
            "worker_busy_seconds": stats,
            # Workers' compute-device peaks (host RSS for CPU workers), and the driver's RSS.
            "peak_memory_bytes": max(s["peak_memory_bytes"] for s in stats),
            "driver_peak_rss_bytes": peak_memory_bytes(torch.device("cpu")),
            "device": str(device),
            "notes": list(notes),
        }
        calibrations = [r["calibration"] for r in report if r["calibration"] != "dense"]
        if calibrations:
            summary["experts"] = {how: calibrations.count(how)
                                  for how in ("routed", "all-tokens", "rtn")}
        if rounds is not None:
            summary["schedule"] = "depth-parallel"
            summary["rounds"] = rounds
        recipe_yaml = "".join(f"# {note}\n" for note in notes) + yaml.safe_dump(
            to_mapping(recipe), sort_keys=False)
        extra = {"recipe.yaml": recipe_yaml,
                 "report.jsonl": "".join(json.dumps(r) + "\n" for r in report)}
        if recipe.report.html:
            from .report import render_html

            # The page's time breakdown is the run's up to here (the final renames are not in it).
            timings["write"] += time.perf_counter() - t
            t = time.perf_counter()
            seconds = {k: round(v, 3) for k, v in timings.items()}
            seconds["total"] = round(time.perf_counter() - started, 3)
            extra["report.html"] = render_html(report, {**summary, "seconds": seconds},
                                               recipe_yaml)
        writer.finalize(config=config.to_dict(), source_dir=model_dir, ignore=ignore,
                        extra_files=extra)
        timings["write"] += time.perf_counter() - t
    except BaseException:
        writer.abort()
        raise
    shutil.rmtree(work, ignore_errors=True)
    summary["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    summary["seconds"]["total"] = round(time.perf_counter() - started, 3)
    return summary


def _run_block_with_restarts(coord: Coordinator, b: int, num_blocks: int, work: Path,
                             attempts: int = 3) -> BlockOutput:
    """Run block ``b``; when a worker dies, bring restarted workers up to block ``b`` from the
    committed blocks and redo the block on every worker (results are deterministic, so the redo
    writes the same bytes)."""
    for attempt in range(attempts):
        try:
            return coord.run_block(b, num_blocks)
        except WorkerLost as exc:
            if attempt == attempts - 1:
                raise
            restarted = coord.backend.restarted()
            log.warning("worker lost on block %d (%s); restarted %s, redoing the block", b, exc,
                        restarted)
            for w in range(coord.backend.size):
                coord.backend.get([coord.backend.call(w, "release_block")])
            for done in range(b):
                out = read_commit(work, done)
                coord.replay(done, num_blocks, out, restarted)
    raise AssertionError("unreachable")


def _write_block(writer: CheckpointWriter, index: TensorIndex, prefix: str, out: BlockOutput,
                 recipe: Recipe) -> None:
    spec = recipe.grid
    for name, (codes, scale, zero) in out.quantized.items():
        grid = Grid(spec.bits, spec.effective_group_size(codes.shape[1]), codes.shape[1],
                    spec.symmetric, scale, zero)
        writer.add_quantized(out.disk[name], codes, grid)
    written = {f"{out.disk[name]}.weight" for name in out.quantized} | set(out.consumed)
    for disk, name in zip(index.names(), index.module_names()):
        if name.startswith(prefix + ".") and disk not in written:
            writer.add_tensor(disk, index.read(disk))


def _depth_parallel(backend, recipe: Recipe, index: TensorIndex, blocks_prefix: str,
                    num_blocks: int, num_batches: int, timings: dict, progress: bool,
                    work: Path, check_width, on_round=None):
    """Round 0 and the correction rounds; returns every block's output and per-round figures.

    The blocks are cut into ``solver.segments`` contiguous segments (one per worker by default),
    and workers own whole segments for the whole run. Round 0: one pipelined forward of the float
    model — batches flow from worker to worker, all computing at once — leaves every segment its
    float input, then every worker quantizes its segments at once, sequentially inside each
    (stage by stage, block by block, as the sequential schedule does). Round r re-solves the
    segments from r on, warm-started, each from the output the segment before it produced in
    round r - 1: segment r - 1 was then solved on final inputs, so after round r segments 0…r are
    exactly sequential and the error left is only downstream. Segment r, whose inputs are final in
    round r, is solved cold (the full schedule, as the sequential schedule would), the later ones
    warm-started. The result depends on the segments,
    never on how many workers hold them. Every round is committed (layer states and segment
    outputs), so a resumed run continues from the last finished round with the same bytes.
    """
    num_segments = min(recipe.solver.segments or backend.size, num_blocks)
    n = min(backend.size, num_segments)
    seg_bounds = [num_blocks * j // num_segments for j in range(num_segments + 1)]
    segments = {j: list(range(seg_bounds[j], seg_bounds[j + 1])) for j in range(num_segments)}
    owned = {k: list(range(num_segments * k // n, num_segments * (k + 1) // n)) for k in range(n)}
    seg_owner = {j: k for k, js in owned.items() for j in js}
    backend.get([backend.call(k, "own", {j: segments[j] for j in owned[k]}) for k in range(n)])
    for widths in backend.get([backend.call(k, "layer_widths") for k in range(n)]):
        for (b, name), cols in sorted(widths.items()):
            check_width(f"{blocks_prefix}{b}.{name}", cols)
    warm = recipe.solver.warm()
    history: list[dict] = []
    latest: dict[tuple[int, str], dict] = {}
    started, aside = time.perf_counter(), 0.0  # aside: time spent writing round checkpoints
    owner = {b: seg_owner[j] for j, blocks in segments.items() for b in blocks}

    def collect() -> dict[int, BlockOutput]:
        """Every block's current codes and report rows, as the writer takes them."""
        outputs = {}
        for b in range(num_blocks):
            prefix = f"{blocks_prefix}{b}"
            out = BlockOutput()
            results = backend.get([backend.call(owner[b], "results", b)])[0]
            for row in (x for x in latest.values() if x["block"] == b):
                name = row["layer"]
                out.quantized[name] = results[name]
                out.disk[name] = index.disk_name(f"{prefix}.{name}.weight")[: -len(".weight")]
                out.report.append({
                    "layer": f"{prefix}.{name}", "block": b, "method": row["method"],
                    "shape": list(results[name][0].shape), "loss": row["loss"],
                    "iterations": row["iterations"], "seconds": round(row["seconds"], 4),
                    "calibration": "dense", "tokens": row["tokens"], "group": row["group"],
                    "changed_last_round": row["changed"],
                    **{k: row[k] for k in ("residual", "rho", "compare") if k in row}})
            outputs[b] = out
        return outputs

    first = 0
    finished = sorted(work.glob("round-*.done"))
    if finished:
        marker = json.loads(finished[-1].read_text())
        history = marker["history"]
        latest = {(row["block"], row["layer"]): row for row in marker["rows"]}
        first = marker["round"] + 1
        solved_in = {j: min(j, marker["round"]) for j in range(num_segments)}
        backend.get([backend.call(k, "load_round", str(work),
                                  {j: solved_in[j] for j in owned[k]}) for k in range(n)])
        _exchange(backend, seg_owner, list(range(1, num_segments)))
        log.info("resuming the depth-parallel schedule after round %d", marker["round"])
        if marker.get("stopped"):
            first = recipe.solver.rounds + 1
    elif first == 0:
        t = time.perf_counter()
        last = []
        for i in range(num_batches):
            h = None
            for k in range(n):
                h = backend.call(k, "forward_shard", i, h)
            last.append(h)
        backend.get(last)
        del last
        timings["forward"] += time.perf_counter() - t
    for r in range(first, recipe.solver.rounds + 1):
        dirty = [j for j in range(num_segments) if j >= r]
        if not dirty:  # every segment was solved on final inputs
            break
        t = time.perf_counter()
        # Segment r has final inputs from this round on: its result is final, so it gets the
        # full schedule from a GPTQ start; the segments after it are warm-started corrections.
        rows = [row for part in backend.get([
            backend.call(k, "run_round", r, warm, [j for j in owned[k] if j in dirty], [r])
            for k in range(n)]) for row in part]
        timings["solve"] += time.perf_counter() - t
        for row in latest.values():
            row["changed"] = 0.0
        latest.update({(row["block"], row["layer"]): row for row in rows})
        sizes = sum(row["size"] for row in latest.values())
        changed = sum(row["changed"] * row["size"] for row in latest.values()) / max(sizes, 1)
        history.append({"round": r, "changed": changed, "segments_solved": len(dirty),
                        "mean_loss": sum(x["loss"] for x in latest.values()) / max(len(latest), 1),
                        "iterations": sum(row["iterations"] for row in rows),
                        "seconds": round(time.perf_counter() - t, 3),
                        "elapsed_seconds": round(time.perf_counter() - started - aside, 3)})
        if progress:
            print(f"round {r}: {len(dirty)} of {num_segments} segments solved, mean loss "
                  f"{history[-1]['mean_loss']:.5f}, {changed:.2%} of codes changed",
                  file=sys.stderr, flush=True)
        stop = r >= 1 and changed < recipe.solver.round_stop_changed
        backend.get([backend.call(k, "save_round", str(work), r,
                                  [j for j in owned[k] if j in dirty]) for k in range(n)])
        tmp = work / f".round-{r:03d}.done.tmp"
        tmp.write_text(json.dumps({"round": r, "history": history, "stopped": stop,
                                   "rows": list(latest.values())}))
        os.replace(tmp, work / f"round-{r:03d}.done")
        if on_round is not None:
            t = time.perf_counter()
            on_round(r, collect())
            aside += time.perf_counter() - t
        if stop:
            break
        # The next round's inputs: what each re-solved segment now outputs.
        _exchange(backend, seg_owner, [j + 1 for j in dirty if j + 1 < num_segments])
    return collect(), history


def _exchange(backend, seg_owner: dict[int, int], targets: list[int]) -> None:
    """Give each segment in ``targets`` the latest output of the segment before it."""
    outs = {j: backend.call(seg_owner[j - 1], "segment_output", j - 1) for j in targets}
    backend.get([backend.call(seg_owner[j], "set_input", j, outs[j]) for j in targets])
