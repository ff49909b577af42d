"""The package versions a benchmark ran with, for its results file.

Figures on the embedded model move with more than admmq-dist's code: the GGUF conversion
(``gguf``, ``transformers``) and the tokenizer (``tokenizers``) decide the calibration and
evaluation tokens, so a rerun can only be compared with a result that names the same versions.
"""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PACKAGES = ("torch", "transformers", "tokenizers", "gguf", "compressed-tensors", "ray")


def describe() -> str:
    """``"python 3.11.2, torch 2.13.0+cpu, transformers 5.22.2, …"`` (absent packages left out)."""
    parts = [f"python {platform.python_version()}"]
    for name in PACKAGES:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(parts)


def commit() -> str:
    """The checkout's short commit, for a results file's header, with ``+dirty`` when the
    package has uncommitted changes (the figures are then of no commit)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "admmq_dist"],
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return head + ("+dirty" if dirty else "")


def write_results(name: str, lines: list[str]) -> Path:
    """``benchmarks/results/NAME.md`` from ``lines``; says where it went."""
    out = RESULTS / f"{name}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return out


def settings_record(overrides: dict | None = None,
                    sections: tuple[str, ...] = ("grid", "solver", "calibration", "output")) -> str:
    """The resolved recipe a benchmark's figures ran with, for its results file: today's defaults
    with ``overrides`` (what the benchmark sets on purpose), in the recipe ``sections`` its
    figures depend on, as one HTML comment line that tests/test_quoted_figures.py compares with
    the defaults of the day the docs are read on."""
    from admmq_dist.recipe import Recipe, effective_mapping, override

    overrides = overrides or {}
    resolved = effective_mapping(override(Recipe(), overrides))
    record = {"commit": commit(), "overrides": overrides,
              "recipe": {name: resolved[name] for name in sections}}
    return "<!-- settings: " + json.dumps(record, sort_keys=True) + " -->"
