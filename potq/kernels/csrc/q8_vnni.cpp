// The 8-bit-activation kernels on AVX-512 VNNI: 64 weights a step, and the u8×s8 multiply-add
// that sums four products into a 32-bit lane (vpdpbusd) in one instruction where AVX2 takes three
// (maddubs, madd, add) and must widen before 16-bit sums overflow.
//
// vpdpbusd multiplies unsigned bytes by signed ones. The activations are the signed operand; a
// 2- or 3-bit weight ±2^f enters as the unsigned ±2^f + o (o its largest magnitude, a 16-entry
// table lookup on the whole code), so a group's sum is Σw·x + o·Σx and o·Σx, known from the
// activations' quantization, is taken off in integers — exact, as the AVX2 loop. 4-bit magnitudes
// reach 2^7, too large for ±2^f + 128 to fit a byte: there the magnitude is the unsigned operand
// and the activations of negative codes are negated under a mask (what _mm256_sign_epi8 does on
// AVX2, which AVX-512 lacks). The symmetric 8-bit layers (codes q + 127) are the same sum with
// o = 127 and no table at all.
#include "q8_layout.h"  // first: it brings torch's headers, which must precede potq's Layout

#include <immintrin.h>

#include <cstring>
#include <vector>

#define POTQ_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

namespace {

// A 64-code unit's unsigned operand; for 4-bit codes also the mask of the negative ones.
template <int BITS>
POTQ_VNNI inline __m512i unit_weights(const uint8_t* unit, __m512i table, __mmask64& negative) {
  if constexpr (BITS == 8) {
    return _mm512_loadu_si512(unit);
  } else if constexpr (BITS == 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit));
    const __m512i c = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1),
                                       _mm512_set1_epi8(15));
    negative = _mm512_test_epi8_mask(c, _mm512_set1_epi8(8));
    return _mm512_shuffle_epi8(table, c);
  } else {
    // lane L of the broadcast low plane shifted by 2L: byte 16L + i holds code 16L + i's low bits
    const __m512i plane = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit)));
    __m512i c = _mm512_and_si512(_mm512_srlv_epi64(plane, _mm512_setr_epi64(0, 0, 2, 2, 4, 4, 6, 6)),
                                 _mm512_set1_epi8(3));
    if constexpr (BITS == 3) {
      __mmask64 signs;
      std::memcpy(&signs, unit + 16, 8);
      c = _mm512_mask_add_epi8(c, signs, c, _mm512_set1_epi8(4));
    }
    return _mm512_shuffle_epi8(table, c);
  }
}

template <int BITS>
POTQ_VNNI inline __m512i lookup_table(const Q8Layer& Q) {
  __m128i entries;
  std::memcpy(&entries, BITS == 4 ? static_cast<const void*>(Q.magnitude) : static_cast<const void*>(Q.shifted), 16);
  return _mm512_broadcast_i32x4(entries);
}

// 64 activations as the signed operand: for 4-bit codes, negated where the code is negative.
template <int BITS>
POTQ_VNNI inline __m512i activations(const int8_t* xq, __mmask64 negative) {
  const __m512i xv = _mm512_loadu_si512(xq);
  return BITS == 4 ? _mm512_mask_sub_epi8(xv, negative, _mm512_setzero_si512(), xv) : xv;
}

// Four vectors' 32-bit lanes summed four at a time: lane 4L + i of the result is the sum of v_i's
// lanes 4L .. 4L + 3 — four rows' sums in one vector, so that a group's scaling (and a row's final
// reduction) is done once for four rows.
POTQ_VNNI inline __m512i sum_four(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  return _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
}

// The four 128-bit lanes of v added: lane i = v's lanes i, 4 + i, 8 + i, 12 + i summed.
POTQ_VNNI inline __m128 lanes_summed(__m512 v) {
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// Rows [r0, r1) for activation row b, one row at a time: what the four-row and four-token loops
// leave (a slice's first rows off a multiple of 4; an 8-bit layer's single tokens).
template <int BITS>
POTQ_VNNI void rows(const Q8Layer& Q, const Q8Activations& x, float* y, int64_t b, int64_t r0, int64_t r1) {
  const int64_t units = Q.group / 64, total_units = Q.in / 64;
  const __m512i table = lookup_table<BITS>(Q);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = Q.row_start(r);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < Q.groups; ++g) {
      __m512i dot = _mm512_setzero_si512();
      for (int64_t u = g * units; u < std::min((g + 1) * units, total_units); ++u) {
        __mmask64 negative = 0;
        const __m512i w = unit_weights<BITS>(row + u * Q.unit_stride, table, negative);
        dot = _mm512_dpbusd_epi32(dot, w, activations<BITS>(x.q.data() + b * x.n + u * 64, negative));
      }
      const int64_t at = b * x.stride + g;
      if constexpr (BITS != 4) dot = _mm512_mask_sub_epi32(dot, 1, dot, _mm512_set1_epi32(Q.offset * x.sum[at]));
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(_cvtsh_ss(Q.scales[r * Q.groups + g]) * Q.unit * x.scale[at]),
                            acc);
    }
    y[b * Q.out + r] = _mm512_reduce_add_ps(acc);
  }
}

// Rows [r0, r1) for the 4·K activation rows from b0 (a prompt's tokens): each unit decoded once for
// all of them; a group's sums of four tokens gathered into one vector (sum_four) and scaled by one
// multiply-add with their four scales (Q8Activations' transposed scale_t, sum_t: one load each).
template <int BITS, int K>
POTQ_VNNI void token_quads(const Q8Layer& Q, const Q8Activations& x, float* y, int64_t b0, int64_t r0, int64_t r1) {
  const int64_t units = Q.group / 64, total_units = Q.in / 64;
  const __m512i table = lookup_table<BITS>(Q);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = Q.row_start(r);
    __m512 acc[K];
    for (int k = 0; k < K; ++k) acc[k] = _mm512_setzero_ps();
    for (int64_t g = 0; g < Q.groups; ++g) {
      __m512i dot[4 * K];
      for (int b = 0; b < 4 * K; ++b) dot[b] = _mm512_setzero_si512();
      for (int64_t u = g * units; u < std::min((g + 1) * units, total_units); ++u) {
        __mmask64 negative = 0;
        const __m512i w = unit_weights<BITS>(row + u * Q.unit_stride, table, negative);
        const int8_t* xu = x.q.data() + b0 * x.n + u * 64;
        for (int b = 0; b < 4 * K; ++b) dot[b] = _mm512_dpbusd_epi32(dot[b], w, activations<BITS>(xu + b * x.n, negative));
      }
      const float f = _cvtsh_ss(Q.scales[r * Q.groups + g]) * Q.unit;
      for (int k = 0; k < K; ++k) {
        const int64_t at = g * x.rows + b0 + 4 * k;
        __m512i sums = sum_four(dot[4 * k], dot[4 * k + 1], dot[4 * k + 2], dot[4 * k + 3]);
        if constexpr (BITS != 4) {
          const __m128i offsets = _mm_mullo_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(&x.sum_t[at])),
                                                  _mm_set1_epi32(Q.offset));
          sums = _mm512_mask_sub_epi32(sums, 0xF, sums, _mm512_zextsi128_si512(offsets));
        }
        const __m512 scale = _mm512_broadcast_f32x4(_mm_mul_ps(_mm_loadu_ps(&x.scale_t[at]), _mm_set1_ps(f)));
        acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[k]);
      }
    }
    for (int k = 0; k < K; ++k) {
      float four[4];
      _mm_storeu_ps(four, lanes_summed(acc[k]));
      for (int i = 0; i < 4; ++i) y[(b0 + 4 * k + i) * Q.out + r] = four[i];
    }
  }
}

// Rows [r0, r1) for one activation row b (decoding), r0 a multiple of 4: four rows at a time (one
// stream in the interleaved layout), each unit's activations loaded once for the four, a group's
// four integer sums scaled by one multiply-add with the four rows' scales (Q.quad_scales:
// [out/4, groups, 4] fp16, repacked so they are one load).
template <int BITS>
POTQ_VNNI void quads(const Q8Layer& Q, const Q8Activations& x, float* y, int64_t b, int64_t r0, int64_t r1) {
  constexpr int64_t kUnitBytes = BITS * 8;
  const int64_t units = Q.group / 64, total_units = Q.in / 64;
  const __m512i table = lookup_table<BITS>(Q);
  const int8_t* xb = x.q.data() + b * x.n;
  for (int64_t r = r0; r < r1; r += 4) {
    const uint8_t* quad = Q.row_start(r);
    const uint16_t* scales = Q.quad_scales + r * Q.groups;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < Q.groups; ++g) {
      __m512i dot[4];
      for (int i = 0; i < 4; ++i) dot[i] = _mm512_setzero_si512();
      const int64_t end = std::min((g + 1) * units, total_units);
      for (int64_t u = g * units; u < end; ++u) {
        const __m512i xv = _mm512_loadu_si512(xb + u * 64);
        prefetch_ahead<4 * kUnitBytes>(quad + 4 * u * kUnitBytes);
        for (int i = 0; i < 4; ++i) {
          __mmask64 negative = 0;
          const __m512i w = unit_weights<BITS>(quad + (4 * u + i) * kUnitBytes, table, negative);
          dot[i] = _mm512_dpbusd_epi32(dot[i], w, BITS == 4 ? _mm512_mask_sub_epi8(xv, negative, _mm512_setzero_si512(), xv) : xv);
        }
      }
      __m512i sums = sum_four(dot[0], dot[1], dot[2], dot[3]);
      const int64_t at = b * x.stride + g;
      if constexpr (BITS != 4) sums = _mm512_mask_sub_epi32(sums, 0xF, sums, _mm512_set1_epi32(Q.offset * x.sum[at]));
      const __m128 f = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(scales + 4 * g)));
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(_mm512_broadcast_f32x4(f), _mm512_set1_ps(Q.unit * x.scale[at])),
                            acc);
    }
    const __mmask8 live = static_cast<__mmask8>(r1 - r >= 4 ? 0xF : (1u << (r1 - r)) - 1);
    _mm_mask_storeu_ps(y + b * Q.out + r, live, lanes_summed(acc));
  }
}

template <int BITS>
void rows_all(const Q8Layer& Q, const Q8Activations& x, float* y, int64_t r0, int64_t r1) {
  int64_t b = 0;  // eight activation rows share each unit's decoding, then four, then one
  for (; b + 8 <= x.rows; b += 8) token_quads<BITS, 2>(Q, x, y, b, r0, r1);
  for (; b + 4 <= x.rows; b += 4) token_quads<BITS, 1>(Q, x, y, b, r0, r1);
  for (; b < x.rows; ++b) {  // four rows at a time (a thread's slice starts on a multiple of 4)
    const int64_t first = std::min(r1, (r0 + 3) / 4 * 4);
    rows<BITS>(Q, x, y, b, r0, first);
    quads<BITS>(Q, x, y, b, first, r1);
  }
}

// One 8-bit row of groups of 32 against one activation row: two groups a 64-code step, so each
// step's sixteen lanes take their group's scale from a vector of sixteen groups' scales (a lane
// permute), and the offset correction is one dot product of those scales a sixteen groups.
POTQ_VNNI float int8_row_g32(const Int8Layer& L, const uint8_t* row, const uint16_t* scales, const int8_t* xq,
                             const float* x_scale, const float* offsets) {
  __m512 acc = _mm512_setzero_ps(), correction = _mm512_setzero_ps();
  const __m512i pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  for (int64_t g0 = 0; g0 < L.groups; g0 += 16) {
    const __mmask16 live = static_cast<__mmask16>(L.groups - g0 >= 16 ? 0xFFFF : (1u << (L.groups - g0)) - 1);
    const __m512 f = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, scales + g0));
    const __m512 fx = _mm512_mul_ps(f, _mm512_maskz_loadu_ps(live, x_scale + g0));
    correction = _mm512_fmadd_ps(f, _mm512_maskz_loadu_ps(live, offsets + g0), correction);
    __m512i lanes = pair;
    for (int64_t j = g0 * 32; j < std::min(L.in, (g0 + 16) * 32); j += 64) {
      prefetch_ahead<64>(row + j);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(row + j),
                                              _mm512_loadu_si512(xq + j));
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(lanes, fx), acc);
      lanes = _mm512_add_epi32(lanes, _mm512_set1_epi32(2));
    }
  }
  return _mm512_reduce_add_ps(acc) - _mm512_reduce_add_ps(correction);
}

}  // namespace

void q8_rows_vnni(const Q8Layer& Q, const Q8Activations& x, float* y, int64_t r0, int64_t r1) {
  switch (Q.bits) {
    case 2: return rows_all<2>(Q, x, y, r0, r1);
    case 3: return rows_all<3>(Q, x, y, r0, r1);
    default: return rows_all<4>(Q, x, y, r0, r1);
  }
}

void q8_int8_rows_vnni(const Int8Layer& L, const Q8Activations& x, float* y, int64_t r0, int64_t r1) {
  if (L.group % 64 == 0) {  // the PoT loop's shape: codes q + 127 are ±q + o with o = 127, no table
    Q8Layer Q;
    Q.data = L.codes, Q.scales = L.scales, Q.row_bytes = L.in, Q.groups = L.groups, Q.group = L.group, Q.in = L.in;
    Q.out = L.out, Q.bits = 8, Q.isa = kQ8Vnni, Q.width = 64, Q.unit = 1.0f, Q.offset = 127, Q.unit_stride = 64;
    int64_t b = 0;
    for (; b + 8 <= x.rows; b += 8) token_quads<8, 2>(Q, x, y, b, r0, r1);
    for (; b + 4 <= x.rows; b += 4) token_quads<8, 1>(Q, x, y, b, r0, r1);
    for (; b < x.rows; ++b) rows<8>(Q, x, y, b, r0, r1);
    return;
  }
  // groups of 32: per activation row, 127 · Σx_q · its scale per group (the offset's share)
  thread_local std::vector<float> offsets;
  offsets.resize(x.rows * x.stride);
  for (int64_t b = 0; b < x.rows; ++b)
    for (int64_t g = 0; g < L.groups; ++g)
      offsets[b * x.stride + g] = 127.0f * static_cast<float>(x.sum[b * x.stride + g]) * x.scale[b * x.stride + g];
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < x.rows; ++b)
      y[b * L.out + r] = int8_row_g32(L, L.codes + r * L.in, L.scales + r * L.groups, x.q.data() + b * x.n,
                                      x.scale.data() + b * x.stride, offsets.data() + b * x.stride);
}
