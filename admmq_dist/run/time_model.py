"""The job's time modelled from measured rates: ``admmq plan``'s "modelled time" line, and the
model behind ``benchmarks/cost_model.py``'s tables (which calls this module with the rates
``benchmarks/layer_shapes.py`` measured, looked up as measured: :class:`MeasuredRates`).

The rates are measured on one device at one model's shapes; to model any other model they are
fitted (``benchmarks/fit_rates.py`` writes them, :func:`.rates.fit` fits them) as power laws of the
width ``n`` of the Hessian a piece works on, ``seconds = c · count · size^p``:

- the decoder block's forward: per token, ``size`` = the block's FLOPs per token
  (:func:`flops_per_token`; one point measured, so ``p`` = 1: seconds per FLOP);
- a Hessian's capture: per token, ``size`` = ``n`` (nominally ``p`` = 2: ``XᵀX``);
- ``eigh`` and GPTQ's Cholesky: per factorization, ``size`` = ``n`` (nominally 3);
- GPTQ (ADMM-Q's start, and the GPTQ method), one ADMM-Q iteration with the exact and with the CG
  W-update, one local-search sweep: per row solved, ``size`` = ``n`` (nominally 2).

``p`` is fitted where the measurements span two or more widths (the 1B shapes: 2,048 and 8,192),
else it is the nominal exponent. ADMM-Q runs the measured iterations per row block (it stops
early), at most the recipe's budget. Not measured, so not modelled: the scale refit itself (its
local-search sweep is), the asymmetric objective's moved target, network transfers (bytes at an
assumed :data:`LINK_BYTES_PER_S`).

The schedules, as ``benchmarks/cost_model.py`` always modelled them:

- sequential: per decoder block, one forward per true-sequential stage (its capture) and one to
  propagate (one more for the float pass of asymmetric calibration), on the busiest worker's
  shard of the tokens, and the captures over that shard (three statistics per dense Hessian
  under asymmetric calibration; an expert's over the tokens routed to it); per stage the row
  blocks handed out as the real scheduler does (:func:`.plan.assign`), each worker paying the
  factorizations of every Hessian it solves rows of; the stage lasts as long as its busiest
  worker.
- depth-parallel: a pipelined float forward fills every segment's input, then each round lasts
  as long as one segment solved cold on all the tokens; ``min(rounds, segments - 1)``
  correction rounds.
- coordinated: one segment per block (at most ``blocks`` workers busy); every round a pipelined
  forward with every Hessian's capture over all the tokens, then on each worker, for each of its
  blocks, every eigendecomposition again (the Hessians changed) and ``iterations`` ADMM-Q
  iterations of every linear; round 0 adds the GPTQ start (or, with the sequential start, one
  sequential GPTQ pass block by block before it), the polish one more refreshing forward and a
  local-search sweep.
- under asymmetric calibration the round schedules run and hand off the float model's stream
  beside the quantized one, and the captures take three statistics.
- transfers: bytes as the run report counts them (partial and merged Hessians, codes, the
  block's weights; the round schedules' hand-offs), at :data:`LINK_BYTES_PER_S`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .memory import routed_expert
from .plan import assign, assign_whole, tokens_per_worker, wave_bounds
# The rates (measured and fitted) live in .rates; re-exported for the benchmarks and tests.
from .rates import (DEFAULT_RATES, PIECES, FittedRates, Linear, MeasuredRates, Stages,
                    describe_rates, fit, flops_per_token, load_rates, measured_points,
                    measured_stages)  # noqa: F401

# Between workers: an assumption (10 GB/s), not a measurement.
LINK_BYTES_PER_S = 10e9
# Micro-batches of the round schedules' pipelined forward.
MICRO_BATCHES = 16
PHASES = ("forward", "capture", "factorizations", "solve", "transfers")


@dataclass(frozen=True)
class Solve:
    """What solving a layer runs: the method of each linear ("exact" or "cg": ADMM-Q with that
    W-update; "gptq"; "rtn"), and the recipe's choices the time depends on."""

    method_of: Callable[[Linear], str]
    gptq_start: bool = True  # ADMM-Q starts from GPTQ's codes
    iteration_budget: int | None = None  # caps the measured iterations
    sweeps: int = 1  # local-search sweeps after ADMM-Q (with one per scale refit)
    gptq_sweeps: int = 0  # after GPTQ
    asymmetric: bool = False  # a float pass per block, three statistics per dense capture
    row_block: int = 512
    group_size: int | None = 128
    act_bytes: int = 2  # hidden states handed between segments


# ------------------------------------------------------------------------------------- the model


def _costs(**phases: float) -> dict:
    out = {phase: phases.get(phase, 0.0) for phase in PHASES}
    out["bytes"] = phases.get("bytes", 0)
    out["total"] = sum(out[p] for p in PHASES)
    return out


def _hessians(stage: list[Linear]) -> dict[str, list[Linear]]:
    out: dict[str, list[Linear]] = {}
    for lin in stage:
        out.setdefault(lin.hessian, []).append(lin)
    return out


def _factor_seconds(lins: list[Linear], rates, solve: Solve) -> float:
    """One worker's factorizations of one Hessian, for the linears ``lins`` it solves rows of."""
    methods = {solve.method_of(lin) for lin in lins}
    if methods <= {"rtn"}:
        return 0.0
    return rates.cholesky(lins[0]) + (rates.eigh(lins[0]) if "exact" in methods else 0.0)


def _rows_seconds(lin: Linear, rows: int, rates, solve: Solve) -> float:
    """``rows`` rows of ``lin`` solved, factorizations aside."""
    method = solve.method_of(lin)
    if method == "rtn":
        return 0.0
    if method == "gptq":
        return rates.gptq(lin, rows) + solve.gptq_sweeps * rates.local_search(lin, rows)
    iterations = rates.iterations(lin, method)
    if solve.iteration_budget is not None:
        iterations = min(iterations, solve.iteration_budget)
    return ((rates.gptq(lin, rows) if solve.gptq_start else 0.0)
            + iterations * rates.iteration(lin, method, rows)
            + solve.sweeps * rates.local_search(lin, rows))


def _codes_bytes(lin: Linear, solve: Solve) -> float:
    group = solve.group_size or lin.cols
    return lin.rows * lin.cols * (1 + 4 / group)


def stage_seconds(stage: list[Linear], rates, solve: Solve, workers: int
                  ) -> tuple[float, float, int]:
    """``(factorizations, solve, bytes moved)`` of one stage on ``workers`` workers: the row
    blocks assigned as the scheduler assigns them, the busiest worker's seconds."""
    by_name = {lin.name: lin for lin in stage}
    units = [(lin.name, blk, (blk[1] - blk[0]) * lin.cols)
             for lin in stage for blk in lin.row_blocks(solve.row_block)]
    hessians = _hessians(stage)
    # An expert stage with a Hessian per worker or more is solved expert by expert, as the
    # schedule does (.plan.assign_whole): each expert factorized once, on its owner.
    whole = len(hessians) >= workers and any(routed_expert(lin.name) for lin in stage)
    assignment = (assign_whole(units, {lin.name: lin.hessian for lin in stage}, workers)
                  if whole else assign(units, workers))
    busiest, solvers = (0.0, 0.0), {}
    for mine in assignment.values():
        if not mine:
            continue
        mine_lins = [by_name[name] for name, _, _ in mine]
        touched = _hessians(list({lin.name: lin for lin in mine_lins}.values()))
        for key in touched:
            solvers[key] = solvers.get(key, 0) + 1
        factor = sum(_factor_seconds(lins, rates, solve) for lins in touched.values())
        rows = sum(_rows_seconds(by_name[name], blk[1] - blk[0], rates, solve)
                   for name, blk, _ in mine)
        if factor + rows > sum(busiest):
            busiest = (factor, rows)
    # Every other worker's partial Hessian to its owner, the merged one to its other solvers,
    # the codes to the schedule and to every worker.
    moved = sum((workers - 1 + solvers.get(key, 1) - 1) * lins[0].cols ** 2 * 4
                for key, lins in hessians.items())
    moved += sum(_codes_bytes(lin, solve) for lin in stage) * (1 + workers)
    return busiest[0], busiest[1], int(moved)


def block_seconds(stages: Stages, hidden: int, rates, solve: Solve, workers: int,
                  tokens: float, seq_len: int, waves: int = 1) -> dict:
    """One decoder block of the sequential schedule; ``tokens``: the busiest worker's share;
    ``waves``: an expert stage's capture is that many forward passes (:func:`.plan.expert_waves`)."""
    passes = len(stages) + 1 + (1 if solve.asymmetric else 0) + sum(
        len(wave_bounds(len(stage), waves, workers)) - 1 for stage in stages
        if any(routed_expert(lin.name) for lin in stage))
    forward = passes * rates.forward(stages, hidden, tokens, seq_len)
    capture = factor = rows = 0.0
    moved = (workers - 1) * sum(lin.rows * lin.cols for stage in stages for lin in stage) * 2
    for stage in stages:
        for lins in _hessians(stage).values():
            stats = 3 if solve.asymmetric and lins[0].routed == 1.0 else 1
            capture += stats * rates.capture(lins[0], tokens * lins[0].routed)
        f, s, m = stage_seconds(stage, rates, solve, workers)
        factor, rows, moved = factor + f, rows + s, moved + m
    moved = 0 if workers == 1 else moved
    return _costs(forward=forward, capture=capture, factorizations=factor, solve=rows,
                  transfers=moved / LINK_BYTES_PER_S, bytes=moved)


def _scaled(costs: dict, factor: float) -> dict:
    return {k: v * factor for k, v in costs.items()}


def _added(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}


def sequential(blocks: list[tuple[Stages, int]], hidden: int, rates, solve: Solve,
               workers: int, tokens_per_worker: float, seq_len: int, waves: int = 1) -> dict:
    """``blocks``: each distinct block's stages and how many blocks are like it."""
    out = _costs()
    for stages, count in blocks:
        out = _added(out, _scaled(block_seconds(stages, hidden, rates, solve, workers,
                                                tokens_per_worker, seq_len, waves), count))
    return out


def _heaviest(blocks: list[tuple[Stages, int]], cost: Callable[[Stages], dict]
              ) -> tuple[Stages, dict]:
    return max(((stages, cost(stages)) for stages, _ in blocks), key=lambda sc: sc[1]["total"])


def depth_parallel(blocks: list[tuple[Stages, int]], hidden: int, rates, solve: Solve,
                   workers: int, tokens: float, seq_len: int, rounds: int,
                   segments: int | None = None) -> dict:
    """One segment per worker (or ``segments``); every round waits for a segment solved cold on
    all the tokens on one worker (the heaviest block's cost per block)."""
    count = sum(c for _, c in blocks)
    segments = min(segments or workers, count)
    per_segment = math.ceil(count / segments)
    _, cold = _heaviest(blocks, lambda st: block_seconds(st, hidden, rates, solve, 1, tokens,
                                                         seq_len))
    pass_all = max(rates.forward(st, hidden, tokens, seq_len) for st, _ in blocks)
    fill = 0.0 if segments == 1 else (
        sum(c * rates.forward(st, hidden, tokens, seq_len) for st, c in blocks) / segments
        + (segments - 1) * per_segment * pass_all / MICRO_BATCHES)
    corrections = min(rounds, segments - 1)
    streams = 2 if solve.asymmetric else 1  # the float model's input travels beside
    moved = (corrections + 1) * (segments - 1) * tokens * hidden * solve.act_bytes * streams
    solve_rounds = (corrections + 1) * per_segment
    out = _costs(forward=fill + solve_rounds * cold["forward"],
                 capture=solve_rounds * cold["capture"],
                 factorizations=solve_rounds * cold["factorizations"],
                 solve=solve_rounds * cold["solve"], transfers=moved / LINK_BYTES_PER_S,
                 bytes=moved)
    out["rounds"] = corrections + 1
    return out


def coordinated(blocks: list[tuple[Stages, int]], hidden: int, rates, solve: Solve,
                workers: int, tokens: float, seq_len: int, rounds: int, iterations: int,
                sequential_start: bool = False, polish: bool = True,
                polish_sweeps: int = 1) -> dict:
    """``rounds`` rounds of ``iterations`` ADMM-Q iterations of every layer at once;
    ``sequential_start``: after one sequential GPTQ pass, block by block (one worker busy)."""
    count = sum(c for _, c in blocks)
    busy = min(workers, count)
    per_worker = math.ceil(count / busy)
    streams = 2 if solve.asymmetric else 1

    def per_block(stages: Stages) -> dict:
        lins = [lin for stage in stages for lin in stage]
        hessians = {k: v for stage in stages for k, v in _hessians(stage).items()}
        stats = 3 if solve.asymmetric else 1
        capture = sum((stats if h[0].routed == 1.0 else 1)
                      * rates.capture(h[0], tokens * h[0].routed) for h in hessians.values())
        # Under asymmetric calibration every block runs on the float model's stream too.
        forward = streams * rates.forward(stages, hidden, tokens, seq_len)
        eigh = sum(rates.eigh(h[0]) for h in hessians.values()
                   if any(solve.method_of(lin) == "exact" for lin in h))
        cholesky = sum(rates.cholesky(h[0]) for h in hessians.values())
        iterate = iterations * sum(rates.iteration(lin, solve.method_of(lin), lin.rows)
                                   for lin in lins)
        gptq = sum(rates.gptq(lin, lin.rows) for lin in lins)
        sweep = polish_sweeps * sum(rates.local_search(lin, lin.rows) for lin in lins) \
            if polish else 0.0
        return {"forward": forward, "capture": capture, "eigh": eigh, "cholesky": cholesky,
                "iterate": iterate, "gptq": gptq, "sweep": sweep,
                "total": forward + capture + eigh + cholesky + iterate + gptq + sweep}

    _, b = _heaviest(blocks, per_block)
    every = [(per_block(st), c) for st, c in blocks]
    refreshes = rounds + (1 if polish else 0)
    fill = (busy - 1) * per_worker * (b["forward"] + b["capture"]) / MICRO_BATCHES
    share = b["forward"] + b["capture"]
    refresh = per_worker * share + fill  # one round's pipelined forward with the captures
    serial = {k: sum(c * p[k] for p, c in every) if sequential_start else 0.0
              for k in ("forward", "capture", "cholesky", "gptq")}
    hand_off = (busy - 1) * tokens * hidden * solve.act_bytes * streams
    moved = refreshes * hand_off + (count * tokens * hidden * solve.act_bytes * streams
                                    if sequential_start else 0)
    start = {"cholesky": 0.0, "gptq": 0.0} if sequential_start else \
        {"cholesky": b["cholesky"], "gptq": b["gptq"]}
    out = _costs(
        forward=refreshes * refresh * b["forward"] / share + serial["forward"],
        capture=refreshes * refresh * b["capture"] / share + serial["capture"],
        factorizations=per_worker * (rounds * b["eigh"] + start["cholesky"])
        + serial["cholesky"],
        solve=per_worker * (rounds * b["iterate"] + start["gptq"] + b["sweep"]) + serial["gptq"],
        transfers=moved / LINK_BYTES_PER_S, bytes=moved)
    out["rounds"] = rounds
    return out


# ------------------------------------------------------------------------------------ the plan


def plan_stages(stages: list[list[tuple]], experts_per_token: int | None) -> Stages:
    """:func:`.model_shape.block_stages`'s stages (per Hessian ``(name, rows, cols, units)``) as
    the model costs them; an expert's Hessian sees ``experts_per_token`` of the stage's experts'
    share of the tokens."""
    out = []
    for stage in stages:
        experts = sum(routed_expert(name) for name, *_ in stage)
        out.append([Linear(name, rows, cols, name, units,
                           min(1.0, experts_per_token / experts)
                           if experts and experts_per_token and routed_expert(name) else 1.0)
                    for name, rows, cols, units in stage])
    return out


def job_seconds(blocks: list[tuple[list, int]], *, hidden: int, recipe, workers: int, rates,
                experts_per_token: int | None = None, act_bytes: int = 2,
                expert_waves: int = 1) -> dict:
    """The recipe's job on ``workers`` workers: ``{phase: seconds}`` (:data:`PHASES`), ``total``
    and ``bytes``. ``blocks``: each distinct block's stages (as :func:`.model_shape.block_stages`
    gives them) and how many blocks are like it."""

    calib, solver = recipe.calibration, recipe.solver
    method = solver.method
    sweeps = solver.sweeps + solver.refits * max(solver.sweeps, 1)
    solve = Solve(
        method_of=(lambda lin: solver.admm.w_update_for(lin.cols)) if method == "admmq"
        else (lambda lin: method),
        gptq_start=solver.admm.init == "gptq", iteration_budget=solver.admm.iterations,
        sweeps=sweeps, gptq_sweeps=sweeps,
        asymmetric=calib.asymmetric_strength(method) > 0, row_block=solver.row_block,
        group_size=recipe.grid.group_size, act_bytes=act_bytes)
    costed = [(plan_stages(stages, experts_per_token), count) for stages, count in blocks]
    tokens = calib.num_samples * calib.seq_len
    if solver.schedule == "sequential":
        batches = math.ceil(calib.num_samples / calib.batch_size)
        share, _ = tokens_per_worker(calib.num_samples, calib.seq_len, calib.batch_size,
                                     min(workers, batches))
        return sequential(costed, hidden, rates, solve, workers, share, calib.seq_len,
                          expert_waves)
    if solver.schedule == "depth-parallel":
        return depth_parallel(costed, hidden, rates, solve, workers, tokens, calib.seq_len,
                              solver.rounds, solver.segments)
    return coordinated(costed, hidden, rates, solve, workers, tokens, calib.seq_len,
                       solver.coordinated_rounds, solver.coordinated_iterations,
                       sequential_start=solver.coordinated_start == "sequential",
                       polish_sweeps=solver.sweeps or 1)

