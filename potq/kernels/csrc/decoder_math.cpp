// The native decoder's attention and activation (decoder_math.h): AVX-512 or AVX2 where the CPU
// has it, else scalar loops. The attention reads a KV cache of float32 or float16 (T): one
// template, the cache's rows widened to float32 as they are loaded.
#include "decoder_math.h"

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>

namespace {

inline float value(float x) { return x; }
inline float value(c10::Half x) { return static_cast<float>(x); }

template <typename T>
void attend_scalar(const float* q, int64_t G, int64_t q_stride, const T* K, const T* V, int64_t span,
                   int64_t D, float scaling, float softcap, float* scores, float* out, int64_t out_stride,
                   float* stats) {
  for (int64_t g = 0; g < G; ++g) {
    float* p = scores + g * span;
    for (int64_t s = 0; s < span; ++s) {
      float dot = 0.0f;
      for (int64_t j = 0; j < D; ++j) dot += q[g * q_stride + j] * value(K[s * D + j]);
      p[s] = dot * scaling;
    }
    if (softcap > 0.0f) soft_cap(p, span, softcap);
    const float top = *std::max_element(p, p + span);
    float total = 0.0f;
    for (int64_t s = 0; s < span; ++s) total += (p[s] = std::exp(p[s] - top));
    if (stats) stats[2 * g] = top, stats[2 * g + 1] = total;
    float* o = out + g * out_stride;
    std::fill(o, o + D, 0.0f);
    for (int64_t s = 0; s < span; ++s)
      for (int64_t j = 0; j < D; ++j) o[j] += p[s] / total * value(V[s * D + j]);
  }
}

#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
AVX2 inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

AVX2 inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// e^x for |x| <= 87 (beyond: clamped): 2^n · p(r), Cephes' polynomial, relative error ~1e-7.
AVX2 inline __m256 exp_clamped(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

constexpr int64_t kMaxGroup = 8;

// The softmax of each of the G rows of `scores` ([G, span], unnormalised: the outputs divide by
// the sums, whose inverses go to `inverse`), with each row's max and sum into stats.
AVX2 void softmax_rows_avx2(float* scores, int64_t G, int64_t span, float* inverse, float* stats) {
  for (int64_t g = 0; g < G; ++g) {
    float* p = scores + g * span;
    const float top = *std::max_element(p, p + span);
    __m256 total = _mm256_setzero_ps();
    int64_t s = 0;
    for (; s + 8 <= span; s += 8) {
      const __m256 e = exp_clamped(_mm256_sub_ps(_mm256_loadu_ps(p + s), _mm256_set1_ps(top)));
      _mm256_storeu_ps(p + s, e);
      total = _mm256_add_ps(total, e);
    }
    float rest = 0.0f;
    for (; s < span; ++s) rest += (p[s] = std::exp(p[s] - top));
    const float sum = hsum(total) + rest;
    inverse[g] = 1.0f / sum;
    if (stats) stats[2 * g] = top, stats[2 * g + 1] = sum;
  }
}

template <typename T>
AVX2 void attend_avx2(const float* q, int64_t G, int64_t q_stride, const T* K, const T* V, int64_t span,
                      int64_t D, float scaling, float softcap, float* scores, float* out, int64_t out_stride,
                      float* stats) {
  for (int64_t s = 0; s < span; ++s) {  // scores: each key row read once for the group
    __m256 acc[kMaxGroup];
    for (int64_t g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t j = 0; j < D; j += 8) {
      const __m256 k = load8(K + s * D + j);
      for (int64_t g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * q_stride + j), k, acc[g]);
    }
    for (int64_t g = 0; g < G; ++g) scores[g * span + s] = hsum(acc[g]) * scaling;
  }
  if (softcap > 0.0f) soft_cap(scores, G * span, softcap);
  float inverse[kMaxGroup];
  softmax_rows_avx2(scores, G, span, inverse, stats);
  for (int64_t j = 0; j < D; j += 8) {  // outputs: each value row read once for the group
    __m256 acc[kMaxGroup];
    for (int64_t g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t s = 0; s < span; ++s) {
      const __m256 v = load8(V + s * D + j);
      for (int64_t g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(scores + g * span + s), v, acc[g]);
    }
    for (int64_t g = 0; g < G; ++g) _mm256_storeu_ps(out + g * out_stride + j, _mm256_mul_ps(acc[g], _mm256_set1_ps(inverse[g])));
  }
}

#define AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
AVX512 inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// [a.L0 + a.L1, a.L2 + a.L3, b.L0 + b.L1, b.L2 + b.L3] of the 128-bit lanes L of a and b
AVX512 inline __m512 add_lane_pairs(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}

// The sums of each of 16 vectors, as one vector (v[0]'s sum first): pairs combined level by level
// (within 128-bit lanes, then across them) — 45 operations for 16 sums, not 16 horizontal sums.
AVX512 inline __m512 sums16(const __m512* v) {
  __m512 two[8], four[4];
  for (int i = 0; i < 8; ++i)  // [a0+a2, b0+b2, a1+a3, b1+b3] per lane
    two[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // [a, b, c, d] per lane (each lane's share of the sums)
    four[i] = _mm512_add_ps(_mm512_shuffle_ps(two[2 * i], two[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_ps(two[2 * i], two[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return add_lane_pairs(add_lane_pairs(four[0], four[1]), add_lane_pairs(four[2], four[3]));
}

// scores[i] = q·K[i]·scaling for the `count` (<= 16) key rows at K, q: C vectors of 16 (D = 16·C)
template <int C, typename T>
AVX512 inline void scores16(const float* q, const T* K, int64_t count, __m512 scale, float* scores) {
  __m512 qv[C], acc[16];
  for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  if (count == 16) {
    for (int i = 0; i < 16; ++i) {
      acc[i] = _mm512_mul_ps(qv[0], load16(K + i * 16 * C));
      for (int c = 1; c < C; ++c) acc[i] = _mm512_fmadd_ps(qv[c], load16(K + i * 16 * C + 16 * c), acc[i]);
    }
  } else {
    for (int i = 0; i < 16; ++i) {
      acc[i] = _mm512_setzero_ps();
      if (i < count)
        for (int c = 0; c < C; ++c) acc[i] = _mm512_fmadd_ps(qv[c], load16(K + i * 16 * C + 16 * c), acc[i]);
    }
  }
  _mm512_mask_storeu_ps(scores, static_cast<__mmask16>((1u << count) - 1), _mm512_mul_ps(sums16(acc), scale));
}

// attend_avx2 with 16-float vectors, for heads of 64 or 128 values: the scores of 16 positions at a
// time (their keys, a few KB, read by every head of the group), the 16 sums formed together
// (sums16); each value row read once for the group.
template <int C, typename T>
AVX512 void attend_avx512(const float* q, int64_t G, int64_t q_stride, const T* K, const T* V, int64_t span,
                          float scaling, float softcap, float* scores, float* out, int64_t out_stride, float* stats) {
  constexpr int64_t D = 16 * C, chunks = C;
  const __m512 scale = _mm512_set1_ps(scaling);
  for (int64_t s0 = 0; s0 < span; s0 += 16)
    for (int64_t g = 0; g < G; ++g)
      scores16<C, T>(q + g * q_stride, K + s0 * D, std::min<int64_t>(16, span - s0), scale, scores + g * span + s0);
  if (softcap > 0.0f) soft_cap(scores, G * span, softcap);
  float inverse[kMaxGroup];
  softmax_rows_avx2(scores, G, span, inverse, stats);
  for (int64_t c = 0; c < chunks; ++c) {  // outputs: each value row read once for the group
    __m512 acc[kMaxGroup];
    for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t s = 0; s < span; ++s) {
      const __m512 v = load16(V + s * D + 16 * c);
      for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * span + s]), v, acc[g]);
    }
    for (int64_t g = 0; g < G; ++g)
      _mm512_storeu_ps(out + g * out_stride + 16 * c, _mm512_mul_ps(acc[g], _mm512_set1_ps(inverse[g])));
  }
}

// p[0..span) = softmax(p·scaling) and p[span..width) = 0.
AVX2 void softmax_row_avx2(float* p, int64_t span, int64_t width, float scaling) {
  const float top = *std::max_element(p, p + span) * scaling;
  const __m256 scale = _mm256_set1_ps(scaling), shift = _mm256_set1_ps(top);
  __m256 total = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= span; s += 8) {
    const __m256 e = exp_clamped(_mm256_fmsub_ps(_mm256_loadu_ps(p + s), scale, shift));
    _mm256_storeu_ps(p + s, e);
    total = _mm256_add_ps(total, e);
  }
  float rest = 0.0f;
  for (; s < span; ++s) rest += (p[s] = std::exp(p[s] * scaling - top));
  const __m256 inverse = _mm256_set1_ps(1.0f / (hsum(total) + rest));
  for (s = 0; s + 8 <= span; s += 8) _mm256_storeu_ps(p + s, _mm256_mul_ps(_mm256_loadu_ps(p + s), inverse));
  for (; s < span; ++s) p[s] *= _mm256_cvtss_f32(inverse);
  std::fill(p + span, p + width, 0.0f);
}

void softmax_row_scalar(float* p, int64_t span, int64_t width, float scaling) {
  const float top = *std::max_element(p, p + span) * scaling;
  float total = 0.0f;
  for (int64_t s = 0; s < span; ++s) total += (p[s] = std::exp(p[s] * scaling - top));
  for (int64_t s = 0; s < span; ++s) p[s] /= total;
  std::fill(p + span, p + width, 0.0f);
}

constexpr float kGeluTanh = 1.5957691216057308f, kGeluCube = 0.044715f;  // 2·√(2/π), and the cube's weight

// The argument of the sigmoid in act(g) = g·σ(z): z = g (silu) or 2√(2/π)(g + 0.044715g³) (gelu).
inline float sigmoid_argument(Activation act, float g) {
  return act == Activation::kSilu ? g : kGeluTanh * (g + kGeluCube * g * g * g);
}

AVX2 void gated_activation_avx2(Activation act, const float* gate, const float* up, float* out, int64_t n) {
  int64_t j = 0;
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  const __m256 outer = _mm256_set1_ps(kGeluTanh), cube = _mm256_set1_ps(kGeluCube);
  for (; j + 8 <= n; j += 8) {
    const __m256 g = _mm256_loadu_ps(gate + j);
    const __m256 z = act == Activation::kSilu
        ? g : _mm256_mul_ps(outer, _mm256_fmadd_ps(_mm256_mul_ps(cube, g), _mm256_mul_ps(g, g), g));
    const __m256 e = exp_clamped(_mm256_sub_ps(zero, z));
    _mm256_storeu_ps(out + j, _mm256_div_ps(_mm256_mul_ps(g, _mm256_loadu_ps(up + j)), _mm256_add_ps(one, e)));
  }
  for (; j < n; ++j) out[j] = gate[j] / (1.0f + std::exp(-sigmoid_argument(act, gate[j]))) * up[j];
}

bool avx2_here() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

AVX2 void widen_avx2(const c10::Half* x, float* out, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(out + j, load8(x + j));
  for (; j < n; ++j) out[j] = static_cast<float>(x[j]);
}

// out[j] = x[j] as float32, j < n
void widen(const c10::Half* x, float* out, int64_t n) {
  static const bool avx2 = avx2_here();
  if (avx2) return widen_avx2(x, out, n);
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(x[j]);
}

bool avx512_here() {
  __builtin_cpu_init();
  return avx2_here() && __builtin_cpu_supports("avx512f");
}

template <typename T>
void attend_group_of(const float* q, int64_t G, int64_t q_stride, const T* K, const T* V, int64_t span, int64_t D,
                     float scaling, float softcap, float* scores, float* out, int64_t out_stride, float* stats) {
  static const bool avx2 = avx2_here(), avx512 = avx512_here();
  if (span == 0) {  // an empty part of the positions: nothing to weigh
    for (int64_t g = 0; g < G; ++g) {
      std::fill(out + g * out_stride, out + g * out_stride + D, 0.0f);
      if (stats) stats[2 * g] = -INFINITY, stats[2 * g + 1] = 0.0f;
    }
    return;
  }
  if (avx512 && (D == 64 || D == 128)) {
    for (int64_t g0 = 0; g0 < G; g0 += kMaxGroup)  // groups wider than the registers hold: in parts
      (D == 64 ? attend_avx512<4, T> : attend_avx512<8, T>)(q + g0 * q_stride, std::min(kMaxGroup, G - g0), q_stride, K, V,
                                                      span, scaling, softcap, scores, out + g0 * out_stride, out_stride,
                                                      stats ? stats + 2 * g0 : nullptr);
    return;
  }
  if (avx2 && D % 8 == 0) {
    for (int64_t g0 = 0; g0 < G; g0 += kMaxGroup)  // groups wider than the registers hold: in parts
      attend_avx2<T>(q + g0 * q_stride, std::min(kMaxGroup, G - g0), q_stride, K, V, span, D, scaling, softcap, scores,
                  out + g0 * out_stride, out_stride, stats ? stats + 2 * g0 : nullptr);
    return;
  }
  attend_scalar<T>(q, G, q_stride, K, V, span, D, scaling, softcap, scores, out, out_stride, stats);
}

}  // namespace

void attend_group(const float* q, int64_t G, int64_t q_stride, const float* K, const float* V, int64_t span, int64_t D,
                  float scaling, float softcap, float* scores, float* out, int64_t out_stride, float* stats) {
  attend_group_of(q, G, q_stride, K, V, span, D, scaling, softcap, scores, out, out_stride, stats);
}

void attend_group(const float* q, int64_t G, int64_t q_stride, const c10::Half* K, const c10::Half* V, int64_t span,
                  int64_t D, float scaling, float softcap, float* scores, float* out, int64_t out_stride, float* stats) {
  attend_group_of(q, G, q_stride, K, V, span, D, scaling, softcap, scores, out, out_stride, stats);
}

void attend_merge(const float* outputs, const float* stats, int64_t parts, int64_t part_stride, int64_t H, int64_t D,
                  float* out) {
  for (int64_t h = 0; h < H; ++h) {
    float top = -INFINITY;
    for (int64_t p = 0; p < parts; ++p) top = std::max(top, stats[p * 2 * H + 2 * h]);
    auto weight = [&](int64_t p) {  // an empty part (max −∞) weighs nothing
      const float part_top = stats[p * 2 * H + 2 * h];
      return part_top == -INFINITY ? 0.0f : stats[p * 2 * H + 2 * h + 1] * std::exp(part_top - top);
    };
    float total = 0.0f;
    for (int64_t p = 0; p < parts; ++p) total += weight(p);
    float* o = out + h * D;
    std::fill(o, o + D, 0.0f);
    for (int64_t p = 0; p < parts; ++p) {
      const float w = weight(p) / total;
      if (w > 0.0f)
        for (int64_t j = 0; j < D; ++j) o[j] += w * outputs[p * part_stride + h * D + j];
    }
  }
}

void attend_block(const float* q, int64_t tokens, int64_t G, int64_t q_token_stride, const float* K, const float* V,
                  int64_t first, int64_t window, int64_t D, float scaling, float softcap, float* out,
                  int64_t out_token_stride, std::vector<float>& work) {
  static const bool avx2 = avx2_here();
  auto earliest = [&](int64_t i) { return window ? std::max<int64_t>(0, first + i - window + 1) : 0; };
  const int64_t start = earliest(0);  // the first position any of the block's tokens sees
  const int64_t rows = tokens * G, width = first + tokens - start;  // the last token sees up to `width` of them
  work.resize(std::max<size_t>(work.size(), rows * D * 2 + rows * width));
  float *queries = work.data(), *outputs = queries + rows * D, *scores = outputs + rows * D;
  for (int64_t i = 0; i < tokens; ++i) std::copy(q + i * q_token_stride, q + i * q_token_stride + G * D, queries + i * G * D);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor Q = at::from_blob(queries, {rows, D}, f32);
  at::Tensor S = at::from_blob(scores, {rows, width}, f32);
  const at::Tensor keys = at::from_blob(const_cast<float*>(K + start * D), {width, D}, f32);
  const at::Tensor values = at::from_blob(const_cast<float*>(V + start * D), {width, D}, f32);
  at::Tensor O = at::from_blob(outputs, {rows, D}, f32);
  at::mm_out(S, Q, keys.t());
  for (int64_t r = 0; r < rows; ++r) {  // row r: token r / G, positions [begin, end) of the block's columns
    float* p = scores + r * width;
    const int64_t begin = earliest(r / G) - start, end = first + r / G + 1 - start;
    std::fill(p, p + begin, 0.0f);
    float row_scaling = scaling;
    if (softcap > 0.0f) {  // capped scores first: the softmax then takes them as they are
      for (int64_t s = begin; s < end; ++s) p[s] *= scaling;
      soft_cap(p + begin, end - begin, softcap);
      row_scaling = 1.0f;
    }
    (avx2 ? softmax_row_avx2 : softmax_row_scalar)(p + begin, end - begin, width - begin, row_scaling);
  }
  at::mm_out(O, S, values);
  for (int64_t i = 0; i < tokens; ++i) std::copy(outputs + i * G * D, outputs + (i + 1) * G * D, out + i * out_token_stride);
}

void attend_block(const float* q, int64_t tokens, int64_t G, int64_t q_token_stride, const c10::Half* K,
                  const c10::Half* V, int64_t first, int64_t window, int64_t D, float scaling, float softcap, float* out,
                  int64_t out_token_stride, std::vector<float>& work) {
  // the positions the block's tokens see, widened to float32 once for the block's two products: the
  // first of them (`start`) becomes position 0 of the widened rows, the block's first token `first −
  // start` (the window, counted back from each token, is the same)
  const int64_t start = window ? std::max<int64_t>(0, first - window + 1) : 0, width = first + tokens - start;
  const int64_t rows = tokens * G, room = rows * D * 2 + rows * width;  // what the float call keeps at the front
  work.resize(room + 2 * width * D);
  float *keys = work.data() + room, *values = keys + width * D;
  widen(K + start * D, keys, width * D);
  widen(V + start * D, values, width * D);
  attend_block(q, tokens, G, q_token_stride, keys, values, first - start, window, D, scaling, softcap, out,
               out_token_stride, work);
}

void gated_activation(Activation act, const float* gate, const float* up, float* out, int64_t n) {
  static const bool avx2 = avx2_here();
  if (avx2) return gated_activation_avx2(act, gate, up, out, n);
  for (int64_t j = 0; j < n; ++j) out[j] = gate[j] / (1.0f + std::exp(-sigmoid_argument(act, gate[j]))) * up[j];
}

void soft_cap(float* p, int64_t n, float cap) {
  for (int64_t j = 0; j < n; ++j) p[j] = cap * std::tanh(p[j] / cap);
}
