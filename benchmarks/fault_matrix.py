"""The fault matrix as a table: runs the fault-injection tests (in-process backend, every step
of every schedule, a worker killed during a call or silently between two; and the Ray subset)
and writes each cell's outcome to ``benchmarks/results/fault_matrix.md``.

A cell passes when the run ends byte-identical to the uninterrupted run with the fault listed in
its summary (or, for the non-recoverable cases, stops with the one expected error).

    python benchmarks/fault_matrix.py            # in-process matrix and the Ray subset
    python benchmarks/fault_matrix.py --no-ray
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    tests = ["tests/test_faults.py"]
    if not args.no_ray:
        tests += ["tests/test_ray.py::test_a_ray_worker_killed_mid_run_costs_time_not_bytes",
                  "tests/test_ray.py::test_a_killed_worker_is_restarted_and_its_block_redone"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={xml}", *tests], cwd=ROOT)
        cases = ET.parse(xml).getroot().iter("testcase")
        rows = []
        for case in cases:
            name = case.get("name")
            outcome = ("failed" if case.find("failure") is not None or
                       case.find("error") is not None else
                       "skipped" if case.find("skipped") is not None else "passed")
            test, _, params = name.partition("[")
            rows.append((case.get("classname").split(".")[-1], test, params.rstrip("]"),
                         outcome, float(case.get("time"))))
    import environment

    passed = sum(r[3] == "passed" for r in rows)
    lines = ["# Fault matrix", "",
             f"- {passed} of {len(rows)} cells passed; environment: {environment.describe()}",
             "- `kill`: the worker's process dies during the call (rebuilt fresh, the call "
             "fails); `kill-between`: it dies after the call returned (nothing fails until it "
             "is asked again); Ray cells kill a real actor process. Each cell must end "
             "byte-identical to the uninterrupted run, with the fault in the run's summary.", "",
             "| file | test | case (method, worker, call / kind) | outcome | seconds |",
             "|---|---|---|---|---|"]
    for file, test, params, outcome, seconds in rows:
        lines.append(f"| {file} | {re.sub('^test_', '', test)} | {params} | {outcome} "
                     f"| {seconds:.1f} |")
    lines += ["", f"Whole matrix {time.perf_counter() - started:.0f}s.", ""]
    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "fault_matrix.md").write_text(report)
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
