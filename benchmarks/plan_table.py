"""`admmq plan` for the public configs in tests/configs (defaults, 128 x 2048 calibration
tokens, 80 GB or 141 GB devices), written to benchmarks/results/plan_table.md; docs/planning.md
quotes the table and tests/test_plan_cli.py recomputes every row of it.

    python benchmarks/plan_table.py
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

from admmq_dist.cli import main as admmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ROWS = [("Llama-3.1-8B", "sequential", 1, "80GiB"), ("Llama-3.1-70B", "sequential", 1, "80GiB"),
        ("Llama-3.1-70B", "sequential", 1, "141GB"), ("Llama-3.1-70B", "sequential", 8, "80GiB"),
        ("Llama-3.1-70B", "depth-parallel", 8, "80GiB"),
        ("Llama-3.1-70B", "coordinated", 8, "80GiB"),
        ("Llama-3.1-405B", "sequential", 16, "80GiB"),
        ("Qwen3-235B-A22B", "sequential", 16, "80GiB"),
        ("Mixtral-8x22B-v0.1", "sequential", 16, "80GiB"),
        ("DeepSeek-V3", "sequential", 16, "80GiB")]


def row(model: str, schedule: str, workers: int, device: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        admmq(["plan", str(ROOT / "tests/configs" / model), "--schedule", schedule, "--workers",
               str(workers), "--device-memory", device, "--num-samples", "128", "--seq-len",
               "2048", "--json"])
    plan = json.loads(out.getvalue().strip().splitlines()[-1])
    fewest = plan["smallest_workers"]
    return (f"| {model} | {schedule} | {workers} × {device} | "
            f"{plan['worker_device_peak_bytes'] / 2**30:.1f} GiB | "
            f"{'yes' if plan['fits'] else 'no'} | {'none' if fewest is None else fewest} | "
            f"{plan['worst'].split('.', 2)[-1]} |")


def main() -> None:
    commit = environment.commit()
    lines = ["# `admmq plan` for public model configs", "",
             f"`python benchmarks/plan_table.py` at commit {commit}: defaults (4-bit, group 128, "
             "asymmetric grid and calibration 0.25, one scale refit), 128 × 2048 calibration "
             "tokens. A plan is a model, not a measurement: every schedule's model is held "
             "within [1, 1.3] of measured peaks on CPU at small shapes (memory_model.md); no GPU "
             "run has checked it yet.", "",
             environment.settings_record({"calibration": {"num_samples": 128,
                                                          "seq_len": 2048}}), "",
             "<!-- plan-table -->",
             "| model | schedule | workers × device | per-worker device peak | fits | "
             "fewest workers | worst stage |", "|---|---|---|---|---|---|---|",
             *(row(*r) for r in ROWS), "<!-- /plan-table -->"]
    out = ROOT / "benchmarks/results/plan_table.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
