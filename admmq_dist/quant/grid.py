"""Per-row, per-group quantization grids: uniform integer grids and the FP4 grids of :mod:`.fp4`.

A grid assigns every weight ``W[i, j]`` of a ``[rows, cols]`` matrix (``[out, in]``) a scale and an
integer zero point, shared by the ``group_size`` consecutive input columns of its group. Integer
codes are unsigned integers in ``[0, 2**bits - 1]`` and dequantise as ``scale * (code - zero)``;
FP4 codes (``kind`` ``nvfp4`` or ``mxfp4``) are E2M1 encodings and dequantise as
``scale * e2m1(code)`` (their zero points are all 0). Solvers reach the grid's values only through
its methods (``codes``, ``dequantize``, ``project``, ``round_normalized_``, ``normalized``), so
every solver runs on every kind.

The grid is fitted before any solver runs and solvers choose codes on it; only the scale refit
(``solvers/scales.py``), after the codes are chosen, moves its scales.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from . import fp4

SUPPORTED_BITS = (2, 3, 4, 8)
GRID_KINDS = fp4.KINDS


@dataclass(frozen=True)
class GridSpec:
    """How a grid is fitted to a weight matrix.

    ``group_size=None`` means one group per row (per-channel). A group size that does not divide
    the input width leaves a ragged last group; checkpoint writers that cannot hold that refuse it.
    ``symmetric=None`` is "not chosen yet" (a recipe's default): whoever knows the model and the
    checkpoint format settles it (the pipeline: symmetric where engines read no zero points)
    before a grid is fitted. ``kind``: ``int``, or an FP4 format (``nvfp4``, ``mxfp4``: 4 bits,
    the format's own group size, no zero points).
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool | None = False
    range_search: Literal["minmax", "mse"] = "minmax"
    # GPTQ's range search: shrink [xmin, xmax] by 1 - k / mse_steps for k < mse_max_shrink *
    # mse_steps, keep the shrink with the smallest sum |projection error| ** mse_norm per group.
    mse_norm: float = 2.4
    mse_steps: int = 100
    mse_max_shrink: float = 0.8
    kind: Literal["int", "nvfp4", "mxfp4"] = "int"

    def __post_init__(self) -> None:
        if self.kind not in GRID_KINDS:
            raise ValueError(f"grid kind={self.kind!r} is not supported; choose one of {GRID_KINDS}")
        if self.kind != "int":
            self._check_fp4()
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; choose one of {SUPPORTED_BITS}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(
                f"group_size={self.group_size!r} must be a positive integer, or None for per-channel"
            )
        if self.symmetric not in (True, False, None):
            raise ValueError(f"symmetric={self.symmetric!r} must be true, false or null (auto)")
        if self.range_search not in ("minmax", "mse"):
            raise ValueError(f"range_search={self.range_search!r} must be 'minmax' or 'mse'")
        if not self.mse_norm > 0:
            raise ValueError(f"mse_norm={self.mse_norm} must be positive")
        if self.mse_steps < 1:
            raise ValueError(f"mse_steps={self.mse_steps} must be at least 1")
        if not 0.0 <= self.mse_max_shrink < 1.0:
            raise ValueError(f"mse_max_shrink={self.mse_max_shrink} must lie in [0, 1)")

    def _check_fp4(self) -> None:
        size = fp4.GROUP_SIZES[self.kind]
        if self.bits != 4:
            raise ValueError(f"{self.kind} is a 4-bit format; bits={self.bits} cannot be stored "
                             f"in it (drop --bits or use --grid int)")
        if self.group_size != size:
            raise ValueError(f"{self.kind} has groups of {size}; group_size={self.group_size} "
                             f"cannot be stored in it (drop --group-size or use --grid int)")
        if self.symmetric is False:
            raise ValueError(f"{self.kind} grids have no zero points; they cannot be asymmetric "
                             "(drop --asym or use --grid int)")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def num_groups(self, cols: int) -> int:
        return 1 if self.group_size is None else math.ceil(cols / self.group_size)

    def effective_group_size(self, cols: int) -> int:
        return cols if self.group_size is None else self.group_size


@dataclass(frozen=True)
class Grid:
    """A fitted grid for one ``[rows, cols]`` weight matrix.

    ``scale`` and ``zero`` are ``[rows, num_groups]`` float32 tensors (``zero`` holds integers).
    Column ``j`` belongs to group ``j // group_size``.
    """

    bits: int
    group_size: int
    cols: int
    symmetric: bool
    scale: torch.Tensor
    zero: torch.Tensor
    kind: str = "int"
    # NVFP4's per-tensor power of two (fp4.nvfp4_global_scale), kept by row slices so that
    # every row block snaps refitted scales under the one the whole layer is stored with.
    global_scale: float | None = None

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def rows(self) -> int:
        return self.scale.shape[0]

    @property
    def num_groups(self) -> int:
        return self.scale.shape[1]

    def group_index(self) -> torch.Tensor:
        """``[cols]`` int64: the group of every input column."""
        return torch.arange(self.cols, device=self.scale.device) // self.group_size

    def expanded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-element ``(scale, zero)``, each ``[rows, cols]``."""
        g = self.group_index()
        return self.scale[:, g], self.zero[:, g]

    def columns(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` of columns ``start:stop``, each ``[rows, stop - start]``."""
        g = torch.arange(start, stop, device=self.scale.device) // self.group_size
        return self.scale[:, g], self.zero[:, g]

    @classmethod
    def from_parts(cls, spec: GridSpec, cols: int, scale: torch.Tensor,
                   zero: torch.Tensor, global_scale: float | None = None) -> "Grid":
        """The grid of a ``[rows, cols]`` layer from its stored ``scale`` and ``zero`` (as a
        commit, a worker or a resumed run hands them over) and the spec they were fitted with;
        ``global_scale``: NVFP4's, where later scales must be snapped under the one the layer
        was fitted with (a refit between rounds: the linears engines fuse share it)."""
        if spec.kind != "nvfp4":
            global_scale = None
        elif global_scale is None:
            # A whole layer's NVFP4 scales give back its global scale (or a larger power of
            # two, under which they are still representable: see fp4's docstring).
            global_scale = fp4.nvfp4_global_scale(scale)
        return cls(spec.bits, spec.effective_group_size(cols), cols, spec.symmetric, scale, zero,
                   spec.kind, global_scale)

    def row_slice(self, start: int, stop: int) -> "Grid":
        """The grid of rows ``start:stop`` (grids are fitted row by row, so this is exact)."""
        return dataclasses.replace(self, scale=self.scale[start:stop], zero=self.zero[start:stop])

    def to(self, device: torch.device | str) -> "Grid":
        return dataclasses.replace(self, scale=self.scale.to(device), zero=self.zero.to(device))

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Nearest codes of ``weight`` (``[rows, cols]``), int32 in ``[0, maxq]``."""
        scale, zero = self.expanded()
        if self.kind != "int":
            return fp4.encode(fp4.round_e2m1_(weight / scale))
        return codes_of(weight, scale, zero, self.maxq)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        scale, zero = self.expanded()
        if self.kind != "int":
            return scale * fp4.decode(codes)
        return dequantize_codes(codes, scale, zero)

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """Euclidean projection of ``weight`` onto the grid (round to nearest)."""
        scale, zero = self.expanded()
        if self.kind != "int":
            return fp4.round_e2m1_(weight / scale).mul_(scale)
        return project(weight, scale, zero, self.maxq)

    def quantize_values(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, values)`` of ``weight`` on this grid's ``scale`` and ``zero`` for the same
        elements (e.g. one column's), broadcasting."""
        if self.kind != "int":
            normalized = fp4.round_e2m1_(weight / scale)
            return fp4.encode(normalized), normalized * scale
        codes = codes_of(weight, scale, zero, self.maxq)
        return codes, dequantize_codes(codes, scale, zero)

    def round_normalized_(self, t: torch.Tensor, low: torch.Tensor, high: torch.Tensor
                          ) -> torch.Tensor:
        """Round ``t`` (weights divided by their scales) in place to the nearest grid value,
        ``code - zero`` for integer grids (``low = -zero``, ``high = maxq - zero``)."""
        if self.kind != "int":
            return fp4.round_e2m1_(t)
        return t.round_().clamp_(low, high)

    def normalized(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 ``code - zero`` (FP4: the E2M1 value): what a scale multiplies."""
        if self.kind != "int":
            return fp4.decode(codes)
        return codes.float() - self.expanded()[1]

    def snap_scales(self, scale: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        """``scale`` as the checkpoint can store it: rounded to ``dtype`` (integer grids) or to
        the FP4 format's scale numbers."""
        if self.kind != "int":
            return fp4.snap(self.kind, scale, self.global_scale).to(scale.dtype)
        return scale if dtype is None else scale.to(dtype).to(scale.dtype)


def codes_of(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(weight / scale) + zero, 0, maxq).to(torch.int32)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes.to(scale.dtype) - zero)


def project(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``scale * (clamp(round(weight / scale) + zero, 0, maxq) - zero)``, broadcasting."""
    return scale * (torch.clamp(torch.round(weight / scale) + zero, 0, maxq) - zero)


def _params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool):
    maxq = 2**bits - 1
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    # An all-zero group still needs a positive scale (GPTQ's rule). So does a group whose range
    # is too small for its step to be a normal float32 (the step would underflow to 0): its
    # weights are below 1e-37 and round to zero on the fallback grid.
    both_zero = (xmax - xmin) < maxq * torch.finfo(torch.float32).tiny
    xmin = torch.where(both_zero, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(both_zero, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    # A range near float32's limit overflows as a difference but not as a step.
    scale = torch.where(torch.isfinite(scale), scale, xmax / maxq - xmin / maxq)
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def fit_grid(weight: torch.Tensor, spec: GridSpec, global_scale: float | None = None) -> Grid:
    """Fit a grid to ``weight`` (``[rows, cols]``) by min-max or GPTQ's MSE range search
    (``global_scale``: NVFP4's, shared by the linears engines fuse; default from ``weight``)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("the weight holds NaN or Inf values; cannot fit a quantization grid")
    if spec.symmetric is None and spec.kind == "int":
        raise ValueError("the grid's symmetric setting is not chosen (None); pass "
                         "symmetric=True or False")
    rows, cols = weight.shape
    gs = spec.effective_group_size(cols)
    ngroups = spec.num_groups(cols)
    w = weight.float()
    pad = ngroups * gs - cols
    # Padding the ragged last group with zeros leaves its range unchanged: the range always
    # includes 0. The padded entries are excluded from the MSE error below.
    wg = torch.nn.functional.pad(w, (0, pad)).reshape(rows, ngroups, gs)
    valid = torch.ones(ngroups * gs, dtype=torch.bool, device=w.device)
    if pad:
        valid[cols:] = False
    valid = valid.reshape(1, ngroups, gs)
    if spec.kind != "int":
        scale, global_scale = fp4.fit_scales(wg, valid, spec.kind, spec.range_search,
                                             spec.mse_norm, spec.mse_steps, spec.mse_max_shrink,
                                             global_scale)
        return Grid(spec.bits, gs, cols, True, scale, torch.zeros_like(scale), spec.kind,
                    global_scale)
    xmin = torch.clamp(wg.amin(dim=2), max=0.0)
    xmax = torch.clamp(wg.amax(dim=2), min=0.0)
    scale, zero = _params_from_range(xmin, xmax, spec.bits, spec.symmetric)
    if spec.range_search == "mse":
        maxq = spec.maxq
        best = torch.full_like(scale, float("inf"))
        for k in range(int(spec.mse_max_shrink * spec.mse_steps)):
            p = 1.0 - k / spec.mse_steps
            s1, z1 = _params_from_range(p * xmin, p * xmax, spec.bits, spec.symmetric)
            err = (project(wg, s1[..., None], z1[..., None], maxq) - wg).abs_().pow_(spec.mse_norm)
            err = (err * valid).sum(dim=2)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
    return Grid(spec.bits, gs, cols, spec.symmetric, scale.contiguous(), zero.contiguous())
