// AVX2 + FMA: 8 codes a vector. Compiled for this target only; chosen at run time.
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "pot_gemv_layout.h"

namespace {
struct Isa {
  using V = __m256;
  using I = __m256i;
  static constexpr int kLanes = 8;
  static I lane_shifts(int bits) { return _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits); }
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
  }
  // 8 weights: each code's exponent added to the scale's bit pattern, sign bit OR-ed in.
  template <int BITS, bool ZERO>
  static V decode(const uint8_t* row, int64_t byte, int64_t row_bytes, int32_t a_bits, int64_t top, I shifts);
};
}  // namespace

#include "pot_gemv_rows.h"

namespace {
template <int BITS, bool ZERO>
Isa::V Isa::decode(const uint8_t* row, int64_t byte, int64_t row_bytes, int32_t a_bits, int64_t top, I shifts) {
  const I word = _mm256_set1_epi32(static_cast<int32_t>(load_word(row, byte, row_bytes)));
  const I codes = _mm256_and_si256(_mm256_srlv_epi32(word, shifts), _mm256_set1_epi32((1 << BITS) - 1));
  const I field = _mm256_and_si256(codes, _mm256_set1_epi32((1 << (BITS - 1)) - 1));
  const I sign = _mm256_slli_epi32(_mm256_srli_epi32(codes, BITS - 1), 31);
  const I e = _mm256_sub_epi32(field, _mm256_set1_epi32(static_cast<int32_t>(top) + (ZERO ? 1 : 0)));
  I v = _mm256_or_si256(_mm256_add_epi32(_mm256_set1_epi32(a_bits), _mm256_slli_epi32(e, 23)), sign);
  if (ZERO) v = _mm256_andnot_si256(_mm256_cmpeq_epi32(field, _mm256_setzero_si256()), v);
  return _mm256_castsi256_ps(v);
}
}  // namespace

void rows_avx2(const Args& A, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1) {
  rows_for(A, nb, x, y, r0, r1);
}
