// The entry points each ISA's unit exports (declared in pot_gemv_layout.h), defined once here:
// include after `Isa`, pot_gemv_rows.h, int8_rows.h, dense_rows.h and dequant_elementwise.h, then POTQ_ENTRY_POINTS(avx2).
#pragma once

#define POTQ_ENTRY_POINTS(ISA)                                                                          \
  void rows_##ISA(const Args& A, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1) {        \
    rows_for(A, nb, x, y, r0, r1);                                                                      \
  }                                                                                                     \
  void dequantize_##ISA(const Args& A, float* w, int64_t r0, int64_t r1) { dequantize_for(A, w, r0, r1); } \
  void int8_rows_##ISA(const Int8Layer& L, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1) {  \
    int8_rows_for(L, nb, x, y, r0, r1);                                                                 \
  }                                                                                                     \
  void elementwise_##ISA(int kind, int out, const uint8_t* codes, const uint16_t* scales,                \
                         const uint8_t* zeros, void* dst, int64_t rows, int64_t n, int64_t group,         \
                         int64_t groups, const Layout& L) {                                              \
    elementwise_for(kind, out, codes, scales, zeros, dst, rows, n, group, groups, L);                    \
  }                                                                                                     \
  void dense_rows_##ISA(const float* w, int64_t in, const float* x, float* y, int64_t r0, int64_t r1) {  \
    dense_rows_for(w, in, x, y, r0, r1);                                                                \
  }
