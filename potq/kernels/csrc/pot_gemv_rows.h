// The fused PoT GEMV row loop, written once for any vector ISA (see pot_gemv.cpp for the layout).
// Each ISA's translation unit sets its target (#pragma GCC target) and defines `Isa` — vector
// types, lanes and a decode of `Isa::kLanes` codes — before including this file; everything here
// sits in an anonymous namespace, so each unit keeps its own copy compiled for its own target.
#pragma once
#include <algorithm>
#include <cstring>

#include "pot_gemv_scalar.h"

namespace {

// Rows [r0, r1) for `nb` <= kMaxBatch activation rows; BITS in 2..4 and ZERO fixed at compile time.
template <int BITS, bool ZERO>
void rows(const Args& A, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1) {
  const Layout& L = A.layout;
  constexpr int kLanes = Isa::kLanes;
  const typename Isa::I shifts = Isa::lane_shifts(BITS);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = A.codes + r * L.row_bytes;
    const float* rs = A.scales + r * A.groups;
    typename Isa::V acc[kMaxBatch];
    float tail[kMaxBatch] = {0.0f};
    for (int64_t b = 0; b < nb; ++b) acc[b] = Isa::zero();
    for (int64_t g = 0; g < A.groups; ++g) {
      const int64_t start = g * L.group, end = std::min(start + L.group, L.in_features);
      const float a = rs[g];
      const int64_t vend = normal_range(a, L) ? start + (end - start) / kLanes * kLanes : start;
      for (int64_t b = 0; b < nb && vend < end; ++b) tail[b] += scalar_dot(row, x + b * L.in_features, rs, L, vend, end);
      int32_t a_int;
      std::memcpy(&a_int, &a, 4);
      for (int64_t j = start; j < vend; j += kLanes) {
        const typename Isa::V w = Isa::template decode<BITS, ZERO>(row, j * BITS >> 3, L.row_bytes, a_int, L.top, shifts);
        for (int64_t b = 0; b < nb; ++b) acc[b] = Isa::fma(w, Isa::load(x + b * L.in_features + j), acc[b]);
      }
    }
    for (int64_t b = 0; b < nb; ++b) y[b * A.out_features + r] = tail[b] + Isa::sum(acc[b]);
  }
}

// The instantiation for the layer's code width (2..4 bits; callers send wider codes elsewhere).
inline void rows_for(const Args& A, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1) {
  const bool z = A.layout.with_zero;
  switch (A.layout.bits) {
    case 2: return z ? rows<2, true>(A, nb, x, y, r0, r1) : rows<2, false>(A, nb, x, y, r0, r1);
    case 3: return z ? rows<3, true>(A, nb, x, y, r0, r1) : rows<3, false>(A, nb, x, y, r0, r1);
    default: return z ? rows<4, true>(A, nb, x, y, r0, r1) : rows<4, false>(A, nb, x, y, r0, r1);
  }
}

}  // namespace
