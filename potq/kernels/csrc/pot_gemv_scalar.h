// The scalar pieces every kernel variant shares: reading packed codes and potq's exact decode.
// In an anonymous namespace: each translation unit keeps its own copy, compiled for its own target.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "pot_gemv_layout.h"

namespace {

// One stored fp16 scale as float32 (exact, subnormals included; F16C is not assumed; no calls,
// so the vector loops that use it keep their accumulators in registers).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0) {
    const float f = float(man) * 0x1p-24f;  // exact: man < 2^10
    return sign ? -f : f;
  }
  const uint32_t bits = sign | (exp == 31 ? 0x7F800000u : (exp + 112) << 23) | (man << 13);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The 32-bit word holding the code that starts at `byte` (a code takes N <= 8 bits of it).
inline uint32_t load_word(const uint8_t* row, int64_t byte, int64_t row_bytes) {
  uint32_t word = 0;
  if (byte + 4 <= row_bytes) {
    std::memcpy(&word, row + byte, 4);
  } else {
    for (int64_t i = 0; byte + i < row_bytes; ++i) word |= uint32_t(row[byte + i]) << (8 * i);
  }
  return word;
}

// potq's decode of one code, exactly: sign * a * 2^(field - K) (pot-zero: field 0 is 0.0).
inline float scalar_weight(uint32_t code, float a, const Layout& L) {
  const int32_t field = code & ((1u << (L.bits - 1)) - 1);
  if (L.with_zero && field == 0) return 0.0f;
  const float v = std::ldexp(a, field - L.top - (L.with_zero ? 1 : 0));
  return (code >> (L.bits - 1)) & 1 ? -v : v;
}

// One row's dot product with x over codes [0, in_features): the path for codes wider than 4 bits.
inline float scalar_dot(const uint8_t* row, const float* x, const uint16_t* scales, const Layout& L) {
  float acc = 0.0f;
  for (int64_t j = 0; j < L.in_features; ++j) {
    const int64_t bit = j * L.bits;
    const uint32_t code = (load_word(row, bit >> 3, L.row_bytes) >> (bit & 7)) & ((1u << L.bits) - 1);
    acc += scalar_weight(code, half_to_float(scales[j / L.group]), L) * x[j];
  }
  return acc;
}

}  // namespace
