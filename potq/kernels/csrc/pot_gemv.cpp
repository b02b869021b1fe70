// Fused PoT matrix-vector product on packed codes: y[b, r] = sum_j x[b, j] * W[r, j].
//
// W is never materialised. Each row's codes are read from the packed bit stream (little-endian,
// code j at bits j*N .. j*N+N-1, potq's storage layout), 8 (AVX2) or 16 (AVX-512) at a time;
// each weight is built in a register by adding its exponent to the bit pattern of the group's
// scale and OR-ing in the sign bit (the thesis' exponent-add dequantization, no multiply), then
// multiplied-accumulated against the activations. Rows are split across threads.
//
// The vector paths (pot_gemv_avx2.cpp, pot_gemv_avx512.cpp, one row loop in pot_gemv_rows.h)
// handle 2..4-bit codes, whole vectors of each group (a group starts byte-aligned whenever G is
// a multiple of 8); the rest — wider codes, a group's last < 8 (16) codes, results that would be
// subnormal — takes the scalar path, which computes exactly what potq's decode computes.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "pot_gemv_layout.h"
#include "pot_gemv_scalar.h"

void rows_scalar(const Args& A, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1) {
  const Layout& L = A.layout;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < nb; ++b)
      y[b * A.out_features + r] = scalar_dot(A.codes + r * L.row_bytes, x + b * L.in_features,
                                             A.scales + r * A.groups, L, 0, L.in_features);
}

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
  const int64_t batch = x.size(0), out_features = codes.size(0);
  const Args A{{bits, group, top, x.size(1), codes.size(1), with_zero}, codes.data_ptr<uint8_t>(),
               scales.data_ptr<float>(), scales.size(1), out_features};
  auto rows = bits > 4 || isa == "scalar" ? rows_scalar : isa == "avx512" ? rows_avx512 : rows_avx2;
  auto y = torch::empty({batch, out_features}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out_features, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t b0 = 0; b0 < batch; b0 += kMaxBatch)
      rows(A, std::min(kMaxBatch, batch - b0), xp + b0 * A.layout.in_features, yp + b0 * out_features, r0, r1);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pot_gemv", &pot_gemv, "fused PoT GEMV on packed codes");
  m.def("best_isa", &best_isa, "the widest vector ISA this CPU runs");
}
