// What the fused PoT GEMV is given: the packed layer and where the activations and results live.
#pragma once
#include <cstdint>

struct Layout {
  int64_t bits, group, top, in_features, row_bytes;
  bool with_zero;
};

struct Args {
  Layout layout;
  const uint8_t* codes;      // [out_features, row_bytes], potq's packed rows
  const uint8_t* codes_end;  // one past the last byte: vector reads never go beyond it
  const uint16_t* scales;    // [out_features, groups], the stored fp16 scales (bit patterns)
  int64_t groups, out_features;
};

// A symmetric 8-bit layer (potq's uniform-sym 8): code c = q + 127, weight (c − 127)·s per group.
struct Int8Layer {
  const uint8_t* codes;    // [out, in]
  const uint16_t* scales;  // [out, groups], fp16 bit patterns
  int64_t in, out, group, groups;
};
void int8_rows_avx2(const Int8Layer& L, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1);
void int8_rows_avx512(const Int8Layer& L, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1);

// Rows [r0, r1) of y[nb, out] = x[nb, in] · Wᵀ, one function per instruction set.
void rows_avx2(const Args& A, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1);
void rows_avx512(const Args& A, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1);
void rows_scalar(const Args& A, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1);
// Rows [r0, r1) of y = W·x for a float32 W [out, in] (the native decoder's float layers).
void dense_rows_avx2(const float* w, int64_t in, const float* x, float* y, int64_t r0, int64_t r1);
void dense_rows_avx512(const float* w, int64_t in, const float* x, float* y, int64_t r0, int64_t r1);
// Rows [r0, r1) of the weight itself, w[out, in] in float32.
void dequantize_avx2(const Args& A, float* w, int64_t r0, int64_t r1);
void dequantize_avx512(const Args& A, float* w, int64_t r0, int64_t r1);
// Elementwise PoT (kind 0) or uniform (kind 1) dequantization of unpacked codes (the benchmark harness).
void elementwise_avx2(int kind, int out, const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros,
                      void* dst, int64_t rows, int64_t n, int64_t group, int64_t groups, const Layout& L);
void elementwise_avx512(int kind, int out, const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros,
                        void* dst, int64_t rows, int64_t n, int64_t group, int64_t groups, const Layout& L);
