"""The modelled time of `admmq plan` (admmq_dist/run/time_model.py): the shipped rates are the fit
of benchmarks/results/layer_shapes_1b_cpu.json and reproduce what it measured, the model at the
1B shapes it measured gives benchmarks/results/cost_model_1b_cpu.md's rows (as measured, exactly;
from the fitted rates, within 10%), more workers never model a longer solve, and the plan prints
it (`--rates` swaps the rates)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
from pathlib import Path

import pytest

from admmq_dist.cli import main
from admmq_dist.quant.solvers.solve import SolverSettings
from admmq_dist.recipe import Recipe
from admmq_dist.run import time_model as tm
from admmq_dist.run.model_shape import model_shape

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "configs"
RESULTS = ROOT / "benchmarks" / "results"
MEASURED = RESULTS / "layer_shapes_1b_cpu.json"
TABLE = RESULTS / "cost_model_1b_cpu.md"
# The fitted model against the table modelled from the rates as measured.
TABLE_BOUND = 0.10
# Llama-3.2-1B, the shapes layer_shapes measured: hidden size, and the forward's sequence length.
HIDDEN_1B, FORWARD_SEQ_LEN = 2048, 2048


def measured() -> dict:
    return json.loads(MEASURED.read_text())


def table_rows() -> dict[tuple[str, str, int], dict]:
    """cost_model_1b_cpu.md's rows: ``(method, schedule, workers)`` -> hours by column."""
    out = {}
    for line in TABLE.read_text().splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[2].isdigit():
            out[(cells[0], cells[1], int(cells[2]))] = {
                "forward": float(cells[3]), "capture": float(cells[4]),
                "solve": float(cells[5]), "total": float(cells[7])}
    return out


def table_job() -> tuple[int, int, int]:
    """``(blocks, calibration tokens, coordinated rounds)`` the table says it modelled."""
    text = TABLE.read_text()
    blocks, tokens = map(int, re.search(r"(\d+) blocks, (\d+) calibration tokens", text).groups())
    rounds = int(re.search(r"coordinated at (\d+) rounds", text).group(1))
    return blocks, tokens, rounds


# ------------------------------------------------------------------------------------- the fit


def test_the_shipped_rates_are_the_fit_of_the_measured_file():
    shipped = json.loads(tm.DEFAULT_RATES.read_text())
    assert shipped["source"]["file"] == MEASURED.relative_to(ROOT).as_posix()
    assert shipped["source"]["sha256"] == hashlib.sha256(MEASURED.read_bytes()).hexdigest(), \
        "the measurement changed: rerun benchmarks/fit_rates.py (its docstring has the command)"
    assert shipped["device"] == "cpu" and "CPU" in shipped["machine"]
    refit = tm.fit(measured(), hidden=HIDDEN_1B, seq_len=FORWARD_SEQ_LEN)
    for piece, rate in refit["rates"].items():
        for key in ("coefficient", "exponent"):
            assert shipped["rates"][piece][key] == pytest.approx(rate[key], rel=1e-12), piece
    assert shipped["iterations"] == refit["iterations"]


def geometric_means(points: list[tuple[float, float]]) -> dict[float, float]:
    """Each width's geometric mean of the seconds measured at it."""
    logs: dict[float, list[float]] = {}
    for size, seconds in points:
        logs.setdefault(size, []).append(math.log(seconds))
    return {size: math.exp(sum(v) / len(v)) for size, v in logs.items()}


def test_the_fit_reproduces_every_rate_it_was_fitted_on():
    rates = tm.load_rates()
    points = tm.measured_points(measured(), hidden=HIDDEN_1B, seq_len=FORWARD_SEQ_LEN)
    assert set(points) == set(tm.PIECES)
    worst = 0.0
    for piece, pts in points.items():
        for size, seconds in pts:
            worst = max(worst, abs(rates.law(piece, size) / seconds - 1))
    # One exponent and one coefficient through the widths' geometric means: the error at a point
    # is its distance from that mean, the spread of the timings at one width on a shared CPU
    # (o_proj's GPTQ took 3.4x q_proj's in one run here), not a property of the fit to bound.
    spread = max(abs(geometric_means(pts)[size] / seconds - 1)
                 for pts in points.values() for size, seconds in pts)
    assert worst == pytest.approx(spread, rel=1e-9)
    assert worst == pytest.approx(json.loads(tm.DEFAULT_RATES.read_text())["max_relative_error"])


def test_the_fit_is_exact_on_one_width_and_a_power_law_across_two():
    """Two widths measured: the fitted law goes through each width's geometric mean."""
    rates = tm.load_rates()
    points = tm.measured_points(measured(), hidden=HIDDEN_1B, seq_len=FORWARD_SEQ_LEN)
    for piece, pts in points.items():
        for width, mean in geometric_means(pts).items():
            assert rates.law(piece, width) == pytest.approx(mean, rel=1e-9), (piece, width)


# ------------------------------------------------------------------- the model at the 1B shapes


def predicted(rates, rows: list[dict]) -> dict[tuple[str, str, int], dict]:
    """The rows of cost_model_1b_cpu.md modelled by the package from ``rates`` (as
    benchmarks/layer_shapes.py's ``models`` composes them)."""
    blocks, tokens, coordinated_rounds = table_job()
    stages = tm.measured_stages(rows)
    by_name = {r["linear"]: r for r in rows}
    settings = SolverSettings()
    out = {}
    for label, method in (("ADMM-Q", None), ("ADMM-Q exact", "exact"), ("GPTQ", "gptq")):
        solve = tm.Solve(method_of=lambda lin, m=method: m or by_name[lin.name][
            "default_w_update"], group_size=rows[0]["group_size"])
        for workers in (1, 8, 64):
            out[(label, "sequential", workers)] = tm.sequential(
                [(stages, blocks)], HIDDEN_1B, rates, solve, workers, tokens / workers,
                FORWARD_SEQ_LEN)
            if label == "GPTQ":
                continue
            out[(label, "depth-parallel", workers)] = tm.depth_parallel(
                [(stages, blocks)], HIDDEN_1B, rates, solve, workers, tokens, FORWARD_SEQ_LEN,
                settings.rounds)
            for start, name in ((False, "coordinated"), (True, "coordinated, sequential start")):
                out[(label, name, workers)] = tm.coordinated(
                    [(stages, blocks)], HIDDEN_1B, rates, solve, workers, tokens,
                    FORWARD_SEQ_LEN, coordinated_rounds, settings.coordinated_iterations,
                    sequential_start=start)
    return out


def test_the_measured_rates_give_the_table_to_its_last_digit():
    """benchmarks/cost_model.py is this model fed the rates as measured."""
    data = measured()
    rates = tm.MeasuredRates(data["rows"], data["hessians"], data["forward_per_1k_tokens"])
    table = table_rows()
    model = predicted(rates, data["rows"])
    assert set(model) == set(table)
    for key, row in table.items():
        costs = model[key]
        assert f"{costs['total'] / 3600:.2f}" == f"{row['total']:.2f}", key
        assert f"{(costs['factorizations'] + costs['solve']) / 3600:.2f}" == \
            f"{row['solve']:.2f}", key


def test_the_fitted_rates_give_the_table_within_ten_percent():
    data = measured()
    table = table_rows()
    model = predicted(tm.load_rates(), data["rows"])
    assert set(model) == set(table)
    for key, row in table.items():
        hours = model[key]["total"] / 3600
        # The table rounds to 0.01 h: allow that on top.
        assert abs(hours - row["total"]) <= TABLE_BOUND * row["total"] + 0.005, (key, hours)


def test_cost_model_py_still_writes_the_table(tmp_path):
    """benchmarks/cost_model.py, now a caller of the package's model, rebuilds its results file
    from the measured JSON unchanged."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import layer_shapes
        import cost_model
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    data = measured()
    blocks, tokens, _ = table_job()
    model = layer_shapes.models(data["rows"], data["hessians"], data["forward_per_1k_tokens"],
                                layer_shapes.SHAPES["1b"], tokens)
    lines = cost_model.table(model)
    text = TABLE.read_text()
    assert all(line in text.splitlines() for line in lines)
    assert len(lines) == 2 + len(table_rows())


# --------------------------------------------------------------------------- workers and shapes


@pytest.mark.parametrize("name", ["Llama-3.1-70B", "Mixtral-8x22B-v0.1", "Qwen3-235B-A22B"])
def test_more_workers_never_model_a_longer_sequential_solve(name):
    recipe = Recipe()  # batches of one sample: up to 128 workers
    recipe = dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration,
                                                                         batch_size=1))
    shape = model_shape(str(CONFIGS / name), recipe, None)
    blocks = [(stages, count) for stages, _, count, _ in shape.blocks]
    rates = tm.load_rates()
    previous = math.inf
    for workers in (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64, 100, 128):
        costs = tm.job_seconds(blocks, hidden=shape.hidden, recipe=recipe, workers=workers,
                               rates=rates, experts_per_token=shape.experts_per_token)
        solve = costs["factorizations"] + costs["solve"]
        assert solve <= previous * (1 + 1e-12), (name, workers)
        previous = solve
    assert solve < costs["total"]


def test_an_expert_sees_its_share_of_the_tokens():
    """Mixtral routes 2 of 8 experts per token: its experts' captures and forward count a quarter
    of the tokens each."""
    shape = model_shape(str(CONFIGS / "Mixtral-8x22B-v0.1"), Recipe(), None)
    assert shape.experts_per_token == 2
    stages = tm.plan_stages(shape.blocks[0][0], shape.experts_per_token)
    routed = {lin.routed for stage in stages for lin in stage}
    assert routed == {1.0, 0.25}


# ----------------------------------------------------------------------------------- the plan

PLAN = [str(CONFIGS / "Llama-3.1-70B"), "--workers", "8", "--device-memory", "80GiB"]


def plan_json(capsys, *extra: str) -> dict:
    assert main(["plan", *PLAN, *extra, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_plan_prints_the_modelled_time(capsys):
    assert main(["plan", *PLAN]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "modelled time" in line]
    assert len(lines) == 1
    line = lines[0]
    assert re.search(r"modelled time: [\d.]+ h \(forward [\d.]+ h, capture [\d.]+ h, "
                     r"factorizations [\d.]+ h, solve [\d.]+ h, transfers [\d.]+ h at an "
                     r"assumed 10 GB/s\) at rates measured on .*CPU.* — not a GPU measurement$",
                     line), line


def test_the_json_line_has_the_modelled_seconds(capsys):
    out = plan_json(capsys)
    assert set(out["modelled_seconds_by_phase"]) == set(tm.PHASES)
    assert out["modelled_seconds"] == pytest.approx(sum(out["modelled_seconds_by_phase"].values()))
    assert out["modelled_seconds"] > 0 and "not a GPU measurement" in out["modelled_rates"]


def test_rates_of_another_device_change_the_figure(capsys, tmp_path):
    """Rates twice as slow everywhere: everything but the (assumed) transfers doubles, and the
    plan names the machine they came from."""
    shipped = json.loads(tm.DEFAULT_RATES.read_text())
    for rate in shipped["rates"].values():
        rate["coefficient"] *= 2
    shipped |= {"machine": "a test GPU", "device": "cuda"}
    mine = tmp_path / "rates.json"
    mine.write_text(json.dumps(shipped))
    base = plan_json(capsys)
    slow = plan_json(capsys, "--rates", str(mine))
    for phase in tm.PHASES:
        factor = 1 if phase == "transfers" else 2
        assert slow["modelled_seconds_by_phase"][phase] == pytest.approx(
            factor * base["modelled_seconds_by_phase"][phase], rel=1e-9), phase
    assert "a test GPU" in slow["modelled_rates"]
    assert "not a GPU measurement" not in slow["modelled_rates"]


def test_a_file_that_is_not_rates_costs_a_line(capsys, tmp_path):
    bad = tmp_path / "rates.json"
    bad.write_text(json.dumps({"format": 1, "rates": {}}))
    assert main(["plan", *PLAN, "--rates", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "not a rates file" in err and "fit_rates.py" in err and len(err.splitlines()) == 1
