"""Power-of-two grids: every nonzero level is ``±a·2^-j``.

The thesis writes the zero-excluded N-bit grid as ``{±2^0 … ±2^(2^(N-1)-1)}·s`` with
``s0 = max|w| / 2^(2^(N-1)-1)``. potq keeps the same grid but stores its *largest* level
``a = s·2^K`` (``K = 2^(N-1)-1``) as the group scale: ``s`` itself underflows fp16 from 5 bits
on (``max|w|/2^31``), ``a`` never does. Step 1's multiplier b scales ``a`` and ``s`` alike.

Rounding follows the thesis (eq. 3.4): the exponent is ``round(log2(|w|/s))``, clamped to the
grid, i.e. rounding in the log domain. A code is ``sign bit | exponent field``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from potq.formats.base import FP16_TINY, Format, QParams, Rounding


class PoT(Format):
    """Zero-excluded PoT (thesis default): N bits = 1 sign + (N-1) exponent bits, no zero level."""

    name = "pot"
    log_rounding = True

    @property
    def top_exponent(self) -> int:
        """K: the grid spans ``a·2^-K .. a``."""
        return 2 ** (self.bits - 1) - 1

    @property
    def lowest_index(self) -> int:
        """The smallest rounded exponent: ``-K`` here; one lower (the zero level) with a zero."""
        return -self.top_exponent

    @property
    def _field_mask(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def init_qparams(self, wg: Tensor, clip: Tensor | float = 1.0,
                     clip_low: Tensor | float | None = None) -> QParams:
        return QParams((wg.abs().amax(dim=-1) * clip).clamp(min=FP16_TINY))

    def magnitude_steps(self) -> list[tuple[float, float, float]]:
        """Log-domain rounding steps from exponent n to n − 1 at ``log2|w|/a = n − ½``."""
        one, unit = torch.tensor(1.0), QParams(torch.tensor(1.0))
        level = lambda e: float(self.value_of(torch.tensor(float(e)), one, unit))  # noqa: E731
        return [(n - 0.5, level(n), level(n - 1)) for n in range(0, self.lowest_index, -1)]

    def log2_ratio(self, wg: Tensor, qp: QParams) -> Tensor:
        """``log2(|w|/a)``, with zero weights floored below every grid (2^-140 < 2^-128), so that
        they stay finite and carry no gradient instead of giving ``-inf`` and NaN gradients."""
        return torch.log2((wg.abs() / qp.scale).clamp(min=2.0**-140))

    def exponent_or_level(self, wg: Tensor, qp: QParams, rnd: Rounding) -> Tensor:
        return rnd(self.log2_ratio(wg, qp)).clamp(self.lowest_index, 0)

    def value_of(self, index: Tensor, wg_sign: Tensor, qp: QParams) -> Tensor:
        return wg_sign * qp.scale * torch.exp2(index)

    def to_code(self, index: Tensor, wg_sign: Tensor, qp: QParams) -> Tensor:
        field = index.to(torch.int32) + self.top_exponent
        return field | ((wg_sign < 0).to(torch.int32) << (self.bits - 1))

    def from_code(self, codes: Tensor, qp: QParams) -> tuple[Tensor, Tensor]:
        index = (codes & self._field_mask) - self.top_exponent
        sign = torch.where((codes >> (self.bits - 1)) > 0, -1.0, 1.0)
        return index.to(torch.float32), sign


class PoTWithZero(PoT):
    """PoT with a zero level: field 0 means 0.0, fields 1..2^(N-1)-1 are ``a·2^-K .. a``.

    One exponent is given up (``K = 2^(N-1)-2``) so that small weights can vanish instead of
    being forced to ``±a·2^-K``; a weight is zero when its rounded log2 falls below the grid.
    """

    name = "pot-zero"

    @property
    def top_exponent(self) -> int:
        return 2 ** (self.bits - 1) - 2

    @property
    def lowest_index(self) -> int:
        return -self.top_exponent - 1  # stands for the zero level

    def value_of(self, index: Tensor, wg_sign: Tensor, qp: QParams) -> Tensor:
        value = super().value_of(index, wg_sign, qp)
        return torch.where(index < -self.top_exponent, torch.zeros_like(value), value)

    def to_code(self, index: Tensor, wg_sign: Tensor, qp: QParams) -> Tensor:
        return super().to_code(index + 1, wg_sign, qp)

    def from_code(self, codes: Tensor, qp: QParams) -> tuple[Tensor, Tensor]:
        index, sign = super().from_code(codes, qp)
        return index - 1, sign
