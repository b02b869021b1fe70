// Fused PoT matrix-vector product on packed codes: y[b, r] = sum_j x[b, j] * W[r, j].
//
// W is never materialised. A PoT group has only 2^N distinct weights ±a·2^e, so for each row
// and group the kernel first builds that group's table in a register by the thesis' exponent
// add — the code's exponent added to the bit pattern of the fp16 scale (as float32), the sign
// bit added in, no multiply — and then turns every 16 (AVX-512) or 8 (AVX2) packed codes into
// weights with one byte shuffle, one variable shift and one register table lookup, multiplied
// and accumulated against the activations. The codes are read in potq's storage layout (code j
// of a row at bits j*N .. j*N+N-1, little-endian), so the layer holds exactly what the file
// holds. Output rows are split across threads.
//
// The vector paths (pot_gemv_avx2.cpp, pot_gemv_avx512.cpp, one row loop in pot_gemv_rows.h)
// take 2..4-bit codes and any group size; groups whose values would be subnormal get their
// table value by value (exact). Wider codes take the scalar path, which computes exactly what
// potq's decode computes.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "decoder_ops.h"
#include "pot_gemv_layout.h"
#include "pot_gemv_scalar.h"

void rows_scalar(const Args& A, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1) {
  const Layout& L = A.layout;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < nb; ++b)
      y[b * A.out_features + r] = scalar_dot(A.codes + r * L.row_bytes, x + b * L.in_features,
                                             A.scales + r * A.groups, L);
}

std::string best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return "avx512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
  return "scalar";
}

void dequantize_scalar(const Args& A, float* w, int64_t r0, int64_t r1) {
  const Layout& L = A.layout;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t j = 0; j < L.in_features; ++j) {
      const int64_t bit = j * L.bits;
      const uint32_t code = (load_word(A.codes + r * L.row_bytes, bit >> 3, L.row_bytes) >> (bit & 7)) & ((1u << L.bits) - 1);
      w[r * L.in_features + j] = scalar_weight(code, half_to_float(A.scales[r * A.groups + j / L.group]), L);
    }
}

// The kernel's view of a packed layer of `in_features` columns, after checking what it is given.
Args packed_layer(const torch::Tensor& codes, const torch::Tensor& scales, int64_t in_features, int64_t bits,
                  int64_t group, int64_t top, bool with_zero) {
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.dim() == 2 && codes.is_contiguous(), "codes must be contiguous uint8 [out, bytes]");
  TORCH_CHECK(scales.dtype() == torch::kFloat16 && scales.is_contiguous() && scales.size(0) == codes.size(0),
              "scales must be contiguous float16 [out, groups]");
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits must be 2..8");
  TORCH_CHECK(codes.size(1) * 8 >= in_features * bits, "codes too short for ", in_features, " columns");
  TORCH_CHECK(scales.size(1) * group >= in_features, "too few scales for ", in_features, " columns");
  const uint8_t* code_ptr = codes.data_ptr<uint8_t>();
  return {{bits, group, top, in_features, codes.size(1), with_zero}, code_ptr, code_ptr + codes.numel(),
          reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()), scales.size(1), codes.size(0)};
}

torch::Tensor pot_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, int64_t bits,
                       int64_t group, int64_t top, bool with_zero, std::string isa) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous float32 [B, in]");
  const Args A = packed_layer(codes, scales, x.size(1), bits, group, top, with_zero);
  auto rows = bits > 4 || isa == "scalar" ? rows_scalar : isa == "avx512" ? rows_avx512 : rows_avx2;
  auto y = torch::empty({x.size(0), A.out_features}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t batch = x.size(0);
  // Threads only where each gets enough work (~32k weights a row block): waking them costs microseconds.
  const int64_t grain = std::max<int64_t>(4, (int64_t{1} << 15) / std::max<int64_t>(1, A.layout.in_features * batch));
  at::parallel_for(0, A.out_features, grain, [&](int64_t r0, int64_t r1) { rows(A, batch, xp, yp, r0, r1); });
  return y;
}

// A destination for `rows × cols` of `dtype`: `out` when given (a benchmark reuses it, so that it
// times the dequantization rather than the operating system handing out fresh pages), else new.
torch::Tensor destination(const c10::optional<torch::Tensor>& out, int64_t rows, int64_t cols, torch::ScalarType dtype) {
  if (!out) return torch::empty({rows, cols}, torch::dtype(dtype));
  TORCH_CHECK(out->dtype() == dtype && out->is_contiguous() && out->size(0) == rows && out->size(1) == cols,
              "out must be a contiguous ", rows, "x", cols, " tensor of the output dtype");
  return *out;
}

torch::Tensor pot_dequantize(torch::Tensor codes, torch::Tensor scales, int64_t in_features, int64_t bits,
                             int64_t group, int64_t top, bool with_zero, std::string isa,
                             c10::optional<torch::Tensor> out) {
  const Args A = packed_layer(codes, scales, in_features, bits, group, top, with_zero);
  auto rows = bits > 4 || isa == "scalar" ? dequantize_scalar : isa == "avx512" ? dequantize_avx512 : dequantize_avx2;
  auto w = destination(out, A.out_features, in_features, torch::kFloat32);
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, A.out_features, 64, [&](int64_t r0, int64_t r1) { rows(A, wp, r0, r1); });
  return w;
}

// The dequantization benchmark's harness: unpacked codes [rows, n] -> `dtype` [rows, n], by PoT
// exponent add (zeros undefined) or uniform (q − z)·s, on rows split across threads.
torch::Tensor elementwise_dequantize(torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                                     bool pot, int64_t bits, int64_t group, int64_t top, bool with_zero,
                                     torch::ScalarType dtype, std::string isa, c10::optional<torch::Tensor> out) {
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.dim() == 2 && codes.is_contiguous(), "codes: contiguous uint8 [rows, n]");
  TORCH_CHECK(scales.dtype() == torch::kFloat16 && scales.is_contiguous() && scales.size(0) == codes.size(0), "scales: fp16 [rows, groups]");
  TORCH_CHECK(pot || (zeros && zeros->dtype() == torch::kUInt8 && zeros->sizes() == scales.sizes() && zeros->is_contiguous()),
              "uniform needs uint8 zeros shaped like the scales");
  TORCH_CHECK(isa == "avx512" || isa == "avx2", "the harness needs AVX2 or AVX-512");
  const int kind = dtype == torch::kFloat32 ? 0 : dtype == torch::kFloat16 ? 1 : dtype == torch::kBFloat16 ? 2 : -1;
  TORCH_CHECK(kind >= 0, "dtype must be float32, float16 or bfloat16");
  const int64_t rows = codes.size(0), n = codes.size(1), groups = scales.size(1);
  TORCH_CHECK(groups * group >= n, "too few scales");
  auto w = destination(out, rows, n, dtype);
  const Layout L{bits, group, top, n, n, with_zero};
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const uint8_t* zp = pot ? nullptr : zeros->data_ptr<uint8_t>();
  char* wp = static_cast<char*>(w.data_ptr());
  const int64_t esize = w.element_size();
  auto fn = isa == "avx512" ? elementwise_avx512 : elementwise_avx2;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    fn(pot ? 0 : 1, kind, cp + r0 * n, sp + r0 * groups, zp ? zp + r0 * groups : nullptr, wp + r0 * n * esize,
       r1 - r0, n, group, groups, L);
  });
  return w;
}

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, int64_t group, std::string isa);
void bind_native_decoder(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pot_gemv", &pot_gemv, "fused PoT GEMV on packed codes");
  m.def("elementwise_dequantize", &elementwise_dequantize, "the dequantization benchmark's PoT / uniform harness",
        py::arg("codes"), py::arg("scales"), py::arg("zeros"), py::arg("pot"), py::arg("bits"), py::arg("group"),
        py::arg("top"), py::arg("with_zero"), py::arg("dtype"), py::arg("isa"), py::arg("out") = py::none());
  m.def("pot_dequantize", &pot_dequantize, "float32 weights of packed PoT codes by exponent add",
        py::arg("codes"), py::arg("scales"), py::arg("in_features"), py::arg("bits"), py::arg("group"), py::arg("top"),
        py::arg("with_zero"), py::arg("isa"), py::arg("out") = py::none());
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension, float32, in one call");
  m.def("attend_step", &attend_step, "one token's rotary embedding, KV-cache write and attention in a block");
  m.def("silu_mul", &silu_mul, "silu(gate)·up of a stacked [rows, 2·I] gate_up");
  m.def("best_isa", &best_isa, "the widest vector ISA this CPU runs");
  m.def("int8_gemv", &int8_gemv, "GEMV on symmetric 8-bit codes (potq's uniform-sym 8) without decoding W");
  bind_native_decoder(m);
}
