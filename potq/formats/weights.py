"""A quantized weight matrix: codes, fp16 scales, zero points — what every method produces.

This is the hand-off point of the one-way flow: a method decides the quantization parameters
(and, for GPTQ-like methods, the codes), and everything downstream — the packed layer, the file,
the kernels — only sees a :class:`QuantizedWeight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from potq.formats.base import Format, QParams
from potq.formats.grouping import (
    PER_TENSOR,
    broadcast_rows,
    from_groups,
    tensor_wide,
    to_groups,
)
from potq.formats.packing import pack_bits


@dataclass
class QuantizedWeight:
    """An ``[out, in]`` matrix as codes (uint8, unpacked) with per-group stored parameters."""

    fmt: Format
    group_size: int
    codes: Tensor  # uint8 [out, in]
    scale: Tensor  # fp16 [out, groups]
    zero: Tensor | None  # uint8 [out, groups] for affine formats

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def qparams(self) -> QParams:
        zero = None if self.zero is None else self.zero.to(torch.float32)
        return QParams(self.fmt.load_scale(self.scale), zero)

    def dequantize(self) -> Tensor:
        return dequantize(self.codes, self.qparams(), self.fmt, self.group_size)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        """The same weight with its tensors on ``device`` (results go back to the CPU for storage)."""
        zero = None if self.zero is None else self.zero.to(device)
        return QuantizedWeight(self.fmt, self.group_size, self.codes.to(device), self.scale.to(device), zero)

    def packed_codes(self) -> Tensor:
        return pack_bits(self.codes, self.fmt.bits)

    def compact(self) -> "CompactWeight":
        """The same weight holding its codes bit-packed (3 bits a weight, not 8) until used."""
        return CompactWeight(self.fmt, self.group_size, self.packed_codes(), self.scale, self.zero, self.shape[1])


class CompactWeight(QuantizedWeight):
    """A :class:`QuantizedWeight` whose codes stay bit-packed: what the block-wise engine keeps of
    every finished layer until the model is packed, so a large model's results take their packed
    size rather than a byte per weight."""

    def __init__(self, fmt: Format, group_size: int, packed: Tensor, scale: Tensor, zero: Tensor | None,
                 in_features: int) -> None:
        super().__init__(fmt, group_size, packed, scale, zero)
        self.in_features = in_features

    @property
    def shape(self) -> tuple[int, int]:
        return self.scale.shape[0], self.in_features

    def unpacked(self) -> QuantizedWeight:
        from potq.formats.packing import unpack_bits

        codes = unpack_bits(self.codes, self.fmt.bits, self.in_features)
        return QuantizedWeight(self.fmt, self.group_size, codes, self.scale, self.zero)

    def dequantize(self) -> Tensor:
        return self.unpacked().dequantize()

    def to(self, device: torch.device | str) -> "CompactWeight":
        zero = None if self.zero is None else self.zero.to(device)
        return CompactWeight(self.fmt, self.group_size, self.codes.to(device), self.scale.to(device), zero,
                             self.in_features)

    def packed_codes(self) -> Tensor:
        return self.codes

    def compact(self) -> "CompactWeight":
        return self


def init_qparams(w: Tensor, fmt: Format, group_size: int, clip: Tensor | float = 1.0,
                 clip_low: Tensor | float | None = None) -> QParams:
    """Round-to-nearest parameters of ``w`` (``[out, in]``), per group, channel or tensor,
    optionally clipped (see :meth:`Format.init_qparams`)."""
    if group_size == PER_TENSOR:
        qp = fmt.init_qparams(tensor_wide(w.float()), clip, clip_low)
        return qp.map(lambda t: broadcast_rows(t, w.shape[0]))
    return fmt.init_qparams(to_groups(w.float(), group_size), clip, clip_low)


def quantize_weight(w: Tensor, fmt: Format, group_size: int, qp: QParams | None = None) -> QuantizedWeight:
    """Codes of ``w`` under ``qp`` (default: round-to-nearest init), with ``qp`` rounded through
    fp16 storage first so that the stored codes decode exactly to what was chosen."""
    qp = fmt.as_stored(qp if qp is not None else init_qparams(w, fmt, group_size))
    codes = fmt.encode(to_groups(w.float(), group_size), qp)
    zero = None if qp.zero is None else qp.zero.to(torch.uint8)
    return QuantizedWeight(fmt, group_size, from_groups(codes, w.shape[1]).contiguous(),
                           fmt.store_scale(qp.scale), zero)


def dequantize(codes: Tensor, qp: QParams, fmt: Format, group_size: int) -> Tensor:
    """Float32 ``[out, in]`` weights of unpacked codes ``[out, in]``."""
    in_features = codes.shape[1]
    wg = fmt.decode(to_groups(codes.to(torch.int32), group_size), qp)
    return from_groups(wg, in_features)


def fake_quantize(w: Tensor, fmt: Format, group_size: int, qp: QParams, grad: str = "none") -> Tensor:
    """Quantize-dequantize ``[out, in]`` in float (the path methods and QAT differentiate)."""
    return from_groups(fmt.fake_quant(to_groups(w.float(), group_size), qp, grad), w.shape[1])
