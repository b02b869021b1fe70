"""The PoT grid exactly as "PoT weights in LLMs" defines it (its Table 2).

    y = sign(x) · s · 2^clip(round(log2(|x|/s + ε)), -E, E)

with a symmetric exponent range ``[-E, E]`` and a small ε inside the logarithm. The seed counts
only the exponent levels in its bit widths ("15 levels [-7, 7], which requires only 4 bits");
a stored code also needs the sign and a code for exact zero (``sign(0) = 0``), so here the
format's ``bits`` are the *stored* bits and ``E = 2^(bits-2) - 1``: 5 stored bits hold the seed's
"4-bit" grid [-7, 7], 6 bits its [-15, 15], 7 bits its [-31, 31]. Reports print both numbers.

As for :mod:`potq.formats.pot`, the stored scale is the largest level ``a = s·2^E`` (``s``
itself underflows fp16); ``s = max|w|/2^E`` puts the top level on the group's largest weight.
ε is in units of ``s``: weights smaller than about ``ε·s`` all round to the same exponent, so ε
sets the resolution near zero — the knob the seed found matters more for PoT than for uniform.
"""

from __future__ import annotations

import torch
from torch import Tensor

from potq.errors import PotqError
from potq.formats.base import FP16_TINY, Format, QParams, Rounding

DEFAULT_EPSILON = 1e-8


class PoTSeed(Format):
    """Signed PoT with exponents ``[-E, E]`` around ``s``, exact zero, and the seed's ε."""

    name = "pot-seed"
    log_rounding = True
    min_bits = 3  # a sign, exact zero and at least the exponents [-1, 1]

    def __init__(self, bits: int, epsilon: float = DEFAULT_EPSILON) -> None:
        super().__init__(bits)
        if not epsilon >= 0:
            raise PotqError(f"epsilon must be a number >= 0, got {epsilon!r}")
        self.epsilon = float(epsilon)

    def __repr__(self) -> str:
        return f"{self.name}{self.bits}(eps={self.epsilon:g})"

    @property
    def half_range(self) -> int:
        """E: exponents run over ``[-E, E]`` (the seed's "[-7, 7]" at its 4 bits = 5 stored)."""
        return 2 ** (self.bits - 2) - 1

    def sign(self, w: Tensor) -> Tensor:
        return torch.sign(w)

    def init_qparams(self, wg: Tensor, clip: Tensor | float = 1.0,
                     clip_low: Tensor | float | None = None) -> QParams:
        return QParams((wg.abs().amax(dim=-1) * clip).clamp(min=FP16_TINY))

    def exponent_or_level(self, wg: Tensor, qp: QParams, rnd: Rounding) -> Tensor:
        """The exponent relative to the top level ``a``: ``round(log2(|w|/s + ε)) - E`` in ``[-2E, 0]``."""
        e = self.half_range
        ratio = wg.abs() / qp.scale * 2.0**e + self.epsilon  # |w|/s + ε
        return rnd(torch.log2(ratio.clamp(min=2.0**-140))).clamp(-e, e) - e

    def value_of(self, index: Tensor, wg_sign: Tensor, qp: QParams) -> Tensor:
        return wg_sign * qp.scale * torch.exp2(index)

    def to_code(self, index: Tensor, wg_sign: Tensor, qp: QParams) -> Tensor:
        """0 for zero, ``1 + field`` for positive and ``2 + 2E + field`` for negative weights,
        where ``field = index + 2E`` is in ``[0, 2E]``."""
        field = index.to(torch.int32) + 2 * self.half_range
        negative = (wg_sign < 0).to(torch.int32)
        return torch.where(wg_sign == 0, 0, 1 + field + negative * (2 * self.half_range + 1))

    def from_code(self, codes: Tensor, qp: QParams) -> tuple[Tensor, Tensor]:
        width = 2 * self.half_range + 1
        negative = codes > width
        field = torch.where(negative, codes - 1 - width, codes - 1).clamp(min=0)
        sign = torch.where(codes == 0, 0.0, torch.where(negative, -1.0, 1.0))
        return (field - 2 * self.half_range).to(torch.float32), sign
