"""Additive powers of two (APoT, after Li et al., ICLR 2020): every level is ``±a·m/M`` with ``m``
a sum of at most two powers of two, so a weight still multiplies by two shifts and one add.

Why: a PoT grid spends each extra bit on a smaller exponent. At 4 bits its eight magnitudes run
from ``a`` down to ``a/128``, and the octave between ``a/2`` and ``a`` — where most of a group's
large weights lie — has no level inside it; its squared error on SmolLM2-135M's weights is barely
below 3-bit PoT's and several times uniform 4-bit's. Letting a magnitude be a sum of two powers of
two fills those octaves while keeping the multiply-free arithmetic.

The magnitude sets below are the ones with the least squared error on SmolLM2-135M's block weights
in groups of 64 (each group at its best scale) among all sets of such integers
(``benchmarks/apot_magnitudes.py``; the scores: docs/results/apot-magnitudes.md):

- 2 bits ``{1, 4}``: still pure PoT, the exponents 0 and −2 (skipping −1 puts the two levels
  where a 4-level quantizer of a bell-shaped group wants them, about three apart);
- 3 bits ``{1, 3, 5, 8}``;
- 4 bits ``{1, 2, 4, 6, 8, 10, 12, 16}``.

A code is ``sign bit | index`` into the set, as PoT's ``sign bit | exponent field``, and the group
scale stores the largest level ``a``. Rounding is to the nearest level (linear midpoints): the
index is read off a piecewise-linear position between neighbouring levels, so the straight-through
gradient reaches the weight with a slope near 1 and the scale with the held level (LSQ), as for
uniform grids.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from potq.formats.base import FP16_TINY, Format, QParams, Rounding

MAGNITUDES: dict[int, tuple[int, ...]] = {2: (1, 4), 3: (1, 3, 5, 8), 4: (1, 2, 4, 6, 8, 10, 12, 16)}


class AdditivePoT(Format):
    """Sign + index into a set of ``2^(N−1)`` magnitudes, each a sum of at most two powers of two."""

    name = "apot"
    max_bits = max(MAGNITUDES)

    @property
    def magnitudes(self) -> tuple[int, ...]:
        """The integer magnitudes, smallest first: level ``i`` is ``a·m_i / m_max``."""
        return MAGNITUDES[self.bits]

    def _unit_levels(self, like: Tensor) -> Tensor:
        m = torch.tensor(self.magnitudes, dtype=torch.float32, device=like.device)
        return m / m[-1]

    def init_qparams(self, wg: Tensor, clip: Tensor | float = 1.0,
                     clip_low: Tensor | float | None = None) -> QParams:
        return QParams((wg.abs().amax(dim=-1) * clip).clamp(min=FP16_TINY))

    def magnitude_steps(self) -> list[tuple[float, float, float]]:
        """Nearest-level rounding steps down at the midpoint of two neighbouring levels."""
        levels = [m / self.magnitudes[-1] for m in self.magnitudes]
        return [(math.log2((lo + hi) / 2), hi, lo) for lo, hi in zip(levels[-2::-1], levels[:0:-1])]

    def exponent_or_level(self, wg: Tensor, qp: QParams, rnd: Rounding) -> Tensor:
        levels = self._unit_levels(wg)
        v = wg.abs() / qp.scale
        seg = torch.bucketize(v.detach(), levels[1:-1])  # the segment [levels[k], levels[k+1]] holding v
        lo, hi = levels[seg], levels[seg + 1]
        return rnd(seg + (v - lo) / (hi - lo)).clamp(0, len(levels) - 1)

    def value_of(self, index: Tensor, wg_sign: Tensor, qp: QParams) -> Tensor:
        levels = self._unit_levels(index)
        seg = index.detach().floor().clamp(0, len(levels) - 2).long()
        lo, hi = levels[seg], levels[seg + 1]
        return wg_sign * qp.scale * (lo + (index - seg) * (hi - lo))

    def to_code(self, index: Tensor, wg_sign: Tensor, qp: QParams) -> Tensor:
        return index.to(torch.int32) | ((wg_sign < 0).to(torch.int32) << (self.bits - 1))

    def from_code(self, codes: Tensor, qp: QParams) -> tuple[Tensor, Tensor]:
        index = codes & (2 ** (self.bits - 1) - 1)
        sign = torch.where((codes >> (self.bits - 1)) > 0, -1.0, 1.0)
        return index.to(torch.float32), sign
