"""What serves where: the layouts the writer produces and the engines that load them.

Measured, not assumed. vLLM's side is ``benchmarks/results/vllm_kernels.md``: vLLM's own model
classes built at real shapes (Llama-3.1-8B/70B, Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V2-Lite)
for every layout, with its kernel choice made as on an H100/H200 (sm90) and an A100 (sm80);
``tests/test_vllm.py`` checks these rules against vLLM itself, and loads real checkpoints through
vLLM's weight loaders. transformers' side is the load tests in ``tests/test_checkpoint.py`` and
``tests/test_moe.py``. The pipeline warns (or refuses, when no engine serves a layout) before any
work; ``admmq inspect`` prints the same verdicts for a written checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

# The vLLM release the conformance check (tests/test_vllm.py) and the kernel table ran with.
VLLM_VERSION = "0.33.0"
VLLM = f"vLLM {VLLM_VERSION}"
SM90, SM80 = "H100/H200 (sm90)", "A100 (sm80)"
SM100 = "B200 (sm100)"  # the conformance check chooses FP4 kernels as there too


@dataclass(frozen=True)
class Layout:
    """A checkpoint's quantization layout, as engines see it."""

    format: str  # "compressed-tensors" or "gptq"
    bits: int
    symmetric: bool
    group_size: int | None  # None: one scale per output channel
    experts: bool  # the model has mixture-of-experts layers (quantized experts)
    kind: str = "int"  # the grid: "int", or an FP4 format ("nvfp4", "mxfp4")

    def describe(self) -> str:
        kind = "mixture-of-experts " if self.experts else ""
        if self.kind != "int":
            return f"{self.kind} {kind}{self.format}"
        grid = f"group {self.group_size}" if self.group_size else "per-channel"
        sym = "symmetric" if self.symmetric else "asymmetric"
        return f"{self.bits}-bit {sym} {grid} {kind}{self.format}"


def vllm_gaps(layout: Layout) -> dict[str, str]:
    """GPUs vLLM cannot serve ``layout`` on (``SM90``/``SM80`` -> why); empty when it serves it."""
    everywhere = (SM90, SM80)
    if layout.kind != "int":
        # CompressedTensorsW4A4Fp4(use_a16) and CompressedTensorsW4A4Mxfp4 (weight-only through
        # Marlin below sm100) and their MoE methods: capability 75 and up.
        return {}
    if layout.format == "gptq":
        if layout.bits not in (4, 8):
            return dict.fromkeys(everywhere, f"its GPTQ path takes 4 and 8 bits, not "
                                 f"{layout.bits} (refused at startup)")
        return {}
    if not layout.experts:
        return {}
    if layout.bits == 8 and not layout.symmetric:
        return dict.fromkeys(everywhere, "no MoE kernel takes 8-bit experts with zero points")
    if layout.group_size is None:
        if layout.bits == 4 and not layout.symmetric:
            return {}
        if layout.bits in (4, 8) and layout.symmetric:
            return {SM90: "its sm90 MoE kernel (Humming) takes grouped scales only"}
        return dict.fromkeys(everywhere, f"its {layout.bits}-bit MoE kernel (Humming) takes "
                             "grouped scales only")
    return {}


def transformers_gap(layout: Layout) -> str | None:
    """Why transformers cannot load ``layout`` correctly, or None when it can."""
    if layout.kind == "nvfp4" and layout.experts:
        return ("transformers' expert loader ignores NVFP4's weight_global_scale (experts load "
                "multiplied by it; tests/test_fp4_checkpoint.py); vLLM serves it")
    if layout.format == "compressed-tensors" and layout.experts and not layout.symmetric:
        return ("transformers reads no zero points of mixture-of-experts experts (its expert "
                "loader unpacks weights and scales only; open upstream: transformers PR #47430)")
    return None


def served_by(layout: Layout) -> dict[str, str]:
    """One verdict per engine: ``"yes"`` or ``"no: <why>"`` / ``"not on <GPU>: <why>"``."""
    gaps = vllm_gaps(layout)
    if not gaps:
        vllm = "yes"
    elif len(gaps) == 2:
        vllm = f"no: {next(iter(gaps.values()))}"
    else:
        vllm = "; ".join(f"not on {gpu}: {why}" for gpu, why in gaps.items())
    reader = "transformers" if layout.format == "compressed-tensors" else \
        "transformers + GPTQModel"
    gap = transformers_gap(layout)
    return {VLLM: vllm, reader: "yes" if gap is None else f"no: {gap}"}


def default_symmetric(fmt: str, experts: bool) -> tuple[bool, str | None]:
    """The grid's symmetry when the recipe leaves it open, and why, when it is not the
    asymmetric default (zero points cost little and quantize better)."""
    if fmt == "gptq":
        return True, ("symmetric grid: GPTQ v1 stores zero - 1 and cannot hold asymmetric "
                      "grids whose zero point is 0")
    if experts:
        return True, ("symmetric grid: a mixture-of-experts model, and transformers reads no "
                      "expert zero points (vLLM does: pass --asym for a vLLM-only checkpoint)")
    return False, None


def check_servable(layout: Layout) -> list[str]:
    """Warnings (one line each) for engines that will not serve ``layout``; raises ValueError
    when none does, naming the combination and what would serve."""
    if layout.format == "gptq" and not layout.symmetric:
        raise ValueError("GPTQ v1 stores zero - 1 and cannot hold asymmetric grids whose zero "
                         "point is 0; use --sym, or --format compressed-tensors")
    verdicts = served_by(layout)
    if all(v.startswith("no") for v in verdicts.values()):
        fix = ("use --sym" if not layout.symmetric else
               "use --group-size 128" if layout.group_size is None else
               "use --format compressed-tensors")
        raise ValueError(
            f"no engine serves {layout.describe()} checkpoints ("
            + "; ".join(f"{engine}: {why[4:]}" for engine, why in verdicts.items())
            + f"); {fix}")
    warnings = []
    for engine, verdict in verdicts.items():
        if verdict == "yes":
            continue
        if engine == VLLM and layout.format == "gptq":
            verdict += (f"; vLLM serves {layout.bits}-bit as --format compressed-tensors "
                        "(Humming kernel)")
        warnings.append(f"{engine} will not serve this {layout.describe()} checkpoint: "
                        f"{verdict.removeprefix('no: ')}")
    return warnings
