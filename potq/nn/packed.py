"""Layers whose weight lives as bit-packed codes + fp16 group scales: linear and embedding.

A packed layer's state dict *is* the file format (``codes``, ``scales``, ``zeros``, ``bias``), so
saving a quantized model is saving its state dict, and loading it rebuilds exactly the same layer.
Both kinds hold an ``[rows, cols]`` matrix grouped along ``cols`` — a linear's input dimension,
an embedding's vector — so a tied output head can share its embedding table's codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from potq.formats import Format, QParams
from potq.formats.grouping import num_groups
from potq.formats.packing import packed_row_bytes, unpack_bits
from potq.formats.weights import QuantizedWeight, dequantize
from potq.kernels import fused, triton_gemv


class PackedWeight(nn.Module):
    """The packed ``[out_features, in_features]`` matrix both layer kinds share.

    The decoded float weight is cached after the first forward (``cache_weight``) because the
    pure-PyTorch unpacking costs about as much as a batch-1 matmul; the cache is never saved and
    is dropped whenever the packed buffers are reloaded.
    """

    kind = "packed"

    def __init__(self, in_features: int, out_features: int, fmt: Format, group_size: int,
                 cache_weight: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.group_size = fmt, group_size
        self.cache_weight = cache_weight
        groups = num_groups(in_features, group_size)
        row_bytes = packed_row_bytes(in_features, fmt.bits)
        # uninitialised: a layer is always filled (by a method's result or a file) before it is used
        self.register_buffer("codes", torch.empty(out_features, row_bytes, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.uint8)
                             if fmt.has_zero else None)
        self._weight: Tensor | None = None

    def load_quantized(self, qw: QuantizedWeight) -> None:
        """Copy a method's result into the buffers."""
        self.codes.copy_(qw.packed_codes())
        self.scales.copy_(qw.scale)
        if qw.zero is not None:
            self.zeros.copy_(qw.zero)
        self._weight = None

    def share_from(self, other: "PackedWeight") -> None:
        """Use ``other``'s buffers (a tied output head and its embedding table): one copy in
        memory and, since the state dict entries alias, one copy on disk."""
        self.codes, self.scales, self.zeros = other.codes, other.scales, other.zeros
        self._weight = None

    def unpacked_codes(self) -> Tensor:
        return unpack_bits(self.codes, self.fmt.bits, self.in_features)

    def qparams(self) -> QParams:
        zero = None if self.zeros is None else self.zeros.to(torch.float32)
        return QParams(self.fmt.load_scale(self.scales), zero)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.fmt, self.group_size, self.unpacked_codes(), self.scales, self.zeros)

    def dequantize(self) -> Tensor:
        return dequantize(self.unpacked_codes(), self.qparams(), self.fmt, self.group_size)

    def weight_for_forward(self) -> Tensor:
        if not self.cache_weight:
            return self.dequantize()
        stale = self._weight is None or (self._weight.is_inference() and not torch.is_inference_mode_enabled())
        if stale:  # a copy made under inference_mode cannot enter a graph autograd records
            self._weight = self.dequantize()
        return self._weight

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._weight = None
        super()._load_from_state_dict(*args, **kwargs)

    def storage_bytes(self) -> int:
        """Bytes of the packed weight as stored: codes + scales + zeros (bias excluded)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros)
                   if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.fmt!r}, group_size={self.group_size}")


FUSED_MAX_ROWS = 8  # up to this many activation rows the fused GEMV beats dequantize + matmul


class QuantLinear(PackedWeight):
    """``y = x Wᵀ + b`` with ``W`` decoded from packed codes.

    A PoT layer the fused kernel serves (:mod:`potq.kernels.fused`: 2–4 bits, CPU) keeps no float
    weight at all: a few rows of activations (decoding) go through the fused GEMV on the packed
    codes, larger batches (a prompt, perplexity windows) through a float weight the kernel's
    exponent add makes for that call only (into a reused buffer unless autograd needs it).
    On a CUDA device with Triton, a PoT layer's decoding rows go through the Triton GEMV
    (:mod:`potq.kernels.triton_gemv`) and larger batches through a per-call weight, likewise.
    Other formats decode once and keep the float weight.
    """

    kind = "linear"

    def __init__(self, in_features: int, out_features: int, fmt: Format, group_size: int,
                 bias: bool = False, cache_weight: bool = True) -> None:
        super().__init__(in_features, out_features, fmt, group_size, cache_weight)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None = None) -> "QuantLinear":
        out_features, in_features = qw.shape
        layer = cls(in_features, out_features, qw.fmt, qw.group_size, bias=bias is not None)
        layer.load_quantized(qw)
        if bias is not None:
            layer.bias.copy_(bias.detach().float())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if fused.serves(self):
            if x.requires_grad:  # autograd keeps the weight for the backward pass: a fresh one
                w = fused.packed_dequantize(self)
            elif x.numel() <= FUSED_MAX_ROWS * self.in_features:
                return fused.served_gemv(x, self)
            else:
                w = fused.scratch_dequantize(self)
        elif fused.serves_int8(self) and not x.requires_grad and x.numel() <= FUSED_MAX_ROWS * self.in_features:
            return fused.int8_gemv(x, self)
        elif triton_gemv.serves(self):
            if not x.requires_grad and x.numel() <= FUSED_MAX_ROWS * self.in_features:
                return triton_gemv.pot_gemv(x, self)
            w = self.dequantize()  # for this call only: no float weight at rest on the GPU either
        else:
            w = self.weight_for_forward()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class QuantEmbedding(PackedWeight):
    """A lookup table of ``out_features`` vectors of ``in_features``, decoded from packed codes."""

    kind = "embedding"

    def __init__(self, in_features: int, out_features: int, fmt: Format, group_size: int) -> None:
        super().__init__(in_features, out_features, fmt, group_size)
        self.register_buffer("embed_scale", None, persistent=False)

    def keep_scale_of(self, original: nn.Module) -> "QuantEmbedding":
        """Carry the output factor of a scaled embedding it replaces (Gemma-3's table multiplies the
        looked-up rows by √d in its own forward), so the model computes what it did."""
        scale = getattr(original, "embed_scale", None)
        if isinstance(scale, Tensor):
            self.embed_scale = scale.detach().clone()
        return self

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight) -> "QuantEmbedding":
        rows, dim = qw.shape
        layer = cls(dim, rows, qw.fmt, qw.group_size)
        layer.load_quantized(qw)
        return layer

    @property
    def weight(self) -> Tensor:
        """The decoded table (transformers reads ``embedding.weight`` for its dtype and device)."""
        return self.weight_for_forward()

    def forward(self, ids: Tensor) -> Tensor:
        rows = self._rows(ids)
        return rows if self.embed_scale is None else rows * self.embed_scale.to(rows.dtype)

    def _rows(self, ids: Tensor) -> Tensor:
        """Only the looked-up rows are decoded: the table stays packed."""
        if self._weight is not None:
            return F.embedding(ids, self._weight)
        flat = ids.reshape(-1)
        if fused.serves(self):
            return fused.dequantize_rows(self, flat).view(*ids.shape, self.in_features)
        zeros = None if self.zeros is None else self.zeros[flat]
        qw = QuantizedWeight(self.fmt, self.group_size, unpack_bits(self.codes[flat], self.fmt.bits, self.in_features),
                             self.scales[flat], zeros)
        return qw.dequantize().reshape(*ids.shape, self.in_features)
