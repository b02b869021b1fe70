"""Kernels: exponent-add PoT dequantization (``exponent_add``) and the fused packed GEMV (``fused``)."""
