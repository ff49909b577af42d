"""The round schedules against the sequential one at today's defaults, over calibration seeds.

Issue 34, item 5. For every seed: sequential ADMM-Q (the baseline), depth-parallel with 2 segments
(``dp-2``), depth-parallel with one segment per block (``dp-block``) and coordinated, the round
schedules on 2 and 4 Ray workers (one thread each, a private local Ray instance; sequential's
codes do not depend on the worker count, so it runs once per seed, on 2). Two targets: ``whole``
SmolLM2-135M (the embedded model) and ``slice``, its first 8 decoder blocks (a model folder built
once in the scratch folder: the float model with ``num_hidden_layers=8``). Every quantize run is
its own ``admmq quantize --json`` process with nothing but the grid (``--bits B --group-size 64``),
calibration (``--num-samples``, ``--seq-len``, ``--seed``) and schedule chosen, so every other
setting is the shipped default. Per run: output error against the float model — ||Y_q - Y_f||^2 /
||Y_f||^2 over held-out windows, Y the last decoder block's output hidden states *before* the
final norm (``output_hidden_states=True`` with ``tie_last_hidden_states`` off, checked against the
normed output) — perplexity on the same windows (whole model only), the process's wall time and
the rounds the run took (its --json summary), each also as a ratio to the sequential run of the
same target, bits and seed. Held-out text: the first half of the WikiText-2 test file
(calibration draws from the other half).

    python benchmarks/schedules.py                     # everything: 2 targets x 3-/4-bit x 3 seeds
    python benchmarks/schedules.py --targets slice --bits 3 --seeds 0 --num-samples 16 \\
        --seq-len 128 --rounds 2 --coordinated-rounds 2 --output schedules_smoke   # smoke test

The full run is 2 targets x 2 bit widths x 3 seeds x (1 + 3 schedules x 2 worker counts) = 84
quantizations at 128 x 512 calibration. Measured on the project's 2-core CPU machine (shared with
another developer's jobs) for the slice at 3 bits, 32 x 256 calibration, 2 workers
(results/schedules_slice.md): one seed, its four runs with their evaluation, took 27-31 minutes
(sequential 3-3.5 min, dp-2 4.5-5, dp-block 8.5, coordinated 8-9, evaluation 1-1.5 each).
Extrapolated, not measured: 8x the calibration tokens (4x the windows, each twice as long) and
30 blocks instead of 8 make a whole-model run several times (roughly 5-15x) a slice run, so the
full benchmark is days of CPU time here (4 workers on 2 cores are oversubscribed, too). Run it on
a machine with a GPU per worker, or reduce it as schedules_slice.md did:

    python benchmarks/schedules.py --targets slice --bits 3 --workers 2 --num-samples 32 \\
        --seq-len 256 --eval-windows 40 --output schedules_slice

Rows are appended to ``benchmarks/results/NAME.rows.json`` as each run finishes, and ``NAME.md``
is written again each time; run again with the same ``--output`` (and the same settings) and the
rows already there are skipped, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import environment  # noqa: E402  (benchmarks/environment.py)

SCHEDULES = {"sequential": "sequential (baseline)", "dp-2": "depth-parallel, 2 segments",
             "dp-block": "depth-parallel, one segment per block", "coordinated": "coordinated"}
SEQUENTIAL_WORKERS = 2  # sequential's codes do not depend on the worker count: one run per seed
GROUP = 64
ENV = {**os.environ, "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration seeds")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4],
                   help="Ray workers of the round schedules (sequential: always 2)")
    p.add_argument("--targets", nargs="+", default=["whole", "slice"], choices=("whole", "slice"))
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    p.add_argument("--num-samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="calibration window length")
    p.add_argument("--eval-windows", type=int, default=80, help="held-out windows")
    p.add_argument("--eval-seq-len", type=int, default=512, help="held-out window length")
    p.add_argument("--slice-blocks", type=int, default=8)
    p.add_argument("--rounds", type=int, default=None, help="depth-parallel rounds (default: "
                   "the recipe's; only for smoke tests)")
    p.add_argument("--coordinated-rounds", type=int, default=None,
                   help="coordinated rounds (default: the recipe's; only for smoke tests)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="also run the coordinated schedule with these quantize flags, as "
                   "schedule 'coordinated NAME' (e.g. keep-best=--keep-best); repeatable")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per worker")
    p.add_argument("--note", action="append", default=[], help="a line for the header")
    p.add_argument("--scratch", type=Path, default=ROOT / ".scratch" / "schedules",
                   help="where the slice model and the checkpoints (deleted after each run) go")
    p.add_argument("--output", default="schedules", help="NAME of NAME.md and NAME.rows.json "
                   "under benchmarks/results/")
    args = p.parse_args(argv)
    args.output = Path(args.output).stem
    args.variants = {}
    for v in args.variant:
        name, sep, flags = v.partition("=")
        if not sep or not name or " " in name or not flags.strip():
            p.error(f"--variant {v!r}: give NAME=FLAGS, e.g. keep-best=--keep-best")
        args.variants[name] = shlex.split(flags)
    return args


def cli(*args: str, log: Path) -> dict:
    """``python -m admmq_dist.cli ARGS --json`` in a fresh process; its summary line, with the
    process's wall time. Its stderr goes to ``log``."""
    cmd = [sys.executable, "-m", "admmq_dist.cli", *args, "--json"]
    started = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
                              env=ENV)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n"
                           + log.read_text()[-4000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = time.perf_counter() - started
    return out


def check_package() -> str:
    """The admmq_dist the subprocesses import must be this checkout's."""
    where = subprocess.run([sys.executable, "-c", "import admmq_dist; print(admmq_dist.__file__)"],
                           capture_output=True, text=True, env=ENV, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(ROOT):
        raise SystemExit(f"the CLI would run {where}, not this checkout ({ROOT})")
    return where


def slice_model(scratch: Path, blocks: int) -> Path:
    """The float SmolLM2 cut to its first ``blocks`` decoder blocks, saved once under scratch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from admmq_dist.model.embedded import embedded_model_folder

    folder = scratch / f"smollm2-135m-first{blocks}"
    if (folder / "config.json").is_file():
        return folder
    source = embedded_model_folder()
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    lm.model.layers = lm.model.layers[:blocks]
    lm.config.num_hidden_layers = blocks
    if getattr(lm.config, "layer_types", None):
        lm.config.layer_types = lm.config.layer_types[:blocks]
    part = folder.with_name(folder.name + ".part")
    lm.save_pretrained(part)
    AutoTokenizer.from_pretrained(source).save_pretrained(part)
    part.rename(folder)
    return folder


def held_out(model_dir: Path, windows: int, seq_len: int) -> torch.Tensor:
    """``[windows, seq_len]`` consecutive token windows of the evaluation text."""
    from transformers import AutoTokenizer

    from admmq_dist.evaluate import evaluation_text

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(evaluation_text(None, "test", "text"), return_tensors="pt",
                    verbose=False).input_ids[0]
    n = min(windows, ids.numel() // seq_len)
    return ids[:n * seq_len].view(n, seq_len)


@torch.no_grad()
def forward(model_dir: Path, ids: torch.Tensor, ppl: bool, check: bool = False) -> dict:
    """The last block's output (before the final norm) per window, and the perplexity (with
    ``ppl``). Through the whole causal LM even without: a compressed-tensors checkpoint's inner
    model alone does not run (its Linear layers have no ``weight`` until the top forward)."""
    from transformers import AutoModelForCausalLM

    from admmq_dist.checkpoint.compat import fix_asymmetric_loading

    fix_asymmetric_loading()
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lm.config.tie_last_hidden_states = False  # hidden_states[-1]: the last block's own output
    hidden, nll = [], 0.0
    for row in ids:
        out = lm(row[None], output_hidden_states=True, use_cache=False)
        assert len(out.hidden_states) == lm.config.num_hidden_layers + 1
        hidden.append(out.hidden_states[-1][0].double())
        if ppl:
            nll += float(torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), row[1:],
                                                           reduction="sum"))
    if check:  # it is the pre-norm state: the model's last_hidden_state is its norm
        base = lm.model(ids[:1], use_cache=False).last_hidden_state[0].double()
        assert not torch.allclose(hidden[0], base), "hidden_states[-1] is already normed"
        normed = lm.model.norm(hidden[0].float()).double()
        assert torch.allclose(normed, base, atol=1e-4), "hidden_states[-1] is not the norm's input"
    return {"hidden": hidden,
            "ppl": math.exp(nll / (ids.numel() - ids.shape[0])) if ppl else None}


def output_error(quantized: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    num = sum(float((q - f).pow(2).sum()) for q, f in zip(quantized, reference))
    return num / sum(float(f.pow(2).sum()) for f in reference)


def schedule_flags(schedule: str, blocks: int, variants: dict) -> list[str]:
    base, _, variant = schedule.partition(" ")
    if base in ("sequential", "coordinated"):
        return ["--schedule", base, *variants.get(variant, [])]
    return ["--schedule", "depth-parallel", "--segments", str(2 if schedule == "dp-2" else blocks)]


def run_one(job: tuple, model: Path, reference: dict, ids, args) -> dict:
    target, bits, seed, workers, schedule = job
    rounds = [*(["--rounds", str(args.rounds)] if args.rounds else []),
              *(["--coordinated-rounds", str(args.coordinated_rounds)]
                if args.coordinated_rounds else [])]
    flags = schedule_flags(schedule, reference["blocks"], args.variants)
    with tempfile.TemporaryDirectory(prefix="run-", dir=args.scratch) as tmp:
        out = Path(tmp) / "ckpt"
        q = cli("quantize", str(model), "-o", str(out), "--bits", str(bits), "--group-size",
                str(GROUP), "--num-samples", str(args.num_samples), "--seq-len",
                str(args.seq_len), "--seed", str(seed), "--workers", str(workers), "--address",
                "local", "--worker-device", "cpu", "--device", "cpu", "--threads",
                str(args.threads), *flags, *rounds,
                log=Path(tmp) / "quantize.log")
        got = forward(out, ids, ppl=target == "whole")
    history = q.get("rounds") or []
    row = {"target": target, "bits": bits, "seed": seed, "workers": workers,
           "schedule": schedule, "flags": flags,
           "error": output_error(got["hidden"], reference["hidden"]),
           "ppl": got["ppl"], "wall_seconds": q["wall_seconds"],
           "driver_seconds": q["seconds"]["total"], "seconds_split": q["seconds"],
           "symmetric": q["symmetric"],
           "rounds": sum(isinstance(h["round"], int) for h in history) if history else None,
           "history": [{k: h[k] for k in ("round", "changed", "rho", "mean_loss") if k in h}
                       for h in history],
           "mean_layer_loss": q["mean_loss"], "commit": commit()}
    return row


def commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = git("status", "--porcelain", "--", "admmq_dist")  # the library as run
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")


def jobs(args) -> list[tuple]:
    """(target, bits, seed, workers, schedule), the baseline first within each seed."""
    out = []
    for target in args.targets:
        for bits in args.bits:
            for seed in args.seeds:
                if "sequential" in args.schedules:
                    out.append((target, bits, seed, SEQUENTIAL_WORKERS, "sequential"))
                out += [(target, bits, seed, w, s) for w in args.workers for s in args.schedules
                        if s != "sequential"]
                out += [(target, bits, seed, w, f"coordinated {v}") for w in args.workers
                        for v in args.variants]
    return out


def key(row: dict) -> tuple:
    return row["target"], row["bits"], row["seed"], row["workers"], row["schedule"]


def settings_of(args) -> dict:
    return {k: getattr(args, k) for k in ("num_samples", "seq_len", "eval_windows",
                                          "eval_seq_len", "slice_blocks", "rounds",
                                          "coordinated_rounds", "threads")}


def load_state(args) -> dict:
    path = RESULTS / f"{args.output}.rows.json"
    state = {"settings": settings_of(args), "notes": [], "float": {}, "rows": [], "failures": []}
    if path.exists():
        kept = json.loads(path.read_text())
        differ = {k: (kept["settings"].get(k), v) for k, v in state["settings"].items()
                  if kept["settings"].get(k) != v}
        if differ:
            raise SystemExit(f"{path} was measured under other settings: " + ", ".join(
                f"{k} {a} (now {b})" for k, (a, b) in differ.items()) + "; use another --output")
        state.update(kept, failures=[])  # failed runs are tried again
    state["notes"] += [n for n in args.note if n not in state["notes"]]
    return state


def save(args, state: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name, text in ((f"{args.output}.rows.json", json.dumps(state, indent=1) + "\n"),
                       (f"{args.output}.md", report(state))):
        tmp = RESULTS / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(RESULTS / name)


def baseline(rows: list[dict], row: dict) -> dict | None:
    return next((r for r in rows if r["schedule"] == "sequential" and
                 (r["target"], r["bits"], r["seed"]) == (row["target"], row["bits"], row["seed"])),
                None)


def ratio(rows: list[dict], row: dict, field: str) -> float | None:
    base = baseline(rows, row)
    if base is None or row.get(field) is None or not base.get(field):
        return None
    return row[field] / base[field]


def spread(values: list, fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:{fmt}} (n=1)"
    return f"{mean:{fmt}} ({min(values):{fmt}}–{max(values):{fmt}}, n={len(values)})"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor() or platform.machine())
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def header(state: dict) -> list[str]:
    s, rows = state["settings"], state["rows"]
    floats = ", ".join(f"{t}: {v['blocks']} blocks" + (f", float ppl {v['ppl']:.4f}"
                                                       if t == "whole" else "")
                       for t, v in sorted(state["float"].items()))
    return ["# Round schedules against sequential ADMM-Q (issue 34, item 5)", "",
            "Written by `benchmarks/schedules.py`, rows appended as runs finish.", "",
            f"- calibration: {s['num_samples']} x {s['seq_len']} tokens from the shipped text "
            "(second half of the WikiText-2 test file), `--seed` = the seed; group "
            f"{GROUP}, symmetry the default (here symmetric = "
            f"{'/'.join(sorted({str(r['symmetric']) for r in rows}))}); every other setting the "
            "shipped default" + ("" if s["rounds"] is None and s["coordinated_rounds"] is None
                                 else f" except rounds {s['rounds']}, coordinated rounds "
                                      f"{s['coordinated_rounds']}"),
            f"- evaluation: {s['eval_windows']} held-out windows of {s['eval_seq_len']} tokens "
            f"(first half of the WikiText-2 test file); models: {floats}",
            "- output error: ||Y_q - Y_f||^2 / ||Y_f||^2 summed over the windows, Y the last "
            "decoder block's output before the final norm (`hidden_states[-1]` with "
            "`tie_last_hidden_states` off; checked: the final norm of it is the model's "
            "`last_hidden_state`); perplexity for the whole model only",
            f"- workers: a private local Ray instance, {s['threads']} thread(s) per worker, CPU; "
            f"sequential runs on {SEQUENTIAL_WORKERS} and is every schedule's baseline; "
            "`dp-block`: one depth-parallel segment per block",
            "- wall s: the `admmq quantize` process (Python and Ray start-up included); rounds: "
            "the numbered rounds in the run's --json summary, round 0 included (the "
            "coordinated polish not counted); sequential has none",
            f"- commits: {', '.join(sorted({r['commit'] for r in rows}))}; environment: "
            f"{environment.describe()}; machine: {machine()}",
            *(f"- {n}" for n in state["notes"]), "",
            # What every row shares (bits, seed and schedule are per row): the resolved recipe.
            environment.settings_record({"grid": {"group_size": GROUP}, "calibration": {
                "num_samples": s["num_samples"], "seq_len": s["seq_len"]}}), ""]


def order(schedule: str) -> tuple:
    """Where a schedule's rows go: the schedules in their order, each variant after its base."""
    base, _, variant = schedule.partition(" ")
    return list(SCHEDULES).index(base), variant


def report(state: dict) -> str:
    rows = state["rows"]
    lines = header(state) + [
        "## Ratio to sequential, across seeds (mean (min–max, n))", "",
        "| target | bits | workers | schedule | output error / seq | ppl / seq | wall / seq "
        "| rounds | output error |", "|---|---|---|---|---|---|---|---|---|"]
    groups = sorted({k[:2] + k[3:] for k in map(key, rows)},
                    key=lambda g: (g[0], g[1], g[2], order(g[3])))
    for target, bits, workers, schedule in groups:
        mine = [r for r in rows if (r["target"], r["bits"], r["workers"], r["schedule"])
                == (target, bits, workers, schedule)]
        lines.append(f"| {target} | {bits} | {workers} | {schedule} "
                     f"| {spread([ratio(rows, r, 'error') for r in mine], '.4f')} "
                     f"| {spread([ratio(rows, r, 'ppl') for r in mine], '.4f')} "
                     f"| {spread([ratio(rows, r, 'wall_seconds') for r in mine], '.2f')} "
                     f"| {spread([r['rounds'] for r in mine], '.1f')} "
                     f"| {spread([r['error'] for r in mine], '.4f')} |")
    lines += ["", "## Per seed", "", "| target | bits | seed | workers | schedule | output error "
              "| / seq | ppl | / seq | wall s | / seq | rounds |", "|---|---|---|---|---|---|---|"
              "---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["target"], r["bits"], r["seed"], r["workers"],
                                         order(r["schedule"]))):
        def f(v, fmt):
            return "" if v is None else format(v, fmt)
        lines.append(f"| {r['target']} | {r['bits']} | {r['seed']} | {r['workers']} "
                     f"| {r['schedule']} | {r['error']:.4f} | {f(ratio(rows, r, 'error'), '.4f')} "
                     f"| {f(r['ppl'], '.4f')} | {f(ratio(rows, r, 'ppl'), '.4f')} "
                     f"| {r['wall_seconds']:.0f} | {f(ratio(rows, r, 'wall_seconds'), '.2f')} "
                     f"| {'' if r['rounds'] is None else r['rounds']} |")
    if state["failures"]:
        lines += ["", "## Failed runs", ""] + [
            f"- {f['job']}: `{f['error'].strip().splitlines()[-1]}`" for f in state["failures"]]
    return "\n".join(lines) + "\n"


def reference(target: str, args) -> tuple[Path, torch.Tensor, dict]:
    """The float model of ``target``, the held-out windows and its outputs on them."""
    from admmq_dist.model.embedded import embedded_model_folder

    model = embedded_model_folder() if target == "whole" else \
        slice_model(args.scratch, args.slice_blocks)
    ids = held_out(model, args.eval_windows, args.eval_seq_len)
    ref = forward(model, ids, ppl=target == "whole", check=True)
    ref["blocks"] = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    return model, ids, ref


def main(argv=None) -> int:
    args = parse(argv)
    args.scratch.mkdir(parents=True, exist_ok=True)
    print(f"admmq_dist for the runs: {check_package()}", file=sys.stderr, flush=True)
    state = load_state(args)
    done = {key(r) for r in state["rows"]}
    for r in state["rows"]:  # a kept variant row must have run what its name now stands for
        name = r["schedule"].partition(" ")[2]
        if name in args.variants and r["flags"][2:] != args.variants[name]:
            raise SystemExit(f"{r['schedule']} was measured with {r['flags']}; use another name")
    todo = [j for j in jobs(args) if j not in done]
    print(f"{len(todo)} runs to do ({len(done)} kept)", file=sys.stderr, flush=True)
    references: dict = {}
    for n, job in enumerate(todo, 1):
        target = job[0]
        if target not in references:
            references[target] = reference(target, args)
            model, ids, ref = references[target]
            state["float"][target] = {"blocks": ref["blocks"], "ppl": ref["ppl"],
                                      "windows": ids.shape[0]}
        model, ids, ref = references[target]
        started = time.perf_counter()
        try:
            row = run_one(job, model, ref, ids, args)
        except RuntimeError as exc:
            state["failures"].append({"job": list(job), "error": str(exc)[-1500:]})
            print(f"[{n}/{len(todo)}] {job} FAILED:\n{exc}", file=sys.stderr, flush=True)
            save(args, state)
            continue
        state["rows"].append(row)
        save(args, state)
        print(f"[{n}/{len(todo)}] {job}: error {row['error']:.4f} "
              f"(/seq {ratio(state['rows'], row, 'error') or float('nan'):.4f}), ppl {row['ppl']}, "
              f"rounds {row['rounds']}, {row['wall_seconds']:.0f}s "
              f"({time.perf_counter() - started:.0f}s with eval)", file=sys.stderr, flush=True)
    return 1 if state["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
