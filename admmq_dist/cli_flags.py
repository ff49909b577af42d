"""The recipe flags of `admmq quantize`: one table, each flag with the recipe path it sets, so the
parser, the help and the recipe cannot drift apart (tests/test_recipe.py walks the table)."""

from __future__ import annotations

import argparse

from .quant.solvers.solve import DEFAULT_ADMMQ_REFITS
from .recipe import AUTO_ASYMMETRIC, Recipe


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
    ("--bits", "grid.bits", {"type": int, "choices": (2, 3, 4, 8),
                             "help": "bits per integer code"}),
    ("--group-size", "grid.group_size", {
        "type": None, "metavar": "N|channel",
        "help": "weights sharing one scale (and zero point) along a row, or channel for one per "
                "row"}),
    ("--range-search", "grid.range_search", {
        "choices": ("minmax", "mse"),
        "help": "how the grid's range is fitted: min-max, or GPTQ's search over shrunk ranges "
                "for the smallest |error|^2.4"}),
    ("--grid", "grid.kind", {
        "choices": ("int", "nvfp4", "mxfp4"),
        "help": "the number format: int (integer codes, any --bits and --group-size), nvfp4 "
                "(E2M1 codes, FP8 scales per 16 under a global scale) or mxfp4 (E2M1, "
                "power-of-two scales per 32); FP4 sets 4 bits and its group size"}),
    ("--method", "solver.method", {
        "choices": ("admmq", "gptq", "rtn"),
        "help": "the layer solver: ADMM-Q, GPTQ (act-order; GPTAQ under asymmetric "
                "calibration) or round-to-nearest"}),
    ("--iterations", "solver.admm.iterations", {"type": int, "metavar": "N",
                                                "help": "ADMM-Q's most iterations per layer"}),
    ("--rho-start", "solver.admm.rho_start", {
        "type": float, "metavar": "RHO", "help": "ADMM-Q's first penalty ρ"}),
    ("--rho-growth", "solver.admm.rho_growth", {
        "type": float, "metavar": "FACTOR",
        "help": "ρ's growth per iteration; given alone, one rate for the whole run (the default "
                "schedule grows x1.1 to ρ=0.3, then x1.03)"}),
    ("--rho-slow-from", "solver.admm.rho_slow_from", {
        "type": float, "metavar": "RHO",
        "help": "the ρ from which growth slows to --rho-growth-slow"}),
    ("--rho-growth-slow", "solver.admm.rho_growth_slow", {
        "type": float, "metavar": "FACTOR",
        "help": "ρ's growth per iteration from --rho-slow-from on"}),
    ("--w-update", "solver.admm.w_update", {
        "choices": ("auto", "exact", "cg"),
        "help": "ADMM-Q's W-update: exact (one eigendecomposition per Hessian), cg (inexact, "
                "warm-started conjugate gradient), auto (exact below 16384 inputs)"}),
    ("--projection", "solver.admm.projection", {
        "choices": ("hard", "soft", "random"),
        "help": "ADMM-Q's Z-step: hard (nearest grid point), soft (a bounded move toward it), "
                "random (re-project a random half of the codes)"}),
    ("--init", "solver.admm.init", {
        "choices": ("gptq", "rtn"), "help": "ADMM-Q's starting codes"}),
    ("--local-search-sweeps", "solver.local_search_sweeps", {
        "type": int, "metavar": "N",
        "help": "after the solve: sweeps of exact one-code moves that lower the layer's loss "
                "(admmq: 1, gptq/rtn: 0 by default)"}),
    ("--scale-refits", "solver.scale_refits", {
        "type": int, "metavar": "N", "help": "after the polish: rounds of refitting the grid's scales to the codes "
                             "(zero points kept), each followed by a local-search sweep "
                             "(admmq: %d, gptq/rtn: 0 by default)" % DEFAULT_ADMMQ_REFITS}),
    ("--schedule", "solver.schedule", {
        "choices": ("sequential", "depth-parallel", "coordinated"),
        "help": "block by block (default); segments at once then correction rounds "
                "(depth-parallel); or one ADMM-Q run across rounds with every layer at once "
                "and Hessians refreshed each round (coordinated)"}),
    ("--coordinated-rounds", "solver.coordinated_rounds", {
        "type": int, "metavar": "N", "help": "coordinated: most rounds"}),
    ("--coordinated-iterations", "solver.coordinated_iterations", {
        "type": int, "metavar": "N",
        "help": "coordinated: ADMM-Q iterations per layer per round"}),
    ("--refresh-dual", "solver.refresh_dual", {
        "choices": ("keep", "zero"),
        "help": "coordinated: what a layer's dual does when its Hessian is refreshed: zero it "
                "or keep it"}),
    ("--penalty", "solver.penalty", {
        "choices": ("continuation", "balance"),
        "help": "coordinated: each round's ρ from the admm schedule carried across rounds "
                "(continuation), or that balanced on the model's primal and dual residuals "
                "(balance)"}),
    ("--coordinated-start", "solver.coordinated_start", {
        "choices": ("float", "sequential"),
        "help": "coordinated: round 0 after one sequential GPTQ pass, block by block "
                "(sequential: GPTQ's time, the quality of the sequential schedule), or from GPTQ "
                "on the float model, every block at once (float)"}),
    ("--keep-best", "solver.coordinated_keep_best", {
        "action": "store_true", "default": None,
        "help": "coordinated: each round keeps, row by row, the better of its best iterate and "
                "the codes already in place (on the refreshed Hessian)"}),
    ("--freeze-changed", "solver.freeze_changed", {
        "type": float, "metavar": "FRACTION",
        "help": "coordinated: freeze a layer once its codes move less than FRACTION in a round "
                "(past admm.stop_min_rho); frozen layers are no longer iterated (default: off)"}),
    ("--rounds", "solver.rounds", {"type": int, "metavar": "N",
                                   "help": "depth-parallel: most correction rounds"}),
    ("--segments", "solver.segments", {
        "type": int, "metavar": "N",
        "help": "depth-parallel: segments of blocks (default: one per worker; fix it for bytes "
                "independent of --workers)"}),
    ("--damp", "solver.gptq.damp", {"type": float, "metavar": "FRACTION",
                                    "help": "GPTQ's damping, a fraction of the Hessian's mean "
                                            "diagonal"}),
    ("--dataset", "calibration.dataset", {
        "metavar": "PATH|ID", "help": "local .txt/.jsonl/.json/.parquet/.csv or hub dataset id (default: the "
                "WikiText-2 excerpt shipped with admmq-dist)"}),
    ("--split", "calibration.split", {"metavar": "NAME", "help": "the dataset's split"}),
    ("--text-field", "calibration.text_field", {"metavar": "NAME",
                                                "help": "the dataset's text column"}),
    ("--num-samples", "calibration.num_samples", {"type": int, "metavar": "N",
                                                  "help": "calibration windows"}),
    ("--seq-len", "calibration.seq_len", {"type": int, "metavar": "TOKENS",
                                          "help": "tokens per calibration window"}),
    ("--batch-size", "calibration.batch_size", {"type": int, "metavar": "N",
                                                "help": "windows per forward pass"}),
    ("--seed", "calibration.seed", {"type": int, "metavar": "N",
                                    "help": "which windows of the text are drawn"}),
    ("--min-expert-tokens", "calibration.min_expert_tokens", {
        "type": int, "metavar": "N",
        "help": "MoE: experts routed fewer calibration tokens use --expert-fallback (default: "
                "the hidden size)"}),
    ("--expert-fallback", "calibration.expert_fallback", {
        "choices": ("all-tokens", "rtn"),
        "help": "MoE: a rarely routed expert is calibrated on every token reaching its block "
                "(all-tokens) or rounded to nearest (rtn)"}),
    ("--asymmetric-grid", "calibration.asymmetric_grid", {
        "choices": ("target", "weight"),
        "help": "under asymmetric calibration, fit the grid to the moved target or to the "
                "float weight"}),
    ("--asymmetric", "calibration.asymmetric", {
        "type": strength, "metavar": "STRENGTH",
        "help": "asymmetric calibration (GPTAQ), 0..1 or auto: also match the float model's "
                "outputs on its own activations, correcting earlier layers' error; one more "
                "forward pass per block. 0 is the plain objective (auto: %s, 0 for rtn)"
                % AUTO_ASYMMETRIC}),
    ("--format", "output.format", {
        "choices": ("compressed-tensors", "gptq"),
        "help": "the checkpoint layout: compressed-tensors (vLLM, transformers) or GPTQ v1 "
                "(vLLM 4/8-bit, transformers with GPTQModel)"}),
    ("--dtype", "output.dtype", {
        "choices": ("auto", "float16", "bfloat16", "float32"),
        "help": "the dtype of the checkpoint's unquantized tensors and scales (auto: the "
                "model's)"}),
    ("--skip", "output.skip", {
        "action": "append", "metavar": "NAME",
        "help": "leave modules whose name contains NAME unquantized (repeatable; default: "
                "lm_head)"}),
    # Switches: their "unset" is None, so that a recipe's value stands unless the flag is given.
    ("--sym", "grid.symmetric", {
        "action": "store_true", "default": None,
        "help": "symmetric grid, no zero points (default: chosen per model and format — "
                "symmetric for GPTQ and mixture-of-experts models, asymmetric otherwise)"}),
    ("--asym", "grid.symmetric", {"action": "store_false", "default": None,
                                  "help": "asymmetric grid, with zero points (default: see --sym)"}),
    ("--no-act-order", "solver.gptq.act_order", {
        "action": "store_false", "default": None,
        "help": "GPTQ in column order instead of by decreasing Hessian diagonal (default: "
                "act-order)"}),
    ("--compare", "report.compare", {
        "action": "store_true", "default": None,
        "help": "also solve every layer with GPTQ and RTN on the same Hessian and report their "
                "losses (report.jsonl, report.html) (default: off)"}),
    ("--no-html-report", "report.html", {"action": "store_false", "default": None,
                                         "help": "write report.jsonl only (default: both)"}),
]


def dest(path: str) -> str:
    return path.replace(".", "__")


# What a user decides, in the order --help shows it.
HELP_GROUPS = ("model and output", "grid and format", "solver", "calibration",
               "schedule and cluster", "resume")
SCHEDULE_KEYS = ("schedule", "coordinated_rounds", "coordinated_iterations", "refresh_dual",
                 "penalty", "coordinated_start", "coordinated_keep_best", "freeze_changed",
                 "rounds", "segments")


def help_groups(parser) -> dict:
    return {title: parser.add_argument_group(title) for title in HELP_GROUPS}


def _help_group(path: str) -> str:
    section, _, key = path.partition(".")
    if section in ("output", "report"):
        return "model and output"
    if section == "grid":
        return "grid and format"
    if section == "calibration":
        return "calibration"
    return "schedule and cluster" if key in SCHEDULE_KEYS else "solver"


def _recipe_default(path: str) -> str | None:
    """The default a flag leaves in place, as --help shows it (None where the code decides)."""
    node = Recipe()
    for key in path.split("."):
        node = getattr(node, key)
    if node is None:
        return None
    if isinstance(node, bool):
        return "on" if node else "off"
    return ", ".join(node) if isinstance(node, tuple) else str(node)


def add_recipe_flags(q, groups: dict | None = None) -> None:
    groups = groups or help_groups(q)
    symmetry = None
    for flag, path, kwargs in RECIPE_FLAGS:
        group = groups[_help_group(path)]
        kwargs = {**kwargs, "dest": dest(path)}
        default = _recipe_default(path)
        if default is not None and "default" not in kwargs.get("help", ""):
            kwargs["help"] = f"{kwargs.get('help', '')} (default: {default})".lstrip()
        if path == "grid.group_size":
            kwargs.update(type=group_size, default=argparse.SUPPRESS)
        if path == "grid.symmetric":  # --sym and --asym exclude each other
            symmetry = symmetry or group.add_mutually_exclusive_group()
            symmetry.add_argument(flag, **kwargs)
        else:
            group.add_argument(flag, **kwargs)
