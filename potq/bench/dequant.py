"""Benchmark 1: dequantization throughput, PoT by exponent add vs uniform ``(q − z)·s``.

Both formulas as the thesis compares them (§3.3.3, Figure 3.5), from the same unpacked uint8
codes and fp16 group parameters into each output dtype, in one C++ harness compiled like the
fused kernel (``csrc/dequant_elementwise.h``: the same loop shape, vectorized by the compiler,
rows split across threads). PoT adds the code's exponent to the scale's bit pattern in the output
format — integer ops; uniform computes in float32 and converts (CPUs have no fp16/bf16 arithmetic).
Beside them, the fused kernel's own path (packed codes, a per-group table) into float32.
"""

from __future__ import annotations

import torch

from potq.bench.timing import per_call
from potq.formats import get_format
from potq.formats.grouping import group_width
from potq.formats.weights import QuantizedWeight, quantize_weight
from potq.kernels import fused
from potq.nn import QuantLinear

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def elementwise(qw: QuantizedWeight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``qw``'s weights in ``dtype`` by the harness: exponent add for PoT, (q − z)·s for uniform."""
    ext, fmt = fused.extension(), qw.fmt
    pot = fmt.name.startswith("pot")
    width = group_width(qw.codes.shape[1], qw.group_size)
    return ext.elementwise_dequantize(qw.codes.contiguous(), qw.scale.contiguous(), None if pot else qw.zero, pot,
                                      fmt.bits, width, fmt.top_exponent if pot else 0, fmt.name == "pot-zero", dtype,
                                      fused.best_isa(), out)


def run(rows: int = 4096, cols: int = 4096, bits: int = 3, group: int = 128, seconds: float = 0.5) -> list[dict]:
    """Elements per second of each dequantization of a ``rows × cols`` matrix."""
    if fused.best_isa() not in ("avx2", "avx512"):
        return []
    torch.manual_seed(0)
    w = torch.randn(rows, cols)
    pot = quantize_weight(w, get_format("pot", bits), group)
    uni = quantize_weight(w, get_format("uniform", bits), group)
    n = rows * cols
    out = []
    for name, dtype in DTYPES.items():
        buffer = torch.empty(rows, cols, dtype=dtype)  # one output buffer: pages are not faulted in per call
        t_pot = per_call(lambda: elementwise(pot, dtype, buffer), seconds)
        t_uni = per_call(lambda: elementwise(uni, dtype, buffer), seconds)
        out.append({"path": "elementwise, unpacked codes", "dtype": name, "pot_gelem_s": n / t_pot / 1e9,
                    "uniform_gelem_s": n / t_uni / 1e9, "ratio": t_uni / t_pot})
    layer = QuantLinear.from_quantized(pot)
    buffer = torch.empty(rows, cols)
    t = per_call(lambda: fused.packed_dequantize(layer, out=buffer), seconds)
    out.append({"path": "fused kernel's table (packed codes)", "dtype": "fp32", "pot_gelem_s": n / t / 1e9,
                "uniform_gelem_s": None, "ratio": None})
    return out


def markdown(rows: list[dict], shape: str) -> list[str]:
    if not rows:
        return ["Not measured: the harness needs a CPU with AVX2 and the kernel built."]
    lines = [f"Dequantize a {shape} 3-bit matrix (G128), elements per second:", "",
             "| implementation | dtype | PoT exponent add (Gelem/s) | uniform (q−z)·s (Gelem/s) | PoT / uniform |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        uni = "–" if r["uniform_gelem_s"] is None else f"{r['uniform_gelem_s']:.2f}"
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        lines.append(f"| {r['path']} | {r['dtype']} | {r['pot_gelem_s']:.2f} | {uni} | {ratio} |")
    return lines
