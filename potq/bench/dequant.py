"""Benchmark 1: dequantization throughput, PoT by exponent add vs uniform ``(q − z)·s``.

Both from the same unpacked uint8 codes and fp16 group parameters, in the same harness (the
PyTorch elementwise implementations of :mod:`potq.kernels.exponent_add`), for each output dtype;
plus the fused kernel's own exponent add, which reads packed codes and writes float32.
"""

from __future__ import annotations

import torch

from potq.bench.timing import per_call
from potq.formats import get_format
from potq.formats.weights import quantize_weight
from potq.kernels import fused
from potq.kernels.exponent_add import pot_dequantize, uniform_dequantize
from potq.nn import QuantLinear

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run(rows: int = 4096, cols: int = 4096, bits: int = 3, group: int = 128, seconds: float = 0.5) -> list[dict]:
    """Elements per second of each dequantization of a ``rows × cols`` matrix."""
    torch.manual_seed(0)
    w = torch.randn(rows, cols)
    pot = quantize_weight(w, get_format("pot", bits), group)
    uni = quantize_weight(w, get_format("uniform", bits), group)
    n = rows * cols
    out = []
    for name, dtype in DTYPES.items():
        t_pot = per_call(lambda: pot_dequantize(pot.codes, pot.scale, pot.fmt, group, dtype), seconds)
        t_uni = per_call(lambda: uniform_dequantize(uni.codes, uni.scale, uni.zero, group, dtype), seconds)
        out.append({"path": "PyTorch elementwise", "dtype": name, "pot_gelem_s": n / t_pot / 1e9,
                    "uniform_gelem_s": n / t_uni / 1e9, "ratio": t_uni / t_pot})
    layer = QuantLinear.from_quantized(pot)
    if fused.serves(layer):
        t = per_call(lambda: fused.packed_dequantize(layer), seconds)
        out.append({"path": "fused kernel (packed codes)", "dtype": "fp32", "pot_gelem_s": n / t / 1e9,
                    "uniform_gelem_s": None, "ratio": None})
    return out


def markdown(rows: list[dict], shape: str) -> list[str]:
    lines = [f"Dequantize a {shape} 3-bit matrix (G128), elements per second:", "",
             "| implementation | dtype | PoT exponent add (Gelem/s) | uniform (q−z)·s (Gelem/s) | PoT / uniform |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        uni = "–" if r["uniform_gelem_s"] is None else f"{r['uniform_gelem_s']:.2f}"
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        lines.append(f"| {r['path']} | {r['dtype']} | {r['pot_gelem_s']:.2f} | {uni} | {ratio} |")
    return lines
