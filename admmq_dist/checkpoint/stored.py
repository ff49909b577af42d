"""What the writer accepts, and the scale and zero point it stores: every check that a layout can
hold a layer exactly (bits, group size, widths, codes in range, integer zero points, scales that
stay positive and finite in the stored dtype) happens here, before anything is packed."""

from __future__ import annotations

import torch

from admmq_dist.checkpoint import fp4_layout
from admmq_dist.checkpoint.formats import FORMATS, layer_tensors, matches_ignore
from admmq_dist.quant.grid import GRID_KINDS, SUPPORTED_BITS, Grid, GridSpec

MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_settings(format, bits, group_size, symmetric, dtype, max_shard_bytes,
                   kind="int") -> None:
    """Refuse writer settings no layout can hold."""
    if kind not in GRID_KINDS:
        raise ValueError(f"grid kind={kind!r} is not supported; choose one of {GRID_KINDS}")
    if kind != "int":
        if format != "compressed-tensors":
            raise ValueError(f"{kind} checkpoints are compressed-tensors only; use --format "
                             "compressed-tensors")
        GridSpec(bits=bits, group_size=group_size, symmetric=symmetric, kind=kind)
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not supported; choose one of {FORMATS}")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; choose one of {SUPPORTED_BITS}")
    if group_size is not None and (
            isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(
            f"group_size={group_size!r} must be a positive integer, or None for per-channel")
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric={symmetric!r} must be True or False")
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype={dtype} is not a model dtype; choose one of {MODEL_DTYPES}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r} must be a positive integer")
    if format == "gptq" and not symmetric:
        # v1 stores zero - 1 and every v1 reader (vLLM, gptqmodel, AutoGPTQ) adds the 1 back,
        # so an asymmetric group whose zero point is 0 silently dequantises wrong there.
        raise ValueError(
            "GPTQ v1 stores zero-1 and cannot represent asymmetric grids whose zero point is 0; "
            "use --format compressed-tensors or --sym")


def check_width(fmt: str, group_size: int | None, module: str, in_features: int) -> None:
    """Refuse a linear ``in_features`` wide that groups of ``group_size`` do not tile."""
    size = in_features if group_size is None else group_size
    if in_features % size != 0:
        raise ValueError(
            f"{module}: in_features={in_features} is not divisible by group_size={size}; "
            f"the last group would be ragged, which {fmt} cannot store. Choose a group "
            "size that divides every quantized layer's input width, use per-channel "
            f"quantization, or add {module!r} to the ignore list")


def check_grid(fmt: str, bits: int, group_size: int | None, module: str, grid: Grid,
               kind: str = "int") -> None:
    """``grid`` has the writer's kind, bits and group size, whole groups, and matching shapes."""
    if not isinstance(grid, Grid):
        raise TypeError(
            f"{module}: grid must be an admmq_dist.quant.grid.Grid, got {type(grid).__name__}")
    if grid.kind != kind:
        raise ValueError(f"{module}: grid is {grid.kind} but the writer writes {kind}")
    if grid.bits != bits:
        raise ValueError(f"{module}: grid has {grid.bits} bits but the writer writes {bits}-bit")
    rows, cols = grid.rows, grid.cols
    expected = cols if group_size is None else group_size
    if grid.group_size != expected:
        what = "per-channel" if group_size is None else f"group size {group_size}"
        raise ValueError(f"{module}: grid has group size {grid.group_size} but the writer "
                         f"writes {what}")
    check_width(fmt, group_size, module, cols)
    groups = cols // expected
    if tuple(grid.scale.shape) != (rows, groups) or tuple(grid.zero.shape) != (rows, groups):
        raise ValueError(
            f"{module}: grid scale/zero have shapes {tuple(grid.scale.shape)}/"
            f"{tuple(grid.zero.shape)}, expected ({rows}, {groups})")


def quantized_tensors(fmt: str, kind: str, bits: int, group_size: int | None, symmetric: bool,
                      dtype: torch.dtype, module: str, codes: torch.Tensor, grid: Grid
                      ) -> dict[str, torch.Tensor]:
    """What the layout stores for ``module`` (``codes`` ``[out, in]`` on ``grid``), every check
    made first."""
    check_grid(fmt, bits, group_size, module, grid, kind)
    check_codes(bits, module, codes, grid.rows, grid.cols)
    if kind != "int":
        return fp4_layout.layer_tensors(kind, module, codes, grid.scale, grid.global_scale)
    scale = stored_scale(fmt, dtype, module, grid)
    zero = stored_zero(bits, symmetric, module, grid)
    return layer_tensors(fmt, module, codes, scale, zero, bits, symmetric, grid.group_size)


def check_codes(bits: int, module: str, codes: torch.Tensor, rows: int, cols: int) -> None:
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError(f"{module}: codes must be a 2-D tensor [out, in]")
    if tuple(codes.shape) != (rows, cols):
        raise ValueError(f"{module}: codes have shape {tuple(codes.shape)}, grid is ({rows}, {cols})")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"{module}: codes must have an integer dtype, got {codes.dtype}")
    maxq = 2**bits - 1
    cmin, cmax = int(codes.min()), int(codes.max())
    if cmin < 0 or cmax > maxq:
        raise ValueError(
            f"{module}: codes must lie in [0, {maxq}] for {bits}-bit, got [{cmin}, {cmax}]")


def stored_zero(bits: int, symmetric: bool, module: str, grid: Grid) -> torch.Tensor:
    """The grid's zero points as the int32 the layouts pack."""
    maxq = 2**bits - 1
    zero = grid.zero.detach().cpu()
    if not torch.equal(zero, torch.round(zero)) or float(zero.min()) < 0 or float(zero.max()) > maxq:
        raise ValueError(f"{module}: zero points must be integers in [0, {maxq}]")
    zero = zero.to(torch.int32)
    if symmetric and not bool((zero == 2 ** (bits - 1)).all()):
        raise ValueError(
            f"{module}: the writer is symmetric but the grid's zero points are not all "
            f"{2 ** (bits - 1)}; fit the grid with symmetric=True or write asymmetric")
    return zero


def stored_scale(fmt: str, dtype: torch.dtype, module: str, grid: Grid) -> torch.Tensor:
    """The grid's scales in the dtype the layout stores them in (GPTQ: float16; otherwise the
    model's)."""
    scale_dtype = torch.float16 if fmt == "gptq" else dtype
    scale = grid.scale.detach().cpu()
    if fmt == "gptq" and dtype == torch.bfloat16:
        # GPTQ stores float16 scales but vLLM holds them in the model's dtype: rounded to
        # bfloat16 first, they survive both conversions exactly (bfloat16's 8-bit mantissa
        # fits float16's 11) instead of being rounded a second time as vLLM loads them.
        scale = scale.to(torch.bfloat16)
    scale = scale.to(scale_dtype)
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError(
            f"{module}: some scales are not positive finite numbers once stored as {scale_dtype} "
            "(overflow or underflow); "
            + ("GPTQ stores float16 scales, use --format compressed-tensors with --dtype bfloat16"
               if fmt == "gptq" else "write with dtype=torch.bfloat16 or torch.float32"))
    return scale


def check_ignore_entries(fmt: str, ignore: list[str]) -> None:
    """Refuse dense modules the format cannot mark unquantized (checked before any work)."""
    if fmt == "gptq":
        # A GPTQ v1 config has no per-module skip list that every reader honours: transformers
        # (optimum) converts every Linear inside the decoder blocks, and lm_head is governed by
        # the "lm_head" flag. So only lm_head may stay unquantized.
        extra = [i for i in ignore if i != "lm_head"]
        if extra:
            raise ValueError(
                f"GPTQ checkpoints cannot mark {extra} as unquantized (readers quantize every "
                "linear in the decoder blocks); use --format compressed-tensors")


def check_ignore(fmt: str, quantized: list[str], ignore: list[str]) -> None:
    """No module written quantized may match the ignore list (loaders would expect it dense)."""
    if fmt == "gptq":
        # GPTQ configs carry no ignore list; which dense modules readers would convert (the
        # nn.Linear ones inside the blocks) only the caller knows: check_ignore_entries.
        if "lm_head" in quantized:
            raise ValueError("quantizing lm_head is not supported for GPTQ; keep it in the "
                             "ignore list")
        return
    for module in quantized:
        entry = matches_ignore(module, ignore)
        if entry is not None:
            raise ValueError(f"{module} was written quantized but matches ignore entry "
                             f"{entry!r}; loaders would expect a dense weight for it")
