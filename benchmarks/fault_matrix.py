"""The fault matrix as a table: runs the fault-injection tests (in-process backend, every step
of every schedule, a worker killed during a call, silently between two, or after a call whose
effects happened but whose answer was lost, under the default configuration and the plain
objective; and the Ray subset: single-node kills, and the multi-node cluster's lost nodes —
between steps and during one —, hung worker and host OOM) and writes each cell's outcome and
configuration to ``benchmarks/results/fault_matrix.md``.

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


# The multi-node cells (tests/test_cluster.py: a head and three one-GPU nodes, 2 workers).
CLUSTER = ("two_nodes_write_the_in_process_bytes_and_survive_a_lost_node",
           "a_node_removed_during_a_step_costs_time_not_bytes",
           "a_hung_worker_passes_its_deadline_and_is_rebuilt",
           "a_node_out_of_host_memory_stops_at_once_naming_resume")

DEFAULT = "default (asymmetric auto)"
PLAIN = "plain (asymmetric 0)"


def configuration(params: str) -> str:
    """The calibration a cell ran: test_faults.py's cells name theirs; every other cell runs
    the plain objective (tests/runs.py SETTINGS)."""
    return DEFAULT if "-default-" in f"-{params}-" else PLAIN


def kind(test: str, params: str) -> str:
    for k in ("kill-between", "kill-after", "kill", "lost-reply"):
        if params.endswith(k):
            return k
    for words, what in (("removed_during", "node removed during a step"),
                        ("lost_node", "node removed between blocks"),
                        ("hung", "hung worker (deadline)"), ("host_memory", "host OOM (stops)"),
                        ("killed", "actor process killed"), ("not_a_lost", "worker error (stops)"),
                        ("budget", "restart budget (stops, resumes)"),
                        ("corrupted", "bad commit, full disk"), ("second_loss", "kill twice")):
        if words in test:
            return what
    return "—"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    tests = ["tests/test_faults.py",
             "tests/test_workdir.py::test_kill_9_at_any_phase_then_resume_from_the_command_line"]
    if not args.no_ray:
        tests += ["tests/test_ray.py::test_a_ray_worker_killed_mid_run_costs_time_not_bytes",
                  "tests/test_ray.py::test_a_killed_worker_is_restarted_and_its_block_redone",
                  *(f"tests/test_cluster.py::test_{name}" for name in CLUSTER)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        # Every cell, those the default test run leaves out (marker "matrix") included.
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-m", "matrix or not matrix", f"--junitxml={xml}", *tests], cwd=ROOT)
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
             f"- {passed} of {len(rows)} cells passed at commit {environment.commit()}; "
             f"environment: {environment.describe()}",
             "- `kill`: the worker's process dies during the call (rebuilt fresh, the call "
             "fails); `kill-between`: it dies after the call returned (nothing fails until it "
             "is asked again); `kill-after`: the call runs to completion (files written, state "
             "changed, a partial sum folded in, a commit written) and the worker dies before "
             "answering (rebuilt, the call fails); `lost-reply`: the same with the worker alive "
             "(Ray's ActorUnavailableError), keeping what the call did. Ray cells kill a real actor process; cluster "
             "cells remove a whole node (between steps, or while worker 1's call is in "
             "flight), hang a worker or inject Ray's host OOM. Each cell must end byte-identical "
             "to the uninterrupted run, with the fault in the run's summary (or, where stated, "
             "stop with the one expected error).",
             f"- Configuration: `{DEFAULT}` is the recipe's default calibration (asymmetric "
             f"\"auto\": on); `{PLAIN}` the plain objective the other run tests pin. Every "
             "cell: tiny 3-block Llama, 3-bit, group 32, row blocks of 24, 8 samples of 48 "
             "tokens, 2 workers; round-schedule cells: 3 segments, 2 correction rounds, 3 "
             "coordinated rounds, the coordinated schedule's default sequential start; ADMM "
             "iterations 10 (40 in test_ray's block test and the cluster's lost-node-between-"
             "steps, hung-worker and OOM cells).", "",
             "| file | test | configuration | kind | cells | passed |", "|---|---|---|---|---|---|"]
    counts: dict[tuple, list[int]] = {}
    for file, test, params, outcome, _ in rows:
        key = (file, re.sub("^test_", "", test), configuration(params), kind(test, params))
        counts.setdefault(key, [0, 0])
        counts[key][0] += 1
        counts[key][1] += outcome == "passed"
    for (file, test, config, k), (n, ok) in counts.items():
        lines.append(f"| {file} | {test} | {config} | {k} | {n} | {ok} |")
    lines += ["", "| file | test | case (method, worker, call / configuration, kind) | "
              "configuration | outcome | seconds |", "|---|---|---|---|---|---|"]
    for file, test, params, outcome, seconds in rows:
        lines.append(f"| {file} | {re.sub('^test_', '', test)} | {params} | "
                     f"{configuration(params)} | {outcome} | {seconds:.1f} |")
    per_file = {}
    for file, *_, seconds in rows:
        per_file[file] = per_file.get(file, 0.0) + seconds
    lines += ["", f"Whole matrix {time.perf_counter() - started:.0f}s; per file (sum of its "
              "cells, setup included): " + ", ".join(f"{f} {t:.0f}s" for f, t in per_file.items())
              + ".", ""]
    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "fault_matrix.md").write_text(report)
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
