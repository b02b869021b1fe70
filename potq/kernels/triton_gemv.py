"""The fused PoT GEMV for GPUs, in Triton: the CUDA counterpart of ``csrc/pot_gemv.cpp``.

Same contract as :func:`potq.kernels.fused.pot_gemv`: ``x @ W.T (+ bias)`` straight from a packed
layer's codes and fp16 scales, never a float copy of ``W``. Each program owns ``BLOCK_N`` output
rows of one activation row and walks the input in ``BLOCK_K`` chunks: it pulls every code out of
potq's packed row bit stream (the two bytes a code of ≤ 8 bits can straddle), makes the weight by
adding the code's exponent to the scale's float32 exponent field (thesis Figure 3.5; the ordinary
multiply only where that add would leave the normal range, as on the CPU), and accumulates in
float32.

Triton is optional (``pip install potq[gpu]``; CUDA builds of torch bring it along). Where a
layer's codes live on a CUDA device, :class:`~potq.nn.packed.QuantLinear` decodes through this
kernel; on the CPU the C++ kernel stays the default. With ``TRITON_INTERPRET=1`` in the
environment the same kernel runs in Triton's interpreter on CPU tensors — slow, but it is how
the tests check it on machines without a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from potq.errors import PotqError
from potq.formats.grouping import group_width
from potq.formats.pot import PoT, PoTWithZero

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch do not bring Triton
    triton = tl = None

BLOCK_N = 32  # output rows per program
BLOCK_K = 128  # input columns per step (a group of 128 is one step)


def _kernel_source(x_ptr, codes_ptr, scales_ptr, y_ptr, n_out, n_in, row_bytes, n_groups,  # noqa: ANN001
                   group: tl.constexpr, BITS: tl.constexpr, LOWEST: tl.constexpr, WITH_ZERO: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr) -> None:
    """Rows ``[pid0·BLOCK_N, +BLOCK_N)`` of ``y[pid1] = W · x[pid1]`` (``LOWEST`` = K, or K + 1
    for pot-zero: a field's exponent is ``field − LOWEST``)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    batch = tl.program_id(1).to(tl.int64)
    row_ok = rows < n_out
    row_codes = rows.to(tl.int64) * row_bytes
    row_scales = rows.to(tl.int64) * n_groups
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < n_in
        ok = row_ok[:, None] & col_ok[None, :]
        byte = (cols * BITS) >> 3
        lo = tl.load(codes_ptr + row_codes[:, None] + byte[None, :], mask=ok, other=0).to(tl.int32)
        hi = tl.load(codes_ptr + row_codes[:, None] + byte[None, :] + 1,
                     mask=ok & (byte + 1 < row_bytes)[None, :], other=0).to(tl.int32)
        code = ((lo | (hi << 8)) >> ((cols * BITS) & 7)[None, :]) & ((1 << BITS) - 1)
        field = code & ((1 << (BITS - 1)) - 1)
        exponent = field - LOWEST  # <= 0
        a = tl.load(scales_ptr + row_scales[:, None] + (cols // group)[None, :], mask=ok, other=0.0).to(tl.float32)
        a_bits = a.to(tl.int32, bitcast=True)
        added = (a_bits + (exponent << 23)).to(tl.float32, bitcast=True)  # the exponent add
        exact = a * tl.exp2(exponent.to(tl.float32))  # where the add would underflow
        w = tl.where(((a_bits >> 23) & 0xFF) + exponent > 0, added, exact)
        w = tl.where((code >> (BITS - 1)) != 0, -w, w)  # the sign bit
        if WITH_ZERO:
            w = tl.where(field == 0, 0.0, w)
        x = tl.load(x_ptr + batch * n_in + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + batch * n_out + rows, acc, mask=row_ok)


# compiled for the GPU, or run by Triton's interpreter when TRITON_INTERPRET=1 was set before
# Triton was imported (its own library functions are made for one mode or the other at import)
_kernel = None if triton is None else triton.jit(_kernel_source, do_not_specialize=["n_out", "n_in", "row_bytes",
                                                                                   "n_groups"])


def serves(layer) -> bool:  # noqa: ANN001
    """Whether this kernel computes ``layer``: a packed PoT layer whose codes are on a CUDA device,
    with Triton installed."""
    return (layer.codes.is_cuda and isinstance(layer.fmt, PoT) and layer.fmt.bits <= 8
            and triton is not None)


def pot_gemv(x: Tensor, layer) -> Tensor:  # noqa: ANN001
    """``x @ W.T (+ bias)`` for a packed PoT ``layer``, ``x`` of shape ``[..., in]`` on the layer's
    device (a CUDA one, or the CPU under Triton's interpreter); the result in ``x``'s dtype."""
    if triton is None:
        raise PotqError("the GPU PoT kernel needs Triton: pip install 'potq[gpu]'")
    fmt = layer.fmt
    flat = x.reshape(-1, layer.in_features).float().contiguous()
    y = torch.empty(flat.shape[0], layer.out_features, device=flat.device, dtype=torch.float32)
    grid = (-(-layer.out_features // BLOCK_N), flat.shape[0])
    with_zero = isinstance(fmt, PoTWithZero)
    _kernel[grid](flat, layer.codes, layer.scales, y, layer.out_features, layer.in_features,
                  layer.codes.shape[1], layer.scales.shape[1], group_width(layer.in_features, layer.group_size),
                  fmt.bits, fmt.top_exponent + int(with_zero), with_zero, BLOCK_N, BLOCK_K)
    if layer.bias is not None:
        y += layer.bias
    return y.view(*x.shape[:-1], layer.out_features).to(x.dtype)
