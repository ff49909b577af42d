"""Recipes: YAML files that override the frozen settings dataclasses, and nothing else.

A recipe mirrors the dataclasses' fields::

    grid:   {bits: 3, group_size: 128, symmetric: false}
    solver: {method: admmq, local_search_sweeps: 1,
             admm: {rho_start: 0.1, rho_growth: 1.05}, gptq: {damp: 0.01}}

Unknown keys are errors that name the key with its full path, so a typo never silently falls back
to a default. The resolved recipe (:func:`to_mapping`) is what gets stored beside a checkpoint.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .quant.fp4 import GROUP_SIZES as FP4_GROUP_SIZES
from .quant.grid import GridSpec
from .quant.solvers.solve import SolverSettings


# The asymmetric-calibration strength "auto" stands for: measured on SmolLM2-135M end to end
# (benchmarks/e2e_perplexity.py, results/e2e_perplexity_3bit.md), GPTAQ's own choice.
AUTO_ASYMMETRIC = 0.25


@dataclass(frozen=True)
class CalibrationSettings:
    """Where calibration text comes from and how it is cut into token windows."""

    # A local .txt/.jsonl/.json/.parquet/.csv file or a hub dataset id ("name" or "name:config");
    # None uses the text shipped with admmq-dist (a WikiText-2 excerpt, CC BY-SA 3.0).
    dataset: str | None = None
    split: str = "train"
    text_field: str = "text"
    num_samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    # Mixture-of-experts: an expert routed fewer calibration tokens than this (None: the model's
    # hidden size, below which its Hessian is rank-deficient) is calibrated by `expert_fallback`:
    # "all-tokens" runs it on every token reaching the block for its Hessians, "rtn" rounds it.
    min_expert_tokens: int | None = None
    expert_fallback: Literal["all-tokens", "rtn"] = "all-tokens"
    # Asymmetric calibration (GPTAQ): each layer also pulls its quantized outputs toward the float
    # model's outputs — float weights on the float model's own activations — by this much, so the
    # error earlier layers left behind is corrected instead of carried on. 0 is GPTQ's objective
    # (match the float weights on the quantized model's inputs); 1 the exact asymmetric objective,
    # which over-fits the calibration tokens. Costs one more forward pass per block and the float
    # model's activations of the block being solved. Dense layers only: experts see different
    # tokens in the two models. "auto": AUTO_ASYMMETRIC for the calibrated methods, 0 for
    # round-to-nearest (whose codes calibration data does not touch).
    asymmetric: float | Literal["auto"] = "auto"
    # What the grid (scales, zero points) is fitted to under asymmetric calibration: "target" the
    # moved target W̃ the codes approximate (a range fitted to W clips the entries the correction
    # moved out of it), "weight" the float weight W. Measured end to end in
    # benchmarks/results/e2e_perplexity_3bit.md. The coordinated schedule fits its grid once, in
    # its first round, where the target is the float weight, and keeps it.
    asymmetric_grid: Literal["target", "weight"] = "target"

    def __post_init__(self) -> None:
        if isinstance(self.asymmetric, str):
            if self.asymmetric != "auto":
                raise ValueError(f"asymmetric={self.asymmetric!r} must be 'auto' or a number "
                                 "in [0, 1]")
        elif not 0.0 <= self.asymmetric <= 1.0:
            raise ValueError(f"asymmetric={self.asymmetric} must lie in [0, 1]")
        for name in ("num_samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.min_expert_tokens is not None and self.min_expert_tokens < 0:
            raise ValueError(f"min_expert_tokens={self.min_expert_tokens} must be non-negative")
        if self.asymmetric_grid not in ("target", "weight"):
            raise ValueError(f"asymmetric_grid={self.asymmetric_grid!r} must be 'target' or "
                             "'weight'")
        if self.expert_fallback not in ("all-tokens", "rtn"):
            raise ValueError(f"expert_fallback={self.expert_fallback!r} must be 'all-tokens' or 'rtn'")

    def asymmetric_strength(self, method: str) -> float:
        """The strength ``method`` runs with: ``asymmetric`` with "auto" resolved; 0 for RTN."""
        if method == "rtn":
            return 0.0
        return AUTO_ASYMMETRIC if self.asymmetric == "auto" else float(self.asymmetric)

    def settled(self, method: str) -> "CalibrationSettings":
        """These settings with the strength ``method`` runs with in place of "auto"."""
        if self.asymmetric != "auto":
            return self
        return dataclasses.replace(self, asymmetric=self.asymmetric_strength(method))


@dataclass(frozen=True)
class OutputSettings:
    """What the checkpoint looks like."""

    format: Literal["compressed-tensors", "gptq"] = "compressed-tensors"
    # "auto": the dtype the model was saved in (its config, else its safetensors headers).
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    # Module names (or parts of names) left unquantized; lm_head by default, as every tool does.
    skip: tuple[str, ...] = ("lm_head",)
    max_shard_gb: float = 4.0

    def __post_init__(self) -> None:
        if not self.max_shard_gb > 0:
            raise ValueError(f"max_shard_gb={self.max_shard_gb} must be positive")


@dataclass(frozen=True)
class ReportSettings:
    """What the run report beside the checkpoint holds."""

    # Also solve every layer with GPTQ and round-to-nearest on the same Hessian and report their
    # losses beside ADMM-Q's (the written codes are ADMM-Q's; costs one GPTQ solve per layer).
    compare: bool = False
    # report.html: plots and tables inlined in one file (report.jsonl is always written).
    html: bool = True


# What each `effort` sets before the recipe's own keys (which win over it). Measured on real
# SmolLM2 layers (3-bit g64, layer loss and solve time against act-order GPTQ's) and end to end
# in benchmarks/results/effort.md:
# "fast": ADMM-Q from ρ = 0.3 at one rate ×1.15 (14 iterations where the default takes 57);
# "best": the slow phase at ×1.02 (76), two local-search sweeps and two scale refits.
EFFORTS: dict[str, dict] = {
    "fast": {"solver": {"admm": {"rho_start": 0.3, "rho_growth": 1.15, "rho_slow_from": None}}},
    "default": {},
    "best": {"solver": {"admm": {"rho_growth_slow": 1.02}, "local_search_sweeps": 2,
                        "scale_refits": 2}},
}


@dataclass(frozen=True)
class Recipe:
    # How much work a layer's solve gets (EFFORTS): its settings are applied first, so a key the
    # recipe or a flag sets stands over it.
    effort: Literal["fast", "default", "best"] = "default"
    # symmetric=None: chosen per model and format by the pipeline (symmetric for GPTQ and
    # mixture-of-experts models, where engines read no zero points; asymmetric otherwise).
    grid: GridSpec = field(default_factory=lambda: GridSpec(symmetric=None))
    solver: SolverSettings = field(default_factory=SolverSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    report: ReportSettings = field(default_factory=ReportSettings)

    def __post_init__(self) -> None:
        kind = self.grid.kind
        if kind != "int" and self.output.format != "compressed-tensors":
            raise ValueError(f"{kind} checkpoints are compressed-tensors only; drop --format "
                             f"{self.output.format} or use --grid int")


class RecipeError(ValueError):
    """A recipe that cannot be applied; the message names the offending key."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the field type ``tp`` (bool, int, float, str, Literal, Optional)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if errors else f"{where}: {value!r} has the wrong type")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise RecipeError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    # (accepts, message) per scalar type; bool is excluded from the numbers on purpose.
    checks = {
        bool: (lambda v: isinstance(v, bool), "true or false"),
        int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
        float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
        str: (lambda v: isinstance(v, str), "a string"),
    }
    if tp in checks:
        accepts, expected = checks[tp]
        if not accepts(value):
            raise RecipeError(f"{where}: expected {expected}, got {value!r}")
        return float(value) if tp is float else value
    return value


def override(instance: Any, updates: dict | None, where: str = "") -> Any:
    """A copy of the frozen dataclass ``instance`` with ``updates`` (a nested mapping) applied."""
    if updates is None:
        return instance
    if not isinstance(updates, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(instance))
    names = {f.name for f in dataclasses.fields(instance)}
    if isinstance(instance, Recipe) and "effort" in updates:
        effort = _coerce(updates["effort"], hints["effort"], "effort")
        instance = override(instance, EFFORTS[effort])  # then the keys given beside it
    if isinstance(instance, GridSpec) and updates.get("kind") in FP4_GROUP_SIZES:
        # An FP4 format fixes bits and group size: they follow it unless given (and refused
        # by GridSpec when given otherwise).
        updates = {"bits": 4, "group_size": FP4_GROUP_SIZES[updates["kind"]], **updates}
    changes = {}
    for key, value in updates.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise RecipeError(f"unknown recipe key '{path}'; known keys here: {sorted(names)}")
        tp = hints[key]
        if _is_dataclass_type(tp):
            changes[key] = override(getattr(instance, key), value, path)
        else:
            changes[key] = _coerce(value, tp, path)
    try:
        return dataclasses.replace(instance, **changes)
    except ValueError as exc:
        raise RecipeError(f"{where or 'recipe'}: {exc}") from None


def to_mapping(instance: Any) -> dict:
    """The settings as plain data (for YAML or JSON), "auto" and unset keys as they are."""
    return dataclasses.asdict(instance)


def effective_mapping(recipe: Recipe) -> dict:
    """:func:`to_mapping` with the keys whose default the code decides (the scale refits, the
    local-search sweeps, the asymmetric strength) as the run takes them: a record of what ran, so
    that a changed default shows."""
    mapping = to_mapping(recipe)
    method = recipe.solver.method
    mapping["solver"].update(scale_refits=recipe.solver.refits,
                             local_search_sweeps=recipe.solver.sweeps)
    mapping["calibration"]["asymmetric"] = recipe.calibration.asymmetric_strength(method)
    return mapping


def load_recipe(path: str | Path, base: Recipe | None = None,
                effort: str | None = None) -> Recipe:
    """The recipe file applied over ``base`` (the defaults); ``effort`` (the command line's)
    replaces the file's, its settings still under every other key of the file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {exc}") from None
    data = data or {}
    if effort is not None and isinstance(data, dict):
        data = {**data, "effort": effort}
    return override(base or Recipe(), data)
