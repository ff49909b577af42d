"""Issue 34 item 3: the spectral penalty rule (Xu, Figueiredo and Goldstein 2017, "Adaptive ADMM
with spectral penalty parameter selection") against the coordinated schedule's fixed continuation
and residual balancing, on real layers, with one ρ for every layer as the coordinator holds it.

The coordinated schedule's rounds, minus the refresh (the Hessians stay the float model's, so
what differs is the penalty alone): every layer starts from GPTQ's codes, then each round runs
``--iterations`` ADMM-Q iterations of every layer warm from its last iterate and dual at the
round's ρ (as ``CoordinatedWorker.iterate`` does, through the package's ``admmq``), and the rule
sets the next round's ρ from what the round did:

* ``fixed``: the admm continuation over the round's iterations (today's default, ``advance``);
* ``balance``: that, then ×2 or ÷2 when the whole model's primal and dual residuals are more than
  10× apart (``penalty: balance``, ``next_rho``);
* ``spectral``: AADMM's rule. Per round, between its first and last iteration, every layer gives six
  inner products in the Jacobi-scaled metric (``⟨a, b⟩ = Σ a b H_jj``: the metric the penalty and
  ρ live in, alike across layers): of ΔW, of the intermediate dual Δλ̂ (λ̂ = −(Y + ρ(W − Z_prev)),
  the objective's gradient there), of ΔZ and ΔY. Summed over layers, they give the curvature
  estimates α̂ (objective) and β̂ (constraint set), each the hybrid of steepest-descent and
  minimum-gradient step sizes, with the correlation safeguard ε = 0.2: ρ = √(α̂β̂) when both
  are trusted, the trusted one alone, else ρ unchanged;
* ``spectral-floor``: the larger of the spectral ρ and the continuation's (ADMM-Q needs ρ to
  grow for its codes to settle; this keeps the growth and lets the rule speed it up).

Each rule's figure: every layer's best loss over the rounds (the exact objective), divided by the
fixed continuation's in the same run; and the sequential schedule's uninterrupted ADMM-Q (the
shipped default: its own stop rule, no local search or refit here) for reference. Real problems:
SmolLM2-135M float-model Hessians (``benchmarks/real_layers.py``), one linear per Hessian.

    python benchmarks/spectral_penalty.py       # writes benchmarks/results/spectral_penalty.md
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import platform
import statistics
import sys
from pathlib import Path

import torch

from admmq_dist.quant.factors import HessianFactors
from admmq_dist.quant.grid import fit_grid
from admmq_dist.quant.hessian import relative_loss
from admmq_dist.recipe import Recipe, override
from admmq_dist.run.coordinated import BALANCE_RATIO, BALANCE_STEP, advance

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402
from real_layers import load_real_layers, one_per_hessian  # noqa: E402

ADMMQ = importlib.import_module("admmq_dist.quant.solvers.admmq")
RULES = ("fixed", "balance", "spectral", "spectral-floor")
CORRELATION = 0.2  # AADMM's ε_cor


class Recording:
    """Wraps a W-update and keeps, for the round's first and last iteration, W, the intermediate
    dual λ̂ = −(Y_prev + ρ (W − Z_prev)), Z and Y (each ``[m, n]``)."""

    def __init__(self, inner) -> None:
        self.inner, self.first, self.last = inner, None, None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def start(self, Z, Y=None):
        self.Z = Z
        return self.inner.start(Z, Y)

    def w_step(self, rho):
        W = self.inner.w_step(rho)
        self._now = {"W": W.clone(), "lam_hat": -(self.inner.Y + rho * (W - self.Z))}
        return W

    def z_done(self, Z, Zhard, rho):
        out = self.inner.z_done(Z, Zhard, rho)
        self.Z = Z
        self._now.update(Z=Z.clone(), Y=self.inner.Y.clone())
        if self.first is None:
            self.first = self._now
        self.last = self._now
        return out


def inner_products(rec: Recording, d2: torch.Tensor) -> dict[str, float]:
    """The six sums of the spectral rule for one layer (metric ``Σ a b H_jj``)."""
    f, last = rec.first, rec.last
    dw, dl = last["W"] - f["W"], last["lam_hat"] - f["lam_hat"]
    dz, dy = last["Z"] - f["Z"], last["Y"] - f["Y"]
    dot = lambda a, b: float(((a * b) @ d2).sum())  # noqa: E731
    return {"ww": dot(dw, dw), "wl": dot(dw, dl), "ll": dot(dl, dl),
            "gg": dot(dz, dz), "gy": dot(-dz, -dy), "yy": dot(dy, dy)}


def _hybrid(sd: float, mg: float) -> float:
    return mg if 2 * mg > sd else sd - mg / 2


def spectral_rho(rho: float, s: dict[str, float]) -> float:
    """AADMM's ρ from the model's summed inner products (``rho`` when neither estimate is
    trusted)."""
    def estimate(aa: float, ab: float, bb: float):
        if aa <= 0 or bb <= 0 or ab <= 0:
            return None
        if ab / math.sqrt(aa * bb) <= CORRELATION:
            return None
        return _hybrid(bb / ab, ab / aa)  # (steepest descent, minimum gradient)

    alpha = estimate(s["ww"], s["wl"], s["ll"])
    beta = estimate(s["gg"], s["gy"], s["yy"])
    if alpha is not None and beta is not None:
        return math.sqrt(alpha * beta)
    return alpha if alpha is not None else beta if beta is not None else rho


def run_rule(problems: list[dict], recipe: Recipe, rule: str, rounds: int,
             iterations: int) -> tuple[list[float], list[float]]:
    """Every layer's best loss over ``rounds`` rounds under ``rule``, and the ρ of each round."""
    admm = recipe.solver.admm
    rho, rhos = admm.rho_start, []
    states = [None] * len(problems)
    best = [math.inf] * len(problems)
    exact_update = ADMMQ._w_update
    for _ in range(rounds):
        rhos.append(rho)
        settings = dataclasses.replace(admm, iterations=iterations, rho_start=rho,
                                       stop_tolerance=0.0)
        sums = dict.fromkeys(("ww", "wl", "ll", "gg", "gy", "yy"), 0.0)
        primal = dual = size = 0.0
        for k, p in enumerate(problems):
            recorded = []
            ADMMQ._w_update = lambda *a: recorded.append(Recording(exact_update(*a))) \
                or recorded[-1]
            try:
                state = states[k]
                result = ADMMQ.admmq(p["weight"], p["hessian"], p["grid"], settings,
                                     gptq_settings=recipe.solver.gptq, factors=p["factors"],
                                     init_codes=None if state is None else state["last_codes"],
                                     init_dual=None if state is None else state["dual"])
            finally:
                ADMMQ._w_update = exact_update
            states[k] = result.state
            loss = relative_loss(result.weight, p["weight"], p["hessian"])
            best[k] = min(best[k], loss)
            for key, value in inner_products(recorded[0], p["d2"]).items():
                sums[key] += value
            # As model_residuals: size-weighted, each relative to the layer's ‖W0‖.
            n, norm = p["weight"].numel(), result.history["weight_norm"][0]
            primal += n * (result.history["residual"][-1] / norm) ** 2
            dual += n * (result.history["dual_residual"][-1] / norm) ** 2
            size += n
        continued = advance(rho, iterations, admm)
        if rule == "fixed":
            rho = continued
        elif rule == "balance":
            rho = continued
            if primal > BALANCE_RATIO ** 2 * dual:
                rho *= BALANCE_STEP
            elif dual > BALANCE_RATIO ** 2 * primal:
                rho /= BALANCE_STEP
        elif rule == "spectral":
            rho = spectral_rho(rho, sums)
        else:
            rho = max(continued, spectral_rho(rho, sums))
    return best, rhos


def problems_of(blocks: list[int], recipe: Recipe) -> list[dict]:
    out = []
    for layer in one_per_hessian(load_real_layers(blocks=blocks, num_samples=64)):
        factors = HessianFactors(layer["hessian"])
        factors.eigen()
        out.append({"name": layer["name"], "weight": layer["weight"],
                    "hessian": layer["hessian"], "factors": factors,
                    "d2": torch.diagonal(factors.hessian).clone(),
                    "grid": fit_grid(layer["weight"], recipe.grid)})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="0,12,29")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args(argv)
    recipe = override(Recipe(), {"grid": {"bits": args.bits, "group_size": args.group_size,
                                          "symmetric": False}})
    problems = problems_of([int(b) for b in args.blocks.split(",")], recipe)
    results = {}
    for rule in RULES:
        results[rule] = run_rule(problems, recipe, rule, args.rounds, args.iterations)
        print(rule, [f"{r:.3g}" for r in results[rule][1]], flush=True)
    sequential = [relative_loss(ADMMQ.admmq(p["weight"], p["hessian"], p["grid"],
                                            recipe.solver.admm, gptq_settings=recipe.solver.gptq,
                                            factors=p["factors"]).weight,
                                p["weight"], p["hessian"]) for p in problems]
    base = results["fixed"][0]
    commit = environment.commit()
    lines = [
        "# The spectral penalty rule against the fixed continuation (issue 34, item 3)", "",
        f"`python benchmarks/spectral_penalty.py` at commit {commit}, torch {torch.__version__}, "
        f"{platform.machine()}; one run (deterministic for the inputs). SmolLM2-135M blocks "
        f"{args.blocks}, float-model Hessians (64 x 512 WikiText-2 windows), {args.bits}-bit "
        f"g{args.group_size} asymmetric grid, shipped ADMM-Q defaults; {args.rounds} rounds of "
        f"{args.iterations} iterations of every layer at one ρ (the coordinated schedule without "
        "its refresh: fixed Hessians). Each cell: the layer's best loss over the rounds / the "
        "fixed continuation's in the same run; `sequential` is uninterrupted ADMM-Q with its own "
        "stop rule (no local search or refit for any column).", "",
        "| layer | " + " | ".join(RULES[1:]) + " | sequential |",
        "|---|" + "---|" * len(RULES)]
    for k, p in enumerate(problems):
        lines.append(f"| {p['name']} | " + " | ".join(
            f"{results[r][0][k] / base[k]:.4f}" for r in RULES[1:])
            + f" | {sequential[k] / base[k]:.4f} |")
    lines.append("| **median** | " + " | ".join(
        f"**{statistics.median(ratios):.4f}**" for ratios in (
            [results[r][0][k] / base[k] for k in range(len(problems))] for r in RULES[1:]))
        + f" | **{statistics.median(s / b for s, b in zip(sequential, base)):.4f}** |")
    lines += ["", "ρ per round:", ""] + [
        f"- {rule}: " + ", ".join(f"{r:.3g}" for r in results[rule][1]) for rule in RULES]
    environment.write_results("spectral_penalty", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
