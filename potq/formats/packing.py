"""Bit-packing of N-bit codes, row by row.

Each row of codes is written as one little-endian bit stream: code j of a row occupies bits
``j·N … j·N+N-1`` (least significant first) of that row's bytes, and a row takes
``ceil(n·N/8)`` bytes, so the only waste is the padding at the end of a row. Eight 3-bit codes
fill exactly three bytes, which is what a kernel reading 8 codes at a time wants.
"""

from __future__ import annotations

import torch
from torch import Tensor

from potq.errors import PotqError

_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int32)


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes one packed row of ``n`` codes of ``bits`` bits takes."""
    return (n * bits + 7) // 8


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """uint8 ``[rows, n]`` codes in ``[0, 2**bits)`` -> uint8 ``[rows, ceil(n·bits/8)]``."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise TypeError("pack_bits expects a 2-D uint8 tensor of codes")
    if bits == 8:
        return codes.clone()
    rows, n = codes.shape
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(rows, n * bits)
    nbytes = packed_row_bytes(n, bits)
    stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - n * bits))
    return (stream.reshape(rows, nbytes, 8).to(torch.int32) * _BIT_WEIGHTS.to(codes.device)).sum(-1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[rows, nbytes]`` -> uint8 codes ``[rows, n]``."""
    rows, nbytes = packed.shape
    if nbytes != packed_row_bytes(n, bits):
        raise PotqError(
            f"packed codes have {nbytes} bytes a row, {packed_row_bytes(n, bits)} expected for "
            f"{n} codes of {bits} bits: the file is corrupt, quantize the model again"
        )
    if bits == 8:
        return packed.clone()
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(rows, nbytes * 8)[:, : n * bits]
    weights = 2 ** torch.arange(bits, dtype=torch.int32, device=packed.device)
    return (stream.reshape(rows, n, bits).to(torch.int32) * weights).sum(-1).to(torch.uint8)
