"""Benchmark 5: the physical limit — how fast this machine can read weights at all.

Decoding one token reads every weight once, so tokens/s can never exceed the memory read
bandwidth divided by the bytes of weights a token reads; the report prints that bound beside
each measured decoding speed.
"""

from __future__ import annotations

import torch
from torch import nn

from potq.bench.timing import per_call
from potq.nn import PackedWeight, QuantLinear


def read_gb_s(mib: int = 1024, seconds: float = 1.0) -> float:
    """GB/s of summing a ``mib`` MiB float32 tensor (far larger than any cache) with the current threads."""
    x = torch.ones(mib * 2**20 // 4)
    return x.numel() * 4 / per_call(lambda: x.sum(), seconds) / 1e9


def weight_bytes_per_token(model: nn.Module) -> dict[str, int]:
    """Bytes of weights one decoding step reads — every linear as held in memory, and of those the
    output head's; embedding tables are only read a row at a time and are left out."""
    total, head, seen = 0, 0, set()
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in model.modules():
        if isinstance(module, QuantLinear):
            key = module.codes.data_ptr()
            size = 0 if key in seen else module.storage_bytes()
            seen.add(key)
        elif isinstance(module, nn.Linear) and not isinstance(module, PackedWeight):
            size = module.weight.numel() * module.weight.element_size()
        else:
            continue
        total += size
        head += size if module is head_module else 0
    return {"total": total, "head": head}
