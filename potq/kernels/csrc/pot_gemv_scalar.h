// The scalar pieces every kernel variant shares: reading packed codes and potq's exact decode.
// In an anonymous namespace: each translation unit keeps its own copy, compiled for its own target.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "pot_gemv_layout.h"

namespace {

constexpr int64_t kMaxBatch = 8;  // activation rows per pass; larger batches are split by the caller

// The 32-bit word holding 8 codes that start at `byte` (they take N <= 4 bytes). A full 4-byte
// load wherever the row has 4 bytes left: building the word from single-byte copies makes every
// later full-width read of it a store-forwarding stall (measured: 5x slower).
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

inline float scalar_dot(const uint8_t* row, const float* x, const float* scales, const Layout& L,
                        int64_t start, int64_t end) {
  float acc = 0.0f;
  for (int64_t j = start; j < end; ++j) {
    const int64_t bit = j * L.bits;
    const uint32_t code = (load_word(row, bit >> 3, L.row_bytes) >> (bit & 7)) & ((1u << L.bits) - 1);
    acc += scalar_weight(code, scales[j / L.group], L) * x[j];
  }
  return acc;
}

// Whether every exponent add of a group with scale `a` stays in float32's normal range.
inline bool normal_range(float a, const Layout& L) {
  int exp;
  std::frexp(a, &exp);
  return exp - 1 - (L.top + 1) > -126;
}

}  // namespace
