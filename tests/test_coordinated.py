"""run/coordinated.py: one ADMM-Q run across rounds with every layer at once — the same bytes for
any number of workers, one ρ continued across rounds, Hessians refreshed from the current model,
the dual rule and the polish real options, resume between rounds and inside the sequential start
into the same bytes, the last two rounds kept, and a driver that holds one block at a time."""

import hashlib
import json
import weakref

import pytest
import torch

from admmq_dist.quant.solvers.admmq import ADMMSettings
from admmq_dist.recipe import Recipe, override
from admmq_dist.run.backends import LocalBackend
from admmq_dist.run import coordinated as coordinated_module
from admmq_dist.run.coordinated import advance, model_residuals, next_rho
from admmq_dist.run.coordinated_worker import CoordinatedWorker
from admmq_dist.run.job import quantize_model
from admmq_dist.run.workdir import work_dir_for

from runs import SETTINGS, digest, quantize
from tiny import tiny_model_dir

ROUNDS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("src"), "llama", num_hidden_layers=3)


def coordinated(model_dir, out, backend=None, **solver):
    # The float start unless asked: every layer starts at once, so the rounds do all the work.
    recipe = override(Recipe(), {**SETTINGS, "solver": {
        **SETTINGS["solver"], "schedule": "coordinated", "coordinated_rounds": ROUNDS,
        "coordinated_start": "float", **solver}})
    return quantize_model(str(model_dir), out, recipe, device=torch.device("cpu"),
                          progress=False, threads=1, backend=backend, round_checkpoints=True)


def tensors(folder):
    return hashlib.sha256(b"".join(p.read_bytes()
                                   for p in sorted(folder.glob("*.safetensors")))).hexdigest()


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("coordinated") / "one"
    return out, coordinated(model_dir, out)


def test_any_worker_count_writes_the_same_bytes(model_dir, reference, tmp_path):
    out, one = reference
    for n in (2, 3):
        many = coordinated(model_dir, tmp_path / f"w{n}", backend=LocalBackend(n))
        assert digest(tmp_path / f"w{n}") == digest(out)
        assert [h["changed"] for h in many["rounds"]] == [h["changed"] for h in one["rounds"]]
    assert one["layers"] == 21 and one["schedule"] == "coordinated"


def test_one_rho_continues_across_rounds_and_every_round_moves_the_model(reference):
    out, one = reference
    rounds = [h for h in one["rounds"] if h["round"] != "polish"]
    assert [h["round"] for h in rounds] == list(range(ROUNDS))
    admm, k = ADMMSettings(), Recipe().solver.coordinated_iterations
    # The coordinator's ρ: round r starts where round r - 1's iterations left it, never reset.
    expected = [admm.rho_start]
    for _ in rounds[1:]:
        expected.append(advance(expected[-1], k, admm))
    assert [h["rho"] for h in rounds] == pytest.approx(expected)
    assert expected[-1] > 3 * expected[0]
    # Every layer's curve is one run: ROUNDS * k iterations, ρ rising without a reset.
    row = next(r for r in one_report(out) if r["layer"].endswith("mlp.down_proj"))
    assert len(row["rho"]) == ROUNDS * k and row["iterations"] == ROUNDS * k
    assert all(b > a for a, b in zip(row["rho"], row["rho"][1:]))
    # Round 0 sets every code; later rounds move fewer and fewer as ρ grows.
    assert rounds[0]["changed"] == 1.0
    assert 0 < rounds[-1]["changed"] < rounds[1]["changed"] < 0.5
    snapshots = [tensors(out.parent / f"{out.name}.round-{r}") for r in range(ROUNDS)]
    assert len(set(snapshots)) == ROUNDS


def one_report(out):
    import json
    return [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]


def test_the_schedule_improves_on_its_own_start_and_comes_near_sequential(model_dir, reference,
                                                                          tmp_path):
    """Round 0 is GPTQ's start plus ten iterations on the float model's Hessians; the refreshed
    rounds must bring the layer loss well below it, near the sequential schedule's (the losses
    are each schedule's own objective: the layer's inputs as its final model gives them)."""
    _, one = reference
    rounds = [h for h in one["rounds"] if h["round"] != "polish"]
    sequential = quantize(model_dir, tmp_path / "seq")["mean_loss"]
    gptq = quantize_model(str(model_dir), tmp_path / "gptq", override(Recipe(), {
        **SETTINGS, "solver": {**SETTINGS["solver"], "method": "gptq"}}),
        device=torch.device("cpu"), progress=False, threads=1)["mean_loss"]
    assert one["mean_loss"] < 0.97 * rounds[0]["mean_loss"]
    assert one["mean_loss"] < gptq
    assert one["mean_loss"] < 1.1 * sequential


def test_the_dual_rule_and_the_polish_change_the_result(model_dir, reference, tmp_path):
    out, one = reference  # the default: duals zeroed on a refresh
    keep = coordinated(model_dir, tmp_path / "keep", refresh_dual="keep")
    assert tensors(tmp_path / "keep") != tensors(out)
    assert keep["rounds"][1]["changed"] != one["rounds"][1]["changed"]
    polish = one["rounds"][-1]
    assert polish["round"] == "polish" and 0 < polish["changed"] < 0.2
    # The polish is a local search from the last round's codes (its round checkpoint), and it
    # moves some codes of it (switching it off was measured 4% worse and removed).
    assert tensors(out.parent / f"{out.name}.round-{ROUNDS - 1}") != tensors(out)
    with pytest.raises(ValueError, match="coordinated_polish"):
        override(Recipe(), {"solver": {"coordinated_polish": False}})


def test_the_sequential_start_is_a_real_option_and_the_diverging_dual_rule_is_gone(
        model_dir, reference, tmp_path, monkeypatch):
    """The sequential start hands round 0 the codes of a sequential GPTQ pass, so round 0 moves
    only part of them (from a float start, every code is new) — for any worker count, with
    asymmetric calibration's float stream carried through the pass too; its captures keep one
    running sum per statistic (its worker adds every batch in order; the canonical tree held up
    to four partial sums at 16 batches, the plan counts one). The stationary dual rule, which
    diverged, is gone."""
    from admmq_dist.model import capture

    out, one = reference
    with pytest.raises(ValueError, match=r"'stationary' is not one of \('keep', 'zero'\)"):
        override(Recipe(), {"solver": {"refresh_dual": "stationary"}})
    made = []

    class Recorded(capture.HessianAccumulator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.in_order)

    monkeypatch.setattr(capture, "HessianAccumulator", Recorded)
    start = coordinated(model_dir, tmp_path / "start", coordinated_start="sequential")
    monkeypatch.undo()
    assert len(made) == 3 * 4 and all(made)  # three blocks of four Hessians, all in order
    assert one["rounds"][0]["changed"] == 1.0 and 0 < start["rounds"][0]["changed"] < 0.5
    assert tensors(tmp_path / "start") != tensors(out)
    recipe = override(Recipe(), {**SETTINGS, "solver": {
        **SETTINGS["solver"], "schedule": "coordinated", "coordinated_rounds": 2,
        "coordinated_start": "sequential"},
        "calibration": {**SETTINGS["calibration"], "asymmetric": 0.25}})
    for name, n in (("asym", 1), ("asym2", 2)):
        quantize_model(str(model_dir), tmp_path / name, recipe, device=torch.device("cpu"),
                       progress=False, threads=1, backend=LocalBackend(n))
    assert digest(tmp_path / "asym") == digest(tmp_path / "asym2")


def test_a_run_stopped_in_the_sequential_start_goes_on_from_its_last_committed_block(
        model_dir, tmp_path, monkeypatch):
    """The sequential start commits block by block: stopped in block 2, a resumed run solves
    block 2 only, and writes the bytes of a run never stopped."""
    recipe = override(Recipe(), {**SETTINGS, "solver": {
        **SETTINGS["solver"], "schedule": "coordinated", "coordinated_rounds": 2,
        "coordinated_start": "sequential"},
        "calibration": {**SETTINGS["calibration"], "asymmetric": 0.25}})
    run = lambda out, **kw: quantize_model(  # noqa: E731
        str(model_dir), out, recipe, device=torch.device("cpu"), progress=False, threads=1,
        backend=LocalBackend(2), **kw)
    run(tmp_path / "ref")
    original, started = CoordinatedWorker.sequential_start, []

    def sequential_start(self, s, *args):
        started.append(s)
        if s == 2 and len(started) == 3:
            raise KeyboardInterrupt
        return original(self, s, *args)

    monkeypatch.setattr(CoordinatedWorker, "sequential_start", sequential_start)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "out")
    work = work_dir_for(tmp_path / "out")
    assert sorted(p.name for p in work.glob("start-*")) == [
        "start-hidden-00000.safetensors", "start-hidden-00001.safetensors",
        "start-segment-00000.safetensors", "start-segment-00001.safetensors"]
    run(tmp_path / "out", resume=True)
    assert started == [0, 1, 2, 2]
    assert digest(tmp_path / "out") == digest(tmp_path / "ref")


def test_the_driver_holds_one_block_of_results_at_a_time(model_dir, tmp_path, monkeypatch):
    """Blocks go from the workers to the writer one at a time (uint8 codes): when a block
    arrives, the blocks before it are gone from the driver. Counted by weak references to what
    the driver was handed, so a driver that gathered every block first fails."""
    from admmq_dist.run.depth_parallel import DepthParallelSchedule

    original, alive, most = DepthParallelSchedule._each_block, {}, []

    def each_block(self, start=0):
        for b, out in original(self, start):
            for name, (codes, _, _) in out.quantized.items():
                assert codes.dtype == torch.uint8
                alive[(b, name)] = weakref.ref(codes)
            yield b, out
            most.append(len({key[0] for key, ref in alive.items() if ref() is not None}))

    monkeypatch.setattr(DepthParallelSchedule, "_each_block", each_block)
    coordinated(model_dir, tmp_path / "out")
    # Three blocks written (the round checkpoints' too), never more than the one in hand.
    assert len(most) == 3 * (ROUNDS + 1) and max(most) <= 1


def test_keeping_the_better_codes_per_row_stops_the_first_rounds_from_overshooting(
        model_dir, reference, tmp_path):
    """With coordinated_keep_best a round puts in place, row by row, the better of its best
    iterate and the codes already in place (on the refreshed Hessian): round 1 no longer ends
    above round 0, and every round ends lower than without. The polish evens the two out (on this
    model 0.1% above without it with float32 eigh, 0.7% below with float64), so the final loss is
    only held to within 1%."""
    _, plain = reference
    best = coordinated(model_dir, tmp_path / "best", coordinated_keep_best=True)
    assert tensors(tmp_path / "best") != tensors(reference[0])
    rounds = [h for h in plain["rounds"] if h["round"] != "polish"]
    kept = [h for h in best["rounds"] if h["round"] != "polish"]
    assert rounds[1]["mean_loss"] > rounds[0]["mean_loss"]  # the overshoot it removes
    assert kept[1]["mean_loss"] < kept[0]["mean_loss"]
    assert all(k["mean_loss"] < r["mean_loss"] for k, r in zip(kept[1:], rounds[1:]))
    assert best["mean_loss"] < 1.01 * plain["mean_loss"]


def test_frozen_layers_stop_costing_iterations_and_barely_change_the_result(model_dir,
                                                                           tmp_path):
    """A layer that moved less than freeze_changed in a round past stop_min_rho is no longer
    iterated: the run spends fewer iterations, and its loss stays within 1% of the run that
    iterates every layer to the end."""
    admm = {**SETTINGS["solver"]["admm"], "stop_min_rho": 0.3}
    # The dual kept on refreshes: zeroed, every layer here freezes by round 4, and the figures
    # below need some still moving.
    runs = {name: coordinated(model_dir, tmp_path / name, coordinated_rounds=6,
                              round_stop_changed=0.001, admm=admm, refresh_dual="keep", **kw)
            for name, kw in (("all", {}), ("freeze", {"freeze_changed": 0.03}))}
    every, frozen = ([h for h in runs[name]["rounds"] if h["round"] != "polish"]
                     for name in ("all", "freeze"))
    assert [h["frozen"] for h in every] == [0] * 6
    assert 0 < frozen[-3]["frozen"] < frozen[-2]["frozen"] < 21
    assert frozen[-1]["iterations"] < 0.95 * every[-1]["iterations"]
    assert runs["freeze"]["mean_loss"] < 1.01 * runs["all"]["mean_loss"]
    assert tensors(tmp_path / "freeze") != tensors(tmp_path / "all")
    with pytest.raises(ValueError, match="freeze_changed"):
        override(Recipe(), {"solver": {"freeze_changed": 1.5}})


def test_a_run_stopped_inside_a_round_resumes_into_the_same_bytes(model_dir, reference, tmp_path,
                                                                  monkeypatch):
    out, one = reference
    calls = []
    original = CoordinatedWorker.iterate

    def iterate(self, rho, *args):
        calls.append(rho)
        if len(calls) == 4:  # the process "dies" in round 3 with rounds 0, 1 and 2 committed
            raise KeyboardInterrupt
        return original(self, rho, *args)

    monkeypatch.setattr(CoordinatedWorker, "iterate", iterate)
    with pytest.raises(KeyboardInterrupt):
        coordinated(model_dir, tmp_path / "out")
    monkeypatch.setattr(CoordinatedWorker, "iterate", original)
    # Only the last two rounds are kept (each holds every layer's codes, iterate and duals),
    # and the size the run reported for them is what is on disk.
    work = work_dir_for(tmp_path / "out")
    assert sorted(p.name for p in work.glob("round-*.done")) == [
        "round-001.done", "round-002.done"]
    assert {p.name[:9] for p in work.glob("round-*-segment-*")} == {"round-001", "round-002"}
    marker = json.loads((work / "round-002.done").read_text())
    assert marker["history"][-1]["work_bytes"] == sum(
        p.stat().st_size for p in work.glob("round-*-segment-*"))
    recipe = override(Recipe(), {**SETTINGS, "solver": {
        **SETTINGS["solver"], "schedule": "coordinated", "coordinated_rounds": ROUNDS,
        "coordinated_start": "float"}})
    resumed = quantize_model(str(model_dir), tmp_path / "out", recipe, device=torch.device("cpu"),
                             progress=False, threads=1, resume=True)

    def figures(summary):
        return [(h["round"], h.get("rho"), h["changed"], h["mean_loss"]) for h in summary["rounds"]]

    assert figures(resumed) == figures(one)
    assert digest(tmp_path / "out") == digest(out)


def test_the_recipe_refuses_what_the_schedule_cannot_do():
    with pytest.raises(ValueError, match="admmq"):
        override(Recipe(), {"solver": {"schedule": "coordinated", "method": "gptq"}})
    with pytest.raises(ValueError, match="refresh_dual"):
        override(Recipe(), {"solver": {"refresh_dual": "rescale"}})
    assert Recipe().solver.coordinated_start == "sequential"  # measured: the better start
    with pytest.raises(ValueError, match="coordinated_start"):
        override(Recipe(), {"solver": {"coordinated_start": "gptq"}})
    with pytest.raises(ValueError, match="coordinated_rounds"):
        override(Recipe(), {"solver": {"coordinated_rounds": 0}})


def test_advance_follows_the_two_phase_schedule():
    admm = ADMMSettings(rho_start=0.1, rho_growth=1.1, rho_slow_from=0.3, rho_growth_slow=1.03)
    assert advance(0.1, 1, admm) == pytest.approx(0.11)
    assert advance(0.5, 2, admm) == pytest.approx(0.5 * 1.03 ** 2)
    assert advance(0.25, 0, admm) == 0.25


def test_residual_balancing_scales_the_continued_penalty_by_the_models_residuals():
    admm = ADMMSettings()
    base = advance(0.4, 10, admm)
    assert next_rho(0.4, 10, admm, "continuation", (1.0, 0.0)) == base
    assert next_rho(0.4, 10, admm, "balance", (1.0, 0.05)) == pytest.approx(2 * base)
    assert next_rho(0.4, 10, admm, "balance", (0.05, 1.0)) == pytest.approx(base / 2)
    assert next_rho(0.4, 10, admm, "balance", (1.0, 0.5)) == base
    assert next_rho(0.4, 10, admm, "balance", None) == base
    # The model's residuals: the layers' last values, root mean square weighted by size.
    rows = [{"size": 3, "residual": [9.0, 0.2], "dual_residual": [9.0, 0.0]},
            {"size": 1, "residual": [9.0, 0.4], "dual_residual": [9.0, 0.4]},
            {"size": 5, "residual": [], "dual_residual": []}]  # a frozen or non-ADMM layer
    primal, dual = model_residuals(rows)
    assert primal == pytest.approx(((3 * 0.04 + 0.16) / 4) ** 0.5)
    assert dual == pytest.approx((0.16 / 4) ** 0.5)
    assert model_residuals([]) is None


def test_every_round_reports_the_residuals_and_balancing_moves_the_penalty(model_dir, reference,
                                                                         tmp_path, monkeypatch):
    out, one = reference
    rounds = [h for h in one["rounds"] if h["round"] != "polish"]
    assert all(h["primal_residual"] > 0 and h["dual_residual"] >= 0 for h in rounds)
    row = next(r for r in one_report(out) if r["layer"].endswith("mlp.down_proj"))
    assert len(row["dual_residual"]) == len(row["residual"]) == ROUNDS * 10
    # This tiny model's residuals stay within Boyd's 10x of each other (the rule would hold ρ
    # on the continuation); a tighter balance shows the rule reaches the workers' ρ and bytes.
    monkeypatch.setattr(coordinated_module, "BALANCE_RATIO", 1.2)
    balanced = coordinated(model_dir, tmp_path / "balance", penalty="balance")
    got = [h for h in balanced["rounds"] if h["round"] != "polish"]
    admm, k = ADMMSettings(), Recipe().solver.coordinated_iterations
    for before, after in zip(got, got[1:]):  # each round's ρ is the rule applied to the last
        assert after["rho"] == pytest.approx(next_rho(
            before["rho"], k, admm, "balance",
            (before["primal_residual"], before["dual_residual"])))
    assert [h["rho"] for h in got] != [h["rho"] for h in rounds]
    assert tensors(tmp_path / "balance") != tensors(out)
    with pytest.raises(ValueError, match="penalty"):
        override(Recipe(), {"solver": {"penalty": "spectral"}})


def test_asymmetric_calibration_pulls_the_model_toward_the_float_one(model_dir, reference,
                                                                      tmp_path):
    """The float model's hidden states travel beside the quantized ones, so every round's cross
    terms are against the float model's inputs: the quantized model's logits end nearer the
    float model's than without, and any worker count writes the same bytes."""
    from transformers import AutoModelForCausalLM

    out, _ = reference
    recipe = override(Recipe(), {**SETTINGS, "solver": {
        **SETTINGS["solver"], "schedule": "coordinated", "coordinated_rounds": ROUNDS,
        "coordinated_start": "float"},
        "calibration": {**SETTINGS["calibration"], "asymmetric": 0.25}})
    for name, n in (("asym", 1), ("asym2", 2)):
        quantize_model(str(model_dir), tmp_path / name, recipe, device=torch.device("cpu"),
                       progress=False, threads=1, backend=LocalBackend(n))
    assert digest(tmp_path / "asym") == digest(tmp_path / "asym2")
    torch.manual_seed(1)
    ids = torch.randint(0, 200, (4, 48))

    def logits(folder):
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits

    float_logits = logits(model_dir)
    plain = float(((logits(out) - float_logits) ** 2).mean())
    asym = float(((logits(tmp_path / "asym") - float_logits) ** 2).mean())
    assert asym < 0.95 * plain  # 0.93 with the default zeroed duals, 0.87 with them kept


def test_the_polish_refits_the_scales_on_the_final_hessians(model_dir, reference, tmp_path):
    """Like the sequential schedule's default, the scales are refitted after the last round —
    on the Hessians of the final model, before the local search — so a run without the refit
    writes other scales, and the refit lowers the polished loss."""
    from safetensors.torch import load_file

    out, one = reference
    plain = coordinated(model_dir, tmp_path / "norefit", scale_refits=0)
    refitted = {k: v for p in out.glob("model*.safetensors") for k, v in load_file(p).items()}
    fixed = {k: v for p in (tmp_path / "norefit").glob("model*.safetensors")
             for k, v in load_file(p).items()}
    scales = [k for k in refitted if k.endswith("weight_scale")]
    assert scales and any(not torch.equal(refitted[k], fixed[k]) for k in scales)
    assert one["rounds"][-1]["mean_loss"] < plain["rounds"][-1]["mean_loss"]
    # The polish is committed like a round: a resumed run would not refit twice.
    assert one["rounds"][-1]["round"] == "polish" and one["rounds"][-1]["work_bytes"] > 0
