"""Issue 27: ADMM-Q's eigendecomposition in float32 instead of float64 — the loss it changes on real
layers and the time it saves.

``HessianFactors.eigen`` decomposes the Jacobi-scaled Hessian in float64 (99 s at n = 8192 on a
2-core CPU, and a GPU without fast FP64 pays ~64x for it). Here every layer is solved by the
shipped ``solve()`` twice, with the float64 ``eigh`` and with a float32 one (the same scaling,
the result cast to float32 as today), and the final losses are compared; the ``eigh`` alone is
timed at the real widths and at synthetic Llama widths (a Hessian of low-rank plus log-normal
channels, as ``benchmarks/layer_shapes.py`` makes them).

    python benchmarks/eigh_precision.py       # writes benchmarks/results/eigh_precision.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from admmq_dist.quant.factors import HessianFactors
from admmq_dist.recipe import Recipe, override

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402
from real_layers import losses_under  # noqa: E402



def eigen_in(dtype: torch.dtype):
    """``HessianFactors.eigen`` with the decomposition in ``dtype``."""
    def eigen(self):
        if self._eigen is None:
            H = self.hessian
            d = torch.sqrt(torch.diagonal(H)).to(dtype)
            evals, evecs = torch.linalg.eigh((H.to(dtype) / d[:, None]) / d[None, :])
            self._eigen = (evals.clamp_min(0).float(), (d[:, None] * evecs).float(),
                           (evecs.T / d[None, :]).float().contiguous())
            self.counts["eigh"] += 1
        return self._eigen
    return eigen


def synthetic_hessian(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n // 8, generator=gen) @ torch.randn(n // 8, n, generator=gen)
    x += 0.1 * torch.randn(4 * n, n, generator=gen)
    x *= torch.exp(torch.randn(n, generator=gen))
    return (x.T @ x) / x.shape[0]


def timed(hessian: torch.Tensor, dtype: torch.dtype) -> float:
    factors = HessianFactors(hessian)
    t = time.perf_counter()
    eigen_in(dtype)(factors)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="0,12,29")
    parser.add_argument("--widths", default="2048,4096")
    args = parser.parse_args(argv)
    recipe = override(Recipe(), {"grid": {"bits": 3, "group_size": 64, "symmetric": False}})
    variants = {name: lambda dtype=dtype: mock.patch.object(HessianFactors, "eigen",
                                                             eigen_in(dtype))
                for name, dtype in (("float64", torch.float64), ("float32", torch.float32))}
    rows = [(name, n, losses["float32"] / losses["float64"]) for name, n, losses in
            losses_under(variants, args.blocks, recipe.grid, recipe.solver)]
    times = []
    for n in [576, 1536] + [int(w) for w in args.widths.split(",")]:
        hessian = synthetic_hessian(n)
        times.append((n, timed(hessian, torch.float64), timed(hessian, torch.float32)))
        print(*times[-1], flush=True)
    commit = environment.commit()
    ratios = [r for *_, r in rows]
    lines = [
        "# ADMM-Q's eigendecomposition in float32 (issue 27)", "",
        f"`python benchmarks/eigh_precision.py` at commit {commit}, torch {torch.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} threads; one run. Losses: SmolLM2-135M "
        f"blocks {args.blocks} (every linear), float-model Hessians of 64 x 512 WikiText-2 "
        "windows, 3-bit g64 asymmetric grid, the shipped solve() (GPTQ start, ADMM-Q, local "
        "search, one scale refit), the final loss with a float32 eigh / with the float64 one "
        "(deterministic for the inputs).", "",
        f"Loss ratio over {len(ratios)} layers: median {statistics.median(ratios):.6f}, "
        f"min {min(ratios):.6f}, max {max(ratios):.6f}.", "",
        "| layer | n | loss float32 / float64 |", "|---|---|---|"]
    lines += [f"| {name} | {n} | {r:.6f} |" for name, n, r in rows]
    lines += ["", "Time of the eigh alone (synthetic Hessians, one run each; the machine may be "
              "shared, so these are noisy):", "", "| n | float64 s | float32 s | ratio |",
              "|---|---|---|---|"]
    lines += [f"| {n} | {a:.2f} | {b:.2f} | {b / a:.2f} |" for n, a, b in times]
    environment.write_results("eigh_precision", lines)


if __name__ == "__main__":
    main()
