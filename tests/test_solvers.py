import pytest
import torch

from admmq_dist.quant.grid import GridSpec, fit_grid
from admmq_dist.quant.hessian import relative_loss
from admmq_dist.quant.solvers import ADMMSettings, GPTQSettings, admmq, gptq, local_search, rtn

from conftest import synthetic_layer


def on_grid(result):
    codes = result.codes
    assert codes.dtype == torch.int32
    assert int(codes.min()) >= 0 and int(codes.max()) <= result.grid.maxq
    assert torch.equal(result.weight, result.grid.dequantize(codes))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits", [3, 4])
def test_admmq_beats_act_order_gptq_and_rtn(seed, bits):
    w, h, _ = synthetic_layer(128, 192, 4096, seed=seed)
    grid = fit_grid(w, GridSpec(bits=bits, group_size=64))
    loss_rtn = rtn(w, h, grid).loss
    loss_gptq = gptq(w, h, grid, GPTQSettings(act_order=True)).loss
    result = admmq(w, h, grid)
    on_grid(result)
    assert result.loss == pytest.approx(relative_loss(result.weight, w, h))
    assert result.loss <= 0.95 * loss_gptq
    assert result.loss <= 0.3 * loss_rtn
    assert result.loss < 0.05  # absolute: a 3-bit layer of this kind, far from RTN's ~0.03-0.2


def test_identity_hessian_gives_round_to_nearest(layer):
    w, _, _ = layer
    h = torch.eye(w.shape[1])
    grid = fit_grid(w, GridSpec(bits=3, group_size=32))
    for init in ("gptq", "rtn"):
        result = admmq(w, h, grid, ADMMSettings(init=init))
        assert torch.equal(result.codes, grid.codes(w))


VARIANTS = {"cg": ADMMSettings(init="rtn", w_update="cg"),
            "soft": ADMMSettings(init="rtn", projection="soft"),
            "random": ADMMSettings(init="rtn", projection="random", random_probability=0.5),
            "cg-random": ADMMSettings(init="rtn", w_update="cg", projection="random"),
            "gradient": ADMMSettings(init="rtn", w_update="gradient")}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_runs_what_it_says(layer, name):
    """From the round-to-nearest start (``init="rtn"``): a variant must improve far on its start
    (one that ran no iteration would keep it), end near the exact update's loss, and not with the
    exact update's codes (one that silently ran the exact update would). The gradient variant
    steps on the activations even when the Hessian is given."""
    w, h, x = layer
    grid = fit_grid(w, GridSpec(bits=3, group_size=32))
    start = rtn(w, h, grid).loss
    exact = admmq(w, h, grid, ADMMSettings(init="rtn"))
    assert exact.loss < 0.3 * start
    result = admmq(w, h, grid, VARIANTS[name], activations=x)
    on_grid(result)
    assert result.iterations >= 1
    assert result.loss < 0.5 * start and result.loss < 1.3 * exact.loss
    assert not torch.equal(result.codes, exact.codes)
    # The start is a real option too: GPTQ's codes lead elsewhere than round to nearest's.
    if name == "cg":
        gptq_start = admmq(w, h, grid, ADMMSettings(w_update="cg"))
        assert not torch.equal(gptq_start.codes, result.codes)


def test_no_two_variants_are_the_same_run(layer):
    """Each option changes the run: were one silently another (gradient steps running CG, a
    projection ignored), two of these would end on the same codes."""
    w, h, x = layer
    grid = fit_grid(w, GridSpec(bits=3, group_size=32))
    runs = {name: admmq(w, h, grid, settings, activations=x).codes.numpy().tobytes()
            for name, settings in {**VARIANTS, "exact": ADMMSettings(init="rtn")}.items()}
    assert len(set(runs.values())) == len(runs)


def test_the_gradient_variant_needs_activations_and_the_pipeline_refuses_it(layer):
    from admmq_dist.quant.solvers.solve import SolverSettings

    w, h, _ = layer
    grid = fit_grid(w, GridSpec(bits=3, group_size=32))
    with pytest.raises(ValueError, match="pass activations"):
        admmq(w, h, grid, ADMMSettings(w_update="gradient"))
    with pytest.raises(ValueError, match="does not keep"):
        SolverSettings(admm=ADMMSettings(w_update="gradient"))


def test_gradient_variant_runs_from_activations_without_a_hessian(layer):
    w, h, x = layer
    grid = fit_grid(w, GridSpec(bits=3, group_size=32))
    result = admmq(w, None, grid, ADMMSettings(w_update="gradient", init="rtn"), activations=x)
    on_grid(result)
    true_loss = relative_loss(result.weight, w, h)
    assert result.loss == pytest.approx(true_loss, rel=1e-3)
    assert true_loss < 0.5 * rtn(w, h, grid).loss


def test_best_iterate_is_never_worse_than_the_initialisation(layer):
    w, h, _ = layer
    grid = fit_grid(w, GridSpec(bits=2, group_size=32))
    init = gptq(w, h, grid)
    # A schedule that starts far too small for 3 iterations cannot improve; it must not get worse.
    result = admmq(w, h, grid, ADMMSettings(iterations=3, rho_start=1e-4, rho_growth=1.0),
                   init_codes=init.codes)
    assert result.loss <= init.loss + 1e-9


def test_same_seed_same_codes(layer):
    w, h, _ = layer
    grid = fit_grid(w, GridSpec(bits=3, group_size=32))
    settings = ADMMSettings(projection="random", seed=7)
    a = admmq(w, h, grid, settings)
    b = admmq(w, h, grid, settings)
    c = admmq(w, h, grid, ADMMSettings(projection="random", seed=8))
    assert torch.equal(a.codes, b.codes)
    assert not torch.equal(a.codes, c.codes)


def test_local_search_is_monotone_after_every_solver(layer):
    w, h, _ = layer
    grid = fit_grid(w, GridSpec(bits=3, group_size=32))
    for start in (rtn(w, h, grid), gptq(w, h, grid), admmq(w, h, grid, ADMMSettings(iterations=20))):
        polished = local_search(w, h, grid, start.codes, sweeps=3, block_size=16)
        on_grid(polished)
        losses = polished.history["loss"]
        assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))
        assert polished.loss <= start.loss + 1e-9
    # From round-to-nearest there is a lot to gain.
    from_rtn = local_search(w, h, grid, rtn(w, h, grid).codes, sweeps=3)
    assert from_rtn.loss < 0.7 * rtn(w, h, grid).loss


def test_a_solvers_loss_is_the_sweeps_own_starting_loss_bit_for_bit(layer):
    """solve() hands GPTQ's and ADMM-Q's loss to the sweep instead of evaluating it again: it
    must be the very number the sweep computes, and the denominator taken once the same."""
    from admmq_dist.quant.hessian import reference_term

    w, h, _ = layer
    grid = fit_grid(w, GridSpec(bits=3, group_size=32))
    for start in (gptq(w, h, grid), admmq(w, h, grid, ADMMSettings(iterations=20))):
        assert local_search(w, h, grid, start.codes, 0).loss == start.loss
        assert relative_loss(start.weight, w, h, reference_term(w, h)) == start.loss
    assert torch.isnan(torch.tensor(gptq(w, h, grid, with_loss=False).loss))


def test_dead_inputs_are_handled():
    w, h, x = synthetic_layer(64, 96, 2048, seed=4, dead=5)
    dead = torch.diagonal(h) == 0
    assert int(dead.sum()) == 5
    grid = fit_grid(w, GridSpec(bits=3, group_size=32))
    for result in (gptq(w, h, grid), admmq(w, h, grid), admmq(w, h, grid, ADMMSettings(w_update="cg")),
                   admmq(w, None, grid, ADMMSettings(w_update="gradient"), activations=x)):
        on_grid(result)
        assert torch.isfinite(result.weight).all()
        # A dead column carries no signal: its codes are the grid's nearest to zero.
        assert torch.equal(result.codes[:, dead], grid.codes(torch.zeros_like(w))[:, dead])
        assert result.loss < rtn(w, h, grid).loss


def test_gptq_act_order_beats_plain_gptq_with_outliers():
    w, h, _ = synthetic_layer(128, 192, 4096, seed=5, outliers=8)
    grid = fit_grid(w, GridSpec(bits=3, group_size=64))
    plain = gptq(w, h, grid, GPTQSettings(act_order=False))
    act = gptq(w, h, grid, GPTQSettings(act_order=True))
    on_grid(act)
    assert act.loss < plain.loss < rtn(w, h, grid).loss


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="rho_growth"):
        ADMMSettings(rho_growth=0.5)
    with pytest.raises(ValueError, match="projection"):
        ADMMSettings(projection="fuzzy")
    with pytest.raises(ValueError, match="block_size"):
        GPTQSettings(block_size=0)
    with pytest.raises(ValueError, match="products"):
        ADMMSettings(products="fp16")


def test_tf32_products_reach_cublas_inside_the_iterations_only(layer, monkeypatch):
    """products="tf32" sets cuBLAS's float32 precision to TF32 while ADMM-Q iterates on a CUDA
    device and restores it after; on a CPU it changes nothing (the same codes)."""
    from admmq_dist.quant.solvers.admmq import products_in

    w, h, _ = layer
    grid = fit_grid(w, GridSpec(bits=3, group_size=32))
    plain = admmq(w, h, grid, ADMMSettings(iterations=20))
    assert torch.equal(admmq(w, h, grid, ADMMSettings(iterations=20, products="tf32")).codes,
                       plain.codes)
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    seen = []
    with products_in("tf32", torch.device("cuda")):
        seen.append(matmul.fp32_precision)
    with products_in("float32", torch.device("cuda")):
        seen.append(matmul.fp32_precision)
    assert seen == ["tf32", before] and matmul.fp32_precision == before


def test_a_warm_start_corrects_codes_for_a_changed_hessian():
    """Depth-parallel rounds: codes solved on one Hessian, then warm-started (codes + dual) on the
    Hessian of shifted inputs, beat keeping the old codes and cost fewer iterations than a cold run."""
    import dataclasses

    from admmq_dist.quant.hessian import relative_loss

    w, h_old, x = synthetic_layer(96, 128, 4096, seed=11)
    torch.manual_seed(12)
    shift = x + 0.3 * torch.randn_like(x) * x.std(dim=0)
    h_new = shift.T @ shift / shift.shape[0]
    grid = fit_grid(w, GridSpec(bits=3, group_size=32))
    first = admmq(w, h_old, grid, ADMMSettings())
    assert first.state["rho"] > 1 and first.state["dual"].shape == w.shape
    warm_settings = dataclasses.replace(ADMMSettings(), rho_start=0.3, rho_growth=1.05,
                                        iterations=40)
    warm = admmq(w, h_new, grid, warm_settings, init_codes=first.codes,
                 init_dual=first.state["dual"])
    cold = admmq(w, h_new, grid, ADMMSettings())
    stale = relative_loss(grid.dequantize(first.codes), w, h_new)
    assert warm.loss < 0.99 * stale
    assert warm.loss < 1.03 * cold.loss
    assert warm.iterations <= 40 < cold.iterations
    again = admmq(w, h_new, grid, warm_settings, init_codes=first.codes,
                  init_dual=first.state["dual"])
    assert torch.equal(again.codes, warm.codes)


def test_auto_w_update_switches_to_cg_at_the_width_without_an_eigendecomposition():
    """``w_update="auto"`` runs the exact update below ``cg_from_width`` and CG from it (no
    eigh at all); CG with the default steps stays within 1% of the exact update's loss, and
    fewer steps lose more (the step count is not a no-op)."""
    from admmq_dist.quant.factors import HessianFactors

    w, h, _ = synthetic_layer(128, 256, 4096, seed=3)
    grid = fit_grid(w, GridSpec(bits=3, group_size=64))
    start = gptq(w, h, grid).codes
    assert ADMMSettings().w_update == "auto"
    assert ADMMSettings().w_update_for(16383) == "exact"
    assert ADMMSettings().w_update_for(16384) == "cg"
    assert ADMMSettings(w_update="exact").w_update_for(10**6) == "exact"

    def run(**kw):
        factors = HessianFactors(h)
        result = admmq(w, h, grid, ADMMSettings(**kw), init_codes=start, factors=factors)
        return result, factors.counts["eigh"]

    exact, eighs_exact = run(cg_from_width=257)
    auto_cg, eighs_cg = run(cg_from_width=256)
    explicit_cg, _ = run(w_update="cg")
    few_steps, _ = run(w_update="cg", cg_steps=1)
    assert (eighs_exact, eighs_cg) == (1, 0)
    assert torch.equal(auto_cg.codes, explicit_cg.codes)
    assert not torch.equal(auto_cg.codes, exact.codes)
    assert auto_cg.loss <= 1.01 * exact.loss
    assert few_steps.loss > 1.02 * exact.loss
    assert exact.loss < 0.95 * gptq(w, h, grid).loss


def test_cg_from_width_is_validated():
    with pytest.raises(ValueError, match="cg_from_width"):
        ADMMSettings(cg_from_width=0)
    with pytest.raises(ValueError, match="w_update"):
        ADMMSettings(w_update="eigh")


@pytest.mark.parametrize("w_update", ["exact", "cg"])
def test_the_stationary_dual_makes_the_codes_a_fixed_point_of_the_w_step(w_update):
    """The coordinated schedule's "stationary" dual rule: on a refreshed Hessian the dual is set
    so that the current codes solve the W-step at any ρ (the W-step then moves nothing, and the
    projection moves a code only where the objective's gradient outweighs ρ). A zero dual pulls
    W toward the float weights instead."""
    from admmq_dist.quant.factors import HessianFactors
    from admmq_dist.quant.solvers.w_updates import ExactUpdate, InexactUpdate

    torch.manual_seed(0)
    x = torch.randn(512, 32) @ torch.randn(32, 32)
    hessian, weight = x.T @ x / 512, torch.randn(16, 32)
    grid = fit_grid(weight, GridSpec(bits=3, group_size=16))
    Z = grid.dequantize(grid.codes(weight))
    factors = HessianFactors(hessian)
    loop = (ExactUpdate(weight, factors) if w_update == "exact" else
            InexactUpdate(weight, factors, None, ADMMSettings(w_update="cg", cg_steps=50)))
    loop.start(Z, loop.stationary_dual(Z))
    for rho in (0.1, 3.0):
        assert (loop.w_step(rho) - Z).abs().max() < 1e-3 * Z.abs().max()
    loop.start(Z)
    assert (loop.w_step(0.1) - Z).abs().max() > 0.05 * Z.abs().max()
    # Through the solver: the rule changes the run.
    settings = ADMMSettings(iterations=5, rho_start=0.3, w_update=w_update)
    codes = grid.codes(weight)
    runs = [admmq(weight, hessian, grid, settings, init_codes=codes, init_dual=dual).codes
            for dual in (None, "stationary")]
    assert not torch.equal(*runs)
