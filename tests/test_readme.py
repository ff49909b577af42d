"""The README's Python blocks run as written: each in a fresh process (the tests' own process has
the asymmetric-loading fix in place, see conftest), in a folder holding what the README's first
command writes (``smollm2-w4``), made here from a tiny model with the default settings."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from admmq_dist.cli import main

from tiny import tiny_model_dir

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def python_blocks() -> list[str]:
    """The Python blocks of the README and of docs/ (the guide holds the solver's)."""
    texts = [README.read_text(), *(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))]
    return [b for text in texts for b in re.findall(r"^```python\n(.*?)^```", text,
                                                      flags=re.S | re.M)]


def run_block(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_the_readme_has_the_blocks_these_tests_run():
    blocks = python_blocks()
    assert len(blocks) >= 2
    assert any("from_pretrained(\"smollm2-w4\")" in b for b in blocks)
    assert "-o smollm2-w4" in README.read_text().split("\n```", 2)[1]  # the first command


@pytest.mark.slow
@pytest.mark.parametrize("model_type,symmetric", [("llama", False), ("qwen3_moe", True)])
def test_the_loading_block_loads_every_default_output(tmp_path, model_type, symmetric):
    """The dense default is asymmetric — the layout transformers >= 5.23 cannot load unaided —
    and the mixture-of-experts default symmetric; the block loads both and generates."""
    source = tiny_model_dir(tmp_path / "source", model_type)
    assert main(["quantize", str(source), "-o", str(tmp_path / "smollm2-w4"), "--group-size",
                 "32", "--num-samples", "4", "--seq-len", "32"]) == 0
    config = json.loads((tmp_path / "smollm2-w4" / "config.json").read_text())
    weights = next(iter(config["quantization_config"]["config_groups"].values()))["weights"]
    assert weights["symmetric"] is symmetric  # the default this case stands for
    block = next(b for b in python_blocks() if "from_pretrained(\"smollm2-w4\")" in b)
    run = run_block(block, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip(), "the block prints the generated text"


def test_the_solver_block_runs(tmp_path):
    block = next(b for b in python_blocks() if "solve(weight, hessian" in b)
    run = run_block(block, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    loss = float(re.search(r"relative loss ([0-9.]+)", run.stdout).group(1))
    assert 0 < loss < 0.2  # 3 bits on a random layer: measured about 0.03


@pytest.mark.slow
def test_the_upstream_reproduction_still_reproduces():
    """docs/upstream/ holds a reproduction with no admmq code in it; it must show the bug (or
    this fails, and the workaround and the README's call can go) and the symmetric control must
    load."""
    from packaging.version import Version
    import transformers

    script = ROOT / "docs" / "upstream" / "asymmetric_zero_point_repro.py"
    runs = {flag: subprocess.run([sys.executable, str(script), *([flag] if flag else [])],
                                 capture_output=True, text=True, timeout=300)
            for flag in ("", "--symmetric")}
    assert runs["--symmetric"].returncode == 0, runs["--symmetric"].stderr[-2000:]
    if Version(transformers.__version__) >= Version("5.23"):
        assert runs[""].returncode != 0 and "weight_zero_point" in runs[""].stderr, (
            "the reproduction loads: the upstream bug is fixed, retire checkpoint/compat.py")
