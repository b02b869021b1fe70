"""Uniform (integer) grids, the baseline PoT is measured against.

Asymmetric: ``w = (q - z)·s`` with ``q ∈ [0, 2^N-1]`` and an integer zero point z per group
(stored uint8). Symmetric: ``w = q·s`` with ``q ∈ [-(2^(N-1)-1), 2^(N-1)-1]`` (the restricted
range keeps the grid symmetric; 2 bits gives the ternary grid {-s, 0, s}).
"""

from __future__ import annotations

import torch
from torch import Tensor

from potq.formats.base import FP16_TINY, Format, QParams, Rounding


class UniformAsym(Format):
    """Affine uniform grid spanning [min(w,0), max(w,0)] of each group."""

    name = "uniform"
    has_zero = True

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def init_qparams(self, wg: Tensor, clip: Tensor | float = 1.0,
                     clip_low: Tensor | float | None = None) -> QParams:
        lo = wg.amin(dim=-1).clamp(max=0) * (clip if clip_low is None else clip_low)
        hi = wg.amax(dim=-1).clamp(min=0) * clip
        scale = ((hi - lo) / self.qmax).clamp(min=FP16_TINY)
        zero = torch.round(-lo / scale).clamp(0, self.qmax)
        return QParams(scale, zero)

    def exponent_or_level(self, wg: Tensor, qp: QParams, rnd: Rounding) -> Tensor:
        return (rnd(wg / qp.scale) + qp.zero).clamp(0, self.qmax)

    def value_of(self, index: Tensor, wg_sign: Tensor, qp: QParams) -> Tensor:
        return (index - qp.zero) * qp.scale

    def to_code(self, index: Tensor, wg_sign: Tensor, qp: QParams) -> Tensor:
        return index.to(torch.int32)

    def from_code(self, codes: Tensor, qp: QParams) -> tuple[Tensor, Tensor]:
        return codes.to(torch.float32), torch.ones(())


class UniformSym(Format):
    """Symmetric uniform grid spanning [-max|w|, max|w|] of each group, no zero point."""

    name = "uniform-sym"

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def init_qparams(self, wg: Tensor, clip: Tensor | float = 1.0,
                     clip_low: Tensor | float | None = None) -> QParams:
        return QParams((wg.abs().amax(dim=-1) * clip / self.qmax).clamp(min=FP16_TINY))

    def exponent_or_level(self, wg: Tensor, qp: QParams, rnd: Rounding) -> Tensor:
        return rnd(wg / qp.scale).clamp(-self.qmax, self.qmax)

    def value_of(self, index: Tensor, wg_sign: Tensor, qp: QParams) -> Tensor:
        return index * qp.scale

    def to_code(self, index: Tensor, wg_sign: Tensor, qp: QParams) -> Tensor:
        return index.to(torch.int32) + self.qmax

    def from_code(self, codes: Tensor, qp: QParams) -> tuple[Tensor, Tensor]:
        return (codes - self.qmax).to(torch.float32), torch.ones(())
