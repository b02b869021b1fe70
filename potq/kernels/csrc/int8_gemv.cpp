// y[b, r] = sum_j x[b, j] * W[r, j] for a symmetric 8-bit layer (potq's uniform-sym 8: code
// c = q + 127, weight (c - 127)·s with one fp16 scale s per group) without decoding W: the bytes
// are widened to floats in registers, each group's dot product is formed first and its scale
// applied once. This is the packed output head of a model whose GGUF held the token table as
// Q8_0 (potq packs it back losslessly): a quarter of the float head's bytes per decoded token,
// which on a small model is a third of all the bytes a token reads. Output rows are split across
// threads; AVX-512 or AVX2 (int8_rows.h, compiled in each ISA's unit) is picked at run time, with a
// scalar loop for any other CPU.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "pot_gemv_layout.h"
#include "pot_gemv_scalar.h"

namespace {

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

}  // namespace

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, int64_t group, std::string isa) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous float32 [B, in]");
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.dim() == 2 && codes.is_contiguous() && codes.size(1) == x.size(1),
              "codes must be contiguous uint8 [out, in]");
  TORCH_CHECK(scales.dtype() == torch::kFloat16 && scales.is_contiguous() && scales.size(0) == codes.size(0) &&
              group > 0 && scales.size(1) * group >= x.size(1), "scales must be float16 [out, groups]");
  const Int8Layer L{codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                    x.size(1), codes.size(0), group, scales.size(1)};
  auto rows = isa == "avx512" ? int8_rows_avx512 : isa == "avx2" ? int8_rows_avx2 : rows_scalar8;
  auto y = torch::empty({x.size(0), L.out}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t nb = x.size(0);
  const int64_t grain = std::max<int64_t>(4, (int64_t{1} << 15) / std::max<int64_t>(1, L.in * nb));
  at::parallel_for(0, L.out, grain, [&](int64_t r0, int64_t r1) { rows(L, nb, xp, yp, r0, r1); });
  return y;
}
