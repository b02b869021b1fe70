"""Kernels: exponent-add PoT dequantization, and (later) fused packed GEMV."""
