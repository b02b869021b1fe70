"""PoT dequantization without a multiply: add the code's exponent to the scale's exponent field.

A PoT weight is ``±a·2^e`` with ``e ≤ 0`` (thesis §3.3.3, Figure 3.5). In IEEE-754 the value
``a·2^e`` has the bit pattern of ``a`` with ``e`` added to its biased exponent field — one integer
add on the bit pattern (``bits(a) + (e << mantissa_bits)``), then the sign bit set with an OR.
This works for float32, float16 and bfloat16 output alike, only the field positions differ.

Range: ``e ≤ 0`` can never overflow. It can *underflow*: when the scale's biased exponent plus
``e`` drops to 0 or below, the integer add would run into the sign bit / produce garbage, and the
true value is subnormal or zero. Those elements (rare: tiny scales at 6–8 bits, or fp16/bf16
output) are computed by the ordinary multiply, so the result is bit-identical to
``decode(codes).to(dtype)`` everywhere (tested), and the fast path never leaves the normal range.

The uniform dequantization ``(q − z)·s`` is here too, in the same harness, for the comparison.
"""

from __future__ import annotations

import torch
from torch import Tensor

from potq.errors import PotqError
from potq.formats import Format
from potq.formats.pot import PoT, PoTWithZero

# dtype -> (integer view of the same width, mantissa bits, exponent field mask)
FLOAT_FIELDS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float32: (torch.int32, 23, 0xFF),
    torch.float16: (torch.int16, 10, 0x1F),
    torch.bfloat16: (torch.int16, 7, 0xFF),
}


def per_weight(scales: Tensor, group_size: int, in_features: int) -> Tensor:
    """``[rows, groups]`` -> ``[rows, in_features]``: each weight's group parameter."""
    width = in_features if group_size <= 0 or group_size >= in_features else group_size
    return scales.repeat_interleave(width, dim=1)[:, :in_features]


def pot_dequantize(codes: Tensor, scales: Tensor, fmt: Format, group_size: int,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """``[rows, in]`` weights of unpacked PoT ``codes`` (uint8) by exponent add on ``scales``."""
    if not isinstance(fmt, PoT):
        raise PotqError(f"exponent-add dequantization is for the pot and pot-zero formats, not {fmt.name}")
    if dtype not in FLOAT_FIELDS:
        raise PotqError(f"exponent-add dequantization makes float32, float16 or bfloat16, not {dtype}")
    int_type, mantissa, exp_mask = FLOAT_FIELDS[dtype]
    sign_bit = 1 << (torch.finfo(dtype).bits - 1)
    c = codes.to(torch.int32)
    field = c & (2 ** (fmt.bits - 1) - 1)
    negative = (c >> (fmt.bits - 1)) & 1
    shift = field - fmt.top_exponent - (1 if isinstance(fmt, PoTWithZero) else 0)  # e ≤ 0
    a = per_weight(scales, group_size, codes.shape[1]).to(dtype)
    a_bits = a.view(int_type).to(torch.int32)
    biased = (a_bits >> mantissa) & exp_mask
    value_bits = (a_bits + (shift << mantissa)) | (negative * sign_bit)
    fast = value_bits.to(int_type).view(dtype)
    underflow = biased + shift <= 0
    if underflow.any():  # subnormal results: the ordinary multiply, same rounding as decode
        slow = (torch.where(negative > 0, -1.0, 1.0) * a.float() * torch.exp2(shift.float())).to(dtype)
        fast = torch.where(underflow, slow, fast)
    if isinstance(fmt, PoTWithZero):
        fast = torch.where(field == 0, torch.zeros((), dtype=dtype), fast)
    return fast


def uniform_dequantize(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """``(q − z)·s`` for unpacked uniform codes: the baseline the exponent add is measured against."""
    in_features = codes.shape[1]
    s = per_weight(scales, group_size, in_features).to(dtype)
    z = per_weight(zeros, group_size, in_features).to(dtype)
    return (codes.to(dtype) - z) * s
