// y[b, r] = sum_j x[b, j] * W[r, j] for a symmetric 8-bit layer (potq's uniform-sym 8: code
// c = q + 127, weight (c - 127)·s with one fp16 scale s per group) without decoding W: the bytes
// are widened to floats in registers, each group's dot product is formed first and its scale
// applied once. This is the packed output head of a model whose GGUF held the token table as
// Q8_0 (potq packs it back losslessly): a quarter of the float head's bytes per decoded token,
// which on a small model is a third of all the bytes a token reads. Output rows are split across
// threads; AVX-512 or AVX2 is picked at run time, with a scalar loop for any other CPU.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "pot_gemv_scalar.h"

namespace {

struct Int8Layer {
  const uint8_t* codes;    // [out, in]
  const uint16_t* scales;  // [out, groups], fp16 bit patterns
  int64_t in, out, group, groups;
};

void rows_scalar8(const Int8Layer& L, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      float acc = 0.0f;
      for (int64_t g = 0; g < L.groups; ++g) {
        float dot = 0.0f;
        for (int64_t j = g * L.group; j < std::min((g + 1) * L.group, L.in); ++j)
          dot += (static_cast<float>(L.codes[r * L.in + j]) - 127.0f) * x[b * L.in + j];
        acc += half_to_float(L.scales[r * L.groups + g]) * dot;
      }
      y[b * L.out + r] = acc;
    }
}

__attribute__((target("avx512f,avx512bw,f16c")))
void rows_avx512_8(const Int8Layer& L, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1) {
  const __m512 bias = _mm512_set1_ps(127.0f);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* row = L.codes + r * L.in;
      const float* xb = x + b * L.in;
      __m512 acc = _mm512_setzero_ps();
      float tail = 0.0f;
      for (int64_t g = 0; g < L.groups; ++g) {
        const int64_t start = g * L.group, end = std::min(start + L.group, L.in);
        __m512 dot = _mm512_setzero_ps();
        float rest = 0.0f;
        int64_t j = start;
        for (; j + 16 <= end; j += 16) {
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j));
          const __m512 w = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)), bias);
          dot = _mm512_fmadd_ps(w, _mm512_loadu_ps(xb + j), dot);
        }
        for (; j < end; ++j) rest += (static_cast<float>(row[j]) - 127.0f) * xb[j];
        const float s = half_to_float(L.scales[r * L.groups + g]);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(s), dot, acc);
        tail += s * rest;
      }
      y[b * L.out + r] = _mm512_reduce_add_ps(acc) + tail;
    }
}

__attribute__((target("avx2,fma,f16c")))
void rows_avx2_8(const Int8Layer& L, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1) {
  const __m256 bias = _mm256_set1_ps(127.0f);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* row = L.codes + r * L.in;
      const float* xb = x + b * L.in;
      __m256 acc = _mm256_setzero_ps();
      float tail = 0.0f;
      for (int64_t g = 0; g < L.groups; ++g) {
        const int64_t start = g * L.group, end = std::min(start + L.group, L.in);
        __m256 dot = _mm256_setzero_ps();
        float rest = 0.0f;
        int64_t j = start;
        for (; j + 8 <= end; j += 8) {
          int64_t eight;
          std::memcpy(&eight, row + j, 8);
          const __m256 w = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(eight))), bias);
          dot = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + j), dot);
        }
        for (; j < end; ++j) rest += (static_cast<float>(row[j]) - 127.0f) * xb[j];
        const float s = half_to_float(L.scales[r * L.groups + g]);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(s), dot, acc);
        tail += s * rest;
      }
      const __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
      const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
      y[b * L.out + r] = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1))) + tail;
    }
}

}  // namespace

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, int64_t group, std::string isa) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous float32 [B, in]");
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.dim() == 2 && codes.is_contiguous() && codes.size(1) == x.size(1),
              "codes must be contiguous uint8 [out, in]");
  TORCH_CHECK(scales.dtype() == torch::kFloat16 && scales.is_contiguous() && scales.size(0) == codes.size(0) &&
              group > 0 && scales.size(1) * group >= x.size(1), "scales must be float16 [out, groups]");
  const Int8Layer L{codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                    x.size(1), codes.size(0), group, scales.size(1)};
  auto rows = isa == "avx512" ? rows_avx512_8 : isa == "avx2" ? rows_avx2_8 : rows_scalar8;
  auto y = torch::empty({x.size(0), L.out}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t nb = x.size(0);
  const int64_t grain = std::max<int64_t>(4, (int64_t{1} << 15) / std::max<int64_t>(1, L.in * nb));
  at::parallel_for(0, L.out, grain, [&](int64_t r0, int64_t r1) { rows(L, nb, xp, yp, r0, r1); });
  return y;
}
