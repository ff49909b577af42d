"""One decoder block at real Llama shapes: what each piece of ADMM-Q and of act-order GPTQ costs,
measured in the same run, and a whole-model cost model built from those measured rates.

Synthetic but realistic inputs (there is no 1B-70B checkpoint on this machine): per Hessian,
calibration-like activations with a low-rank correlated part, log-normal channel scales and a
few 20x outlier channels (as ``tests/conftest.synthetic_layer``), ``H = XᵀX / N`` from ``N = 2n``
tokens; weights ``N(0, 0.02²)``. One canonical row block (``--rows``, default 512) of every linear
is solved — row blocks are independent and cost the same, so a layer's time is its factorizations
plus ``ceil(rows / 512)`` times a row block's. Pieces timed: a decoder block's forward (a real
``LlamaDecoderLayer``), Hessian capture (per 1,024 tokens), the factorizations (float64 ``eigh``
for ADMM-Q's exact W-update, GPTQ's Cholesky), GPTQ's start (which is act-order GPTQ itself),
ADMM-Q's iterations with the exact and with the CG W-update, the local-search polish; with
``--tf32`` the iterations again with TF32 GEMMs. Transfers: bytes, from the run report's
accounting (``benchmarks/cost_model.py``); no network here to time them.

    python benchmarks/layer_shapes.py                     # Llama-3.2-1B shapes on this CPU
    python benchmarks/layer_shapes.py --shapes 70b --device cuda   # on a GPU (gpu_check.sh)
    python benchmarks/layer_shapes.py --quick             # smaller widths, for a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from admmq_dist.quant.factors import HessianFactors  # noqa: E402
from admmq_dist.quant.grid import GridSpec, fit_grid  # noqa: E402
from admmq_dist.quant.hessian import HessianAccumulator  # noqa: E402
from admmq_dist.quant.solvers import admmq, gptq, local_search  # noqa: E402
from admmq_dist.quant.solvers.admmq import products_in  # noqa: E402
from admmq_dist.quant.solvers.solve import SolverSettings  # noqa: E402
import cost_model  # noqa: E402
from environment import describe, settings_record  # noqa: E402

# hidden, intermediate, heads, kv heads, head dim, decoder blocks (Llama-3 family).
# Rounds the coordinated schedule is costed at: as many as it ran on SmolLM2 before its stop
# rule ended it (benchmarks/results/schedules_slice.md: 7 rounds on the 8-block slice), not its
# budget.
COORDINATED_ROUNDS = 7

SHAPES = {
    "quick": (512, 2048, 8, 2, 64, 16),
    "1b": (2048, 8192, 32, 8, 64, 16),
    "8b": (4096, 14336, 32, 8, 128, 32),
    "70b": (8192, 28672, 64, 8, 128, 80),
}


def block_linears(shape) -> list[tuple[str, int, int, str]]:
    """``(linear, rows, cols, Hessian)``: q/k/v and gate/up share their Hessians."""
    hidden, inter, heads, kv, head_dim, _ = shape
    return [("q_proj", heads * head_dim, hidden, "attn_in"),
            ("k_proj", kv * head_dim, hidden, "attn_in"),
            ("v_proj", kv * head_dim, hidden, "attn_in"),
            ("o_proj", hidden, heads * head_dim, "o_in"),
            ("gate_proj", inter, hidden, "mlp_in"), ("up_proj", inter, hidden, "mlp_in"),
            ("down_proj", hidden, inter, "down_in")]


def synthetic_activations(n: int, tokens: int, seed: int, device) -> torch.Tensor:
    """Generated on ``device`` (at 70B widths the CPU would take longer than the solve)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rank = max(n // 4, 1)
    x = torch.randn(tokens, rank, generator=g, device=device) @ (
        torch.randn(rank, n, generator=g, device=device) / rank**0.5)
    x += 0.3 * torch.randn(tokens, n, generator=g, device=device)
    chan = torch.exp(0.5 * torch.randn(n, generator=g, device=device))
    chan[torch.randperm(n, generator=g, device=device)[:max(n // 512, 4)]] *= 20
    return x * chan


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t


def measure_forward(shape, device, seq_len: int = 2048) -> float:
    """Seconds per 1,024 tokens of one Llama decoder block's forward (bfloat16 on a GPU, float32
    on the CPU), on one ``seq_len`` sequence after a warm-up."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    hidden, inter, heads, kv, head_dim, _ = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=head_dim, num_hidden_layers=1,
                         max_position_embeddings=seq_len)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        layer = LlamaDecoderLayer(config, 0).to(dtype).eval()
        rotary = LlamaRotaryEmbedding(config)
    x = torch.randn(1, seq_len, hidden, device=device, dtype=dtype)
    positions = torch.arange(seq_len, device=device)[None]
    with torch.no_grad():
        cos_sin = rotary(x, positions)
        for _ in range(2):  # the first call warms the kernels up
            _, seconds = timed(lambda: layer(x, position_embeddings=cos_sin,
                                             position_ids=positions), device)
    return seconds * 1024 / seq_len


def measure_hessian(n: int, seed: int, device) -> dict:
    x = synthetic_activations(n, 2 * n, seed, device)
    acc = HessianAccumulator(n, device)
    chunk = 1024
    _, seconds = timed(lambda: acc.add(x[:chunk], 0), device)
    for i, start in enumerate(range(chunk, x.shape[0], chunk)):
        acc.add(x[start:start + chunk], i + 1)
    x = None  # before the factorizations: at 70B widths the activations are 6.6 GB
    hessian = acc.hessian()
    factors = HessianFactors(hessian)
    _, eigh = timed(factors.eigen, device)
    settings = SolverSettings()
    _, chol = timed(lambda: factors.gptq(True, settings.gptq.damp,
                                         settings.gptq.damp_retry_factor,
                                         settings.gptq.damp_retries), device)
    return {"hessian": hessian, "factors": factors,
            "capture_per_1k_tokens": seconds, "eigh": eigh, "cholesky": chol}


def run_admmq(weight, H, grid, factors, start, w_update: str, device) -> tuple:
    settings = SolverSettings()
    admm = dataclasses.replace(settings.admm, w_update=w_update)
    run, seconds = timed(lambda: admmq(weight, H, grid, admm, init_codes=start.codes,
                                       factors=factors), device)
    polished, t_ls = timed(lambda: local_search(weight, H, grid, run.codes, settings.sweeps,
                                                method="admmq"), device)
    return run, seconds, polished, t_ls


def measure_linear(name: str, rows: int, cols: int, key: str, hess: dict, args,
                   seed: int) -> dict:
    """One ``--rows`` row block of a linear: GPTQ's start (act-order GPTQ itself: the same run),
    ADMM-Q's iterations with the exact and the CG W-update, each polished; with ``--tf32`` the
    iterations again with TF32 GEMMs."""
    device = hess["hessian"].device
    g = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(min(rows, args.rows), cols, generator=g, device=device) * 0.02
    grid = fit_grid(weight, GridSpec(bits=args.bits, group_size=args.group_size))
    settings = SolverSettings()
    H, factors = hess["hessian"], hess["factors"]
    start, t_start = timed(lambda: gptq(weight, H, grid, settings.gptq, factors), device)
    out = {"linear": name, "rows": rows, "cols": cols, "hessian_key": key,
           "group_size": args.group_size, "rows_solved": weight.shape[0],
           "default_w_update": settings.admm.w_update_for(cols),
           "gptq_start_s": t_start, "gptq_s": t_start, "loss_gptq": start.loss}
    for w_update in ("exact", "cg"):
        run, seconds, polished, t_ls = run_admmq(weight, H, grid, factors, start, w_update, device)
        out |= {f"{w_update}_iterations": run.iterations, f"{w_update}_iterations_s": seconds,
                f"loss_{w_update}": polished.loss,
                f"loss_ratio_{w_update}": polished.loss / start.loss}
        if w_update == "exact":
            out["local_search_s"] = t_ls
        if args.tf32:
            with products_in("tf32", device):  # as solver.admm.products sets it
                fast, fast_s, fast_pol, _ = run_admmq(weight, H, grid, factors, start,
                                                       w_update, device)
            out |= {f"{w_update}_tf32_iterations_s": fast_s,
                    f"tf32_loss_change_{w_update}": fast_pol.loss / polished.loss - 1}
    default = out["default_w_update"]
    out["loss_ratio"] = out[f"loss_ratio_{default}"]
    return out


def method_of_default(r: dict) -> str:
    return r["default_w_update"]


def models(rows, hessians, forward_per_1k, shape, tokens) -> dict:
    """Whole-model seconds by schedule and method, for 1, 8 and 64 workers."""
    blocks, hidden = shape[5], shape[0]
    rounds = SolverSettings().rounds
    coordinated_rounds = COORDINATED_ROUNDS
    out = {}
    for label, method_of in (("ADMM-Q", method_of_default), ("ADMM-Q exact", lambda r: "exact"),
                             ("GPTQ", lambda r: "gptq")):
        for workers in (1, 8, 64):
            out[(label, "sequential", workers)] = cost_model.sequential(
                rows, hessians, method_of, workers, tokens, blocks, forward_per_1k)
            if label != "GPTQ":
                out[(label, "depth-parallel", workers)] = cost_model.depth_parallel(
                    rows, hessians, method_of, workers, tokens, blocks, forward_per_1k, rounds,
                    hidden)
                for start, name in ((False, "coordinated"),
                                    (True, "coordinated, sequential start")):
                    out[(label, name, workers)] = cost_model.coordinated(
                        rows, hessians, method_of, workers, tokens, blocks, forward_per_1k,
                        coordinated_rounds, SolverSettings().coordinated_iterations, hidden,
                        sequential_start=start)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--quick", action="store_true", help="--shapes quick")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=512, help="rows solved per linear")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128 * 2048,
                        help="calibration tokens the block costs are modelled for")
    parser.add_argument("--tf32", action="store_true",
                        help="also run the iterations with TF32 GEMMs (CUDA) and compare losses")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    shapes = "quick" if args.quick else args.shapes
    device = torch.device(args.device)
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.manual_seed(0)
    shape = SHAPES[shapes]
    linears = block_linears(shape)
    print("decoder block forward...", file=sys.stderr, flush=True)
    forward_per_1k = measure_forward(shape, device)
    widths = {key: cols for _, _, cols, key in linears}
    hessians, rows = {}, []
    for i, (key, n) in enumerate(widths.items()):
        print(f"Hessian {key} ({n} wide)...", file=sys.stderr, flush=True)
        hessians[key] = measure_hessian(n, seed=i, device=device)
    for i, (name, r, c, key) in enumerate(linears):
        print(f"{name} [{r} x {c}]...", file=sys.stderr, flush=True)
        rows.append(measure_linear(name, r, c, key, hessians[key], args, seed=100 + i))
    predicted = models(rows, hessians, forward_per_1k, shape, args.tokens)
    report(args, shapes, hessians, rows, forward_per_1k, predicted, device)
    return 0


def one_block(rows, hessians, method_of) -> float:
    """Solve seconds of a whole decoder block on one worker: factorizations and row blocks."""
    return sum(cost_model.stage_seconds(stage, hessians[stage[0]["hessian_key"]], method_of, 1,
                                        512)[0] for stage in cost_model.stages(rows))


def report(args, shapes, hessians, rows, forward_per_1k, predicted, device) -> None:
    mean = {k: sum(r[f"loss_ratio_{k}"] for r in rows) / len(rows) for k in ("exact", "cg")}
    mean["default"] = sum(r["loss_ratio"] for r in rows) / len(rows)
    solve = {"ADMM-Q": one_block(rows, hessians, method_of_default),
             "exact": one_block(rows, hessians, lambda r: "exact"),
             "cg": one_block(rows, hessians, lambda r: "cg"),
             "GPTQ": one_block(rows, hessians, lambda r: "gptq")}
    record = settings_record({"grid": {"bits": args.bits, "group_size": args.group_size,
                                       "symmetric": GridSpec().symmetric}},
                             sections=("grid", "solver"))
    lines = [f"# Llama-shaped decoder block ({shapes}), {args.bits}-bit group {args.group_size}, "
             f"on {device}", "",
             f"`benchmarks/layer_shapes.py --shapes {shapes} --device {device}"
             f"{' --tf32' if args.tf32 else ''}`; one run; {describe()}. {args.rows} rows of "
             "every linear solved (a canonical row block); whole-layer figures multiply by the "
             "row blocks. Synthetic activations (low-rank + log-normal channels + outliers). "
             f"Block forward: {forward_per_1k:.3f} s per 1,024 tokens.", "",
             record, "",
             "| Hessian | width | eigh s | Cholesky s | capture s / 1k tokens |",
             "|---|---|---|---|---|"]
    lines += [f"| {k} | {h['hessian'].shape[0]} | {h['eigh']:.2f} | {h['cholesky']:.2f} | "
              f"{h['capture_per_1k_tokens']:.3f} |" for k, h in hessians.items()]
    lines += ["", "| linear | shape | GPTQ start = act-order GPTQ s | exact: iterations (s) | "
              "CG: iterations (s) | local search s | loss / GPTQ exact | loss / GPTQ CG | "
              "default |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['linear']} | {r['rows']}x{r['cols']} | {r['gptq_s']:.2f} | "
              f"{r['exact_iterations']} ({r['exact_iterations_s']:.2f}) | "
              f"{r['cg_iterations']} ({r['cg_iterations_s']:.2f}) | {r['local_search_s']:.2f} | "
              f"{r['loss_ratio_exact']:.3f} | {r['loss_ratio_cg']:.3f} | "
              f"{r['default_w_update']} |" for r in rows]
    lines += ["", "Break-even: the CG W-update is the faster for a worker that solves fewer rows "
              "of a Hessian than " + ", ".join(
                  f"{k} {break_even(k, rows, hessians):.0f}" for k in hessians) + " (the eigh "
              "against the CG's extra iteration time per row)."]
    if args.tf32:
        lines += ["", "TF32 GEMMs in the iterations, loss change against float32 (iteration "
                  "time ratio): " + "; ".join(
                      f"{r['linear']} exact {100 * r['tf32_loss_change_exact']:+.2f}% "
                      f"({r['exact_tf32_iterations_s'] / r['exact_iterations_s']:.2f}x), CG "
                      f"{100 * r['tf32_loss_change_cg']:+.2f}% "
                      f"({r['cg_tf32_iterations_s'] / r['cg_iterations_s']:.2f}x)" for r in rows)
                  + "."]
    lines += ["", f"Solve per decoder block, one worker (factorizations, GPTQ start, iterations, "
              f"polish): ADMM-Q (default W-updates) {solve['ADMM-Q']:.0f} s, exact everywhere "
              f"{solve['exact']:.0f} s, CG everywhere {solve['cg']:.0f} s; act-order GPTQ "
              f"{solve['GPTQ']:.0f} s: ratio **{solve['ADMM-Q'] / solve['GPTQ']:.1f}x**. Mean "
              f"layer loss / GPTQ's: default **{mean['default']:.3f}**, exact "
              f"{mean['exact']:.3f}, CG {mean['cg']:.3f}.", "",
              f"## Modelled whole model ({SHAPES[shapes][5]} blocks, {args.tokens} calibration tokens) "
              f"from this run's rates on {device}", "",
              "`benchmarks/cost_model.py` says what is modelled; transfers at an assumed "
              f"{cost_model.LINK_BYTES_PER_S / 1e9:.0f} GB/s.", ""]
    lines += cost_model.table(predicted)
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.output or ROOT / "benchmarks" / "results" / f"layer_shapes_{shapes}_{device.type}.md"
    out.write_text(text)
    (out.with_suffix(".json")).write_text(json.dumps(
        {"settings": record, "rows": rows, "forward_per_1k_tokens": forward_per_1k,
         "solve_per_block": solve,
         "mean_loss_ratio": mean,
         "model_hours": {" / ".join(map(str, k)): v["total"] / 3600 for k, v in predicted.items()},
         "hessians": {k: {kk: v for kk, v in h.items() if kk not in ("hessian", "factors")}
                      for k, h in hessians.items()}}, indent=1))
    print(f"wrote {out}", file=sys.stderr)


def break_even(key: str, rows: list[dict], hessians: dict) -> float:
    """Rows of Hessian ``key`` per worker below which CG (no eigh) is the faster."""
    mine = [r for r in rows if r["hessian_key"] == key]
    extra = sum(r["cg_iterations_s"] - r["exact_iterations_s"] for r in mine) / sum(
        r["rows_solved"] for r in mine)
    return hessians[key]["eigh"] / extra if extra > 0 else float("inf")


if __name__ == "__main__":
    sys.exit(main())
