// AVX-512 (F + BW): 16 weights a vector, one 16-entry table lookup. Chosen at run time.
#pragma GCC target("avx512f,avx512bw,f16c")
#include <immintrin.h>

#include "pot_gemv_layout.h"

namespace {
struct Isa {
  using V = __m512;
  using I = __m512i;
  static constexpr int kLanes = 16;
  struct Table { V values; };
  struct Entries { I add, keep; V pow2; };
  struct Unpack { I shuffle, shift; };

  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store_first(float* p, V v, int64_t n) { _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v); }
  static void to_half(const float* src, uint16_t* dst, int64_t n) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), _mm512_cvtps_ph(_mm512_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
    for (; j < n; ++j) dst[j] = static_cast<uint16_t>(_cvtss_sh(src[j], 0));
  }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  // 16 symmetric 8-bit codes (c − 127) as floats
  static V widen8(const uint8_t* p) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)), _mm512_set1_ps(127.0f));
  }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }

  static Entries entries(const int32_t* add, const int32_t* keep, const float* pow2) {
    return {_mm512_loadu_si512(add), _mm512_loadu_si512(keep), _mm512_loadu_ps(pow2)};
  }
  // The exponent add: 16 values from one scale, two integer ops.
  static Table table(int32_t a_bits, const Entries& E) {
    return {_mm512_castsi512_ps(_mm512_and_si512(_mm512_add_epi32(_mm512_set1_epi32(a_bits), E.add), E.keep))};
  }
  static Table table_exact(float a, const Entries& E) { return {_mm512_mul_ps(_mm512_set1_ps(a), E.pow2)}; }

  // Lane i takes the two bytes holding code i (bit base + i·bits of the 16 bytes read), shifted down.
  static Unpack unpack_control(int bits, int base) {
    alignas(64) int8_t shuffle[64];
    alignas(64) int32_t shift[16];
    for (int i = 0; i < 16; ++i) {
      const int bit = base + i * bits;
      shuffle[4 * i] = static_cast<int8_t>(bit >> 3);
      shuffle[4 * i + 1] = static_cast<int8_t>((bit >> 3) + 1);
      shuffle[4 * i + 2] = shuffle[4 * i + 3] = static_cast<int8_t>(0x80);
      shift[i] = bit & 7;
    }
    return {_mm512_load_si512(shuffle), _mm512_load_si512(shift)};
  }
  static I codes(const uint8_t* p, const Unpack& U) {
    const I bytes = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_srlv_epi32(_mm512_shuffle_epi8(bytes, U.shuffle), U.shift);
  }
  // The table index is the low 4 bits; narrower codes see their table repeated above them.
  template <int BITS>
  static V lookup(const Table& t, I codes) { return _mm512_permutexvar_ps(codes, t.values); }
};
}  // namespace

#include "pot_gemv_rows.h"
#include "int8_rows.h"
#include "dense_rows.h"
#include "dequant_elementwise.h"
#include "pot_gemv_entry.h"

POTQ_ENTRY_POINTS(avx512)
