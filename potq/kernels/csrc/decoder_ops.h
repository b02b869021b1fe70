// The small ops of a decoding step, one call each: at batch 1 PyTorch spends more time
// dispatching its composite ops than computing them — RMSNorm alone is eight (upcast, pow, mean,
// add, rsqrt, mul, mul, copy), and a step runs 61 of them.
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/extension.h>

// y = x / sqrt(mean(x²) + eps) · weight over the last dimension, float32, as torch's rms_norm.
inline torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat32, "x must be float32");
  x = x.contiguous();
  TORCH_CHECK(weight.dtype() == torch::kFloat32 && weight.is_contiguous() && weight.numel() == x.size(-1),
              "weight must be contiguous float32 of x's last dimension");
  auto y = torch::empty_like(x);
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  const float* w = weight.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x.data_ptr<float>() + r * n;
    float* yr = y.data_ptr<float>() + r * n;
    float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // eight sums, so the compiler may vectorise
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
      for (int k = 0; k < 8; ++k) partial[k] += xr[j + k] * xr[j + k];
    float squares = 0;
    for (; j < n; ++j) squares += xr[j] * xr[j];
    for (int k = 0; k < 8; ++k) squares += partial[k];
    const float inv = 1.0f / std::sqrt(squares / static_cast<float>(n) + static_cast<float>(eps));
    for (j = 0; j < n; ++j) yr[j] = xr[j] * inv * w[j];
  }
  return y;
}

// One token's self-attention in a block, in one call instead of about ten ops: the rotary
// embedding on q and k (x·cos + halves-swapped(x)·sin, `sin` with its first half negated, as
// LlamaDecoder keeps it), k and v written into the cache at `pos`, then per query head h
// softmax(q·Kᵀ·scaling)·V over positions 0..pos of kv head h / (heads / kv_heads).
// qkv: [heads + 2·kv_heads, D] of this token; cos, sin: [D] at `pos`; keys, values: one block's
// cache [kv_heads, max_len, D]. Returns [heads·D].
inline torch::Tensor attend_step(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor keys,
                                 torch::Tensor values, int64_t pos, double scaling, int64_t heads) {
  for (const auto& t : {qkv, cos, sin, keys, values})
    TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous(), "attend_step takes contiguous float32 tensors");
  const int64_t kv_heads = keys.size(0), max_len = keys.size(1), D = keys.size(2), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && D <= 1024 && qkv.numel() == (heads + 2 * kv_heads) * D && cos.numel() == D &&
                  sin.numel() == D,
              "attend_step: qkv, cos or sin do not match the cache's head size (even, at most 1024)");
  TORCH_CHECK(values.sizes() == keys.sizes() && pos >= 0 && pos < max_len && heads % kv_heads == 0,
              "attend_step: position or head counts out of range");
  float* q_all = qkv.data_ptr<float>();
  const float *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
  float *K = keys.data_ptr<float>(), *V = values.data_ptr<float>();
  auto rotate = [&](const float* x, float* out) {  // out never aliases x
    for (int64_t j = 0; j < D; ++j) out[j] = x[j] * c[j] + x[j < half ? j + half : j - half] * s[j];
  };
  for (int64_t g = 0; g < kv_heads; ++g) {  // this token's keys and values into the cache
    rotate(q_all + (heads + g) * D, K + (g * max_len + pos) * D);
    std::copy(q_all + (heads + kv_heads + g) * D, q_all + (heads + kv_heads + g + 1) * D, V + (g * max_len + pos) * D);
  }
  auto out = torch::empty({heads * D}, qkv.options());
  float* o_all = out.data_ptr<float>();
  const int64_t group = heads / kv_heads, n = pos + 1;
  const int64_t grain = std::max<int64_t>(1, 32768 / (n * D));  // threads only when a head has work
  at::parallel_for(0, heads, grain, [&](int64_t h0, int64_t h1) {
    std::vector<float> p(n);
    float q[1024];
    for (int64_t h = h0; h < h1; ++h) {
      rotate(q_all + h * D, q);
      const float *Kg = K + (h / group) * max_len * D, *Vg = V + (h / group) * max_len * D;
      float top = -INFINITY;
      for (int64_t t = 0; t < n; ++t) {
        float dot = 0;
        for (int64_t j = 0; j < D; ++j) dot += q[j] * Kg[t * D + j];
        p[t] = dot * static_cast<float>(scaling);
        top = std::max(top, p[t]);
      }
      float total = 0;
      for (int64_t t = 0; t < n; ++t) total += (p[t] = std::exp(p[t] - top));
      float* o = o_all + h * D;
      std::fill(o, o + D, 0.0f);
      for (int64_t t = 0; t < n; ++t) {
        const float w = p[t] / total;
        for (int64_t j = 0; j < D; ++j) o[j] += w * Vg[t * D + j];
      }
    }
  });
  return out;
}

// silu(gate)·up for gate_up = [rows, 2·I] (gate first, as LlamaDecoder stacks them): one call
// instead of chunk, silu and a multiply.
inline torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dtype() == torch::kFloat32 && gate_up.is_contiguous() && gate_up.size(-1) % 2 == 0,
              "silu_mul takes contiguous float32 [rows, 2·I]");
  const int64_t width = gate_up.size(-1) / 2, rows = width ? gate_up.numel() / (2 * width) : 0;
  auto sizes = gate_up.sizes().vec();
  sizes.back() = width;
  auto y = torch::empty(sizes, gate_up.options());
  const float* x = gate_up.data_ptr<float>();
  float* out = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < width; ++j) {
      const float gate = x[r * 2 * width + j];
      out[r * width + j] = gate / (1.0f + std::exp(-gate)) * x[r * 2 * width + width + j];
    }
  return y;
}
