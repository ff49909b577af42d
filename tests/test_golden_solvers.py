"""Golden codes that compare everywhere: one call of each method (and of the default ADMM-Q
with its polish and scale refit) on fixed tensors, against codes and scales recorded in
``tests/golden/solver_codes.safetensors``.

The whole-pipeline digests (``test_golden.py``) hold only in the environment they were recorded
in (float reductions differ with the torch build, the CPU's vector units and transformers), so on
any other machine they compare nothing. These do: the inputs are drawn from torch's CPU generator
(the same numbers on every machine) and the outputs are integer codes, so a float difference in
the last bits moves at most a code that sat on a rounding tie. The recorded
environment must match exactly; elsewhere at most 0.5% of codes may differ, while any change to
a method moves far more (a test below shows it). Re-record deliberately, when an output change is
intended:

    ADMMQ_RECORD_GOLDEN=1 python -m pytest tests/test_golden_solvers.py
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from admmq_dist.quant.grid import GridSpec, fit_grid
from admmq_dist.quant.solvers import ADMMSettings
from admmq_dist.quant.solvers.solve import SolverSettings, solve

from conftest import synthetic_layer
from test_golden import environment

GOLDEN = Path(__file__).resolve().parent / "golden" / "solver_codes.safetensors"
RECORD = os.environ.get("ADMMQ_RECORD_GOLDEN") == "1"
# Outside the recorded environment: codes allowed to differ (rounding ties), as a fraction.
ELSEWHERE = 0.005

CASES = {
    "rtn": SolverSettings(method="rtn"),
    "gptq": SolverSettings(method="gptq"),
    "admmq-plain": SolverSettings(local_search_sweeps=0, scale_refits=0,
                                  admm=ADMMSettings(iterations=60)),
    "admmq-default": SolverSettings(admm=ADMMSettings(iterations=60)),
}


def layer(seed: int = 0):
    weight, hessian, _ = synthetic_layer(64, 128, 2048, seed=seed)
    return weight, hessian


def outputs(name: str, settings: SolverSettings) -> dict[str, torch.Tensor]:
    weight, hessian = layer()
    grid = fit_grid(weight, GridSpec(bits=3, group_size=32))
    result = solve(weight, hessian, grid, settings, scale_dtype=torch.bfloat16)
    return {f"{name}.codes": result.codes.to(torch.uint8).contiguous(),
            f"{name}.scales": result.grid.scale.to(torch.bfloat16).contiguous()}


@pytest.fixture(scope="module")
def recorded():
    if RECORD:
        got = {}
        for name, settings in CASES.items():
            got.update(outputs(name, settings))
        GOLDEN.parent.mkdir(exist_ok=True)
        save_file(got, str(GOLDEN), metadata={k: str(v) for k, v in environment().items()})
        pytest.skip("recorded")
    assert GOLDEN.is_file(), f"no golden codes at {GOLDEN}: record them (see the module doc)"
    from safetensors import safe_open

    with safe_open(str(GOLDEN), "pt") as f:
        where = f.metadata()
    return load_file(str(GOLDEN)), where


def differing(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a != b).float().mean())


@pytest.mark.parametrize("name", list(CASES))
def test_each_method_writes_the_recorded_codes(recorded, name):
    golden, where = recorded
    got = outputs(name, CASES[name])
    same_place = where == {k: str(v) for k, v in environment().items()}
    for key, value in got.items():
        if same_place:
            assert torch.equal(value, golden[key]), f"{key}: the recorded bytes changed"
        else:  # rounding ties may fall the other way; a changed method moves far more
            assert differing(value, golden[key]) <= ELSEWHERE, \
                f"{key}: {differing(value, golden[key]):.2%} differ from the recorded ({where})"


def test_a_changed_method_is_far_outside_the_tolerance(recorded):
    """The bound elsewhere can fail: fewer ADMM-Q iterations, or GPTQ without act order, move
    many times more codes than it allows."""
    golden, _ = recorded
    fewer = outputs("admmq-plain", dataclasses.replace(
        CASES["admmq-plain"], admm=ADMMSettings(iterations=30)))
    assert differing(fewer["admmq-plain.codes"], golden["admmq-plain.codes"]) > 4 * ELSEWHERE
    gptq = CASES["gptq"]
    other = outputs("gptq", dataclasses.replace(
        gptq, gptq=dataclasses.replace(gptq.gptq, act_order=not gptq.gptq.act_order)))
    assert differing(other["gptq.codes"], golden["gptq.codes"]) > 4 * ELSEWHERE
