// Elementwise dequantization of unpacked uint8 codes, the two formulas the thesis compares
// (§3.3.3, Figure 3.5): PoT by exponent add — the code's exponent added to the bit pattern of the
// group's scale in the output format, the sign bit added in, integer ops only — and uniform by
// (q − z)·s in float, converted to the output format. Same loops, same memory traffic, written as
// plain loops the compiler vectorizes for the including unit's target; it is the harness of
// `potq bench`'s dequantization table, not a path models run on (they use the table lookup).
// Included by each ISA's unit after it defines `Isa` (for Isa::to_half).
#pragma once
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <cstdint>
#include <cstring>

#include "pot_gemv_scalar.h"

namespace {

enum OutKind { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline uint16_t to_bf16_bits(float f) {  // round to nearest even, as torch does
  const uint32_t u = float_bits(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// One float in the output format's bits (F16C converts fp16 with round to nearest even).
template <int OUT>
inline std::conditional_t<OUT == kFloat32, uint32_t, uint16_t> out_bits(float f) {
  if constexpr (OUT == kFloat32) return float_bits(f);
  else if constexpr (OUT == kFloat16) return static_cast<uint16_t>(_cvtss_sh(f, 0));
  else return to_bf16_bits(f);
}

template <int OUT>
struct Field {  // the output format: its integer type, mantissa bits and sign bit
  using T = std::conditional_t<OUT == kFloat32, uint32_t, uint16_t>;
  static constexpr int kMantissa = OUT == kFloat32 ? 23 : OUT == kFloat16 ? 10 : 7;
  static constexpr int kSign = OUT == kFloat32 ? 31 : 15;
  static constexpr int kExpMask = OUT == kFloat16 ? 0x1F : 0xFF;
};

template <int OUT, bool ZERO>
void pot_elementwise(const uint8_t* codes, const uint16_t* scales, void* out_ptr, int64_t rows, int64_t n,
                     int64_t group, int64_t groups, const Layout& L) {
  using F = Field<OUT>;
  using T = typename F::T;
  T* out = static_cast<T*>(out_ptr);
  const int bits = static_cast<int>(L.bits), low = static_cast<int>(L.top) + (ZERO ? 1 : 0);
  const T field_mask = static_cast<T>((1u << (bits - 1)) - 1);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t start = g * group, end = std::min(start + group, n);
      const uint8_t* c = codes + r * n;
      T* o = out + r * n;
      const float a = half_to_float(scales[r * groups + g]);
      const T a_bits = out_bits<OUT>(a);
      if (static_cast<int>((a_bits >> F::kMantissa) & F::kExpMask) - low < 1) {  // would leave the normal range
        for (int64_t j = start; j < end; ++j) o[j] = out_bits<OUT>(scalar_weight(c[j], a, L));
        continue;
      }
      const T base = static_cast<T>(a_bits - (static_cast<T>(low) << F::kMantissa));
      for (int64_t j = start; j < end; ++j) {
        const T field = c[j] & field_mask, sign = static_cast<T>(c[j] >> (bits - 1));
        const T v = static_cast<T>(base + (field << F::kMantissa) + (sign << F::kSign));
        o[j] = ZERO && field == 0 ? T(0) : v;
      }
    }
}

template <int OUT>
void uniform_elementwise(const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros, void* out_ptr,
                         int64_t rows, int64_t n, int64_t group, int64_t groups) {
  using T = typename Field<OUT>::T;
  T* out = static_cast<T*>(out_ptr);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t start = g * group, end = std::min(start + group, n);
      const uint8_t* c = codes + r * n;
      T* o = out + r * n;
      const float s = half_to_float(scales[r * groups + g]), z = zeros[r * groups + g];
      if constexpr (OUT == kFloat16) {  // float, then the ISA's vector conversion (compilers do not vectorize it)
        alignas(64) float buf[256];
        for (int64_t j0 = start; j0 < end; j0 += 256) {
          const int64_t len = std::min<int64_t>(256, end - j0);
          for (int64_t j = 0; j < len; ++j) buf[j] = (static_cast<float>(c[j0 + j]) - z) * s;
          Isa::to_half(buf, o + j0, len);
        }
      } else {
        for (int64_t j = start; j < end; ++j) {
          const float v = (static_cast<float>(c[j]) - z) * s;
          if constexpr (OUT == kFloat32) o[j] = float_bits(v);
          else o[j] = to_bf16_bits(v);
        }
      }
    }
}

}  // namespace

namespace {

// The entry the bindings call: kind 0 = PoT exponent add, 1 = uniform; out as in OutKind.
inline void elementwise_for(int kind, int out, const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros,
                            void* dst, int64_t rows, int64_t n, int64_t group, int64_t groups, const Layout& L) {
  if (kind == 0 && L.with_zero) {
    if (out == kFloat32) pot_elementwise<kFloat32, true>(codes, scales, dst, rows, n, group, groups, L);
    else if (out == kFloat16) pot_elementwise<kFloat16, true>(codes, scales, dst, rows, n, group, groups, L);
    else pot_elementwise<kBFloat16, true>(codes, scales, dst, rows, n, group, groups, L);
  } else if (kind == 0) {
    if (out == kFloat32) pot_elementwise<kFloat32, false>(codes, scales, dst, rows, n, group, groups, L);
    else if (out == kFloat16) pot_elementwise<kFloat16, false>(codes, scales, dst, rows, n, group, groups, L);
    else pot_elementwise<kBFloat16, false>(codes, scales, dst, rows, n, group, groups, L);
  } else {
    if (out == kFloat32) uniform_elementwise<kFloat32>(codes, scales, zeros, dst, rows, n, group, groups);
    else if (out == kFloat16) uniform_elementwise<kFloat16>(codes, scales, zeros, dst, rows, n, group, groups);
    else uniform_elementwise<kBFloat16>(codes, scales, zeros, dst, rows, n, group, groups);
  }
}

}  // namespace
