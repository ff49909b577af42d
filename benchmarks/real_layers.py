"""Real layer problems for solver benchmarks: SmolLM2-135M weights with WikiText-2 Hessians.

Each problem is one ``nn.Linear`` of a decoder block — its float32 weight and the Hessian
``H = X Xᵀ / N`` of its inputs — so solvers can be compared on the matrices they will actually
meet (outlier channels, near-singular H) instead of synthetic ones.

The Hessians come from the *float* model: no block is quantized before another is measured, so a
problem does not depend on the bit width or solver used upstream, and one capture serves every
benchmark. Calibration windows are drawn from the second half of the WikiText-2 test file; the
first half is left for perplexity evaluation (see ``admmq_dist.model.calibration.split_text``).

Run ``python benchmarks/real_layers.py`` to capture (1-2.5 min cold on two CPU cores, plus ~25 s
the first time the embedded model is converted) and print a summary; results are cached under
``benchmarks/.cache``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from admmq_dist.model.calibration import read_text, split_text, token_windows
from admmq_dist.model.embedded import embedded_model_folder
from admmq_dist.quant.hessian import HessianAccumulator

BENCHMARKS_DIR = Path(__file__).resolve().parent
# ../shared/data relative to the repository root (the machines have no hub access).
WIKITEXT_TEST = BENCHMARKS_DIR.parent.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
DEFAULT_CACHE_DIR = BENCHMARKS_DIR / ".cache"
# Six of SmolLM2's 30 blocks, first and last included: early, middle and late layers differ a lot
# in activation statistics (massive activations appear after the first blocks).
DEFAULT_BLOCKS = (0, 6, 12, 18, 24, 29)
# 64 windows x 512 tokens = 32768 tokens, 21x the widest input (down_proj, 1536): enough for
# well-determined Hessians, and a cold capture stays ~1-2.5 min on two (shared) CPU cores; 128
# windows took 3-4.5 min there when other jobs competed for the cores (~1.5 min when idle).
DEFAULT_NUM_SAMPLES = 64
MICRO_BATCH = 8  # windows per forward pass; also the Hessian accumulator's batch unit
# Bump when what is captured or how changes, so stale caches are not reused.
CACHE_VERSION = 1


class _StopForward(Exception):
    """Raised after the last chosen block: nothing later (final norm, lm_head) is needed."""


def load_real_layers(bits_independent: bool = True, blocks: list[int] | None = None,
                     num_samples: int = DEFAULT_NUM_SAMPLES, seq_len: int = 512, seed: int = 0,
                     cache_dir: Path | None = None) -> list[dict]:
    """Every ``nn.Linear`` of the chosen SmolLM2-135M blocks, with its WikiText-2 Hessian.

    Returns one dict per linear, in model order::

        {"name": "model.layers.3.self_attn.q_proj", "block": 3, "kind": "q_proj",
         "weight": float32 [out, in], "hessian": float32 [in, in], "num_tokens": int}

    ``bits_independent=True`` (the only mode implemented) captures Hessians from the float model,
    so the problems are the same whatever bit width is benchmarked; a sequential capture (each
    block's inputs from already-quantized earlier blocks) would depend on the bits and solver.
    ``blocks`` defaults to :data:`DEFAULT_BLOCKS`. Results are cached in ``cache_dir`` (default
    ``benchmarks/.cache``) keyed by blocks, sample count, window length and seed.
    """
    if not bits_independent:
        raise NotImplementedError(
            "only float-model (bit-independent) Hessians are implemented; sequential capture "
            "through quantized blocks is not"
        )
    blocks = sorted(set(DEFAULT_BLOCKS if blocks is None else blocks))
    if not blocks:
        raise ValueError("choose at least one block")
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    path = cache_dir / _cache_name(blocks, num_samples, seq_len, seed)
    if path.is_file():
        return torch.load(path, weights_only=True)["layers"]

    layers = capture_layers(blocks, num_samples, seq_len, seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Temporary file, then rename: a killed run never leaves a truncated cache entry.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=cache_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"version": CACHE_VERSION, "layers": layers}, f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return layers


def losses_under(variants: dict, blocks: str, grid_spec, solver) -> list[tuple[str, int, dict]]:
    """Every linear of ``blocks`` ("0,12,29") solved by the shipped ``solve()`` once per variant
    (name -> a callable returning the context the solve runs in, e.g. a ``mock.patch.object``
    that swaps one piece), on the grid ``grid_spec`` fits to its weight: ``(name, width,
    {variant: final loss})`` per linear, printed as they come."""
    from admmq_dist.quant.grid import fit_grid
    from admmq_dist.quant.solvers.solve import solve

    rows = []
    for layer in load_real_layers(blocks=[int(b) for b in blocks.split(",")], num_samples=64):
        weight, hessian = layer["weight"], layer["hessian"]
        grid = fit_grid(weight, grid_spec)
        losses = {}
        for name, context in variants.items():
            with context():
                losses[name] = solve(weight, hessian, grid, solver).loss
        rows.append((layer["name"], weight.shape[1], losses))
        print(*rows[-1], flush=True)
    return rows


def one_per_hessian(layers: list[dict]) -> list[dict]:
    """The layers with a Hessian of their own: k/v share q's, up shares gate's."""
    return [layer for layer in layers if layer["kind"] not in ("k_proj", "v_proj", "up_proj")]


def _cache_name(blocks: list[int], num_samples: int, seq_len: int, seed: int) -> str:
    block_key = "-".join(map(str, blocks))
    return f"smollm2-135m_v{CACHE_VERSION}_b{block_key}_n{num_samples}_s{seq_len}_seed{seed}.pt"


def calibration_windows(tokenizer, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Token windows from the second half of WikiText-2 test (the first half is for evaluation)."""
    if not WIKITEXT_TEST.is_file():
        raise FileNotFoundError(
            f"WikiText-2 test file not found at {WIKITEXT_TEST} (expected ../shared/data/"
            "wikitext-2-raw/wiki.test.raw relative to the repository root)"
        )
    _, calibration_text = split_text(read_text(str(WIKITEXT_TEST)), 0.5)
    return token_windows(tokenizer, calibration_text, num_samples, seq_len, seed)


def capture_layers(blocks: list[int], num_samples: int, seq_len: int, seed: int) -> list[dict]:
    """Run the calibration windows through the float model and collect each target linear's H."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = embedded_model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to("cpu").eval()
    decoder_layers = model.model.layers
    bad = [b for b in blocks if not 0 <= b < len(decoder_layers)]
    if bad:
        raise ValueError(f"blocks {bad} out of range: the model has {len(decoder_layers)} blocks")

    windows = calibration_windows(tokenizer, num_samples, seq_len, seed)
    targets = {  # full name -> (block, kind, module), in model order
        f"model.layers.{b}.{name}": (b, name.rsplit(".", 1)[-1], module)
        for b in blocks
        for name, module in decoder_layers[b].named_modules()
        if isinstance(module, nn.Linear)
    }
    accumulators = {name: HessianAccumulator(module.in_features, "cpu")
                    for name, (_, _, module) in targets.items()}
    # The hooks read the current micro-batch's global index from here.
    batch = {"index": 0}

    def feed(name):
        def hook(module, args):
            accumulators[name].add(args[0], batch["index"])
        return hook

    def stop(module, args, output):
        raise _StopForward

    handles = [module.register_forward_pre_hook(feed(name))
               for name, (_, _, module) in targets.items()]
    handles.append(decoder_layers[blocks[-1]].register_forward_hook(stop))
    try:
        with torch.no_grad():
            for index, start in enumerate(range(0, num_samples, MICRO_BATCH)):
                batch["index"] = index
                try:
                    model(input_ids=windows[start:start + MICRO_BATCH], use_cache=False)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()

    return [
        {"name": name, "block": block, "kind": kind,
         "weight": module.weight.detach().to(torch.float32).clone(),
         "hessian": accumulators[name].hessian(),
         "num_tokens": accumulators[name].num_rows}
        for name, (block, kind, module) in targets.items()
    ]


def _diag_ratio(hessian: torch.Tensor) -> float:
    diag = torch.diagonal(hessian)
    return float(diag.max() / diag.min()) if diag.min() > 0 else float("inf")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=list(DEFAULT_BLOCKS))
    parser.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args(argv)

    cached = (args.cache_dir / _cache_name(sorted(set(args.blocks)), args.num_samples,
                                           args.seq_len, args.seed)).is_file()
    started = time.perf_counter()
    layers = load_real_layers(blocks=args.blocks, num_samples=args.num_samples,
                              seq_len=args.seq_len, seed=args.seed, cache_dir=args.cache_dir)
    elapsed = time.perf_counter() - started

    print(f"SmolLM2-135M-Instruct (embedded GGUF, float32), Hessians from the float model; "
          f"calibration: {args.num_samples} windows x {args.seq_len} tokens (seed {args.seed}) from "
          "the second half of WikiText-2 test (first half reserved for evaluation)")
    print(f"{'loaded from cache' if cached else 'captured'} in {elapsed:.1f} s "
          f"on {torch.get_num_threads()} CPU threads\n")
    print(f"{'name':<36} {'shape':>12} {'tokens':>7} {'diag(H) max':>12} {'diag(H) min':>12} "
          f"{'max/min':>10}")
    for layer in layers:
        diag = torch.diagonal(layer["hessian"])
        shape = "x".join(map(str, layer["weight"].shape))
        print(f"{layer['name']:<36} {shape:>12} {layer['num_tokens']:>7} {diag.max():>12.4g} "
              f"{diag.min():>12.4g} {_diag_ratio(layer['hessian']):>10.3g}")


if __name__ == "__main__":
    # Everything is local; never let a library reach for the Hugging Face hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
