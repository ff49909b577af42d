"""Issue 27, item 2: ADMM-Q's iterations with TF32 or bf16 GEMMs, decided on a CPU.

A GPU's tensor cores multiply float32 operands as TF32 (10 explicit mantissa bits) or bf16 (7)
and accumulate in float32. Here every float32 matrix product inside ADMM-Q's iterations (the
W-update's rotations, the projection's way back, the true objective of each iterate) has its
operands rounded to those mantissas first — to nearest even (a conversion instruction's
rounding) and truncated (what tensor cores do with raw float32 bits, per PyTorch's notes; which
one cuBLAS does is not settled here) — then multiplied in float32, which is what the hardware computes up to the
order of its sums. The GPTQ start, the local search and the refit stay float32 (the setting this
decides is the iterations'). Every layer is solved by the shipped ``solve()`` in each precision
and the final losses are compared with float32's.

    python benchmarks/gemm_precision.py       # writes benchmarks/results/gemm_precision.md
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import platform
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode

from admmq_dist.recipe import Recipe, override

# The module, not the function the package exports under the same name.
admmq_module = importlib.import_module("admmq_dist.quant.solvers.admmq")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402
from real_layers import losses_under  # noqa: E402

# Explicit mantissa bits kept: float32 has 23.
PRECISIONS = {"tf32": (10, "nearest"), "tf32-truncated": (10, "truncate"),
              "bf16": (7, "nearest")}
# Products whose first two tensor arguments are the factors; addmm/baddbmm's are the 2nd and 3rd.
TWO_FACTORS = {"matmul", "mm", "bmm", "__matmul__", "__rmatmul__", "linear"}
BIAS_FIRST = {"addmm", "baddbmm"}


def round_mantissa(x: torch.Tensor, bits: int, mode: str) -> torch.Tensor:
    """``x`` (float32) with ``bits`` explicit mantissa bits, rounded to nearest even or
    truncated; any other dtype as it is."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        return x
    drop = 23 - bits
    i = x.contiguous().view(torch.int32)
    if mode == "nearest":
        i = i + (((i >> drop) & 1) + (1 << (drop - 1)) - 1)
    return ((i >> drop) << drop).view(torch.float32).view(x.shape)


class RoundedProducts(TorchFunctionMode):
    """Every float32 matrix product in the block multiplies rounded operands."""

    def __init__(self, bits: int, mode: str):
        super().__init__()
        self.bits, self.mode = bits, mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in TWO_FACTORS and len(args) >= 2:
            args = (round_mantissa(args[0], self.bits, self.mode),
                    round_mantissa(args[1], self.bits, self.mode), *args[2:])
        elif name in BIAS_FIRST and len(args) >= 3:
            args = (args[0], round_mantissa(args[1], self.bits, self.mode),
                    round_mantissa(args[2], self.bits, self.mode), *args[3:])
        return func(*args, **kwargs)


def iterations_in(original, bits: int, mode: str):
    """``original`` (ADMM-Q's own ``run_iterations``, never a wrapped one: modes would nest)
    with its products on rounded operands."""
    def run_iterations(*args, **kwargs):
        with RoundedProducts(bits, mode):
            return original(*args, **kwargs)
    return run_iterations


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="0,12,29")
    parser.add_argument("--bits", type=int, default=3)
    args = parser.parse_args(argv)
    overrides = {"grid": {"bits": args.bits, "group_size": 64, "symmetric": False}}
    recipe = override(Recipe(), overrides)
    # The rounding is the hardware's: bf16 as torch rounds it, to the bit.
    probe = torch.randn(4096)
    assert torch.equal(round_mantissa(probe, 7, "nearest"), probe.bfloat16().float())
    original = admmq_module.run_iterations
    variants = {"float32": contextlib.nullcontext} | {
        name: lambda bits=bits, mode=mode: mock.patch.object(
            admmq_module, "run_iterations", iterations_in(original, bits, mode))
        for name, (bits, mode) in PRECISIONS.items()}
    rows = [(name, n, {p: losses[p] / losses["float32"] for p in PRECISIONS}) for name, n, losses
            in losses_under(variants, args.blocks, recipe.grid, recipe.solver)]
    lines = [
        "# ADMM-Q's iterations with TF32 and bf16 GEMMs, emulated on a CPU (issue 27)", "",
        f"`python benchmarks/gemm_precision.py --bits {args.bits}` at commit "
        f"{environment.commit()}, torch {torch.__version__}, {platform.machine()}; one run "
        "(deterministic for the inputs). SmolLM2-135M blocks "
        f"{args.blocks} (every linear), float-model Hessians of 64 x 512 WikiText-2 windows, "
        f"{args.bits}-bit g64 asymmetric grid, the shipped solve() (GPTQ start, ADMM-Q, local "
        "search, one scale refit). Every float32 matrix product inside ADMM-Q's iterations "
        "multiplies operands rounded to TF32 (10 mantissa bits) or bf16 (7), to nearest even "
        "(as the hardware converts) or, as a bound, truncated; accumulation in float32. The "
        "final loss / the float32 run's.", "",
        environment.settings_record(overrides, sections=("grid", "solver")), "",
        "| precision | median | min | max | layers above +0.5% |", "|---|---|---|---|---|"]
    for name in PRECISIONS:
        values = [r[name] for *_, r in rows]
        lines.append(f"| {name} | {statistics.median(values):.5f} | {min(values):.5f} | "
                     f"{max(values):.5f} | {sum(v > 1.005 for v in values)} of {len(values)} |")
    lines += ["", "| layer | n | " + " | ".join(PRECISIONS) + " |",
              "|---|---|" + "---|" * len(PRECISIONS)]
    lines += [f"| {layer} | {n} | " + " | ".join(f"{r[p]:.5f}" for p in PRECISIONS) + " |"
              for layer, n, r in rows]
    environment.write_results("gemm_precision", lines)


if __name__ == "__main__":
    main()
