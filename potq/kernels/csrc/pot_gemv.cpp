// Fused PoT matrix-vector product on packed codes: y[b, r] = sum_j x[b, j] * W[r, j].
//
// W is never materialised. Each row's codes are read from the packed bit stream (little-endian,
// code j at bits j*N .. j*N+N-1, potq's storage layout), 8 (AVX2) or 16 (AVX-512) at a time;
// each weight is built in a register by adding its exponent to the bit pattern of the group's
// scale and OR-ing in the sign bit (the thesis' exponent-add dequantization, no multiply), then
// multiplied-accumulated against the activations. Rows are split across threads.
//
// The vector paths handle 2..4-bit codes, whole vectors of each group (a group starts at a
// multiple of G, so its codes start byte-aligned whenever G is a multiple of 8); the rest —
// other widths, the last < 8 (16) codes of a group, results that would be subnormal — takes the
// scalar path, which computes exactly what potq's decode computes.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>

namespace {

constexpr int64_t kMaxBatch = 8;  // activation rows per kernel call; larger batches are split

struct Layout {
  int64_t bits, group, top, in_features, row_bytes;
  bool with_zero;
};

inline uint32_t load_bits(const uint8_t* row, int64_t bit_offset, int64_t nbits) {
  // up to 25 bits starting anywhere: read the bytes that hold them (never past the row's end)
  uint32_t word = 0;
  const int64_t byte = bit_offset >> 3;
  const int64_t need = ((bit_offset & 7) + nbits + 7) >> 3;
  std::memcpy(&word, row + byte, need);
  return (word >> (bit_offset & 7)) & ((1u << nbits) - 1);
}

// The 32-bit word holding 8 codes that start at ``byte`` (they take N <= 4 bytes). A full 4-byte
// load wherever the row has 4 bytes left: building the word from N single-byte copies instead
// makes every later full-width read of it a store-forwarding stall (measured: 5x slower).
inline uint32_t load_word(const uint8_t* row, int64_t byte, const Layout& L) {
  uint32_t word = 0;
  if (byte + 4 <= L.row_bytes) {
    std::memcpy(&word, row + byte, 4);  // a constant size: one unaligned load
  } else {
    for (int64_t i = 0; byte + i < L.row_bytes; ++i) word |= uint32_t(row[byte + i]) << (8 * i);
  }
  return word;
}

// Exactly potq's decode of one code: sign * a * 2^(field - K) (pot-zero: field 0 is 0.0).
inline float scalar_weight(uint32_t code, float a, const Layout& L) {
  const int32_t field = code & ((1u << (L.bits - 1)) - 1);
  const bool negative = (code >> (L.bits - 1)) & 1;
  if (L.with_zero && field == 0) return 0.0f;
  const int32_t e = field - L.top - (L.with_zero ? 1 : 0);
  const float v = std::ldexp(a, e);
  return negative ? -v : v;
}

float scalar_dot(const uint8_t* row, const float* x, const float* scales, const Layout& L,
                 int64_t start, int64_t end) {
  float acc = 0.0f;
  for (int64_t j = start; j < end; ++j) {
    const uint32_t code = load_bits(row, j * L.bits, L.bits);
    acc += scalar_weight(code, scales[j / L.group], L) * x[j];
  }
  return acc;
}

// Whether a group's exponent adds stay in float32's normal range (a·2^-K·2 >= FLT_MIN).
inline bool normal_range(float a, const Layout& L) {
  int exp;
  std::frexp(a, &exp);
  return exp - 1 - (L.top + 1) > -126;
}

__attribute__((target("avx2,fma"))) inline __m256 decode8(uint32_t word, __m256i a_bits, const Layout& L,
                                                          __m256i shifts) {
  const __m256i mask = _mm256_set1_epi32((1 << L.bits) - 1);
  const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), mask);
  const __m256i field = _mm256_and_si256(codes, _mm256_set1_epi32((1 << (L.bits - 1)) - 1));
  const __m256i sign = _mm256_slli_epi32(_mm256_srli_epi32(codes, L.bits - 1), 31);
  const __m256i e = _mm256_sub_epi32(field, _mm256_set1_epi32(L.top + (L.with_zero ? 1 : 0)));
  __m256i v = _mm256_or_si256(_mm256_add_epi32(a_bits, _mm256_slli_epi32(e, 23)), sign);  // exponent add
  if (L.with_zero) v = _mm256_andnot_si256(_mm256_cmpeq_epi32(field, _mm256_setzero_si256()), v);
  return _mm256_castsi256_ps(v);
}

__attribute__((target("avx2,fma"))) void rows_avx2(const float* x, int64_t batch, const uint8_t* codes,
                                                   const float* scales, int64_t groups, const Layout& L,
                                                   float* y, int64_t out_features, int64_t r0, int64_t r1) {
  int32_t sh[8];
  for (int i = 0; i < 8; ++i) sh[i] = i * L.bits;
  const __m256i shifts = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sh));
  const bool vector_ok = L.bits <= 4;
  __m256 acc[kMaxBatch];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = codes + r * L.row_bytes;
    const float* rs = scales + r * groups;
    for (int64_t b = 0; b < batch; ++b) acc[b] = _mm256_setzero_ps();
    float tail[kMaxBatch] = {0.0f};
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t start = g * L.group, end = std::min(start + L.group, L.in_features);
      const float a = rs[g];
      if (!vector_ok || !normal_range(a, L)) {
        for (int64_t b = 0; b < batch; ++b) tail[b] += scalar_dot(row, x + b * L.in_features, rs, L, start, end);
        continue;
      }
      int32_t a_int;
      std::memcpy(&a_int, &a, 4);
      const __m256i a_bits = _mm256_set1_epi32(a_int);
      const int64_t vend = start + (end - start) / 8 * 8;  // whole vectors; the rest is scalar
      for (int64_t b = 0; b < batch && vend < end; ++b)
        tail[b] += scalar_dot(row, x + b * L.in_features, rs, L, vend, end);
      for (int64_t j = start; j < vend; j += 8) {
        const __m256 w = decode8(load_word(row, j * L.bits >> 3, L), a_bits, L, shifts);  // 8 codes: N bytes
        for (int64_t b = 0; b < batch; ++b)
          acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * L.in_features + j), acc[b]);
      }
    }
    for (int64_t b = 0; b < batch; ++b) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc[b]);
      float s = tail[b];
      for (float v : lanes) s += v;
      y[b * out_features + r] = s;
    }
  }
}

__attribute__((target("avx512f"))) void rows_avx512(const float* x, int64_t batch, const uint8_t* codes,
                                                    const float* scales, int64_t groups, const Layout& L,
                                                    float* y, int64_t out_features, int64_t r0, int64_t r1) {
  int32_t sh[16];
  for (int i = 0; i < 16; ++i) sh[i] = (i % 8) * L.bits;
  const __m512i shifts = _mm512_loadu_si512(sh);
  const __m512i mask = _mm512_set1_epi32((1 << L.bits) - 1);
  const __m512i field_mask = _mm512_set1_epi32((1 << (L.bits - 1)) - 1);
  const __m512i bias = _mm512_set1_epi32(L.top + (L.with_zero ? 1 : 0));
  const bool vector_ok = L.bits <= 4;
  __m512 acc[kMaxBatch];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = codes + r * L.row_bytes;
    const float* rs = scales + r * groups;
    for (int64_t b = 0; b < batch; ++b) acc[b] = _mm512_setzero_ps();
    float tail[kMaxBatch] = {0.0f};
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t start = g * L.group, end = std::min(start + L.group, L.in_features);
      const float a = rs[g];
      if (!vector_ok || !normal_range(a, L)) {
        for (int64_t b = 0; b < batch; ++b) tail[b] += scalar_dot(row, x + b * L.in_features, rs, L, start, end);
        continue;
      }
      int32_t a_int;
      std::memcpy(&a_int, &a, 4);
      const __m512i a_bits = _mm512_set1_epi32(a_int);
      const int64_t vend = start + (end - start) / 16 * 16;  // whole vectors; the rest is scalar
      for (int64_t b = 0; b < batch && vend < end; ++b)
        tail[b] += scalar_dot(row, x + b * L.in_features, rs, L, vend, end);
      for (int64_t j = start; j < vend; j += 16) {
        const uint32_t lo = load_word(row, j * L.bits >> 3, L);  // codes j..j+7 and j+8..j+15
        const uint32_t hi = load_word(row, (j + 8) * L.bits >> 3, L);
        const __m512i words = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(lo)),
                                                 _mm256_set1_epi32(hi), 1);
        const __m512i c = _mm512_and_si512(_mm512_srlv_epi32(words, shifts), mask);
        const __m512i field = _mm512_and_si512(c, field_mask);
        const __m512i sign = _mm512_slli_epi32(_mm512_srli_epi32(c, L.bits - 1), 31);
        const __m512i e = _mm512_sub_epi32(field, bias);
        __m512i v = _mm512_or_si512(_mm512_add_epi32(a_bits, _mm512_slli_epi32(e, 23)), sign);  // exponent add
        if (L.with_zero) v = _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(field, field), v);
        const __m512 w = _mm512_castsi512_ps(v);
        for (int64_t b = 0; b < batch; ++b)
          acc[b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + b * L.in_features + j), acc[b]);
      }
    }
    for (int64_t b = 0; b < batch; ++b) y[b * out_features + r] = tail[b] + _mm512_reduce_add_ps(acc[b]);
  }
}

}  // namespace

std::string best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
  return "scalar";
}

torch::Tensor pot_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, int64_t bits,
                       int64_t group, int64_t top, bool with_zero, std::string isa) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous float32 [B, in]");
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous(), "codes must be contiguous uint8");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && scales.is_contiguous(), "scales must be contiguous float32");
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits must be 2..8");
  const int64_t batch = x.size(0), out_features = codes.size(0), groups = scales.size(1);
  const Layout L{bits, group, top, x.size(1), codes.size(1), with_zero};
  auto y = torch::empty({batch, out_features}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out_features, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t b0 = 0; b0 < batch && isa != "scalar"; b0 += kMaxBatch) {
      const int64_t nb = std::min(kMaxBatch, batch - b0);
      const float* xb = xp + b0 * L.in_features;
      float* yb = yp + b0 * out_features;
      if (isa == "avx512") rows_avx512(xb, nb, cp, sp, groups, L, yb, out_features, r0, r1);
      else rows_avx2(xb, nb, cp, sp, groups, L, yb, out_features, r0, r1);
    }
    if (isa == "scalar") {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t b = 0; b < batch; ++b)
          yp[b * out_features + r] = scalar_dot(cp + r * L.row_bytes, xp + b * L.in_features, sp + r * groups, L,
                                                0, L.in_features);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pot_gemv", &pot_gemv, "fused PoT GEMV on packed codes");
  m.def("best_isa", &best_isa, "the widest vector ISA this CPU runs");
}
