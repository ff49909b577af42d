"""quant/factors.py and the asymmetric factor of quant/hessian.py: factorizations computed in
place are the bytes of the out-of-place chains they replace, in the memory of their result."""

import pytest
import torch

from admmq_dist.quant.factors import PERMUTE_ROWS, HessianFactors
from admmq_dist.quant.hessian import asymmetric_factor, damp, dead_inputs

from alloc import peak_allocated


def hessian(n: int, seed: int = 0, dead: int | None = 1) -> torch.Tensor:
    """A Hessian as the accumulator makes them, made not quite symmetric (a GEMM need not give
    H[i, j] and H[j, i] the same bits), with a dead input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g) * torch.linspace(0.1, 10, n)
    h = x.T @ x / (3 * n) + 1e-6 * torch.randn(n, n, generator=g)
    if dead is not None:
        h[dead], h[:, dead] = 0, 0
    return h


def out_of_place_gptq(h: torch.Tensor, act_order: bool, fraction: float, retry_factor: float,
                      retries: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """GPTQ's factor as it was computed before it was computed in place."""
    h = h.clone()
    d = dead_inputs(h)
    h[d, d] = 1.0
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else None
    if perm is not None:
        h = h[perm][:, perm]
    for _ in range(retries + 1):
        L, info = torch.linalg.cholesky_ex(damp(h, fraction))
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return perm, U
        fraction = max(fraction, 1e-4) * retry_factor
    raise ValueError("not positive definite")


@pytest.mark.parametrize("n", [5, 64, 130, 300])
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("fraction", [0.01, 0.0])
def test_gptq_factor_in_place_is_the_out_of_place_bytes(n, act_order, fraction):
    h = hessian(n, seed=n)
    perm, U = HessianFactors(h).gptq(act_order, fraction, 10.0, 4)
    ref_perm, ref = out_of_place_gptq(h, act_order, fraction, 10.0, 4)
    assert (perm is None) == (ref_perm is None) and (perm is None or torch.equal(perm, ref_perm))
    assert torch.equal(U, ref) and U.stride() == ref.stride()


def test_gptq_factor_retries_with_more_damping_from_the_undamped_hessian():
    """An indefinite Hessian fails undamped and succeeds once the damping has grown: each try
    starts again from H (the in-place try overwrote its copy)."""
    h = torch.eye(6)
    h[0, 1] = h[1, 0] = 1.5
    perm, U = HessianFactors(h).gptq(True, 0.0, 10.0, 4)
    assert torch.equal(U, out_of_place_gptq(h, True, 0.0, 10.0, 4)[1])
    with pytest.raises(ValueError, match="not positive definite"):
        HessianFactors(h).gptq(True, 0.0, 10.0, 0)


def test_gptq_factor_needs_its_result_and_two_row_blocks_of_memory():
    n = 1024
    factors = HessianFactors(hessian(n))
    _, peak = peak_allocated(lambda: factors.gptq(True, 0.01, 10.0, 4))
    # The out-of-place chain held four [n, n] float32 arrays at once.
    assert peak <= 4 * n * n + 2 * PERMUTE_ROWS * n * 4 + 32 * n


@pytest.mark.parametrize("n", [7, 200])
def test_asymmetric_factor_in_place_is_the_out_of_place_bytes_in_its_own_memory(n):
    h = hessian(n, seed=3)
    ref = h.double()
    d = dead_inputs(h)
    ref[d, d] = 1.0
    ref.diagonal().add_(0.01 * torch.diagonal(ref).mean())
    ref = torch.linalg.cholesky(ref)
    factor, peak = peak_allocated(lambda: asymmetric_factor(h, 0.01))
    assert torch.equal(factor, ref) and factor.stride() == ref.stride()
    # The float64 factor itself (and the dead-input mask): no second float64 copy.
    assert peak <= 8 * n * n + 64 * n


def test_the_asymmetric_factor_is_dropped_and_counted_once():
    factors = HessianFactors(hessian(16))
    first = factors.asymmetric(0.01)
    assert factors.asymmetric(0.01) is first and factors.counts["asymmetric"] == 1
    factors.drop_asymmetric()
    assert torch.equal(factors.asymmetric(0.01), first) and factors.counts["asymmetric"] == 2
