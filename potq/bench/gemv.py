"""Benchmark 2: one decoding step's matrix-vector products, fused PoT vs float.

For every distinct linear shape of the model (and its output head): float32 and bf16
``F.linear``, dequantize-then-matmul (the kernel's exponent add into a float32 weight, then
``F.linear``), the fused PoT GEMV at 2, 3 and 4 bits, and the native decoder's 8-bit-activation
layer at 3 bits on one thread (its step runs each layer's slice of rows per thread) — batch 1. Two
regimes:

* **hot**: the same weight every call, so it stays in cache — the best case for float;
* **decoding**: each call reads a different copy of the weight, enough copies to exceed twice the
  last-level cache, as in decoding, where every layer's weight streams in from memory once per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from potq.bench.timing import last_level_cache_bytes, per_call, rotating
from potq.formats import get_format
from potq.formats.weights import quantize_weight
from potq.kernels import fused
from potq.models.native_decoder import layer_matrix
from potq.nn import QuantLinear

BITS = (2, 3, 4)
Q8_COLUMN = "pot3 8-bit act., 1 thread"


def linear_shapes(model: nn.Module) -> dict[tuple[int, int], list[str]]:
    """``(out, in)`` -> the names of the model's linear layers of that shape, largest first."""
    shapes: dict[tuple[int, int], list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            shapes.setdefault(tuple(module.weight.shape), []).append(name)
    return dict(sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1]))


def _copies(weight_bytes: int, regime: str) -> int:
    return 1 if regime == "hot" else max(1, math.ceil(2 * last_level_cache_bytes() / weight_bytes))


def _time(make, weight_bytes: int, regime: str, call, seconds: float) -> float:  # noqa: ANN001
    items = [make() for _ in range(_copies(weight_bytes, regime))]
    return per_call(rotating(items, call), seconds)


def measure_shape(weight: torch.Tensor, regime: str, seconds: float = 0.3, bits: tuple[int, ...] = BITS,
                  group: int = 128) -> dict:
    """Microseconds per batch-1 product with ``weight`` ``[out, in]`` for each implementation."""
    w = weight.detach().float()
    x = torch.randn(1, w.shape[1])
    xb = x.bfloat16()
    us = {"fp32": _time(lambda: w.clone(), w.numel() * 4, regime, lambda m: F.linear(x, m), seconds),
          "bf16": _time(lambda: w.bfloat16(), w.numel() * 2, regime, lambda m: F.linear(xb, m), seconds)}
    for b in bits:
        layer = QuantLinear.from_quantized(quantize_weight(w, get_format("pot", b), group))
        if not fused.serves(layer):
            continue
        size = layer.storage_bytes()

        def make(layer: QuantLinear = layer) -> QuantLinear:
            copy = QuantLinear(layer.in_features, layer.out_features, layer.fmt, layer.group_size)
            copy.load_state_dict(layer.state_dict())
            return copy

        us[f"pot{b}"] = _time(make, size, regime, lambda m: fused.pot_gemv(x, m), seconds)
        if b == 3 and fused.extension() is not None:
            x1 = x[0].contiguous()
            us[Q8_COLUMN] = _time(lambda: layer_matrix(make()), size, regime, lambda m: m.gemv(x1), seconds)
        if b == 3:  # one reused weight buffer: the time of decoding, not of faulting in fresh pages
            buffer = torch.empty_like(w)
            us["pot3 dequant+matmul"] = _time(make, size, regime,
                                              lambda m: F.linear(x, fused.packed_dequantize(m, out=buffer)), seconds)
    return {k: v * 1e6 for k, v in us.items()}


def quick_speedup(weight: torch.Tensor, seconds: float = 1.0) -> tuple[float, float]:
    """(fp32 µs, fused PoT 3-bit µs) on ``weight``, hot, batch 1 (``potq bench --quick``)."""
    r = measure_shape(weight, "hot", seconds, bits=(3,))
    return r["fp32"], r["pot3"]


def markdown(results: dict[str, dict[str, dict]], names: dict[str, list[str]]) -> list[str]:
    """One table per regime: µs per call and the speed-up of pot3 over fp32."""
    lines: list[str] = []
    for regime, by_shape in results.items():
        cols = list(next(iter(by_shape.values())))
        lines += ["", f"**{regime}** (µs per call, batch 1; speed-up = fp32 time / fused pot3 time):", "",
                  "| shape (out×in) | layers | " + " | ".join(cols) + " | pot3 speed-up |",
                  "|---|---|" + "---:|" * (len(cols) + 1)]
        for shape, r in by_shape.items():
            layers = ", ".join(sorted({n.split(".")[-1] for n in names[shape]}))
            lines.append(f"| {shape} | {layers} | " + " | ".join(f"{r[c]:.1f}" for c in cols)
                         + f" | {r['fp32'] / r['pot3']:.2f}× |")
    return lines
