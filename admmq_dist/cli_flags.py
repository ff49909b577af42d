"""The recipe flags of `admmq quantize`: one table, each flag with the recipe path it sets, so the
parser, the help and the recipe cannot drift apart (tests/test_recipe.py walks the table)."""

from __future__ import annotations

import argparse

from .quant.solvers.solve import DEFAULT_ADMMQ_REFITS
from .recipe import AUTO_ASYMMETRIC


def strength(value: str):
    if value.lower() == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"strength {value!r} must be 'auto' or a number in [0, 1]") from None


def group_size(value: str):
    if value.lower() in ("channel", "none", "-1"):
        return None
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"group size {value!r} must be a positive integer or 'channel'") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"group size {size} must be positive (or 'channel')")
    return size


# Every flag that sets a recipe field: (flag, recipe path, add_argument keywords). The parser is
# built from this table and the recipe overrides read back from it, so the two cannot drift.
RECIPE_FLAGS: list[tuple[str, str, dict]] = [
    ("--effort", "effort", {
        "choices": ("fast", "default", "best"),
        "help": "how much work each layer's solve gets: fast (ADMM-Q from ρ=0.3 at x1.15: "
                "~14 iterations where the default takes ~57), default, best (ρ's slow phase at "
                "x1.02, two local-search sweeps and two scale refits); flags and recipe keys "
                "given beside it win (default)"}),
    ("--bits", "grid.bits", {"type": int, "choices": (2, 3, 4, 8)}),
    ("--group-size", "grid.group_size", {"type": None, "metavar": "N|channel"}),
    ("--range-search", "grid.range_search", {"choices": ("minmax", "mse")}),
    ("--grid", "grid.kind", {
        "choices": ("int", "nvfp4", "mxfp4"),
        "help": "the number format: int (integer codes, any --bits and --group-size), nvfp4 "
                "(E2M1 codes, FP8 scales per 16 under a global scale) or mxfp4 (E2M1, "
                "power-of-two scales per 32); FP4 sets 4 bits and its group size (int)"}),
    ("--method", "solver.method", {"choices": ("admmq", "gptq", "rtn")}),
    ("--iterations", "solver.admm.iterations", {"type": int, "help": "ADMM-Q iteration budget"}),
    ("--rho-start", "solver.admm.rho_start", {
        "type": float, "help": "ADMM-Q's first penalty ρ (0.1)"}),
    ("--rho-growth", "solver.admm.rho_growth", {
        "type": float, "help": "ρ's growth per iteration; given alone, one rate for the whole "
                               "run (the default schedule grows x1.1 to ρ=0.3, then x1.03)"}),
    ("--rho-slow-from", "solver.admm.rho_slow_from", {
        "type": float, "help": "the ρ from which growth slows to --rho-growth-slow (0.3)"}),
    ("--rho-growth-slow", "solver.admm.rho_growth_slow", {
        "type": float, "help": "ρ's growth per iteration from --rho-slow-from on (1.03)"}),
    ("--w-update", "solver.admm.w_update", {
        "choices": ("auto", "exact", "cg"),
        "help": "ADMM-Q's W-update: exact (one eigendecomposition per Hessian), cg (inexact, "
                "warm-started conjugate gradient), auto (exact below 16384 inputs) (auto)"}),
    ("--projection", "solver.admm.projection", {
        "choices": ("hard", "soft", "random"),
        "help": "ADMM-Q's Z-step: hard (nearest grid point), soft (a bounded move toward it), "
                "random (re-project a random half of the codes) (hard)"}),
    ("--init", "solver.admm.init", {
        "choices": ("gptq", "rtn"), "help": "ADMM-Q's starting codes (gptq)"}),
    ("--local-search-sweeps", "solver.local_search_sweeps", {"type": int}),
    ("--scale-refits", "solver.scale_refits", {
        "type": int, "help": "after the polish: rounds of refitting the grid's scales to the codes "
                             "(zero points kept), each followed by a local-search sweep "
                             "(admmq: %d, gptq/rtn: 0)" % DEFAULT_ADMMQ_REFITS}),
    ("--schedule", "solver.schedule", {
        "choices": ("sequential", "depth-parallel", "coordinated"),
        "help": "block by block (default); segments at once then correction rounds "
                "(depth-parallel); or one ADMM-Q run across rounds with every layer at once "
                "and Hessians refreshed each round (coordinated)"}),
    ("--coordinated-rounds", "solver.coordinated_rounds", {
        "type": int, "help": "coordinated: most rounds (8)"}),
    ("--coordinated-iterations", "solver.coordinated_iterations", {
        "type": int, "help": "coordinated: ADMM-Q iterations per layer per round (10)"}),
    ("--refresh-dual", "solver.refresh_dual", {
        "choices": ("keep", "zero"),
        "help": "coordinated: what a layer's dual does when its Hessian is refreshed: zero it "
                "(default) or keep it"}),
    ("--penalty", "solver.penalty", {
        "choices": ("continuation", "balance"),
        "help": "coordinated: each round's ρ from the admm schedule carried across rounds "
                "(continuation, default), or that balanced on the model's primal and dual "
                "residuals (balance)"}),
    ("--coordinated-start", "solver.coordinated_start", {
        "choices": ("float", "sequential"),
        "help": "coordinated: round 0 after one sequential GPTQ pass, block by block "
                "(sequential: GPTQ's time, the quality of the sequential schedule), or from GPTQ "
                "on the float model, every block at once (float) (sequential)"}),
    ("--keep-best", "solver.coordinated_keep_best", {
        "action": "store_true", "default": None,
        "help": "coordinated: each round keeps, row by row, the better of its best iterate and "
                "the codes already in place (on the refreshed Hessian)"}),
    ("--freeze-changed", "solver.freeze_changed", {
        "type": float, "metavar": "FRACTION",
        "help": "coordinated: freeze a layer once its codes move less than FRACTION in a round "
                "(past admm.stop_min_rho); frozen layers are no longer iterated (off)"}),
    ("--rounds", "solver.rounds", {"type": int,
                                   "help": "depth-parallel: most correction rounds (3)"}),
    ("--segments", "solver.segments", {
        "type": int, "help": "depth-parallel: segments of blocks (default one per worker; fix "
                             "it for bytes independent of --workers)"}),
    ("--damp", "solver.gptq.damp", {"type": float,
                                    "help": "GPTQ damping (fraction of mean diag H)"}),
    ("--dataset", "calibration.dataset", {
        "help": "local .txt/.jsonl/.json/.parquet/.csv or hub dataset id (default: the "
                "WikiText-2 excerpt shipped with admmq-dist)"}),
    ("--split", "calibration.split", {}),
    ("--text-field", "calibration.text_field", {}),
    ("--num-samples", "calibration.num_samples", {"type": int}),
    ("--seq-len", "calibration.seq_len", {"type": int}),
    ("--batch-size", "calibration.batch_size", {"type": int}),
    ("--seed", "calibration.seed", {"type": int}),
    ("--min-expert-tokens", "calibration.min_expert_tokens", {
        "type": int, "help": "MoE: experts routed fewer calibration tokens use "
                             "--expert-fallback (default: the hidden size)"}),
    ("--expert-fallback", "calibration.expert_fallback", {"choices": ("all-tokens", "rtn")}),
    ("--asymmetric-grid", "calibration.asymmetric_grid", {
        "choices": ("target", "weight"),
        "help": "under asymmetric calibration, fit the grid to the moved target (default) or to "
                "the float weight"}),
    ("--asymmetric", "calibration.asymmetric", {
        "type": strength, "metavar": "STRENGTH",
        "help": "asymmetric calibration (GPTAQ), 0..1 or auto: also match the float model's "
                "outputs on its own activations, correcting earlier layers' error; one more "
                "forward pass per block. 0 is the plain objective (auto: %s, 0 for rtn)"
                % AUTO_ASYMMETRIC}),
    ("--format", "output.format", {"choices": ("compressed-tensors", "gptq")}),
    ("--dtype", "output.dtype", {"choices": ("auto", "float16", "bfloat16", "float32")}),
    ("--skip", "output.skip", {
        "action": "append", "metavar": "NAME",
        "help": "leave modules whose name contains NAME unquantized (repeatable; default: "
                "lm_head)"}),
    # Switches: their "unset" is None, so that a recipe's value stands unless the flag is given.
    ("--sym", "grid.symmetric", {"action": "store_true", "default": None}),
    ("--asym", "grid.symmetric", {"action": "store_false", "default": None}),
    ("--no-act-order", "solver.gptq.act_order", {"action": "store_false", "default": None}),
    ("--compare", "report.compare", {
        "action": "store_true", "default": None,
        "help": "also solve every layer with GPTQ and RTN on the same Hessian and report their "
                "losses (report.jsonl, report.html)"}),
    ("--no-html-report", "report.html", {"action": "store_false", "default": None,
                                         "help": "write report.jsonl only"}),
]
