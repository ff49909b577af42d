"""How each mixture-of-experts expert is calibrated, decided once per expert list from the tokens
the router sent it during the gate/up stage's capture, and kept for the down stage:

* ``routed``: on the tokens routed to it (its own Hessian);
* ``all-tokens``: on every token reaching the block (the expert runs on all of them during the
  capture; only its routed rows reach the output) — llm-compressor's and GPTQModel's fallback;
* ``rtn``: rounded to nearest, no Hessian.

An expert routed fewer tokens than ``calibration.min_expert_tokens`` (default: the hidden size,
below which its Hessian is rank-deficient) gets ``calibration.expert_fallback``.
"""

from __future__ import annotations

from ..model.capture import Stage
from ..recipe import CalibrationSettings

# Key prefix of an expert list's every-token input accumulator (its gate/up input).
ALL_TOKENS = "all-tokens:"


class ExpertPolicy:
    """The decisions of one run, per expert list (block-relative path)."""

    def __init__(self, calibration: CalibrationSettings) -> None:
        self.calibration = calibration
        self.how: dict[str, dict[int, str]] = {}
        self.tokens: dict[str, list[int]] = {}

    def calibrate_all(self, stage: Stage) -> list[int]:
        """Experts of the stage (or of its wave) that run on every token during its capture (the
        down stage of experts decided ``all-tokens``: their down projection needs those
        inputs)."""
        if stage.experts is None or stage.role != 1:
            return []
        how = self.how.get(stage.experts, {})
        return sorted(e for e in map(_expert_of(stage), stage.groups)
                      if how.get(e) == "all-tokens")

    def decide(self, stage: Stage, routed: list[int], hidden_size: int) -> None:
        """At the gate/up stage: each expert's calibration from the tokens routed to it."""
        threshold = (hidden_size if self.calibration.min_expert_tokens is None
                     else self.calibration.min_expert_tokens)
        self.how[stage.experts] = {
            e: "routed" if n >= threshold and n > 0 else self.calibration.expert_fallback
            for e, n in enumerate(routed)}
        self.tokens[stage.experts] = routed

    def plan(self, stage: Stage) -> dict[str, dict]:
        """For every linear of an expert stage: the Hessian key its solver merges (None: round
        to nearest), how it is calibrated and the tokens routed to its expert."""
        how_by_expert = self.how[stage.experts]
        out = {}
        for group in stage.groups:
            e = _expert_of(stage)(group)
            how = how_by_expert[e]
            key = group[0]
            if how == "rtn":
                key = None
            elif how == "all-tokens" and stage.role == 0:
                key = ALL_TOKENS + stage.experts
            for name in group:
                out[name] = {"key": key, "calibration": how,
                             "tokens": self.tokens[stage.experts][e]}
        return out


def _expert_of(stage: Stage):
    """A group of an expert stage -> its expert's index (``experts.3.gate_proj`` -> 3)."""
    return lambda group: int(group[0][len(stage.experts) + 1:].split(".")[0])
