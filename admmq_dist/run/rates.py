"""Measured rates for the time model (:mod:`.time_model`): the linears it costs, the rates a
``benchmarks/layer_shapes.py`` JSON holds (:class:`MeasuredRates`, as measured) and their fit as
power laws of the width (:class:`FittedRates`; :func:`fit`, which ``benchmarks/fit_rates.py``
runs), and the rates file ``admmq plan`` reads (:func:`load_rates`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..quant.solvers.rows import row_blocks

# The rates admmq plan uses unless given others: measured on a 2-core CPU at Llama-3.2-1B shapes.
DEFAULT_RATES = Path(__file__).resolve().parent.parent / "data" / "rates_cpu_2core.json"
# Fitted pieces: (per what, nominal exponent of the width or the FLOPs).
PIECES = {"forward": ("token", 1.0), "capture": ("token", 2.0), "eigh": ("factorization", 3.0),
          "cholesky": ("factorization", 3.0), "gptq": ("row", 2.0),
          "iteration_exact": ("row", 2.0), "iteration_cg": ("row", 2.0),
          "local_search": ("row", 2.0)}
RATES_FORMAT = 1


@dataclass(frozen=True)
class Linear:
    """A linear (or several sharing one Hessian, their rows added) as the model costs it."""

    name: str
    rows: int
    cols: int
    hessian: str  # the Hessian it reads (one per key)
    units: int = 0  # its row blocks; 0: ceil(rows / row_block)
    routed: float = 1.0  # the fraction of the tokens that reach it (an expert's)

    def row_blocks(self, row_block: int) -> list[tuple[int, int]]:
        if not self.units:
            return row_blocks(self.rows, row_block)
        base, extra = divmod(self.rows, self.units)
        bounds, start = [], 0
        for i in range(self.units):
            stop = start + base + (1 if i < extra else 0)
            bounds.append((start, stop))
            start = stop
        return bounds


Stages = list[list[Linear]]


def flops_per_token(stages: Stages, hidden: int, seq_len: int) -> float:
    """A decoder block's forward FLOPs per token: its linears (an expert's weighted by the tokens
    routed to it) and causal attention's two products over ``seq_len`` (taken ``hidden`` wide)."""
    return 2.0 * sum(lin.routed * lin.rows * lin.cols for stage in stages for lin in stage) \
        + 2.0 * seq_len * hidden

class FittedRates:
    """Rates fitted as power laws (the format :func:`fit` writes), for any shape."""

    def __init__(self, data: dict, path: Path | None = None):
        if data.get("format") != RATES_FORMAT or set(PIECES) - set(data.get("rates", {})) \
                or not {"exact", "cg"} <= set(data.get("iterations", {})):
            raise ValueError(f"{path or 'the rates'} is not a rates file of format "
                             f"{RATES_FORMAT} (benchmarks/fit_rates.py writes one, with "
                             f"rates {', '.join(PIECES)} and iterations exact and cg)")
        self.data, self.path = data, path
        self.machine = str(data.get("machine", "an unnamed machine"))
        self.device = str(data.get("device", "unknown"))

    def law(self, piece: str, size: float) -> float:
        """Seconds per count (token, factorization or row) of ``piece`` at ``size``."""
        rate = self.data["rates"][piece]
        return rate["coefficient"] * size ** rate["exponent"]

    def forward(self, stages: Stages, hidden: int, tokens: float, seq_len: int) -> float:
        return tokens * self.law("forward", flops_per_token(stages, hidden, seq_len))

    def capture(self, lin: Linear, tokens: float) -> float:
        return tokens * self.law("capture", lin.cols)

    def eigh(self, lin: Linear) -> float:
        return self.law("eigh", lin.cols)

    def cholesky(self, lin: Linear) -> float:
        return self.law("cholesky", lin.cols)

    def gptq(self, lin: Linear, rows: int) -> float:
        return rows * self.law("gptq", lin.cols)

    def iteration(self, lin: Linear, method: str, rows: int) -> float:
        return rows * self.law(f"iteration_{method}", lin.cols)

    def iterations(self, lin: Linear, method: str) -> float:
        return self.data["iterations"][method]

    def local_search(self, lin: Linear, rows: int) -> float:
        return rows * self.law("local_search", lin.cols)


class MeasuredRates:
    """The rates of a ``benchmarks/layer_shapes.py`` JSON as measured, looked up by linear and
    Hessian: only for the block it measured (``measured_stages``)."""

    def __init__(self, rows: list[dict], hessians: dict, forward_per_1k: float):
        self.rows = {r["linear"]: r for r in rows}
        self.hessians, self.forward_per_1k = hessians, forward_per_1k

    def forward(self, stages: Stages, hidden: int, tokens: float, seq_len: int) -> float:
        return self.forward_per_1k * tokens / 1024

    def capture(self, lin: Linear, tokens: float) -> float:
        return self.hessians[lin.hessian]["capture_per_1k_tokens"] * tokens / 1024

    def eigh(self, lin: Linear) -> float:
        return self.hessians[lin.hessian]["eigh"]

    def cholesky(self, lin: Linear) -> float:
        return self.hessians[lin.hessian]["cholesky"]

    def _per_row(self, lin: Linear, key: str, rows: int) -> float:
        r = self.rows[lin.name]
        return r[key] * rows / r["rows_solved"]

    def gptq(self, lin: Linear, rows: int) -> float:
        return self._per_row(lin, "gptq_s", rows)

    def iteration(self, lin: Linear, method: str, rows: int) -> float:
        return self._per_row(lin, f"{method}_iterations_s", rows) / self.iterations(lin, method)

    def iterations(self, lin: Linear, method: str) -> float:
        return self.rows[lin.name][f"{method}_iterations"]

    def local_search(self, lin: Linear, rows: int) -> float:
        return self._per_row(lin, "local_search_s", rows)


def measured_stages(rows: list[dict]) -> Stages:
    """The block ``rows`` (a layer_shapes JSON's) measured, as stages: one per Hessian, in block
    order."""
    out: dict[str, list[Linear]] = {}
    for r in rows:
        out.setdefault(r["hessian_key"], []).append(
            Linear(r["linear"], r["rows"], r["cols"], r["hessian_key"]))
    return list(out.values())


def load_rates(path: str | Path | None = None) -> FittedRates:
    """The rates in ``path`` (a file :func:`fit` wrote), or the shipped CPU rates."""
    path = Path(path) if path is not None else DEFAULT_RATES
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc}); benchmarks/fit_rates.py writes a rates "
                         "file") from None
    return FittedRates(data, path)


def describe_rates(rates: FittedRates) -> str:
    """``at rates measured on <machine> — not a GPU measurement`` (the last part unless the
    rates were measured on a GPU)."""
    text = f"at rates measured on {rates.machine}"
    if rates.path is not None and rates.path.resolve() != DEFAULT_RATES:
        text += f" ({rates.path})"
    return text + ("" if rates.device == "cuda" else " — not a GPU measurement")


# --------------------------------------------------------------------------------- the fit


def _power_law(points: list[tuple[float, float]], nominal: float) -> dict:
    """``seconds = c · size^p`` by least squares on the logarithms; ``p`` nominal when the points
    hold one size only."""
    xs = [math.log(s) for s, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mx) ** 2 for x in xs)
    if max(xs) - min(xs) < math.log(1.5):
        exponent = nominal
    else:
        exponent = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / spread
    coefficient = math.exp(my - exponent * mx)
    error = max(abs(coefficient * s ** exponent / t - 1) for s, t in points)
    return {"coefficient": coefficient, "exponent": exponent, "nominal_exponent": nominal,
            "max_relative_error": error, "points": [[s, t] for s, t in points]}


def measured_points(measured: dict, *, hidden: int, seq_len: int) -> dict[str, list]:
    """Per piece of :data:`PIECES`, ``(size, seconds per count)`` of a layer_shapes JSON."""
    rows, hessians = measured["rows"], measured["hessians"]
    width = {r["hessian_key"]: r["cols"] for r in rows}
    stages = measured_stages(rows)
    points: dict[str, list] = {
        "forward": [(flops_per_token(stages, hidden, seq_len),
                     measured["forward_per_1k_tokens"] / 1024)],
        "capture": [(width[k], h["capture_per_1k_tokens"] / 1024) for k, h in hessians.items()],
        "eigh": [(width[k], h["eigh"]) for k, h in hessians.items()],
        "cholesky": [(width[k], h["cholesky"]) for k, h in hessians.items()],
        "gptq": [(r["cols"], r["gptq_s"] / r["rows_solved"]) for r in rows],
        "local_search": [(r["cols"], r["local_search_s"] / r["rows_solved"]) for r in rows]}
    for m in ("exact", "cg"):
        points[f"iteration_{m}"] = [
            (r["cols"], r[f"{m}_iterations_s"] / r[f"{m}_iterations"] / r["rows_solved"])
            for r in rows]
    return points


def fit(measured: dict, *, hidden: int, seq_len: int) -> dict:
    """The rates of a layer_shapes JSON (``measured``) fitted (``hidden``, ``seq_len``: of the
    block it measured, for the forward's FLOPs): :data:`PIECES` as power laws and ADMM-Q's mean
    iterations per row block."""
    points = measured_points(measured, hidden=hidden, seq_len=seq_len)
    rates = {piece: {"per": per, "size": "FLOPs per token" if piece == "forward" else "width",
                     **_power_law(points[piece], nominal)}
             for piece, (per, nominal) in PIECES.items()}
    rows = measured["rows"]
    iterations = {m: sum(r[f"{m}_iterations"] for r in rows) / len(rows) for m in ("exact", "cg")}
    return {"format": RATES_FORMAT, "rates": rates, "iterations": iterations,
            "max_relative_error": max(r["max_relative_error"] for r in rates.values())}
