// AVX2 + FMA: 8 weights a vector, an 8-entry table lookup (two and a blend for 4-bit codes).
// Compiled for this target only; chosen at run time.
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include <cstring>

#include "pot_gemv_layout.h"

namespace {
struct Isa {
  using V = __m256;
  using I = __m256i;
  static constexpr int kLanes = 8;
  struct Table { V low, high; };  // entries 0..7 and 8..15 (high: 4-bit codes only)
  struct Entries { I add_low, add_high, keep_low, keep_high; V pow2_low, pow2_high; };
  struct Unpack { I shuffle, shift; };

  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load_first(const float* p, int64_t n) { return _mm256_maskload_ps(p, first_lanes(n)); }
  static I first_lanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store_first(float* p, V v, int64_t n) { _mm256_maskstore_ps(p, first_lanes(n), v); }
  static void to_half(const float* src, uint16_t* dst, int64_t n) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
    for (; j < n; ++j) dst[j] = static_cast<uint16_t>(_cvtss_sh(src[j], 0));
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  // 8 symmetric 8-bit codes (c − 127) as floats
  static V widen8(const uint8_t* p) {
    int64_t eight;
    std::memcpy(&eight, p, 8);
    return _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(eight))), _mm256_set1_ps(127.0f));
  }
  static float sum(V v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
  }

  static Entries entries(const int32_t* add, const int32_t* keep, const float* pow2) {
    auto at = [](const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
    return {at(add), at(add + 8), at(keep), at(keep + 8), _mm256_loadu_ps(pow2), _mm256_loadu_ps(pow2 + 8)};
  }
  static V exponent_add(I a, I add, I keep) { return _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(a, add), keep)); }
  static Table table(int32_t a_bits, const Entries& E) {
    const I a = _mm256_set1_epi32(a_bits);
    return {exponent_add(a, E.add_low, E.keep_low), exponent_add(a, E.add_high, E.keep_high)};
  }
  static Table table_exact(float a, const Entries& E) {
    const V av = _mm256_set1_ps(a);
    return {_mm256_mul_ps(av, E.pow2_low), _mm256_mul_ps(av, E.pow2_high)};
  }

  // Lane i takes the two bytes holding code i (bit base + i·bits of the 16 bytes read), shifted down.
  static Unpack unpack_control(int bits, int base) {
    alignas(32) int8_t shuffle[32];
    alignas(32) int32_t shift[8];
    for (int i = 0; i < 8; ++i) {
      const int bit = base + i * bits;
      shuffle[4 * i] = static_cast<int8_t>(bit >> 3);
      shuffle[4 * i + 1] = static_cast<int8_t>((bit >> 3) + 1);
      shuffle[4 * i + 2] = shuffle[4 * i + 3] = static_cast<int8_t>(0x80);
      shift[i] = bit & 7;
    }
    return {_mm256_load_si256(reinterpret_cast<const __m256i*>(shuffle)),
            _mm256_load_si256(reinterpret_cast<const __m256i*>(shift))};
  }
  static I codes(const uint8_t* p, const Unpack& U) {
    const I bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_srlv_epi32(_mm256_shuffle_epi8(bytes, U.shuffle), U.shift);
  }
  // The table index is the low 3 bits; 4-bit codes pick between two tables by their fourth bit.
  template <int BITS>
  static V lookup(const Table& t, I codes) {
    const V low = _mm256_permutevar8x32_ps(t.low, codes);
    if (BITS < 4) return low;
    const V high = _mm256_permutevar8x32_ps(t.high, codes);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
  }
};
}  // namespace

#include "pot_gemv_rows.h"
#include "int8_rows.h"
#include "dense_rows.h"
#include "dequant_elementwise.h"
#include "pot_gemv_entry.h"

POTQ_ENTRY_POINTS(avx2)
