"""Rotations composed with the solvers, measured on real layers before anything ships.

A rotation ``R`` (orthogonal, ``[in, in]``) of a linear's inputs changes nothing in float —
``W x = (W R)(Rᵀ x)`` — but the quantizer then sees ``W R`` with the Hessian ``Rᵀ H R``, where
outlier columns are spread over many inputs (QuaRot, QuIP#; the 2026 LLM-scale ADMM-Q paper
composes ADMM-Q with one). The layer loss is invariant: ``tr(Δ R Rᵀ H R Rᵀ Δᵀ) = tr(Δ H Δᵀ)``,
so every figure here is measured in the original coordinates (the dequantized weight rotated
back, against ``W`` and ``H``) and divided by act-order GPTQ's loss *without* rotation on the same layer.

Three rotations, all seeded:

- ``hadamard-64``: block-diagonal Hadamard of the group size (64) with random signs. Each block
  lies inside one quantization group, so a server needs only a 64-point Hadamard on every
  linear's input (compressed-tensors' transform config describes such a checkpoint).
- ``orthogonal``: a random orthogonal matrix over the whole input, applied after the RMSNorm
  scale (which does not commute with it), so a server would need it online on every linear.
- ``fused``: only what folds into the weights, so the checkpoint stays an ordinary one and
  vLLM serves it with tensor parallelism (its online transforms refuse TP > 1): the RMSNorm
  scale folded into the linears that read the residual stream (q/k/v, gate/up), then one random
  orthogonal rotation of the residual stream shared by every layer (QuaRot/SpinQuant's R1), which
  also turns the output rows of the layers that write to it (o_proj, down_proj); a per-head
  Hadamard on o_proj's input, folded into v_proj's output rows (R2); down_proj's input unrotated.

Every method gets the same rotation (RTN, act-order GPTQ, GPTQ with ADMM-Q's polish, the shipped
ADMM-Q). Not shipped: this measures whether it would pay.

    python benchmarks/rotation_ideas.py            # blocks 12 and 24, 3 and 4 bits (~3 min on 2 cores)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from admmq_dist.quant.grid import GridSpec, fit_grid  # noqa: E402
from admmq_dist.quant.hessian import relative_loss  # noqa: E402
from admmq_dist.quant.solvers import gptq  # noqa: E402
from admmq_dist.quant.solvers.solve import SolverSettings  # noqa: E402
from layer_quality import run_layer  # noqa: E402
from real_layers import load_real_layers  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def sylvester_hadamard(size: int) -> torch.Tensor:
    """The ``size × size`` Hadamard matrix (``size`` a power of two), scaled to be orthogonal.
    Written out because torch has no Hadamard constructor and scipy is not a dependency."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"a Sylvester Hadamard needs a power of two, got {size}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / size ** 0.5


def block_hadamard(size: int, block: int, seed: int) -> torch.Tensor:
    """Block-diagonal ``[size, size]`` rotation: a ``block``-point Hadamard on each aligned block,
    after random signs (so the rotation is not the same on every layer)."""
    if size % block:
        raise ValueError(f"{size} inputs do not split into blocks of {block}")
    signs = torch.randint(0, 2, (size,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.block_diag(*[sylvester_hadamard(block)] * (size // block)) * signs[:, None]


def random_orthogonal(size: int, seed: int) -> torch.Tensor:
    """A Haar-random ``[size, size]`` orthogonal matrix (QR of a Gaussian, signs fixed)."""
    g = torch.randn(size, size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))[None, :]


RESIDUAL_READERS = {"q_proj": "input_layernorm", "k_proj": "input_layernorm",
                    "v_proj": "input_layernorm", "gate_proj": "post_attention_layernorm",
                    "up_proj": "post_attention_layernorm"}


def norm_scales(blocks: list[int]) -> dict[str, torch.Tensor]:
    """The RMSNorm scales of ``blocks`` from the embedded model, keyed by tensor name."""
    from safetensors import safe_open

    from admmq_dist.model.embedded import embedded_model_folder
    wanted = {f"model.layers.{b}.{n}.weight" for b in blocks for n in set(RESIDUAL_READERS.values())}
    with safe_open(str(embedded_model_folder() / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k).double() for k in wanted}


def rotated_problem(kind: str, layer: dict, group_size: int, seed: int, head_dim: int,
                    norms: dict[str, torch.Tensor]):
    """``(W', H', back)``: the problem the quantizer sees under rotation ``kind`` and the map
    taking its dequantized weight back to the original coordinates.

    With ``W' = Lᵀ W D R`` and ``H' = Rᵀ D⁻¹ H D⁻¹ R`` (``D`` a folded norm scale or ``I``; ``L``
    a rotation of the output rows or ``I``), the loss of ``Q'`` equals the original loss of
    ``back(Q') = L Q' Rᵀ D⁻¹``."""
    W, H = layer["weight"].double(), layer["hessian"].double()
    size, scale, R, L = W.shape[1], torch.ones(W.shape[1], dtype=torch.float64), None, None
    if kind == "hadamard-64":
        R = block_hadamard(size, group_size, seed + layer["index"])
    elif kind == "orthogonal":
        R = random_orthogonal(size, seed + layer["index"])
    elif kind == "fused" and layer["kind"] in RESIDUAL_READERS:
        scale = norms[f"model.layers.{layer['block']}.{RESIDUAL_READERS[layer['kind']]}.weight"]
        if (scale == 0).any():
            raise ValueError(f"{layer['name']}: a zero RMSNorm scale cannot be folded")
        R = random_orthogonal(size, seed)  # one residual-stream rotation for every layer
    elif kind not in ("none", "fused"):
        raise ValueError(f"unknown rotation {kind!r}")
    if kind == "fused":
        # One head's Hadamard for every head: the query heads sharing a KV head must agree.
        def per_head(width):
            return torch.block_diag(*[block_hadamard(head_dim, head_dim, seed)] * (width // head_dim))
        if layer["kind"] == "v_proj":
            L = per_head(W.shape[0])
        if layer["kind"] == "o_proj":
            R = per_head(size)
        if layer["kind"] in ("o_proj", "down_proj"):
            L = random_orthogonal(W.shape[0], seed)  # the residual stream's R1, as above
    W, H = W * scale[None, :], H / (scale[:, None] * scale[None, :])
    if R is not None:
        W, H = W @ R, R.T @ H @ R
    if L is not None:
        W = L.T @ W

    def back(q: torch.Tensor) -> torch.Tensor:
        q = q.double() if L is None else L @ q.double()
        q = q if R is None else q @ R.T
        return (q / scale[None, :]).float()
    return W.float(), H.float(), back


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--blocks", type=int, nargs="+", default=[12, 24])
    kinds = ["none", "hadamard-64", "orthogonal", "fused"]
    parser.add_argument("--rotations", nargs="+", default=kinds, choices=kinds)
    parser.add_argument("--head-dim", type=int, default=64, help="SmolLM2-135M's head size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the rotations' randomness")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    layers = [dict(layer, index=i) for i, layer in enumerate(load_real_layers(blocks=args.blocks))]
    norms = norm_scales(args.blocks)
    problems = {}  # (layer index, rotation): (W', H', back, seconds to build) — the same at every bits
    for layer in layers:
        for kind in args.rotations:
            t = time.perf_counter()
            problem = rotated_problem(kind, layer, args.group_size, args.seed, args.head_dim, norms)
            problems[layer["index"], kind] = (*problem, time.perf_counter() - t)
    settings = SolverSettings()
    names = ["rtn", "gptq_act", "gptq_act_polish", "admmq"]

    lines = [
        "# Rotations composed with the solvers (SmolLM2-135M layers, not shipped)", "",
        f"- blocks {args.blocks}, {len(layers)} linears; Hessians from "
        f"{layers[0]['num_tokens']} WikiText-2 tokens (second half of the test file)",
        f"- grid: asymmetric, group {args.group_size}, min-max, fitted to the (rotated) weight; "
        f"rotations seeded with {args.seed} (+ the layer's index, "
        "except `fused`'s, shared as a served model shares them)",
        "- every loss in the original coordinates, over act-order GPTQ's loss without rotation on "
        "the same layer; time over that GPTQ's solver time (the rotation's own cost included); "
        "the methods as `layer_quality.py` runs them",
        f"- ADMM-Q and the polish: the shipped defaults; machine: "
        f"{platform.processor() or platform.machine()}, torch threads {args.threads}, "
        f"torch {torch.__version__}; one run (solvers deterministic, one calibration draw)",
        "",
    ]
    for bits in args.bits:
        spec = GridSpec(bits=bits, group_size=args.group_size, symmetric=False)
        ratio = {(k, m): [] for k in args.rotations for m in names}
        seconds = {(k, m): 0.0 for k in args.rotations for m in names}
        base_seconds = 0.0
        for layer in layers:
            W, H = layer["weight"].float(), layer["hessian"].float()
            reference = gptq(W, H, fit_grid(W, spec))
            base = relative_loss(reference.weight, W, H)
            base_seconds += reference.seconds
            for kind in args.rotations:
                Wr, Hr, back, rotate_seconds = problems[layer["index"], kind]
                res = run_layer(Wr, Hr, fit_grid(Wr, spec), settings)
                for m in names:
                    ratio[kind, m].append(relative_loss(back(res["weights"][m]), W, H) / base)
                    seconds[kind, m] += res[m][1] + rotate_seconds
            print(f"{bits}-bit {layer['name']}: " + ", ".join(
                f"{k}/{m} {ratio[k, m][-1]:.3f}" for k in args.rotations
                for m in ("gptq_act", "admmq")), file=sys.stderr, flush=True)
        lines += [f"## {bits} bits", "",
                  "| rotation | method | mean loss / gptq_act (no rotation) | min–max | "
                  "time / gptq_act |", "|---|---|---|---|---|"]
        for kind in args.rotations:
            for m in names:
                r = ratio[kind, m]
                lines.append(f"| {kind} | {m} | {statistics.fmean(r):.4f} | "
                             f"{min(r):.3f}–{max(r):.3f} | {seconds[kind, m] / base_seconds:.2f} |")
        lines.append("")
    lines.append(f"The whole run took {time.perf_counter() - started:.1f}s.")
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "rotation_ideas.md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
