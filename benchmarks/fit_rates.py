"""Fit the rates ``admmq plan`` models a job's time with (:mod:`admmq_dist.run.time_model`) from
the rates one ``benchmarks/layer_shapes.py`` run measured (its JSON), and write them with where
they came from: the measured file, its commit and checksum, the machine that measured them.

    python benchmarks/layer_shapes.py --shapes 8b --device cuda       # measure, on the device
    python benchmarks/fit_rates.py benchmarks/results/layer_shapes_8b_cuda.json \\
        --machine "one H100 80GB SXM, bfloat16 forward" --output rates_h100.json
    admmq plan tests/configs/Llama-3.1-70B --workers 8 --device-memory 80GiB --rates rates_h100.json

The shipped CPU rates (``admmq_dist/data/rates_cpu_2core.json``) are regenerated, not retyped:

    python benchmarks/fit_rates.py benchmarks/results/layer_shapes_1b_cpu.json \\
        --machine "a 2-core AMD EPYC CPU (KVM guest), float32, torch 2.13.0+cpu" \\
        --output admmq_dist/data/rates_cpu_2core.json
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from admmq_dist.quant.solvers.admmq import ADMMSettings  # noqa: E402
from admmq_dist.run import time_model  # noqa: E402


def provenance(path: Path) -> dict:
    """The measured file as the repository knows it: its path, the last commit that changed it
    (and whether it changed since) and its checksum."""
    path = path.resolve()
    try:
        shown = path.relative_to(ROOT).as_posix()
    except ValueError:
        shown = str(path)

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=path.parent, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"file": shown, "commit": git("log", "-1", "--format=%H", "--", path.name) or None,
            "changed_since_commit": bool(git("status", "--porcelain", "--", path.name)),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "fitted_by": "benchmarks/fit_rates.py"}


def main() -> int:
    import layer_shapes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measured", type=Path, help="a layer_shapes_<shapes>_<device>.json")
    parser.add_argument("--machine", required=True,
                        help="what measured them, as the plan should name it (e.g. 'one H100 "
                             "80GB SXM'); the JSON does not record it")
    parser.add_argument("--shapes", choices=sorted(layer_shapes.SHAPES), default=None,
                        help="the shapes it measured (default: from the file name)")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda (default: from the file name)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    stem = args.measured.stem.split("_")  # layer_shapes_<shapes>_<device>
    shapes = args.shapes or stem[-2]
    device = args.device or stem[-1]
    if shapes not in layer_shapes.SHAPES:
        parser.error(f"cannot tell the shapes from {args.measured.name}: pass --shapes")
    hidden = layer_shapes.SHAPES[shapes][0]
    seq_len = inspect.signature(layer_shapes.measure_forward).parameters["seq_len"].default
    measured = json.loads(args.measured.read_text())
    fitted = time_model.fit(measured, hidden=hidden, seq_len=seq_len)
    out = {"format": fitted.pop("format"), "machine": args.machine, "device": device,
           "source": provenance(args.measured),
           "measured_at": {"shapes": shapes, "hidden": hidden, "forward_seq_len": seq_len,
                           "rows_solved": measured["rows"][0]["rows_solved"],
                           "admm_iteration_budget": ADMMSettings().iterations},
           **fitted}
    args.output.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.output}: largest error of the fit on the measured rates "
          f"{100 * out['max_relative_error']:.1f}% "
          + ", ".join(f"{k} {100 * v['max_relative_error']:.1f}% (exponent "
                      f"{v['exponent']:.2f})" for k, v in out["rates"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
