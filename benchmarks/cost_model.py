"""A whole-model cost model built from the rates ``benchmarks/layer_shapes.py`` measured: the
sequential schedule (data-parallel over workers) and the depth-parallel one (one segment per
worker), for ADMM-Q and act-order GPTQ, on 1, 8 and 64 workers.

What is measured (per device, at the model's shapes): a decoder block's forward per 1,024 tokens,
each Hessian's capture per 1,024 tokens, its float64 ``eigh`` and GPTQ's Cholesky, and per linear
one 512-row block's GPTQ start, ADMM-Q iterations (exact and CG W-updates), local search and
act-order GPTQ. What is modelled:

- sequential: per decoder block, five forward passes (one capture per true-sequential stage and
  the propagation) and the captures over each worker's share of the tokens; per stage, the row
  blocks handed out as the real scheduler does (:func:`admmq_dist.run.plan.assign`), and each
  worker pays the factorizations of every Hessian it solves rows of; the stage lasts as long as
  its busiest worker.
- depth-parallel: a pipelined float forward fills every segment's input, then each round lasts
  as long as one segment solved cold on all the tokens (the segment whose input just became
  final gets the full schedule); ``min(rounds, segments - 1)`` correction rounds.
- coordinated: one segment per block (so at most ``blocks`` workers are busy); every round a
  pipelined forward with every Hessian's capture over all the tokens, then on each worker, for
  each of its blocks, every Hessian's factorizations again (the Hessians changed) and
  ``iterations`` ADMM-Q iterations of every linear at the measured per-iteration rate; round 0
  adds the GPTQ start, the polish one more refreshing forward and the local search.
- transfers: bytes as the run report counts them (partial and merged Hessians, codes, the block's
  weights); seconds at ``LINK_BYTES_PER_S``, the one assumed rate here (no network on the
  machines that measured), kept in its own column.
"""

from __future__ import annotations

import math

from admmq_dist.run.plan import assign
from admmq_dist.quant.solvers.rows import row_blocks

# Ray's object store between workers: an assumption (10 GB/s), not a measurement.
LINK_BYTES_PER_S = 10e9
# Forward passes of a decoder block per sequential step: four stage captures and the propagation.
PASSES = 5
# Micro-batches of the depth-parallel schedule's pipelined float forward.
MICRO_BATCHES = 16


def stages(linears: list[dict]) -> list[list[dict]]:
    """The true-sequential stages: linears grouped by the Hessian they read, in block order."""
    out: dict[str, list[dict]] = {}
    for r in linears:
        out.setdefault(r["hessian_key"], []).append(r)
    return list(out.values())


def row_block_seconds(r: dict, method: str, rows: int) -> float:
    """One row block of ``rows`` rows of linear ``r``: ``method`` is "gptq", "exact" or "cg"."""
    scale = rows / r["rows_solved"]
    if method == "gptq":
        return scale * r["gptq_s"]
    return scale * (r["gptq_start_s"] + r[f"{method}_iterations_s"] + r["local_search_s"])


def factor_seconds(h: dict, method: str) -> float:
    return h["cholesky"] + (h["eigh"] if method == "exact" else 0.0)


def stage_seconds(stage: list[dict], hessian: dict, method_of, workers: int,
                  row_block: int) -> tuple[float, int]:
    """``(seconds, bytes moved)`` of one stage's solve on ``workers`` workers."""
    units = [(r["linear"], blk, (blk[1] - blk[0]) * r["cols"])
             for r in stage for blk in row_blocks(r["rows"], row_block)]
    by_name = {r["linear"]: r for r in stage}
    plan = assign(units, workers)
    busiest, solvers = 0.0, 0
    for w, mine in plan.items():
        if not mine:
            continue
        solvers += 1
        seconds = factor_seconds(hessian, method_of(by_name[mine[0][0]]))
        seconds += sum(row_block_seconds(by_name[name], method_of(by_name[name]), blk[1] - blk[0])
                       for name, blk, _ in mine)
        busiest = max(busiest, seconds)
    n = stage[0]["cols"]
    codes = sum(r["rows"] * r["cols"] * (1 + 4 / r["group_size"]) for r in stage)
    moved = (workers - 1) * n * n * 4 + (solvers - 1) * n * n * 4 + codes * (1 + workers)
    return busiest, int(moved)


def block_seconds(linears, hessians, method_of, workers: int, tokens: int,
                  forward_per_1k: float, row_block: int) -> dict:
    """One decoder block of the sequential schedule on ``workers`` workers."""
    share = tokens / 1024 / workers
    out = {"forward": PASSES * forward_per_1k * share, "capture": 0.0, "solve": 0.0, "bytes": 0}
    weights = sum(r["rows"] * r["cols"] for r in linears) * 2
    out["bytes"] += (workers - 1) * weights
    for stage in stages(linears):
        h = hessians[stage[0]["hessian_key"]]
        out["capture"] += h["capture_per_1k_tokens"] * share
        seconds, moved = stage_seconds(stage, h, method_of, workers, row_block)
        out["solve"] += seconds
        out["bytes"] += moved
    if workers == 1:
        out["bytes"] = 0
    out["transfer"] = out["bytes"] / LINK_BYTES_PER_S
    out["total"] = out["forward"] + out["capture"] + out["solve"] + out["transfer"]
    return out


def sequential(linears, hessians, method_of, workers: int, tokens: int, blocks: int,
               forward_per_1k: float, row_block: int = 512) -> dict:
    one = block_seconds(linears, hessians, method_of, workers, tokens, forward_per_1k, row_block)
    return {k: v * blocks for k, v in one.items()}


def depth_parallel(linears, hessians, method_of, workers: int, tokens: int, blocks: int,
                   forward_per_1k: float, rounds: int, hidden: int,
                   row_block: int = 512) -> dict:
    """One segment per worker; every round waits for a segment solved cold on one worker."""
    segments = min(workers, blocks)
    per_segment = math.ceil(blocks / segments)
    cold = block_seconds(linears, hessians, method_of, 1, tokens, forward_per_1k, row_block)
    pass_all = forward_per_1k * tokens / 1024
    fill = 0.0 if segments == 1 else (blocks * pass_all / segments
                                      + (segments - 1) * per_segment * pass_all / MICRO_BATCHES)
    corrections = min(rounds, segments - 1)
    hand_off = (segments - 1) * tokens * hidden * 2
    moved = (corrections + 1) * hand_off
    solve_rounds = (corrections + 1) * per_segment
    out = {"forward": fill + solve_rounds * cold["forward"],
           "capture": solve_rounds * cold["capture"], "solve": solve_rounds * cold["solve"],
           "bytes": moved, "transfer": moved / LINK_BYTES_PER_S, "rounds": corrections + 1}
    out["total"] = out["forward"] + out["capture"] + out["solve"] + out["transfer"]
    return out


def iteration_seconds(r: dict, method: str) -> float:
    """One ADMM-Q iteration of the whole linear ``r`` (``method``: "exact" or "cg")."""
    return r[f"{method}_iterations_s"] / r[f"{method}_iterations"] * r["rows"] / r["rows_solved"]


def coordinated(linears, hessians, method_of, workers: int, tokens: int, blocks: int,
                forward_per_1k: float, rounds: int, iterations: int, hidden: int,
                sequential_start: bool = False) -> dict:
    """The coordinated schedule: ``rounds`` rounds of ``iterations`` iterations per layer;
    ``sequential_start``: after one sequential GPTQ pass, block by block on each block's owner
    (every token through one block at a time, one worker busy)."""
    busy = min(workers, blocks)
    per_worker = math.ceil(blocks / busy)
    capture = sum(h["capture_per_1k_tokens"] for h in hessians.values()) * tokens / 1024
    pass_all = forward_per_1k * tokens / 1024 + capture  # one block, all tokens, with captures
    fill = (busy - 1) * per_worker * pass_all / MICRO_BATCHES
    refresh = per_worker * pass_all + fill
    factor = sum(h["eigh"] if any(method_of(r) == "exact" for r in linears
                                  if r["hessian_key"] == key) else 0.0
                 for key, h in hessians.items())
    iterate = sum(iteration_seconds(r, method_of(r)) for r in linears) * iterations
    start = sum(r["gptq_start_s"] * r["rows"] / r["rows_solved"] for r in linears) + sum(
        h["cholesky"] for h in hessians.values())
    polish = sum(r["local_search_s"] * r["rows"] / r["rows_solved"] for r in linears)
    hand_off = (busy - 1) * tokens * hidden * 2
    moved = (rounds + 1) * hand_off
    # The sequential start: per block, all tokens through it (with captures) and GPTQ's solve,
    # serial across blocks; every block's output is handed to the next owner.
    serial = blocks if sequential_start else 0
    gptq = sum(r["gptq_s"] * r["rows"] / r["rows_solved"] for r in linears) + sum(
        h["cholesky"] for h in hessians.values())
    moved += serial * tokens * hidden * 2 if sequential_start else 0
    out = {"forward": ((rounds + 1) * refresh * forward_per_1k * tokens / 1024 / pass_all
                       + serial * forward_per_1k * tokens / 1024),
           "capture": (rounds + 1) * refresh * capture / pass_all + serial * capture,
           # Round 0's GPTQ start on the float Hessians is not needed after a sequential one.
           "solve": (per_worker * (rounds * (factor + iterate)
                                   + (0.0 if sequential_start else start) + polish)
                     + serial * gptq),
           "bytes": moved, "transfer": moved / LINK_BYTES_PER_S, "rounds": rounds}
    out["total"] = out["forward"] + out["capture"] + out["solve"] + out["transfer"]
    return out


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
             "the depth-parallel and coordinated schedules.", ""]
    lines += table(predicted)
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.rates.with_name(args.rates.stem.replace("layer_shapes", "cost_model") + ".md")
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
