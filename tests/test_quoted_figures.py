"""Figures the docs quote from a benchmark stand in its results file: between the markers
``<!-- results: NAME -->`` and ``<!-- /results -->`` in docs/*.md, every figure written as the
benchmark writes its summaries — ``mean (min–max, n=N)`` — must appear in
``benchmarks/results/NAME.md`` (re-measure, then quote again).

And the results files the README and docs name ran with today's defaults: each records the
resolved recipe it ran with (``<!-- settings: {...} -->``, benchmarks/environment.py's
``settings_record``: the defaults of its day with the benchmark's deliberate overrides), and the
same overrides on today's defaults must resolve to the same recipe — a default changed since
(a refit, a calibration strength, a schedule) makes the quoted file stale until re-measured."""

from __future__ import annotations

import json
import re
from pathlib import Path

from admmq_dist.recipe import Recipe, effective_mapping, override

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


SETTINGS = re.compile(r"<!-- settings: (\{.*?\}) -->")
RESULTS = ROOT / "benchmarks" / "results"
# Quoted files that record no settings, and why. A file whose figures do not depend on the recipe
# needs none; one that does is listed until its next run writes the record (its figures may be
# stale: the docs say which commit they ran at).
UNRECORDED = {
    "memory_model": "every cell sets its own recipe (tests/memory_cells.py); the bound is the test's",
    "vllm_kernels": "vLLM's kernel choice for checkpoint layouts: no recipe",
    "fault_matrix": "fault recovery, checked byte for byte: no figure depends on the recipe",
    "manifest_hashing_1x2gib": "hashing speed: no recipe",
    "e2e_perplexity_3bit": "ran before records (2026-11-30/12-01): to re-measure",
    "e2e_perplexity_3bit_full_eval": "ran before records: to re-measure",
    "e2e_perplexity_4bit": "ran before records: to re-measure",
    "schedules_slice": "ran before records (3 seeds, 2026-12-07): to re-measure",
    "spectral_penalty": "an experiment with its settings in its header, before records",
    "penalty_residuals_quick": "an experiment with its settings in its header, before records",
    "eigh_precision": "an experiment with its settings in its header, before records",
    "readme_timings": "timed by hand: the default job's time, re-timed when the defaults change",
    "e2e_perplexity_quick": "historical single runs without the scale refit, quoted as such",
    "e2e_asymmetric_quick": "historical single runs without the scale refit, quoted as such",
    "layer_quality": "settings in its header (ADMM-Q's, sweeps, refits), before records",
    "rotation_ideas": "an experiment with its settings in its header, before records",
    "scaling": "2026-11-28, before asymmetric calibration and the refit: to re-measure",
}


def named_results() -> set[str]:
    """Every results file (``NAME`` of ``benchmarks/results/NAME.md``) the README or a doc names,
    by its file name or a results marker."""
    names = set()
    for doc in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        text = doc.read_text()
        names |= {n for n in re.findall(r"([\w.-]+)\.md\b", text) if (RESULTS / f"{n}.md").is_file()}
        names |= {name for name, _ in BLOCK.findall(text)}
    return names - {"README"}


# Results files that measured an option which was then removed (their records name it): the docs
# cite them as the reason it is gone.
REMOVED_OPTIONS = {
    "schedules_slice_polish40": "solver.coordinated_polish_iterations",
}


# Settings removed since a record was written, with the value that does what the code now always
# does: a record holding that value ran as today's code runs.
REMOVED_AS_ALWAYS = {"solver.coordinated_polish": True}  # measured 4% worse off; removed
# Settings only the coordinated schedule reads: a record of another schedule does not depend on
# them. (schedules.py picks each row's schedule by flag; its rows name it.)
COORDINATED_ONLY = {"solver.refresh_dual"}


# Settings added after a record was written, with the default that does what the code did before
# them: a record without the key ran that way.
ADDED_AS_BEFORE = {"solver.admm.products": "float32",  # a CPU computes float32 either way
                   "grid.kind": "int"}  # integer grids were the only ones


def stale_keys(record: dict) -> list[str]:
    """The settings a record's run resolved that today's defaults (with its overrides) do not."""
    today = json.loads(json.dumps(effective_mapping(override(Recipe(), record["overrides"]))))

    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict)
                       else {f"{prefix}{key}": value})
        return out

    then, now = flat(record["recipe"]), flat({k: today[k] for k in record["recipe"]})
    for key, value in REMOVED_AS_ALWAYS.items():
        if then.get(key) == value and key not in now:
            del then[key]
    if then.get("solver.schedule") != "coordinated":
        for key in COORDINATED_ONLY:
            then.pop(key, None)
            now.pop(key, None)
    then = {**{k: v for k, v in ADDED_AS_BEFORE.items() if k.split(".")[0] in record["recipe"]},
            **then}
    return sorted(f"{k}: {then.get(k)!r} then, {now.get(k)!r} now"
                  for k in then.keys() | now.keys() if then.get(k) != now.get(k))


def test_every_named_results_file_ran_with_todays_defaults():
    named = named_results()
    assert {"plan_table", "layer_shapes_1b_cpu", "e2e_perplexity_3bit"} <= named
    for name in sorted(named):
        records = SETTINGS.findall((RESULTS / f"{name}.md").read_text())
        if not records:
            assert name in UNRECORDED, (
                f"the docs name {name}.md, which records no settings: re-run its benchmark "
                "(benchmarks/environment.py settings_record) or say in UNRECORDED why it needs none")
            continue
        assert name not in UNRECORDED, f"{name}.md records its settings now: drop it from UNRECORDED"
        if name in REMOVED_OPTIONS:
            section, key = REMOVED_OPTIONS[name].split(".", 1)
            assert all(key in json.loads(r)["overrides"].get(section, {}) for r in records)
            assert key not in json.loads(json.dumps(effective_mapping(Recipe())))[section], (
                f"{REMOVED_OPTIONS[name]} exists again: {name}.md is then an ordinary record")
            continue
        for record in records:
            stale = stale_keys(json.loads(record))
            assert not stale, f"{name}.md ran with other defaults than today's: {stale}; re-measure"
    assert set(UNRECORDED) <= named, f"no doc names {sorted(set(UNRECORDED) - named)} any more"


def test_a_default_changed_since_a_run_is_caught(monkeypatch):
    from admmq_dist.quant.solvers import solve
    from admmq_dist import recipe as recipe_module

    resolved = effective_mapping(override(Recipe(), {"grid": {"bits": 3}}))
    record = {"overrides": {"grid": {"bits": 3}},
              "recipe": json.loads(json.dumps({k: resolved[k] for k in ("grid", "solver",
                                                                           "calibration")}))}
    assert stale_keys(record) == []
    # A default the code decides (None in the recipe) changes: the record names it.
    monkeypatch.setattr(solve, "DEFAULT_ADMMQ_REFITS", solve.DEFAULT_ADMMQ_REFITS + 1)
    assert len(stale_keys(record)) == 1 and "solver.scale_refits" in stale_keys(record)[0]
    monkeypatch.undo()
    monkeypatch.setattr(recipe_module, "AUTO_ASYMMETRIC", 0.5)
    assert [k.split(":")[0] for k in stale_keys(record)] == ["calibration.asymmetric"]
