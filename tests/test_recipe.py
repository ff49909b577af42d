import dataclasses

import pytest
import yaml

from admmq_dist.recipe import Recipe, RecipeError, load_recipe, override, to_mapping


def test_defaults_round_trip_through_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(to_mapping(Recipe())))
    assert load_recipe(path) == Recipe()


def test_nested_overrides_apply_and_keep_the_rest(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("grid: {bits: 3, group_size: null}\n"
                    "solver: {admm: {rho_growth: 1.02, iterations: 300}, gptq: {damp: 0.05}}\n")
    recipe = load_recipe(path)
    assert recipe.grid.bits == 3 and recipe.grid.group_size is None
    assert recipe.grid.symmetric is None  # left to the pipeline (auto)
    assert recipe.solver.admm.rho_growth == 1.02 and recipe.solver.admm.iterations == 300
    assert recipe.solver.admm.rho_start == Recipe().solver.admm.rho_start
    assert recipe.solver.gptq.damp == 0.05


@pytest.mark.parametrize("text, message", [
    ("grid: {bitz: 3}", "unknown recipe key 'grid.bitz'"),
    ("solver: {admm: {rho: 1}}", "unknown recipe key 'solver.admm.rho'"),
    ("calibrate: {}", "unknown recipe key 'calibrate'"),
    ("output: {format: safetensors}", "output.format: 'safetensors' is not one of"),
    ("output: {skip: lm_head}", "output.skip: expected a list of strings"),
    ("grid: {bits: 5}", "bits=5"),
    ("grid: {bits: three}", "grid.bits: expected an integer"),
    ("grid: {symmetric: 1}", "grid.symmetric: expected true or false"),
    ("solver: {method: awq}", "solver.method: 'awq' is not one of"),
    ("grid: 3", "grid: expected a mapping"),
    ("calibration: {asymmetric: 1.5}", "calibration: asymmetric=1.5 must lie in"),
    ("calibration: {asymmetric: always}", "calibration.asymmetric: expected a number"),
    ("calibration: {asymmetric_grid: float}", "calibration.asymmetric_grid: 'float' is not one of"),
    ("effort: turbo", "effort: 'turbo' is not one of"),
])
def test_bad_recipes_name_the_key(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_recipe(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_override_of_a_single_dataclass():
    recipe = override(Recipe(), {"solver": {"local_search_sweeps": 3}})
    assert recipe.solver.local_search_sweeps == 3


def test_shipped_recipes_load():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
    assert len(recipes) >= 2
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.grid.bits in (2, 3, 4, 8)


def test_asymmetric_calibration_is_on_by_default_and_one_flag_turns_it_off():
    """The default strength is "auto": AUTO_ASYMMETRIC for the calibrated methods, 0 for RTN;
    the run stores the number it used; --asymmetric 0 is the plain objective."""
    from admmq_dist.cli import _recipe_from_args, build_parser
    from admmq_dist.recipe import AUTO_ASYMMETRIC
    from admmq_dist.run.job import settle_recipe

    assert 0 < AUTO_ASYMMETRIC <= 1
    recipe = Recipe()
    assert recipe.calibration.asymmetric == "auto"
    for method, strength in (("admmq", AUTO_ASYMMETRIC), ("gptq", AUTO_ASYMMETRIC), ("rtn", 0)):
        chosen = override(recipe, {"solver": {"method": method}})
        assert chosen.calibration.asymmetric_strength(method) == strength
        settled, _ = settle_recipe(chosen, experts=False)
        assert settled.calibration.asymmetric == strength  # stored resolved in recipe.yaml
    plain = _recipe_from_args(build_parser().parse_args(["quantize", "-o", "o",
                                                        "--asymmetric", "0"]))
    assert plain.calibration.asymmetric_strength("admmq") == 0
    auto = _recipe_from_args(build_parser().parse_args(["quantize", "-o", "o",
                                                       "--asymmetric", "auto"]))
    assert auto == Recipe()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "-o", "o", "--asymmetric", "some"])
    weight = _recipe_from_args(build_parser().parse_args(["quantize", "-o", "o",
                                                         "--asymmetric-grid", "weight"]))
    assert weight.calibration.asymmetric_grid == "weight" != Recipe().calibration.asymmetric_grid


def test_gptq_settings_live_under_solver_gptq_only():
    with pytest.raises(RecipeError, match="unknown recipe key 'solver.admm.gptq'"):
        override(Recipe(), {"solver": {"admm": {"gptq": {"damp": 0.05}}}})


# Family recipes: what each file name promises, (bits, symmetric, format). 4-bit dense: symmetric
# compressed-tensors. 3-bit dense: asymmetric compressed-tensors (vLLM 0.33 serves 2/3-bit from
# compressed-tensors and refuses 3-bit GPTQ). MoE: symmetric (transformers reads no expert zero
# points), compressed-tensors. Every one must be served by vLLM and transformers alike.
FAMILY_RECIPES = {
    "llama3-w4-g128.yaml": (4, True, "compressed-tensors"),
    "llama3-w3-g128.yaml": (3, False, "compressed-tensors"),
    "qwen3-w4-g128.yaml": (4, True, "compressed-tensors"),
    "qwen3-w3-g128.yaml": (3, False, "compressed-tensors"),
    "mistral-w4-g128.yaml": (4, True, "compressed-tensors"),
    "mistral-w3-g128.yaml": (3, False, "compressed-tensors"),
    "gemma3-w4-g128.yaml": (4, True, "compressed-tensors"),
    "gemma3-w3-g128.yaml": (3, False, "compressed-tensors"),
    "moe-w4-g128.yaml": (4, True, "compressed-tensors"),
    "moe-w3-g128.yaml": (3, True, "compressed-tensors"),
}


@pytest.mark.parametrize("name", sorted(FAMILY_RECIPES))
def test_family_recipes_resolve_to_what_their_names_promise(name):
    from pathlib import Path

    from admmq_dist.checkpoint.serving import Layout, check_servable

    bits, symmetric, fmt = FAMILY_RECIPES[name]
    path = Path(__file__).resolve().parent.parent / "recipes" / name
    recipe = load_recipe(path)
    assert (recipe.grid.bits, recipe.grid.group_size, recipe.grid.symmetric) == \
        (bits, 128, symmetric)
    assert recipe.output.format == fmt
    assert f"-w{bits}-g128" in name
    layout = Layout(fmt, bits, symmetric, 128, experts=name.startswith("moe-"))
    assert check_servable(layout) == []  # no engine left out
    assert (recipe.calibration.seq_len, recipe.calibration.num_samples) == (2048, 128)
    assert recipe.calibration.dataset is None
    assert recipe.solver.method == "admmq"
    if name.startswith("moe-"):
        assert recipe.solver.schedule == "sequential"  # depth-parallel refuses MoE blocks
        assert recipe.calibration.expert_fallback == "all-tokens"
    # Linears outside the decoder blocks (lm_head, a vision tower) are named in the ignore list
    # by the writer, so recipes skip nothing but lm_head (test_pipeline checks the names).
    assert recipe.output.skip == ("lm_head",)
    # The recipe is everything that differs from the defaults: resolving it again is stable.
    assert override(Recipe(), to_mapping(recipe)) == recipe


def test_every_recipe_flag_sets_the_field_it_names():
    """The CLI's flags come from one table (cli.RECIPE_FLAGS); each must reach its recipe path,
    and a flag left out must leave the recipe's value alone."""
    from admmq_dist.cli import RECIPE_FLAGS, _recipe_from_args, build_parser

    def value_of(recipe, path):
        for key in path.split("."):
            recipe = getattr(recipe, key)
        return recipe

    base = ["quantize", "-o", "out"]
    untouched = _recipe_from_args(build_parser().parse_args(base))
    assert untouched == Recipe()
    for flag, path, kwargs in RECIPE_FLAGS:
        action = kwargs.get("action")
        if action in ("store_true", "store_false"):
            argv, expected = [flag], action == "store_true"
        elif "choices" in kwargs:
            argv, expected = [flag, str(kwargs["choices"][0])], kwargs["choices"][0]
        elif path == "grid.group_size":
            argv, expected = [flag, "channel"], None
        elif action == "append":
            argv, expected = [flag, "attn", flag, "mlp"], ("attn", "mlp")
        elif kwargs.get("type") is int:
            argv, expected = [flag, "7"], 7
        elif path == "calibration.asymmetric":  # a number, or "auto" (the default)
            argv, expected = [flag, "0"], 0.0
        elif kwargs.get("type") is float:  # 1.5: a valid growth, penalty, damping or strength
            value = 1.5 if path.endswith(("rho_growth", "rho_start", "rho_growth_slow")) else 0.5
            argv, expected = [flag, str(value)], value
        else:
            argv, expected = [flag, "x.txt"], "x.txt"
        recipe = _recipe_from_args(build_parser().parse_args([*base, *argv]))
        assert value_of(recipe, path) == expected, flag
        if value_of(untouched, path) != expected:
            assert recipe != untouched, f"{flag} changed nothing"


def test_rho_flags_do_what_they_say():
    """--rho-growth alone is one rate for the whole run (the default's slow phase would
    otherwise take over from ρ = 0.3 and the flag would set only ~12 iterations); with the slow
    phase's flags the two-phase schedule is kept as given."""
    import torch

    from admmq_dist.cli import _recipe_from_args, build_parser
    from admmq_dist.quant.grid import GridSpec, fit_grid
    from admmq_dist.quant.solvers import admmq

    def admm(*argv):
        return _recipe_from_args(build_parser().parse_args(["quantize", "-o", "o", *argv])
                                 ).solver.admm

    alone = admm("--rho-start", "0.5", "--rho-growth", "1.05", "--iterations", "30")
    assert alone.rho_slow_from is None and alone.rho_start == 0.5
    both = admm("--rho-growth", "1.2", "--rho-slow-from", "1.0", "--rho-growth-slow", "1.01")
    assert (both.rho_growth, both.rho_slow_from, both.rho_growth_slow) == (1.2, 1.0, 1.01)
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    w = torch.randn(8, 32)
    grid = fit_grid(w, GridSpec(bits=3, group_size=16))
    rhos = admmq(w, x.T @ x / 256, grid, dataclasses.replace(alone, stop_tolerance=0.0)
                 ).history["rho"]
    assert len(rhos) == 30
    assert rhos[-1] == pytest.approx(0.5 * 1.05 ** 29)


def test_an_effort_sets_its_settings_under_every_key_given_beside_it(tmp_path):
    """--effort / `effort:` applies its settings first: a recipe key or flag given with it wins,
    also a recipe file's key over the effort given as a flag."""
    from admmq_dist.cli import _recipe_from_args, build_parser

    assert override(Recipe(), {"effort": "default"}) == Recipe()
    fast = override(Recipe(), {"effort": "fast"})
    assert (fast.solver.admm.rho_start, fast.solver.admm.rho_growth,
            fast.solver.admm.rho_slow_from) == (0.3, 1.15, None)
    best = override(Recipe(), {"effort": "best"})
    assert (best.solver.sweeps, best.solver.refits, best.solver.admm.rho_growth_slow) == (2, 2, 1.02)
    assert override(Recipe(), {"effort": "fast", "solver": {"admm": {"rho_start": 0.2}}}
                    ).solver.admm.rho_start == 0.2

    def parsed(*argv):
        return _recipe_from_args(build_parser().parse_args(["quantize", "-o", "out", *argv]))

    assert parsed("--effort", "fast") == fast
    assert parsed("--effort", "fast", "--rho-start", "0.2").solver.admm.rho_start == 0.2
    path = tmp_path / "r.yaml"
    path.write_text("effort: fast\nsolver: {admm: {rho_growth: 1.2}}\n")
    from_file = parsed("--recipe", str(path))
    assert from_file.effort == "fast" and from_file.solver.admm.rho_growth == 1.2
    assert from_file.solver.admm.rho_start == 0.3
    path.write_text("solver: {local_search_sweeps: 3}\n")
    flagged = parsed("--recipe", str(path), "--effort", "best")
    assert flagged.effort == "best" and flagged.solver.sweeps == 3 and flagged.solver.refits == 2


def test_each_effort_changes_the_work_and_the_loss_the_way_it_says():
    """On one layer: fast runs fewer ADMM-Q iterations than the default for a higher loss, best
    more for a lower one (each a no-op would tie with the default)."""
    import torch

    from admmq_dist.quant.grid import GridSpec, fit_grid
    from admmq_dist.quant.solvers.solve import solve

    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(2048, 96, generator=gen) @ torch.randn(96, 96, generator=gen)
    hessian = inputs.T @ inputs / inputs.shape[0]
    weight = torch.randn(64, 96, generator=gen)
    grid = fit_grid(weight, GridSpec(bits=3, group_size=32, symmetric=False))
    runs = {effort: solve(weight, hessian, grid, override(Recipe(), {"effort": effort}).solver)
            for effort in ("fast", "default", "best")}
    assert runs["fast"].iterations < runs["default"].iterations < runs["best"].iterations
    assert runs["best"].loss < runs["default"].loss < runs["fast"].loss
