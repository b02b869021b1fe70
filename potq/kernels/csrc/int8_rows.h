// The 8-bit GEMV row loop (see int8_gemv.cpp), written once for any vector ISA: each ISA's unit
// defines `Isa` (zero, load, fma, set1, sum, widen8) and includes this file.
#pragma once
#include <algorithm>

#include "pot_gemv_scalar.h"

namespace {

// y[b, r] for rows [r0, r1): per group, the dot product of the widened codes with x, then its
// scale applied once; a group's last few columns (fewer than a vector) in scalar.
inline void int8_rows_for(const Int8Layer& L, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1) {
  constexpr int kLanes = Isa::kLanes;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* row = L.codes + r * L.in;
      const float* xb = x + b * L.in;
      typename Isa::V acc = Isa::zero();
      float tail = 0.0f;
      for (int64_t g = 0; g < L.groups; ++g) {
        const int64_t start = g * L.group, end = std::min(start + L.group, L.in);
        typename Isa::V dot = Isa::zero();
        float rest = 0.0f;
        int64_t j = start;
        for (; j + kLanes <= end; j += kLanes) dot = Isa::fma(Isa::widen8(row + j), Isa::load(xb + j), dot);
        for (; j < end; ++j) rest += (static_cast<float>(row[j]) - 127.0f) * xb[j];
        const float s = half_to_float(L.scales[r * L.groups + g]);
        acc = Isa::fma(Isa::set1(s), dot, acc);
        tail += s * rest;
      }
      y[b * L.out + r] = Isa::sum(acc) + tail;
    }
}

}  // namespace
