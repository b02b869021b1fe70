// What the fused PoT GEMV is given: the packed layer and where the activations and results live.
#pragma once
#include <cstdint>

struct Layout {
  int64_t bits, group, top, in_features, row_bytes;
  bool with_zero;
};

struct Args {
  Layout layout;
  const uint8_t* codes;  // [out_features, row_bytes], potq's packed rows
  const float* scales;   // [out_features, groups], the stored fp16 scales as float32
  int64_t groups, out_features;
};

// Rows [r0, r1) of y[nb, out] = x[nb, in] · Wᵀ for nb <= 8, one function per instruction set.
void rows_avx2(const Args& A, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1);
void rows_avx512(const Args& A, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1);
void rows_scalar(const Args& A, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1);
