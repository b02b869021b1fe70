// The native decoder's 8-bit-activation PoT kernel (see q8_layout.h for the method and layout):
// the repacking, a scalar loop for any CPU and an AVX2 loop; the AVX-512 VNNI loops are in
// q8_vnni.cpp. The layer's kernel is chosen when it is repacked.
#include "q8_layout.h"  // first: it brings torch's headers, which must precede potq's Layout

#include <immintrin.h>

#include <ATen/Parallel.h>

#include <cstring>

#include "pot_gemv_scalar.h"

namespace {

// Where a 3-bit unit keeps code j's sign. 32 codes (AVX2): code 4k + i at bit 8i + 7 − k of its
// 32-bit sign word, so that shifting lane k of the word (broadcast) left by k puts every code's sign
// in the top bit of its own byte — one shift, no table, for the whole unit. 64 codes (AVX-512): bit
// j, the byte mask a mask register loads.
inline int sign_bit(int j, int width) { return width == 64 ? j : 8 * (j % 4) + 7 - j / 4; }

// Code `j` (0..width) of one unit of `width` codes in the runtime layout.
inline int unit_code(const uint8_t* unit, int bits, int width, int j) {
  if (bits == 4) return (unit[j % (width / 2)] >> (4 * (j / (width / 2)))) & 15;
  const int quarter = width / 4, low = (unit[j % quarter] >> (2 * (j / quarter))) & 3;
  if (bits == 2) return low;
  const int bit = sign_bit(j, width);
  return low | ((unit[quarter + bit / 8] >> (bit % 8)) & 1) << 2;
}

inline float group_factor(const Q8Layer& Q, int64_t r, int64_t g) {
  return half_to_float(Q.scales[r * Q.groups + g]) * Q.unit;
}

void rows_scalar_q8(const Q8Layer& Q, const Q8Activations& x, float* y, int64_t r0, int64_t r1) {
  const int64_t W = Q.width, units = Q.group / W;
  for (int64_t b = 0; b < x.rows; ++b)
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = Q.row_start(r);
      float acc = 0.0f;
      for (int64_t g = 0; g < Q.groups; ++g) {
        int32_t dot = 0;
        for (int64_t u = g * units; u < std::min((g + 1) * units, Q.in / W); ++u)
          for (int j = 0; j < W; ++j) {
            const int c = unit_code(row + u * Q.unit_stride, Q.bits, static_cast<int>(W), j);
            dot += static_cast<uint8_t>(Q.magnitude[c]) * Q.sign[c] * x.q[b * x.n + u * W + j];
          }
        acc += static_cast<float>(dot) * group_factor(Q, r, g) * x.scale[b * x.stride + g];
      }
      y[b * Q.out + r] = acc;
    }
}

// A 2- or 3-bit unit's low plane: 32 bytes of the codes' two low bits.
__attribute__((target("avx2,fma,f16c"))) inline __m256i low_plane(const uint8_t* unit) {
  int64_t eight;
  std::memcpy(&eight, unit, 8);
  const __m256i shifts = _mm256_setr_epi32(0, 0, 2, 2, 4, 4, 6, 6);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi64x(eight), shifts), _mm256_set1_epi8(3));
}

// A 3-bit unit's sign plane as the sign to give the activations: a byte with its top bit set
// (negative) for negative codes, a positive one for the others.
__attribute__((target("avx2,fma,f16c"))) inline __m256i code_signs(const uint8_t* unit) {
  int32_t signs;
  std::memcpy(&signs, unit + 8, 4);
  const __m256i shifted = _mm256_sllv_epi32(_mm256_set1_epi32(signs), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_or_si256(shifted, _mm256_set1_epi8(1));
}

__attribute__((target("avx2,fma,f16c"))) inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// A unit's weights as the multiply-add takes them: magnitudes 2^f (u8) and the sign to give the
// activations (±1 bytes, which _mm256_sign_epi8 applies).
template <int BITS>
__attribute__((target("avx2,fma,f16c"))) inline void unit_weights(const uint8_t* unit, __m256i magnitude, __m256i sign,
                                                                 __m256i& w, __m256i& s) {
  if constexpr (BITS == 3) {
    w = _mm256_shuffle_epi8(magnitude, low_plane(unit));
    s = code_signs(unit);
  } else {
    __m256i c;
    if constexpr (BITS == 4) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(unit));
      c = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(15));
    } else {
      c = low_plane(unit);
    }
    w = _mm256_shuffle_epi8(magnitude, c);
    s = _mm256_shuffle_epi8(sign, c);
  }
}

// Rows [r0, r1) for the NB activation rows from b0: each unit decoded once for all of them.
template <int BITS, int NB>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2_q8(const Q8Layer& Q, const Q8Activations& x, float* y,
                                                          int64_t b0, int64_t r0, int64_t r1) {
  const int64_t units = Q.group / 32, total_units = Q.in / 32;
  constexpr int64_t kUnitBytes = BITS == 4 ? 16 : BITS == 3 ? 12 : 8;
  // units whose 16-bit pair sums may add up before they are widened: |pair| <= 2·2^f_max·127, so
  // sixteen for 3-bit codes (2032 each), one for 4-bit (32512)
  constexpr int64_t kPairsKept = BITS == 4 ? 1 : 16;
  __m128i m16, s16;
  std::memcpy(&m16, Q.magnitude, 16);
  std::memcpy(&s16, Q.sign, 16);
  const __m256i magnitude = _mm256_broadcastsi128_si256(m16), sign = _mm256_broadcastsi128_si256(s16);
  const __m256i ones16 = _mm256_set1_epi16(1);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = Q.row_start(r);
    __m256 acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = _mm256_setzero_ps();
    for (int64_t g = 0; g < Q.groups; ++g) {
      __m256i dot[NB];
      for (int b = 0; b < NB; ++b) dot[b] = _mm256_setzero_si256();
      const int64_t end = std::min((g + 1) * units, total_units);
      for (int64_t chunk = g * units; chunk < end; chunk += kPairsKept) {
        __m256i pairs[NB];
        for (int b = 0; b < NB; ++b) pairs[b] = _mm256_setzero_si256();
        for (int64_t u = chunk; u < std::min(chunk + kPairsKept, end); ++u) {
          if constexpr (NB == 1) prefetch_ahead<kUnitBytes>(row + u * kUnitBytes);  // decoding streams the weights
          __m256i w, s;
          unit_weights<BITS>(row + u * kUnitBytes, magnitude, sign, w, s);
          const int8_t* xu = x.q.data() + b0 * x.n + u * 32;
          for (int b = 0; b < NB; ++b) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xu + b * x.n));
            pairs[b] = _mm256_add_epi16(pairs[b], _mm256_maddubs_epi16(w, _mm256_sign_epi8(xv, s)));
          }
        }
        for (int b = 0; b < NB; ++b) dot[b] = _mm256_add_epi32(dot[b], _mm256_madd_epi16(pairs[b], ones16));
      }
      const float f = _cvtsh_ss(Q.scales[r * Q.groups + g]) * Q.unit;
      for (int b = 0; b < NB; ++b)
        acc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[b]), _mm256_set1_ps(f * x.scale[(b0 + b) * x.stride + g]), acc[b]);
    }
    for (int b = 0; b < NB; ++b) y[(b0 + b) * Q.out + r] = hsum(acc[b]);
  }
}

template <int BITS>
void rows_avx2_q8_all(const Q8Layer& Q, const Q8Activations& x, float* y, int64_t r0, int64_t r1) {
  int64_t b = 0;  // eight activation rows share each unit's decoding, then four, then one
  for (; b + 8 <= x.rows; b += 8) rows_avx2_q8<BITS, 8>(Q, x, y, b, r0, r1);
  for (; b + 4 <= x.rows; b += 4) rows_avx2_q8<BITS, 4>(Q, x, y, b, r0, r1);
  for (; b < x.rows; ++b) rows_avx2_q8<BITS, 1>(Q, x, y, b, r0, r1);
}

void int8_rows_scalar_q8(const Int8Layer& L, const Q8Activations& x, float* y, int64_t r0, int64_t r1) {
  for (int64_t b = 0; b < x.rows; ++b)
    for (int64_t r = r0; r < r1; ++r) {
      float acc = 0.0f;
      for (int64_t g = 0; g < L.groups; ++g) {
        int32_t dot = 0;
        for (int64_t j = g * L.group; j < std::min((g + 1) * L.group, L.in); ++j)
          dot += (static_cast<int32_t>(L.codes[r * L.in + j]) - 127) * x.q[b * x.n + j];
        acc += static_cast<float>(dot) * half_to_float(L.scales[r * L.groups + g]) * x.scale[b * x.stride + g];
      }
      y[b * L.out + r] = acc;
    }
}

template <int NB>
__attribute__((target("avx2,fma,f16c"))) void int8_rows_avx2_q8(const Int8Layer& L, const Q8Activations& x, float* y,
                                                               int64_t b0, int64_t r0, int64_t r1) {
  const __m256i offset = _mm256_set1_epi8(127), ones16 = _mm256_set1_epi16(1);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = L.codes + r * L.in;
    __m256 acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = _mm256_setzero_ps();
    for (int64_t g = 0; g < L.groups; ++g) {
      __m256i dot[NB];
      for (int b = 0; b < NB; ++b) dot[b] = _mm256_setzero_si256();
      for (int64_t j = g * L.group; j < std::min((g + 1) * L.group, L.in); j += 32) {
        const __m256i q = _mm256_sub_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j)), offset);
        const __m256i magnitude = _mm256_abs_epi8(q);
        for (int b = 0; b < NB; ++b) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + (b0 + b) * x.n + j));
          dot[b] = _mm256_add_epi32(dot[b], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xv, q)), ones16));
        }
      }
      const float f = _cvtsh_ss(L.scales[r * L.groups + g]);
      for (int b = 0; b < NB; ++b)
        acc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[b]), _mm256_set1_ps(f * x.scale[(b0 + b) * x.stride + g]), acc[b]);
    }
    for (int b = 0; b < NB; ++b) y[(b0 + b) * L.out + r] = hsum(acc[b]);
  }
}

__attribute__((target("avx2,fma,f16c"))) void quantize_avx2(const float* x, int64_t n, int8_t* q, float* scale,
                                                            int32_t* sum) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 top = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) top = _mm256_max_ps(top, _mm256_and_ps(_mm256_loadu_ps(x + j), magnitude));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  float amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
  for (; j < n; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
  *scale = d;
  const __m256 iv = _mm256_set1_ps(inv);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i sums = _mm256_setzero_si256();
  j = 0;
  for (; j + 32 <= n; j += 32) {  // cvtps rounds to nearest even, as nearbyint below
    __m256i v[4];
    for (int k = 0; k < 4; ++k) v[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 8 * k), iv));
    sums = _mm256_add_epi32(sums, _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3])));
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j), _mm256_permutevar8x32_epi32(bytes, order));
  }
  int32_t lanes[8], total = 0;
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), sums);
  for (int k = 0; k < 8; ++k) total += lanes[k];
  for (; j < n; ++j) total += q[j] = static_cast<int8_t>(std::nearbyint(x[j] * inv));
  *sum = total;
}

bool avx2_here() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

// The VNNI multiply-add's unsigned operand of each code: sign·magnitude + offset (offset: the largest magnitude).
void shift_table(Q8Layer& Q) {
  for (int c = 0; c < 16; ++c) Q.shifted[c] = static_cast<uint8_t>(static_cast<uint8_t>(Q.magnitude[c]) * Q.sign[c] + Q.offset);
}

}  // namespace

int q8_best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") && avx2_here())
    return kQ8Vnni;
  return avx2_here() ? kQ8Avx2 : kQ8Scalar;
}

int q8_isa_named(const std::string& name) {
  static const char* names[] = {"scalar", "avx2", "vnni"};
  if (name.empty()) return q8_best_isa();
  for (int isa = kQ8Scalar; isa <= q8_best_isa(); ++isa)
    if (name == names[isa]) return isa;
  TORCH_CHECK(false, "this CPU runs the 8-bit-activation kernels up to ", names[q8_best_isa()], ", not ", name);
}

std::vector<torch::Tensor> q8_repack(const Args& A, Q8Layer& Q, int isa) {
  const Layout& L = A.layout;
  // the VNNI loop takes rows and groups of whole 64-code units; any other layer the AVX2 loop
  Q.isa = isa == kQ8Vnni && (L.in_features % 64 || L.group % 64) ? kQ8Avx2 : isa;
  const int W = Q.isa == kQ8Vnni ? 64 : 32;
  const int64_t units = L.in_features / W, unit_bytes = q8_unit_bytes(L.bits, W);
  const int64_t I = Q.isa == kQ8Vnni ? 4 : 1, rows = (A.out_features + I - 1) / I * I;
  auto data = torch::zeros({rows, units * unit_bytes}, torch::kUInt8);
  uint8_t* out = data.data_ptr<uint8_t>();
  at::parallel_for(0, A.out_features, 64, [&](int64_t r0, int64_t r1) {  // rows write disjoint units
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = A.codes + r * L.row_bytes;
      for (int64_t u = 0; u < units; ++u) {
        uint8_t* unit = out + ((r / I) * units * I + u * I + r % I) * unit_bytes;
        for (int j = 0; j < W; ++j) {
          const int64_t bit = (u * W + j) * L.bits;
          const int c = (load_word(row, bit >> 3, L.row_bytes) >> (bit & 7)) & ((1u << L.bits) - 1);
          if (L.bits == 4) {
            unit[j % (W / 2)] |= static_cast<uint8_t>(c << (4 * (j / (W / 2))));
          } else {
            unit[j % (W / 4)] |= static_cast<uint8_t>((c & 3) << (2 * (j / (W / 4))));
            const int sign = sign_bit(j, W);
            if (L.bits == 3) unit[W / 4 + sign / 8] |= static_cast<uint8_t>((c >> 2) << (sign % 8));
          }
        }
      }
    }
  });
  Q.data = out, Q.scales = A.scales, Q.row_bytes = units * unit_bytes, Q.groups = A.groups, Q.width = W;
  Q.interleave = I, Q.unit_stride = I * unit_bytes;
  Q.group = L.group, Q.in = L.in_features, Q.out = A.out_features, Q.bits = static_cast<int>(L.bits);
  Q.unit = std::ldexp(1.0f, -static_cast<int>(L.top) - (L.with_zero ? 1 : 0));
  for (int c = 0; c < 16; ++c) {
    const int code = c & ((1 << L.bits) - 1), field = code & ((1 << (L.bits - 1)) - 1);
    Q.magnitude[c] = static_cast<int8_t>(L.with_zero && field == 0 ? 0 : 1 << field);
    Q.sign[c] = code >> (L.bits - 1) ? -1 : 1;
  }
  Q.offset = 1 << ((1 << (L.bits - 1)) - 1);  // the largest magnitude
  shift_table(Q);
  if (Q.isa != kQ8Vnni) return {data};
  auto quad = torch::zeros({rows * A.groups}, torch::kInt16);
  uint16_t* q = reinterpret_cast<uint16_t*>(quad.data_ptr<int16_t>());
  for (int64_t r = 0; r < A.out_features; ++r)
    for (int64_t g = 0; g < A.groups; ++g) q[((r / 4) * A.groups + g) * 4 + r % 4] = A.scales[r * A.groups + g];
  Q.quad_scales = q;
  return {data, quad};
}

void q8_use_magnitudes(Q8Layer& Q, const std::vector<int64_t>& magnitudes) {
  const int64_t fields = int64_t{1} << (Q.bits - 1);
  TORCH_CHECK(static_cast<int64_t>(magnitudes.size()) == fields, "magnitudes: one per field, ", fields);
  for (const int64_t m : magnitudes) TORCH_CHECK(m >= 1 && m <= magnitudes.back(), "magnitudes: 1 .. the last");
  TORCH_CHECK(magnitudes.back() <= 127, "magnitudes: at most 127");
  for (int c = 0; c < 16; ++c) Q.magnitude[c] = static_cast<int8_t>(magnitudes[c & (fields - 1)]);
  Q.offset = static_cast<int>(magnitudes.back());
  Q.unit = 1.0f / static_cast<float>(magnitudes.back());
  shift_table(Q);
}

void q8_rows(const Q8Layer& Q, const Q8Activations& x, float* y, int64_t r0, int64_t r1) {
  if (Q.isa == kQ8Scalar) return rows_scalar_q8(Q, x, y, r0, r1);
  if (Q.isa == kQ8Vnni) return q8_rows_vnni(Q, x, y, r0, r1);
  switch (Q.bits) {
    case 2: return rows_avx2_q8_all<2>(Q, x, y, r0, r1);
    case 3: return rows_avx2_q8_all<3>(Q, x, y, r0, r1);
    default: return rows_avx2_q8_all<4>(Q, x, y, r0, r1);
  }
}

void q8_row(const Q8Layer& Q, int64_t r, float* out) {
  const uint8_t* row = Q.row_start(r);
  const int64_t W = Q.width;
  for (int64_t j = 0; j < Q.in; ++j) {
    const int c = unit_code(row + (j / W) * Q.unit_stride, Q.bits, static_cast<int>(W), static_cast<int>(j % W));
    out[j] = static_cast<float>(static_cast<uint8_t>(Q.magnitude[c]) * Q.sign[c]) * group_factor(Q, r, j / Q.group);
  }
}

void q8_int8_rows(const Int8Layer& L, const Q8Activations& x, float* y, int64_t r0, int64_t r1, int isa) {
  if (isa == kQ8Scalar) return int8_rows_scalar_q8(L, x, y, r0, r1);
  if (isa == kQ8Vnni && q8_int8_vnni_serves(L)) return q8_int8_rows_vnni(L, x, y, r0, r1);
  int64_t b = 0;
  for (; b + 4 <= x.rows; b += 4) int8_rows_avx2_q8<4>(L, x, y, b, r0, r1);
  for (; b < x.rows; ++b) int8_rows_avx2_q8<1>(L, x, y, b, r0, r1);
}

void q8_quantize_block(const float* x, int64_t n, int8_t* q, float* scale, int32_t* sum) {
  static const bool avx2 = avx2_here();
  if (avx2) return quantize_avx2(x, n, q, scale, sum);
  float amax = 0.0f;
  for (int64_t j = 0; j < n; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
  *scale = d, *sum = 0;
  for (int64_t j = 0; j < n; ++j) *sum += q[j] = static_cast<int8_t>(std::nearbyint(x[j] * inv));
}
