"""A whole-model cost model built from the rates ``benchmarks/layer_shapes.py`` measured: the
sequential schedule (data-parallel over workers), the depth-parallel one (one segment per
worker) and the coordinated one, for ADMM-Q and act-order GPTQ, on 1, 8 and 64 workers.

What is measured (per device, at the model's shapes): a decoder block's forward per 1,024 tokens,
each Hessian's capture per 1,024 tokens, its float64 ``eigh`` and GPTQ's Cholesky, and per linear
one 512-row block's GPTQ start, ADMM-Q iterations (exact and CG W-updates), local search and
act-order GPTQ. What is modelled is :mod:`admmq_dist.run.time_model`'s model (its docstring says
what each schedule costs; ``admmq plan`` prints it for any model from rates fitted to these
measurements, ``benchmarks/fit_rates.py``): this file feeds it the rates as measured
(:class:`~admmq_dist.run.time_model.MeasuredRates`) and keeps the interface
``benchmarks/layer_shapes.py`` calls. Transfers: bytes as the run report counts them, seconds at
``LINK_BYTES_PER_S``, the one assumed rate here (no network on the machines that measured), kept
in its own column.
"""

from __future__ import annotations

from admmq_dist.run import time_model
from admmq_dist.run.time_model import LINK_BYTES_PER_S


def stages(linears: list[dict]) -> list[list[dict]]:
    """The true-sequential stages: linears grouped by the Hessian they read, in block order."""
    out: dict[str, list[dict]] = {}
    for r in linears:
        out.setdefault(r["hessian_key"], []).append(r)
    return list(out.values())


def _solve(linears: list[dict], method_of, row_block: int = 512) -> time_model.Solve:
    """ADMM-Q from GPTQ's start, its measured iterations and one local-search sweep; GPTQ
    alone; float calibration (as layer_shapes measured)."""
    by_name = {r["linear"]: r for r in linears}
    return time_model.Solve(method_of=lambda lin: method_of(by_name[lin.name]),
                            row_block=row_block, group_size=linears[0]["group_size"])


def _as_table(costs: dict) -> dict:
    """The package's phases as this file's columns (the factorizations are part of the solve)."""
    out = {"forward": costs["forward"], "capture": costs["capture"],
           "solve": costs["factorizations"] + costs["solve"], "bytes": costs["bytes"],
           "transfer": costs["transfers"], "total": costs["total"]}
    return out | ({"rounds": costs["rounds"]} if "rounds" in costs else {})


def stage_seconds(stage: list[dict], hessian: dict, method_of, workers: int,
                  row_block: int) -> tuple[float, int]:
    """``(seconds, bytes moved)`` of one stage's solve on ``workers`` workers."""
    rates = time_model.MeasuredRates(stage, {stage[0]["hessian_key"]: hessian}, 0.0)
    factor, solve, moved = time_model.stage_seconds(
        time_model.measured_stages(stage)[0], rates, _solve(stage, method_of, row_block), workers)
    return factor + solve, moved


# The measured rates need neither the hidden size nor the sequence length for the forward (it
# was measured per token); the round schedules' hand-offs take ``hidden``.
def sequential(linears, hessians, method_of, workers: int, tokens: int, blocks: int,
               forward_per_1k: float, row_block: int = 512) -> dict:
    rates = time_model.MeasuredRates(linears, hessians, forward_per_1k)
    return _as_table(time_model.sequential(
        [(time_model.measured_stages(linears), blocks)], 0, rates,
        _solve(linears, method_of, row_block), workers, tokens / workers, 0))


def depth_parallel(linears, hessians, method_of, workers: int, tokens: int, blocks: int,
                   forward_per_1k: float, rounds: int, hidden: int,
                   row_block: int = 512) -> dict:
    """One segment per worker; every round waits for a segment solved cold on one worker."""
    rates = time_model.MeasuredRates(linears, hessians, forward_per_1k)
    return _as_table(time_model.depth_parallel(
        [(time_model.measured_stages(linears), blocks)], hidden, rates,
        _solve(linears, method_of, row_block), workers, tokens, 0, rounds))


def coordinated(linears, hessians, method_of, workers: int, tokens: int, blocks: int,
                forward_per_1k: float, rounds: int, iterations: int, hidden: int,
                sequential_start: bool = False) -> dict:
    """The coordinated schedule: ``rounds`` rounds of ``iterations`` iterations per layer;
    ``sequential_start``: after one sequential GPTQ pass, block by block on each block's owner
    (every token through one block at a time, one worker busy)."""
    rates = time_model.MeasuredRates(linears, hessians, forward_per_1k)
    return _as_table(time_model.coordinated(
        [(time_model.measured_stages(linears), blocks)], hidden, rates,
        _solve(linears, method_of), workers, tokens, 0, rounds, iterations,
        sequential_start=sequential_start))


def table(predicted: dict) -> list[str]:
    """Markdown rows of modelled hours: ``{(method, schedule, workers): costs}``."""
    return ["| method | schedule | workers | forward h | capture h | solve h | transfer h (GB) "
            "| total h |", "|---|---|---|---|---|---|---|---|"] + [
        f"| {m} | {sched} | {w} | {c['forward'] / 3600:.2f} | {c['capture'] / 3600:.2f} | "
        f"{c['solve'] / 3600:.2f} | {c['transfer'] / 3600:.2f} ({c['bytes'] / 1e9:.0f}) | "
        f"**{c['total'] / 3600:.2f}** |" for (m, sched, w), c in predicted.items()]


def main() -> int:
    """Rebuild the whole-model table from the rates a layer_shapes run saved (its JSON)."""
    import argparse
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import layer_shapes

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("rates", type=Path, help="a layer_shapes_<shapes>_<device>.json")
    parser.add_argument("--shapes", choices=sorted(layer_shapes.SHAPES), default="1b")
    parser.add_argument("--tokens", type=int, default=128 * 2048)
    args = parser.parse_args()
    saved = json.loads(args.rates.read_text())
    predicted = layer_shapes.models(saved["rows"], saved["hessians"],
                                    saved["forward_per_1k_tokens"],
                                    layer_shapes.SHAPES[args.shapes], args.tokens)
    lines = [f"# Modelled whole model from the rates in `{args.rates.name}`", "",
             f"`python benchmarks/cost_model.py {args.rates.as_posix()} --shapes {args.shapes}`: "
             f"{layer_shapes.SHAPES[args.shapes][5]} blocks, {args.tokens} calibration tokens; "
             f"coordinated at {layer_shapes.COORDINATED_ROUNDS} rounds. Transfers at an assumed "
             f"{LINK_BYTES_PER_S / 1e9:.0f} GB/s. Only min(workers, blocks) workers are busy in "
             "the depth-parallel and coordinated schedules.", "",
             saved["settings"], ""]  # the recipe the rates were measured with
    lines += table(predicted)
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.rates.with_name(args.rates.stem.replace("layer_shapes", "cost_model") + ".md")
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
