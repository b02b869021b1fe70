// AVX-512F: 16 codes a vector (two 8-code words). Compiled for this target only; chosen at run time.
#pragma GCC target("avx512f")
#include <immintrin.h>

#include "pot_gemv_layout.h"

namespace {
struct Isa {
  using V = __m512;
  using I = __m512i;
  static constexpr int kLanes = 16;
  static I lane_shifts(int bits) {
    const __m256i half = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits);
    return _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
  }
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
  template <int BITS, bool ZERO>
  static V decode(const uint8_t* row, int64_t byte, int64_t row_bytes, int32_t a_bits, int64_t top, I shifts);
};
}  // namespace

#include "pot_gemv_rows.h"

namespace {
template <int BITS, bool ZERO>
Isa::V Isa::decode(const uint8_t* row, int64_t byte, int64_t row_bytes, int32_t a_bits, int64_t top, I shifts) {
  const __m256i lo = _mm256_set1_epi32(static_cast<int32_t>(load_word(row, byte, row_bytes)));
  const __m256i hi = _mm256_set1_epi32(static_cast<int32_t>(load_word(row, byte + BITS, row_bytes)));
  const I codes = _mm512_and_si512(_mm512_srlv_epi32(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), shifts),
                                   _mm512_set1_epi32((1 << BITS) - 1));
  const I field = _mm512_and_si512(codes, _mm512_set1_epi32((1 << (BITS - 1)) - 1));
  const I sign = _mm512_slli_epi32(_mm512_srli_epi32(codes, BITS - 1), 31);
  const I e = _mm512_sub_epi32(field, _mm512_set1_epi32(static_cast<int32_t>(top) + (ZERO ? 1 : 0)));
  I v = _mm512_or_si512(_mm512_add_epi32(_mm512_set1_epi32(a_bits), _mm512_slli_epi32(e, 23)), sign);
  if (ZERO) v = _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(field, field), v);
  return _mm512_castsi512_ps(v);
}
}  // namespace

void rows_avx512(const Args& A, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1) {
  rows_for(A, nb, x, y, r0, r1);
}
