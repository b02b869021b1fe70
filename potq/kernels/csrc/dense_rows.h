// Rows of a float32 matrix times one float32 vector, written once for any vector ISA (each ISA's
// unit defines `Isa` and includes this file): the native decoder's path for layers that stay float.
#pragma once
#include <cstdint>

namespace {

inline void dense_rows_for(const float* w, int64_t in, const float* x, float* y, int64_t r0, int64_t r1) {
  constexpr int kLanes = Isa::kLanes;
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = w + r * in;
    typename Isa::V a = Isa::zero(), b = Isa::zero();
    int64_t j = 0;
    for (; j + 2 * kLanes <= in; j += 2 * kLanes) {
      a = Isa::fma(Isa::load(row + j), Isa::load(x + j), a);
      b = Isa::fma(Isa::load(row + j + kLanes), Isa::load(x + j + kLanes), b);
    }
    float tail = 0.0f;
    for (; j < in; ++j) tail += row[j] * x[j];
    y[r] = Isa::sum(Isa::fma(Isa::set1(1.0f), a, b)) + tail;
  }
}

}  // namespace
