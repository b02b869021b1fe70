"""potq's quantize/dequantize as PyTorch custom ops, so an exported graph can carry any potq format.

PT2E's own ops (``quantized_decomposed.quantize_per_channel`` …) are affine: ``round(x/s) + z``.
A PoT grid is not affine, so a PT2E graph cannot express it with them; these two ops put the
one :class:`potq.formats.Format` into the graph instead. A format travels as its name, bits and
options (JSON), the scales as a tensor, and the body is the very code ``potq quantize`` runs,
which is what makes the PT2E path match potq's own fake-quant path.
"""

from __future__ import annotations

import json
from typing import Optional

import torch
from torch import Tensor

from potq.formats import Format, QParams, get_format
from potq.formats.weights import dequantize as dequantize_codes
from potq.formats.grouping import from_groups, to_groups


def format_of(name: str, bits: int, options: str) -> Format:
    return get_format(name, bits, **json.loads(options))


def _qparams(fmt: Format, scales: Tensor, zeros: Optional[Tensor]) -> QParams:
    return QParams(fmt.load_scale(scales), None if zeros is None else zeros.to(torch.float32))


@torch.library.custom_op("potq::quantize", mutates_args=())
def quantize(w: Tensor, scales: Tensor, zeros: Optional[Tensor], fmt: str, bits: int, group_size: int,
             options: str) -> Tensor:
    """uint8 codes ``[rows, cols]`` of ``w`` under stored fp16 ``scales`` (and uint8 ``zeros``)."""
    f = format_of(fmt, bits, options)
    codes = f.encode(to_groups(w.float(), group_size), _qparams(f, scales, zeros))
    return from_groups(codes, w.shape[1]).contiguous()


@quantize.register_fake
def _(w, scales, zeros, fmt, bits, group_size, options):  # noqa: ANN001, ANN202
    return torch.empty(w.shape, dtype=torch.uint8, device=w.device)


@torch.library.custom_op("potq::dequantize", mutates_args=())
def dequantize(codes: Tensor, scales: Tensor, zeros: Optional[Tensor], fmt: str, bits: int, group_size: int,
               options: str) -> Tensor:
    """float32 ``[rows, cols]`` weights of uint8 codes (the inverse of ``potq::quantize``)."""
    f = format_of(fmt, bits, options)
    return dequantize_codes(codes, _qparams(f, scales, zeros), f, group_size)


@dequantize.register_fake
def _(codes, scales, zeros, fmt, bits, group_size, options):  # noqa: ANN001, ANN202
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
