"""Property tests (hypothesis): recipe overrides and YAML round trips, grid fixed points, and bit
packing round trips, over random inputs rather than the hand-picked cases of the other tests."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from admmq_dist.quant.grid import GridSpec, fit_grid
from admmq_dist.quant.packing import (
    pack_compressed_tensors_weight,
    pack_compressed_tensors_zero_point,
    pack_gptq_qweight,
    pack_gptq_qzeros,
    unpack_compressed_tensors_weight,
    unpack_compressed_tensors_zero_point,
    unpack_gptq_qweight,
    unpack_gptq_qzeros,
)
from admmq_dist.recipe import Recipe, RecipeError, load_recipe, override, to_mapping

SETTINGS = settings(max_examples=75, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
BITS = (2, 3, 4, 8)

# ----------------------------------------------------------------------------- recipes

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1,
                max_size=20)
positive = st.integers(1, 10**6)
positive_float = st.floats(1e-6, 1e6, allow_nan=False, allow_infinity=False)
# Valid values per leaf field, with the path they sit at.
LEAVES = {
    ("grid", "bits"): st.sampled_from(BITS),
    ("grid", "group_size"): st.sampled_from([None, 32, 64, 128]),
    ("grid", "symmetric"): st.booleans(),
    ("grid", "range_search"): st.sampled_from(["minmax", "mse"]),
    ("grid", "mse_norm"): positive_float,
    ("grid", "mse_steps"): positive,
    ("grid", "mse_max_shrink"): st.floats(0.0, 0.99),
    ("calibration", "dataset"): st.none() | names,
    ("calibration", "split"): names,
    ("calibration", "num_samples"): positive,
    ("calibration", "seq_len"): positive,
    ("calibration", "batch_size"): positive,
    ("calibration", "seed"): st.integers(-(2**40), 2**40),
    ("calibration", "min_expert_tokens"): st.none() | st.integers(0, 10**6),
    ("calibration", "expert_fallback"): st.sampled_from(["all-tokens", "rtn"]),
    ("solver", "local_search_sweeps"): st.none() | st.integers(0, 5),
    ("solver", "row_block"): positive,
    ("solver", "rounds"): st.integers(0, 10),
    ("solver", "admm", "iterations"): st.integers(0, 1000),
    ("solver", "admm", "rho_start"): positive_float,
    ("solver", "admm", "rho_growth"): st.floats(1.0, 2.0),
    ("solver", "admm", "rho_slow_from"): st.none() | positive_float,
    ("solver", "admm", "w_update"): st.sampled_from(["auto", "exact", "cg"]),
    ("solver", "gptq", "damp"): st.floats(0.0, 0.99),
    ("solver", "gptq", "act_order"): st.booleans(),
    ("output", "format"): st.sampled_from(["compressed-tensors", "gptq"]),
    ("output", "dtype"): st.sampled_from(["auto", "float16", "bfloat16", "float32"]),
    ("output", "skip"): st.lists(names, max_size=4),
    ("output", "max_shard_gb"): positive_float,
    ("report", "compare"): st.booleans(),
    ("report", "html"): st.booleans(),
}


def _get(instance, path):
    for key in path:
        instance = getattr(instance, key)
    return instance


def _nest(flat: dict) -> dict:
    nested: dict = {}
    for path, value in flat.items():
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return nested


@st.composite
def valid_updates(draw):
    """``(flat, nested)``: a random subset of LEAVES with valid values, plus a consistent
    method/schedule pair (depth-parallel requires ADMM-Q)."""
    paths = draw(st.lists(st.sampled_from(sorted(LEAVES)), unique=True, max_size=12))
    flat = {p: draw(LEAVES[p]) for p in paths}
    schedule = draw(st.sampled_from([None, "sequential", "depth-parallel"]))
    method = "admmq" if schedule == "depth-parallel" else draw(
        st.sampled_from([None, "admmq", "gptq", "rtn"]))
    if schedule is not None:
        flat[("solver", "schedule")] = schedule
    if method is not None:
        flat[("solver", "method")] = method
    return flat, _nest(flat)


def _expected(value):
    return tuple(value) if isinstance(value, list) else value


@SETTINGS
@given(valid_updates())
def test_overrides_apply_exactly_and_round_trip_through_yaml(tmp_path, drawn):
    flat, nested = drawn
    recipe = override(Recipe(), nested)
    for path, value in flat.items():
        got = _get(recipe, path)
        assert got == _expected(value), path
        assert type(got) is type(_expected(value)) or isinstance(value, float), path
    # Everything not named keeps its default.
    default_flat = _flatten(to_mapping(Recipe()))
    for path, value in _flatten(to_mapping(recipe)).items():
        if path not in flat:
            assert value == default_flat[path], path
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(to_mapping(recipe), allow_unicode=True))
    assert load_recipe(path) == recipe
    # The written updates alone (what a user's file holds) load to the same recipe.
    path.write_text(yaml.safe_dump(nested, allow_unicode=True))
    assert load_recipe(path) == recipe


def _flatten(mapping, prefix=()):
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


SECTIONS = {(): Recipe, ("grid",): GridSpec}
for _path, _cls in [(("solver",), type(Recipe().solver)), (("calibration",), type(Recipe().calibration)),
                    (("output",), type(Recipe().output)), (("report",), type(Recipe().report)),
                    (("solver", "admm"), type(Recipe().solver.admm)),
                    (("solver", "gptq"), type(Recipe().solver.gptq))]:
    SECTIONS[_path] = _cls


@SETTINGS
@given(st.sampled_from(sorted(SECTIONS)), names)
def test_unknown_keys_are_errors_naming_the_key(where, key):
    cls = SECTIONS[where]
    assume(key not in {f.name for f in dataclasses.fields(cls)})
    full = ".".join(where + (key,))
    with pytest.raises(RecipeError) as info:
        override(Recipe(), _nest({where + (key,): 1}))
    assert f"unknown recipe key '{full}'" in str(info.value)


# Wrong-typed values per field: (path, strategy of values of a wrong type, message fragment).
WRONG = [
    (("grid", "bits"), names | st.booleans() | st.floats(allow_nan=False) | st.lists(st.integers()),
     "expected an integer"),
    (("grid", "group_size"), names | st.booleans() | st.floats(allow_nan=False), "expected an integer"),
    (("grid", "symmetric"), st.integers() | names | st.floats(allow_nan=False), "expected true or false"),
    (("calibration", "num_samples"), st.booleans() | names | st.floats(allow_nan=False),
     "expected an integer"),
    (("calibration", "seq_len"), st.booleans() | names, "expected an integer"),
    (("calibration", "dataset"), st.integers() | st.booleans() | st.lists(names, min_size=1),
     "expected a string"),
    (("solver", "admm", "rho_start"), st.booleans() | names, "expected a number"),
    (("solver", "gptq", "damp"), st.booleans() | names, "expected a number"),
    (("output", "skip"), names | st.integers() | st.lists(st.integers(), min_size=1),
     "expected a list of strings"),
    (("solver", "method"), names.filter(lambda s: s not in ("admmq", "gptq", "rtn")) | st.integers(),
     "is not one of"),
    (("report", "html"), st.integers() | names, "expected true or false"),
]


@pytest.mark.parametrize("path, values, fragment", WRONG, ids=[".".join(w[0]) for w in WRONG])
@SETTINGS
@given(st.data())
def test_wrong_types_are_errors_naming_the_key_path(path, values, fragment, data):
    value = data.draw(values)
    with pytest.raises(RecipeError) as info:
        override(Recipe(), _nest({path: value}))
    message = str(info.value)
    assert message.startswith(".".join(path) + ": "), message
    assert fragment in message


def test_wrong_type_examples_pinned():
    """The cases the brief names, pinned (hypothesis may not draw exactly these)."""
    with pytest.raises(RecipeError, match=r"^grid\.bits: expected an integer, got '4'$"):
        override(Recipe(), {"grid": {"bits": "4"}})
    with pytest.raises(RecipeError, match=r"^calibration\.num_samples: expected an integer, got True$"):
        override(Recipe(), {"calibration": {"num_samples": True}})


# ----------------------------------------------------------------------------- grids

magnitudes = st.sampled_from([1e-3, 1.0, 1e3, 1e20])
# Zero or any finite float32 magnitude, subnormals and values near the maximum included
# (test_grid_extremes_of_float32 pins the two ends).
entries = st.just(0.0) | st.builds(
    lambda sign, x: sign * x, st.sampled_from([-1.0, 1.0]),
    st.floats(2.0**-149, 2.0**127, width=32))


@st.composite
def weight_matrices(draw):
    rows = draw(st.integers(1, 16))
    cols = draw(st.integers(1, 200))
    kind = draw(st.sampled_from(["normal", "zeros", "sparse", "constant", "one-sided"]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(magnitudes)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * scale
    if kind == "zeros":
        w = torch.zeros(rows, cols)
    elif kind == "sparse":
        w = w * (torch.rand(rows, cols, generator=g) < 0.1)
    elif kind == "constant":
        w = torch.full((rows, cols), draw(entries))
    elif kind == "one-sided":
        w = w.abs()
    # A few explicit drawn values, so hypothesis also shrinks towards specific numbers.
    for _ in range(draw(st.integers(0, 3))):
        w[draw(st.integers(0, rows - 1)), draw(st.integers(0, cols - 1))] = draw(entries)
    return w.float()


grid_specs = st.builds(
    GridSpec,
    bits=st.sampled_from(BITS),
    group_size=st.sampled_from([None, 1, 7, 32, 64, 128, 256]),
    symmetric=st.booleans(),
    range_search=st.sampled_from(["minmax", "mse"]),
    mse_steps=st.integers(1, 20),
)


@SETTINGS
@given(weight_matrices(), grid_specs)
def test_grid_codes_are_in_range_and_dequantize_is_a_fixed_point(w, spec):
    grid = fit_grid(w, spec)
    rows, cols = w.shape
    gs = cols if spec.group_size is None else spec.group_size
    assert grid.scale.shape == grid.zero.shape == (rows, math.ceil(cols / gs))
    assert bool(torch.isfinite(grid.scale).all()) and bool((grid.scale > 0).all())
    assert torch.equal(grid.zero, torch.round(grid.zero))
    if spec.symmetric:
        assert bool((grid.zero == 2 ** (spec.bits - 1)).all())
    else:
        assert int(grid.zero.min()) >= 0 and int(grid.zero.max()) <= 2**spec.bits - 1

    codes = grid.codes(w)
    assert codes.dtype == torch.int32 and codes.shape == w.shape
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2**spec.bits - 1
    deq = grid.dequantize(codes)
    assert torch.equal(grid.codes(deq), codes)          # a grid point has its own code
    assert torch.equal(grid.dequantize(grid.codes(deq)), deq)
    projected = grid.project(w)
    assert torch.equal(projected, deq)                  # project == dequantize(codes)
    assert torch.equal(grid.project(projected), projected)  # idempotent
    # Zero is always on the grid (the range includes 0), so zero weights stay exactly zero.
    zero_weights = w == 0
    assert bool((deq[zero_weights] == 0).all())


@pytest.mark.parametrize("value, symmetric", [(1e-45, False), (1e-45, True), (3e38, True)])
def test_grid_extremes_of_float32(value, symmetric):
    w = torch.tensor([[value, 0.0]], dtype=torch.float32)
    spec = GridSpec(bits=4, group_size=None, symmetric=symmetric)
    try:
        grid = fit_grid(w, spec)
    except ValueError:
        return  # refusing such a weight with a clear error is also acceptable
    codes = grid.codes(w)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    assert bool(torch.isfinite(grid.dequantize(codes)).all())


# ----------------------------------------------------------------------------- packing

@st.composite
def code_matrices(draw, low=0, max_rows=70, max_cols=70, offset=0):
    """``(bits, codes)``: int codes in ``[low, 2**bits - 1 + offset]``, random or at the ends."""
    bits = draw(st.sampled_from(BITS))
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    high = 2**bits - 1 + offset
    fill = draw(st.sampled_from(["random", "low", "high", "alternate"]))
    if fill == "random":
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        codes = torch.randint(low, high + 1, (rows, cols), generator=g)
    elif fill == "low":
        codes = torch.full((rows, cols), low)
    elif fill == "high":
        codes = torch.full((rows, cols), high)
    else:
        codes = torch.where(torch.arange(rows * cols).reshape(rows, cols) % 2 == 0,
                            torch.tensor(low), torch.tensor(high))
    dtype = draw(st.sampled_from([torch.int32, torch.int64] + ([torch.uint8] if high < 256 else [])))
    return bits, codes.to(dtype)


@SETTINGS
@given(code_matrices())
def test_compressed_tensors_weight_round_trips(drawn):
    bits, codes = drawn
    n, k = codes.shape
    packed = pack_compressed_tensors_weight(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (n, math.ceil(k * bits / 32))
    back = unpack_compressed_tensors_weight(packed, bits, (n, k))
    assert back.dtype == torch.int32
    assert torch.equal(back, codes.to(torch.int32))


@SETTINGS
@given(code_matrices(max_cols=8))
def test_compressed_tensors_zero_point_round_trips(drawn):
    bits, zero = drawn
    n, g = zero.shape
    packed = pack_compressed_tensors_zero_point(zero, bits)
    assert packed.dtype == torch.int32 and packed.shape == (math.ceil(n * bits / 32), g)
    assert torch.equal(unpack_compressed_tensors_zero_point(packed, bits, n), zero.to(torch.int32))


def _gptq_words(length, bits):
    return 3 * math.ceil(length / 32) if bits == 3 else math.ceil(length / (32 // bits))


@SETTINGS
@given(code_matrices())
def test_gptq_qweight_round_trips(drawn):
    bits, codes = drawn
    n, k = codes.shape
    qweight = pack_gptq_qweight(codes, bits)
    assert qweight.dtype == torch.int32 and qweight.shape == (_gptq_words(k, bits), n)
    assert torch.equal(unpack_gptq_qweight(qweight, bits, k), codes.to(torch.int32))


@SETTINGS
@given(code_matrices(low=1, max_cols=8))
def test_gptq_qzeros_round_trip_zero_points_from_one(drawn):
    """v1 stores zero - 1, so the packer takes zero points in [1, 2**bits - 1] and they come back
    unchanged (the reader adds the 1 back)."""
    bits, zero = drawn
    n, g = zero.shape
    qzeros = pack_gptq_qzeros(zero, bits)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (g, _gptq_words(n, bits))
    assert torch.equal(unpack_gptq_qzeros(qzeros, bits, n), zero.to(torch.int32))
    # What is stored is zero - 1: the same words as packing zero - 1 as plain codes along N.
    assert torch.equal(qzeros, pack_gptq_qweight(zero.to(torch.int64).T - 1, bits).T)


@SETTINGS
@given(code_matrices(max_cols=8), st.data())
def test_gptq_qzeros_refuse_a_zero_point_of_zero(drawn, data):
    bits, zero = drawn
    zero = zero.to(torch.int64).clamp(min=1)
    i = data.draw(st.integers(0, zero.shape[0] - 1))
    j = data.draw(st.integers(0, zero.shape[1] - 1))
    zero[i, j] = 0
    with pytest.raises(ValueError, match="zero point of 0"):
        pack_gptq_qzeros(zero, bits)


@SETTINGS
@given(code_matrices(offset=1))
def test_out_of_range_codes_are_refused(drawn):
    bits, codes = drawn
    codes = codes.to(torch.int64)
    assume(int(codes.max()) > 2**bits - 1)
    with pytest.raises(ValueError, match=f"must lie in \\[0, {2**bits - 1}\\]"):
        pack_compressed_tensors_weight(codes, bits)
    with pytest.raises(ValueError, match=f"must lie in \\[0, {2**bits - 1}\\]"):
        pack_gptq_qweight(codes, bits)


@SETTINGS
@given(st.sampled_from([2, 4, 8]), st.integers(1, 12), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_symmetric_weight_layouts_agree_for_whole_words(bits, n, blocks, seed):
    """The module docstring's claim: for 2/4/8 bits and K a multiple of 32 the compressed-tensors
    words are GPTQ's, transposed."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, 32 * blocks), generator=g)
    assert torch.equal(pack_compressed_tensors_weight(codes, bits), pack_gptq_qweight(codes, bits).T)
