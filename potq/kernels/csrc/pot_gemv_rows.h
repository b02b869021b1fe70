// The fused PoT GEMV row loop, written once for any vector ISA (see pot_gemv.cpp for the method).
// Each ISA's translation unit sets its target (#pragma GCC target) and defines `Isa` — vector
// types, lanes, the code unpacking and the table lookup — before including this file; everything
// here sits in an anonymous namespace, so each unit keeps its own copy compiled for its target.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>

#include "pot_gemv_scalar.h"

namespace {

// What every row of one call shares: per table entry j (a code, higher bits ignored) the integer
// added to the scale's bit pattern — exponent << 23, plus 1 << 31 for a negative code — whether
// the entry is kept (pot-zero's field 0 is 0.0), and ±2^e for the groups the add cannot serve;
// and the unpack controls for each bit offset a group can start at.
template <int BITS, bool ZERO>
struct Plan {
  typename Isa::Entries entries;
  typename Isa::Unpack unpack[8];
  int32_t lowest;  // a scale's biased exponent must exceed this for every add to stay normal

  explicit Plan(const Layout& L) : lowest(static_cast<int32_t>(L.top) + (ZERO ? 1 : 0)) {
    int32_t add[16], keep[16];
    float pow2[16];
    for (int j = 0; j < 16; ++j) {
      const int code = j & ((1 << BITS) - 1), field = code & ((1 << (BITS - 1)) - 1), negative = code >> (BITS - 1);
      const int32_t e = field - lowest;  // <= 0
      add[j] = static_cast<int32_t>((static_cast<uint32_t>(e) << 23) + (static_cast<uint32_t>(negative) << 31));
      keep[j] = ZERO && field == 0 ? 0 : -1;
      pow2[j] = keep[j] ? std::ldexp(negative ? -1.0f : 1.0f, e) : 0.0f;
    }
    entries = Isa::entries(add, keep, pow2);
    for (int base = 0; base < 8; ++base) unpack[base] = Isa::unpack_control(BITS, base);
  }
};

// A group's table of the 2^BITS weight values ±a·2^e: by exponent add on the scale's bit pattern
// while every value stays a normal float; else (a zero scale) a·(±2^e), which rounds the same.
template <int BITS, bool ZERO>
inline typename Isa::Table group_table(uint16_t scale_bits, const Plan<BITS, ZERO>& P) {
  const float a = half_to_float(scale_bits);
  int32_t a_bits;
  std::memcpy(&a_bits, &a, 4);
  return ((a_bits >> 23) & 0xFF) > P.lowest ? Isa::table(a_bits, P.entries) : Isa::table_exact(a, P.entries);
}

// y[b, r] for R output rows from r0 and NB activation rows: each chunk of kLanes activations is
// loaded once and used by all R rows, whose accumulators are independent FMA chains. SAFE is for
// the matrix's last row, where reading 16 bytes of codes could go past the end of the buffer.
template <int BITS, bool ZERO, int R, int NB, bool SAFE>
void block(const Args& A, const Plan<BITS, ZERO>& P, const float* x, float* y, int64_t r0) {
  constexpr int kLanes = Isa::kLanes;
  const int64_t in = A.layout.in_features, group = A.layout.group, groups = A.groups;
  const uint8_t* row[R];
  const uint16_t* scales[R];
  for (int r = 0; r < R; ++r) {
    row[r] = A.codes + (r0 + r) * A.layout.row_bytes;
    scales[r] = A.scales + (r0 + r) * groups;
  }
  typename Isa::V acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = Isa::zero();
  alignas(64) uint8_t tail_bytes[16];
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t start = g * group, end = std::min(start + group, in);
    typename Isa::Table table[R];
    for (int r = 0; r < R; ++r) table[r] = group_table<BITS, ZERO>(scales[r][g], P);
    const typename Isa::Unpack unpack = P.unpack[(start * BITS) & 7];
    for (int64_t j = start; j < end; j += kLanes) {
      const int64_t n = end - j;
      typename Isa::V xv[NB];
      for (int b = 0; b < NB; ++b) xv[b] = n >= kLanes ? Isa::load(x + b * in + j) : Isa::load_first(x + b * in + j, n);
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = row[r] + ((j * BITS) >> 3);
        if (SAFE && p + 16 > A.codes_end) {  // copy byte by byte rather than read past the end
          for (int i = 0; i < 16; ++i) tail_bytes[i] = p + i < A.codes_end ? p[i] : 0;
          p = tail_bytes;
        }
        const typename Isa::V w = Isa::template lookup<BITS>(table[r], Isa::codes(p, unpack));
        for (int b = 0; b < NB; ++b) acc[r][b] = Isa::fma(w, xv[b], acc[r][b]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) y[b * A.out_features + r0 + r] = Isa::sum(acc[r][b]);
}

// Rows [r0, r1) for nb activation rows: four output rows at a time for a single activation row
// (decoding), four activation rows at a time otherwise; the matrix's last row on the safe path.
template <int BITS, bool ZERO>
void rows(const Args& A, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1) {
  const Plan<BITS, ZERO> P(A.layout);
  const int64_t in = A.layout.in_features, out = A.out_features;
  const bool last = r1 == out;
  const int64_t fast_end = last ? r1 - 1 : r1;
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4) {
    for (int64_t r = r0; r < fast_end; ++r) block<BITS, ZERO, 1, 4, false>(A, P, x + b * in, y + b * out, r);
    if (last) block<BITS, ZERO, 1, 4, true>(A, P, x + b * in, y + b * out, r1 - 1);
  }
  for (; b < nb; ++b) {
    int64_t r = r0;
    for (; r + 4 <= fast_end; r += 4) block<BITS, ZERO, 4, 1, false>(A, P, x + b * in, y + b * out, r);
    for (; r < fast_end; ++r) block<BITS, ZERO, 1, 1, false>(A, P, x + b * in, y + b * out, r);
    if (last) block<BITS, ZERO, 1, 1, true>(A, P, x + b * in, y + b * out, r1 - 1);
  }
}

// The weights of rows [r0, r1) written out as float32 (w[r, j]): the exponent-add dequantization
// itself, for batches large enough that a float matmul beats the fused GEMV.
template <int BITS, bool ZERO>
void dequantize_rows(const Args& A, float* w, int64_t r0, int64_t r1) {
  const Plan<BITS, ZERO> P(A.layout);
  constexpr int kLanes = Isa::kLanes;
  const int64_t in = A.layout.in_features, group = A.layout.group;
  alignas(64) uint8_t tail_bytes[16];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = A.codes + r * A.layout.row_bytes;
    float* out = w + r * in;
    for (int64_t g = 0; g < A.groups; ++g) {
      const int64_t start = g * group, end = std::min(start + group, in);
      const typename Isa::Table table = group_table<BITS, ZERO>(A.scales[r * A.groups + g], P);
      const typename Isa::Unpack unpack = P.unpack[(start * BITS) & 7];
      for (int64_t j = start; j < end; j += kLanes) {
        const uint8_t* p = row + ((j * BITS) >> 3);
        if (p + 16 > A.codes_end) {
          for (int i = 0; i < 16; ++i) tail_bytes[i] = p + i < A.codes_end ? p[i] : 0;
          p = tail_bytes;
        }
        const typename Isa::V v = Isa::template lookup<BITS>(table, Isa::codes(p, unpack));
        if (end - j >= kLanes) Isa::store(out + j, v); else Isa::store_first(out + j, v, end - j);
      }
    }
  }
}

// The instantiations for the layer's code width (2..4 bits; callers send wider codes elsewhere).
inline void rows_for(const Args& A, int64_t nb, const float* x, float* y, int64_t r0, int64_t r1) {
  const bool z = A.layout.with_zero;
  switch (A.layout.bits) {
    case 2: return z ? rows<2, true>(A, nb, x, y, r0, r1) : rows<2, false>(A, nb, x, y, r0, r1);
    case 3: return z ? rows<3, true>(A, nb, x, y, r0, r1) : rows<3, false>(A, nb, x, y, r0, r1);
    default: return z ? rows<4, true>(A, nb, x, y, r0, r1) : rows<4, false>(A, nb, x, y, r0, r1);
  }
}

inline void dequantize_for(const Args& A, float* w, int64_t r0, int64_t r1) {
  const bool z = A.layout.with_zero;
  switch (A.layout.bits) {
    case 2: return z ? dequantize_rows<2, true>(A, w, r0, r1) : dequantize_rows<2, false>(A, w, r0, r1);
    case 3: return z ? dequantize_rows<3, true>(A, w, r0, r1) : dequantize_rows<3, false>(A, w, r0, r1);
    default: return z ? dequantize_rows<4, true>(A, w, r0, r1) : dequantize_rows<4, false>(A, w, r0, r1);
  }
}

}  // namespace
