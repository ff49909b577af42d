"""FP4 grids (NVFP4, MXFP4): the E2M1 rounding, representable scales, every solver on them, the
compressed-tensors layouts bit for bit against the library's own compressors, and a whole run that
transformers loads (issue 28)."""

from __future__ import annotations

import pytest
import torch

from admmq_dist.checkpoint import fp4_layout
from admmq_dist.checkpoint.formats import quantization_config
from admmq_dist.quant import fp4
from admmq_dist.quant.grid import Grid, GridSpec, fit_grid
from admmq_dist.quant.hessian import relative_loss
from admmq_dist.quant.solvers.scales import refit_scales
from admmq_dist.quant.solvers.solve import SolverSettings, solve
from admmq_dist.recipe import Recipe, RecipeError, override

from conftest import synthetic_layer

KINDS = ("nvfp4", "mxfp4")
VALUES = torch.tensor([-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6])


def spec(kind: str, range_search: str = "minmax") -> GridSpec:
    return GridSpec(bits=4, group_size=fp4.GROUP_SIZES[kind], symmetric=True, kind=kind,
                    range_search=range_search)


def representable(grid: Grid) -> bool:
    """Every scale is one the format stores exactly."""
    if grid.kind == "nvfp4":
        local = grid.scale * grid.global_scale
        return (torch.equal(local.to(torch.float8_e4m3fn).float(), local)
                and float(local.max()) <= fp4.E4M3_MAX
                and fp4.nvfp4_global_scale(grid.scale) >= grid.global_scale)
    return torch.equal(torch.exp2(torch.log2(grid.scale).round()), grid.scale)


def test_rounding_is_to_the_nearest_e2m1_value_with_ties_to_even():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g) * 3
    nearest = VALUES[(x[:, None] - VALUES[None]).abs().argmin(dim=1)]
    rounded = fp4.round_e2m1_(x.clone())
    # Off ties the nearest value is unique.
    assert torch.equal(rounded, nearest)
    # Ties go to the even mantissa (0, 1, 2, 4 and their negatives), as the hardware converts;
    # beyond 6 it saturates.
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.75, 7.0, -100.0])
    assert fp4.round_e2m1_(ties).tolist() == [0, 1, 1, 2, 2, 4, 4, -4, -1, 6, -6]
    codes = fp4.encode(VALUES)
    assert torch.equal(fp4.decode(codes), VALUES)
    assert sorted(codes.tolist()) == [c for c in range(16) if c != 8]  # -0 is never written


@pytest.mark.parametrize("kind", KINDS)
def test_fitted_scales_are_the_formats_numbers_and_the_range_search_pays(kind):
    w, _, _ = synthetic_layer(64, 256, 512, seed=3)
    errors = {}
    for range_search in ("minmax", "mse"):
        grid = fit_grid(w, spec(kind, range_search))
        assert representable(grid) and grid.kind == kind
        assert torch.equal(grid.zero, torch.zeros_like(grid.scale))
        q = grid.project(w.clone())
        assert torch.equal(grid.dequantize(grid.codes(w)), q)
        # Min-max never clips the largest magnitude by more than the E4M3 rounding of its scale.
        errors[range_search] = float(((q - w) ** 2).sum())
    assert errors["mse"] < 0.97 * errors["minmax"]
    # The grid is not the integer one: the same weights on a 4-bit integer grid differ.
    other = fit_grid(w, GridSpec(bits=4, group_size=fp4.GROUP_SIZES[kind], symmetric=True))
    assert not torch.equal(other.project(w.clone()), fit_grid(w, spec(kind)).project(w.clone()))


@pytest.mark.parametrize("kind", KINDS)
def test_every_solver_runs_on_fp4_and_admmq_beats_gptq_beats_rtn(kind):
    w, h, _ = synthetic_layer(96, 256, 4096, seed=1)
    grid = fit_grid(w, spec(kind, "mse"))
    losses = {}
    for method in ("rtn", "gptq", "admmq"):
        result = solve(w, h, grid, SolverSettings(method=method))
        assert representable(result.grid)
        assert relative_loss(result.grid.dequantize(result.codes), w, h) == pytest.approx(
            result.loss, rel=1e-4)
        assert int(result.codes.min()) >= 0 and int(result.codes.max()) <= 15
        losses[method] = result.loss
    assert losses["admmq"] < 0.92 * losses["gptq"] < 0.92 * 0.2 * losses["rtn"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_scale_refit_finds_the_formats_scales_the_codes_were_made_with(kind):
    """Weights exactly ``s* · e2m1(codes)``: from scales four steps off, the refit returns ``s*``
    (loss 0), every scale still the format's."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(16, 128, generator=g) * 0.05
    grid = fit_grid(w0, spec(kind))
    codes = grid.codes(w0)
    w = grid.dequantize(codes)
    x = torch.randn(512, 128, generator=g)
    h = x.T @ x / 512
    off = Grid(4, grid.group_size, 128, True, grid.snap_scales(grid.scale * 1.6, None),
               grid.zero, kind, grid.global_scale)
    assert representable(off) and relative_loss(off.dequantize(codes), w, h) > 1e-2
    fitted = refit_scales(w, h, off, codes)
    assert representable(fitted)
    assert torch.equal(fitted.scale, grid.scale)
    assert relative_loss(fitted.dequantize(codes), w, h) < 1e-12


@pytest.mark.parametrize("kind, preset, compressor", [
    ("nvfp4", "NVFP4A16", "compressed_tensors.compressors.nvfp4.base:NVFP4PackedCompressor"),
    ("mxfp4", "MXFP4A16", "compressed_tensors.compressors.mxfp4.base:MXFP4PackedCompressor")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layout_is_compressed_tensors_own_bit_for_bit(kind, preset, compressor, dtype):
    """The library's compressor, handed our dequantized weight and scales, writes our bytes; its
    decompressor gives back our weights; our config is its preset's."""
    ct = pytest.importorskip("compressed_tensors.quantization")
    module, _, cls = compressor.partition(":")
    compressor = getattr(pytest.importorskip(module), cls)
    w, _, _ = synthetic_layer(48, 256, 64, seed=2)
    grid = fit_grid(w, spec(kind, "mse"))
    codes = grid.codes(w)
    ours = fp4_layout.layer_tensors(kind, "m", codes, grid.scale)
    state = {"weight": grid.dequantize(codes).to(dtype)}
    if kind == "nvfp4":
        state["weight_scale"] = ours["m.weight_scale"].to(dtype)
        state["weight_global_scale"] = ours["m.weight_global_scale"]
    else:
        state["weight_scale"] = grid.scale.to(dtype)
    scheme = ct.preset_name_to_scheme(preset, ["Linear"])
    theirs = compressor.compress(state, scheme)
    assert set(theirs) == {k.removeprefix("m.") for k in ours}
    for key, value in theirs.items():
        assert value.dtype == ours[f"m.{key}"].dtype
        assert torch.equal(value.view(torch.uint8) if value.dtype != torch.float32 else value,
                           ours[f"m.{key}"].view(torch.uint8)
                           if value.dtype != torch.float32 else ours[f"m.{key}"])
    back = compressor.decompress(theirs, scheme)["weight"]
    assert torch.equal(back.float(), grid.dequantize(codes).to(back.dtype).float())
    assert torch.equal(fp4_layout.unpack(ours["m.weight_packed"]), codes)
    config = quantization_config("compressed-tensors", 4, fp4.GROUP_SIZES[kind], True,
                                 ["lm_head"], kind)
    library = ct.QuantizationConfig(config_groups={"group_0": scheme},
                                    format=fp4_layout.FORMATS[kind],
                                    quantization_status="compressed", ignore=["lm_head"])
    assert ct.QuantizationConfig.model_validate(config).model_dump() == library.model_dump()


def test_scales_the_format_cannot_hold_are_refused():
    w, _, _ = synthetic_layer(8, 64, 64, seed=0)
    grid = fit_grid(w, spec("mxfp4"))
    with pytest.raises(ValueError, match="not mxfp4 scale numbers"):
        fp4_layout.layer_tensors("mxfp4", "m", grid.codes(w), grid.scale * 1.1)


@pytest.mark.parametrize("updates, needle", [
    ({"grid": {"kind": "nvfp4", "bits": 3}}, "nvfp4 is a 4-bit format"),
    ({"grid": {"kind": "mxfp4", "group_size": 16}}, "mxfp4 has groups of 32"),
    ({"grid": {"kind": "nvfp4", "symmetric": False}}, "no zero points"),
    ({"grid": {"kind": "nvfp4"}, "output": {"format": "gptq"}}, "compressed-tensors only"),
])
def test_combinations_the_formats_cannot_hold_are_refused_by_the_recipe(updates, needle):
    with pytest.raises(RecipeError, match=needle):
        override(Recipe(), updates)
    # The format alone sets its bits and group size.
    grid = override(Recipe(), {"grid": {"kind": updates["grid"]["kind"]}}).grid
    assert (grid.bits, grid.group_size) == (4, fp4.GROUP_SIZES[grid.kind])
