"""Several linear layers that read the same input, computed as one: q/k/v, gate/up.

Decoding one token calls every linear once; at batch 1 each call costs a fixed overhead (Python,
a thread fork-join) on top of its arithmetic, and small matrices (a 576→192 key projection) do
not fill the cores. Stacking the rows of layers that share their input into one matrix turns
seven calls a block into four and gives each call more rows to split across threads.

The stacked layer owns the storage; the original layers are re-pointed at row slices of it, so
the model keeps its structure, its state dict (safetensors writes each slice's own bytes) and
its memory footprint — nothing is held twice.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from potq.nn.packed import QuantLinear

_PACKED_BUFFERS = ("codes", "scales", "zeros", "bias")


def stack_rows(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing ``cat([layer(x) for layer in layers], -1)``, or None where the layers
    cannot be stacked (different kinds, formats, group sizes or input widths; bias on some only)."""
    first = layers[0]
    if len({type(layer) for layer in layers}) != 1 or len({layer.in_features for layer in layers}) != 1:
        return None
    if len({getattr(layer, "bias", None) is None for layer in layers}) != 1:
        return None
    if type(first) is nn.Linear:
        return _stack_linear(layers)
    if type(first) is QuantLinear and len({(layer.fmt, layer.group_size) for layer in layers}) == 1:
        return _stack_packed(layers)
    return None


def _stack_linear(layers: list[nn.Linear]) -> nn.Linear:
    rows = sum(layer.out_features for layer in layers)
    weight = layers[0].weight
    stacked = nn.Linear(layers[0].in_features, rows, bias=layers[0].bias is not None,
                        device=weight.device, dtype=weight.dtype)
    for name in ("weight", "bias"):
        parts = [getattr(layer, name) for layer in layers]
        if parts[0] is None:
            continue
        with torch.no_grad():
            getattr(stacked, name).copy_(torch.cat(parts))
        for layer, view in zip(layers, _row_slices(getattr(stacked, name), layers)):
            setattr(layer, name, nn.Parameter(view, requires_grad=getattr(layer, name).requires_grad))
    return stacked


def _stack_packed(layers: list[QuantLinear]) -> QuantLinear:
    first = layers[0]
    stacked = QuantLinear(first.in_features, sum(layer.out_features for layer in layers), first.fmt,
                          first.group_size, bias=first.bias is not None, cache_weight=first.cache_weight)
    for name in _PACKED_BUFFERS:
        parts = [getattr(layer, name) for layer in layers]
        if parts[0] is None:
            continue
        setattr(stacked, name, torch.cat(parts))
        for layer, view in zip(layers, _row_slices(getattr(stacked, name), layers)):
            setattr(layer, name, view)
    return stacked


def _row_slices(t: Tensor, layers: list[nn.Module]) -> list[Tensor]:
    return list(t.split([layer.out_features for layer in layers]))
