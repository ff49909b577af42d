import pytest
import torch

from admmq_dist.quant.grid import GridSpec, fit_grid


def weights(rows=12, cols=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [None, 8, 16, 7])
@pytest.mark.parametrize("range_search", ["minmax", "mse"])
def test_codes_dequantize_project_are_exact_inverses(bits, symmetric, group_size, range_search):
    w = weights()
    grid = fit_grid(w, GridSpec(bits=bits, group_size=group_size, symmetric=symmetric,
                                range_search=range_search))
    codes = grid.codes(w)
    assert codes.dtype == torch.int32
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2**bits - 1
    deq = grid.dequantize(codes)
    assert torch.equal(grid.project(w), deq)
    assert torch.equal(grid.codes(deq), codes)  # a grid point projects onto itself
    assert torch.equal(grid.project(deq), deq)
    # Nearest point: no other code of the same element is closer (up to ties).
    scale, zero = grid.expanded()
    for step in (-1, 1):
        other = torch.clamp(codes + step, 0, 2**bits - 1)
        assert ((scale * (other - zero) - w).abs() >= (deq - w).abs() - 1e-6).all()


def test_minmax_grid_matches_gptq_convention():
    w = torch.tensor([[-1.0, 0.5, 2.0, 3.0]])
    grid = fit_grid(w, GridSpec(bits=2, group_size=None))
    assert torch.allclose(grid.scale, torch.tensor([[4.0 / 3]]))
    assert torch.equal(grid.zero, torch.tensor([[1.0]]))  # round(1 / (4/3)) = 1
    sym = fit_grid(w, GridSpec(bits=2, group_size=None, symmetric=True))
    assert torch.allclose(sym.scale, torch.tensor([[2.0]]))  # 2 * 3 / 3
    assert torch.equal(sym.zero, torch.tensor([[2.0]]))


def test_all_zero_group_gets_a_positive_scale():
    w = torch.zeros(2, 8)
    w[1, 4:] = 1.0
    grid = fit_grid(w, GridSpec(bits=4, group_size=4))
    assert (grid.scale > 0).all()
    assert torch.equal(grid.project(w), w)


def test_ragged_last_group():
    w = weights(cols=10)
    grid = fit_grid(w, GridSpec(bits=4, group_size=4))
    assert grid.num_groups == 3
    assert grid.group_index().tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    # The last group's range comes from its own two columns only.
    last = w[:, 8:]
    xmax = last.clamp_min(0).amax(1)
    xmin = last.clamp_max(0).amin(1)
    assert torch.allclose(grid.scale[:, 2], (xmax - xmin) / 15)


def test_mse_range_search_lowers_the_error():
    w = weights(rows=64, cols=128, seed=3) ** 3  # heavy tails make clipping pay
    plain = fit_grid(w, GridSpec(bits=3, group_size=32))
    searched = fit_grid(w, GridSpec(bits=3, group_size=32, range_search="mse"))
    # The search minimises sum |error| ** 2.4 (GPTQ's norm), so measure in that norm.
    err_plain = float(((plain.project(w) - w).abs() ** 2.4).sum())
    err_searched = float(((searched.project(w) - w).abs() ** 2.4).sum())
    assert err_searched < 0.95 * err_plain


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 5}, "bits=5"),
    ({"group_size": 0}, "group_size=0"),
    ({"range_search": "max"}, "range_search"),
    ({"mse_max_shrink": 1.0}, "mse_max_shrink"),
])
def test_bad_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GridSpec(**kwargs)


def test_non_finite_weights_are_refused():
    w = weights()
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fit_grid(w, GridSpec())
