"""Several linear layers that read the same input, computed as one: q/k/v, gate/up.

Decoding one token calls every linear once; at batch 1 each call of the fused PoT kernel costs
a fixed overhead (Python, a thread fork-join) on top of its arithmetic, and small matrices (a
576→192 key projection) do not fill the cores. Stacking the rows of layers that share their
input into one matrix turns seven calls a block into four and gives each call more rows to split
across threads.

The stacked layer owns the storage; the original layers are re-pointed at row slices of it, so
the model keeps its structure, its state dict (safetensors writes each slice's own bytes) and
its memory footprint — nothing is held twice.
"""

from __future__ import annotations

import torch
from torch import nn

from potq.nn.packed import QuantLinear


def stack_rows(layers: list[nn.Module]) -> QuantLinear | None:
    """One packed layer computing ``cat([layer(x) for layer in layers], -1)``, or None where the
    layers cannot be stacked (not all packed; different formats, group sizes or input widths; bias
    on some only). Float ``nn.Linear`` layers are left alone: their calls cost little fixed time,
    and stacking them would copy the whole float model each time a decoder is built."""
    if not all(type(layer) is QuantLinear for layer in layers):
        return None
    if len({(layer.in_features, layer.fmt, layer.group_size, layer.bias is None) for layer in layers}) != 1:
        return None
    first, rows = layers[0], [layer.out_features for layer in layers]
    stacked = QuantLinear(first.in_features, sum(rows), first.fmt, first.group_size,
                          bias=first.bias is not None, cache_weight=first.cache_weight)
    for name in ("codes", "scales", "zeros", "bias"):
        parts = [getattr(layer, name) for layer in layers]
        if parts[0] is None:
            continue
        setattr(stacked, name, torch.cat(parts))
        for layer, view in zip(layers, getattr(stacked, name).split(rows)):
            setattr(layer, name, view)
    return stacked
