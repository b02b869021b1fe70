// The small ops of a decoding step, one call each: at batch 1 PyTorch spends more time
// dispatching its composite RMSNorm (eight ops: upcast, pow, mean, add, rsqrt, mul, mul, copy)
// than computing it, and a step runs 61 of them.
#pragma once
#include <cmath>

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
