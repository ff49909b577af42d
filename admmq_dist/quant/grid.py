"""Uniform per-row, per-group quantization grids.

A grid assigns every weight ``W[i, j]`` of a ``[rows, cols]`` matrix (``[out, in]``) a scale and an
integer zero point, shared by the ``group_size`` consecutive input columns of its group. Codes are
unsigned integers in ``[0, 2**bits - 1]`` and dequantise as ``scale * (code - zero)``.

The grid is fitted before any solver runs and solvers choose codes on it; only the scale refit
(``solvers/scales.py``), after the codes are chosen, moves its scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class GridSpec:
    """How a grid is fitted to a weight matrix.

    ``group_size=None`` means one group per row (per-channel). A group size that does not divide
    the input width leaves a ragged last group; checkpoint writers that cannot hold that refuse it.
    ``symmetric=None`` is "not chosen yet" (a recipe's default): whoever knows the model and the
    checkpoint format settles it (the pipeline: symmetric where engines read no zero points)
    before a grid is fitted.
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

    def __post_init__(self) -> None:
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
                   zero: torch.Tensor) -> "Grid":
        """The grid of a ``[rows, cols]`` layer from its stored ``scale`` and ``zero`` (as a
        commit, a worker or a resumed run hands them over) and the spec they were fitted with."""
        return cls(spec.bits, spec.effective_group_size(cols), cols, spec.symmetric, scale, zero)

    def row_slice(self, start: int, stop: int) -> "Grid":
        """The grid of rows ``start:stop`` (grids are fitted row by row, so this is exact)."""
        return Grid(self.bits, self.group_size, self.cols, self.symmetric,
                    self.scale[start:stop], self.zero[start:stop])

    def to(self, device: torch.device | str) -> "Grid":
        return Grid(self.bits, self.group_size, self.cols, self.symmetric,
                    self.scale.to(device), self.zero.to(device))

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Nearest codes of ``weight`` (``[rows, cols]``), int32 in ``[0, maxq]``."""
        scale, zero = self.expanded()
        return codes_of(weight, scale, zero, self.maxq)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        scale, zero = self.expanded()
        return dequantize_codes(codes, scale, zero)

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """Euclidean projection of ``weight`` onto the grid (round to nearest)."""
        scale, zero = self.expanded()
        return project(weight, scale, zero, self.maxq)


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


def fit_grid(weight: torch.Tensor, spec: GridSpec) -> Grid:
    """Fit a grid to ``weight`` (``[rows, cols]``) by min-max or GPTQ's MSE range search."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("the weight holds NaN or Inf values; cannot fit a quantization grid")
    if spec.symmetric is None:
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
