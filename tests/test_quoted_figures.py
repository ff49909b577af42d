"""Figures the docs quote from a benchmark stand in its results file: between the markers
``<!-- results: NAME -->`` and ``<!-- /results -->`` in docs/*.md, every figure written as the
benchmark writes its summaries — ``mean (min–max, n=N)`` — must appear in
``benchmarks/results/NAME.md`` (re-measure, then quote again)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- results: (\S+) -->(.*?)<!-- /results -->", re.S)
FIGURE = re.compile(r"\d+\.\d+ \(\d+\.\d+–\d+\.\d+, n=\d+\)|\d+\.\d+ \(n=1\)")


def quoted() -> list[tuple[str, str, str]]:
    """``(doc, results name, figure)`` for every quoted figure."""
    out = []
    for doc in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        for name, body in BLOCK.findall(doc.read_text()):
            out += [(doc.name, name, figure) for figure in FIGURE.findall(body)]
    return out


def test_every_quoted_benchmark_figure_stands_in_its_results_file():
    figures = quoted()
    assert len({name for _, name, _ in figures}) >= 1 and len(figures) >= 3
    for doc, name, figure in figures:
        results = (ROOT / "benchmarks" / "results" / f"{name}.md").read_text()
        assert figure in results, f"{doc} quotes {figure!r}, which {name}.md does not hold"


def test_a_figure_the_results_do_not_hold_is_caught():
    assert FIGURE.findall("ratio 1.0154 (1.0100–1.0287, n=3) and 0.9859 (n=1)") == [
        "1.0154 (1.0100–1.0287, n=3)", "0.9859 (n=1)"]
