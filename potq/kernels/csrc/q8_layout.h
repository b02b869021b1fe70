// The native decoder's fast PoT layer: integer dot products against 8-bit activations.
//
// A PoT weight is ±a·2^(f − K'), f = 0 .. 2^(N−1) − 1: within a group it is the integer ±2^f times
// the group's factor a·2^−K'. With the activations quantized to int8 per group (one float scale
// each, as llama.cpp's Q8 activations), a group's dot product is an exact integer sum of ±2^f·x_q —
// the magnitudes 2^f fit a byte up to 4-bit codes — taken 32 at a time by a byte table lookup and
// a u8×s8 multiply-add, then scaled once per group. That is about a third of the instructions of
// the float kernel, which decodes every weight into a float lane.
//
// The codes are repacked once, when the decoder is built, into a layout the vector unpacking
// wants, no bits added (the file's layout stays as it is). A unit is 32 weights (the AVX2 loop) or
// 64 (the AVX-512 VNNI loop, where rows and groups are whole 64s), W codes in all:
//   4-bit: W/2 bytes, byte i = code i | code (i + W/2) << 4;
//   3-bit: W/4 bytes of the low two bits (code i + (W/4)·q at bits 2q, 2q + 1 of byte i) + W/8 bytes
//          of sign bits (W = 64: code j at bit j, a mask register's load; W = 32: code 4k + i at
//          bit 8i + 7 − k, which one per-lane shift spreads to the bytes' top bits);
//   2-bit: the W/4 bytes of the 3-bit low plane, holding the whole code.
// For VNNI the rows are also interleaved in fours, unit by unit (Q8Layer::row_start).
// Activations are quantized per block of the layer's group width (a multiple of 32).
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "pot_gemv_layout.h"

#include <xmmintrin.h>

// How far ahead of the loop the weights are prefetched. Decoding streams every weight from memory
// once per token; with the hardware prefetcher alone a core ran a layer's loop at about half the
// speed it reaches on weights already in cache (one core's outstanding misses, not the memory,
// were the limit), and asking for the lines some kilobytes ahead brings most of that back.
constexpr int64_t kAheadBytes = 4096;

// The cache lines of the ``bytes`` bytes at ``p + kAheadBytes`` asked for (a prefetch past the
// weights' end is harmless: it never faults).
template <int64_t Bytes>
inline void prefetch_ahead(const uint8_t* p) {
  for (int64_t line = 0; line < Bytes; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + kAheadBytes + line), _MM_HINT_T0);
}

// The instruction sets of the 8-bit-activation kernels, narrowest first.
enum Q8Isa { kQ8Scalar = 0, kQ8Avx2 = 1, kQ8Vnni = 2 };
// The widest this CPU runs; `name` ("scalar", "avx2", "vnni"; "" = the widest) checked against it.
int q8_best_isa();
int q8_isa_named(const std::string& name);

struct Q8Layer {
  const uint8_t* data = nullptr;    // [out, row_bytes] in the runtime layout
  const uint16_t* scales = nullptr;  // [out, groups] fp16, the file's scales
  const uint16_t* quad_scales = nullptr;  // VNNI: the same as [out/4, groups, 4], four rows' in one load
  int64_t row_bytes = 0, groups = 0, group = 0, in = 0, out = 0;
  int bits = 0, isa = kQ8Scalar, width = 32;  // width: codes per unit of the layout (32, or 64 for VNNI)
  // VNNI: rows interleaved in fours, unit by unit (a quad's unit u of its four rows side by side),
  // so that the four rows the loop takes at once are one stream; `out` padded to a multiple of 4
  int64_t interleave = 1, unit_stride = 0;  // unit_stride: bytes from one unit of a row to its next
  float unit = 0.0f;  // 2^−K': a group's factor is its scale times this
  int8_t magnitude[16] = {}, sign[16] = {};  // code -> 2^f (0 for pot-zero's field 0), code -> ±1
  // code -> sign·2^f + offset ≥ 0 (2- and 3-bit codes: the unsigned operand of the VNNI
  // multiply-add, whose sums are then offset · Σx_q too, taken off per group)
  uint8_t shifted[16] = {};
  int offset = 0;

  const uint8_t* row_start(int64_t r) const {
    return data + (r / interleave) * interleave * row_bytes + (r % interleave) * (unit_stride / interleave);
  }
};

// x[0..n) as int8 q = round(x / d), d = max |x| / 127 (written to *scale; 0 for a zero block),
// and Σq into *sum.
void q8_quantize_block(const float* x, int64_t n, int8_t* q, float* scale, int32_t* sum);

// `rows` vectors of `n` in 8-bit form, per block of a layer's group width: q[b·n + j] and one
// scale per block, scale[b·stride + k]. Quantized on first use after `reset` (ensure) — or, where
// threads share it (a prompt), slice by slice (quantize) behind a barrier.
struct Q8Activations {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;  // Σq per block, beside its scale (the VNNI loops' offset correction)
  std::vector<float> scale_t;  // the same two transposed, [block, row]: a prompt's tokens' in one load
  std::vector<int32_t> sum_t;
  const float* source = nullptr;
  int64_t n = 0, rows = 1, stride = 0, block = 0;

  explicit Q8Activations(int64_t size, int64_t count = 1)
      : q(size * count), scale((size / 32 + 1) * count), sum(scale.size()), scale_t(scale.size()), sum_t(scale.size()),
        n(size), rows(count), stride(size / 32 + 1) {}
  void reset(const float* x) { source = x, block = 0; }
  // All rows for blocks of `width` unless done already (0: the reader is not a q8 layer).
  void ensure(int64_t width) {
    if (width == 0 || width == block) return;
    block = width;
    quantize(width, 0, rows);
  }
  // Rows [r0, r1) for blocks of `width`.
  void quantize(int64_t width, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b * width < n; ++b) {
        q8_quantize_block(source + r * n + b * width, std::min(width, n - b * width), q.data() + r * n + b * width,
                          &scale[r * stride + b], &sum[r * stride + b]);
        scale_t[b * rows + r] = scale[r * stride + b], sum_t[b * rows + r] = sum[r * stride + b];
      }
  }
};

// Bytes of one unit of `width` (32 or 64) weights in the runtime layout.
inline int64_t q8_unit_bytes(int64_t bits, int64_t width = 32) { return bits * width / 8; }

// Whether a packed PoT layer fits the fast path: 2..4-bit codes, groups and rows in whole units.
inline bool q8_serves(const Layout& L) {
  return L.bits >= 2 && L.bits <= 4 && L.group % 32 == 0 && L.group <= 1024 && L.in_features % 32 == 0;
}

// The layer's codes (and for VNNI its scales) repacked into the runtime layout of the kernel for
// `isa` (the returned tensors own them) and `Q` filled in to read them.
std::vector<torch::Tensor> q8_repack(const Args& A, Q8Layer& Q, int isa);
// Field f of a code decodes to magnitudes[f] (integers 1..127, the largest last) instead of 2^f;
// a group's factor becomes its scale / the largest (APoT: the scale stores the largest level).
void q8_use_magnitudes(Q8Layer& Q, const std::vector<int64_t>& magnitudes);
// y[b·out + r] for rows [r0, r1) and every activation row b of x (8-bit, blocks = the layer's
// group width). Several activation rows (a prompt) share each unit's decoding.
void q8_rows(const Q8Layer& Q, const Q8Activations& x, float* y, int64_t r0, int64_t r1);
// Row r's weights as float32.
void q8_row(const Q8Layer& Q, int64_t r, float* out);

// The same for a symmetric 8-bit layer (c − 127 = q in −127..127 per byte): Σ q·x_q as exact
// integers per group, by |q| · (x_q with q's sign), the form u8×s8 multiply-adds take.
inline bool q8_int8_serves(const Int8Layer& L) { return L.group % 32 == 0 && L.group <= 1024 && L.in % 32 == 0; }
void q8_int8_rows(const Int8Layer& L, const Q8Activations& x, float* y, int64_t r0, int64_t r1, int isa);

// The AVX-512 VNNI loops (q8_vnni.cpp): a layer repacked for them (width 64), and an 8-bit layer
// whose rows are whole 64s and whose groups are 32 or whole 64s.
void q8_rows_vnni(const Q8Layer& Q, const Q8Activations& x, float* y, int64_t r0, int64_t r1);
inline bool q8_int8_vnni_serves(const Int8Layer& L) { return L.in % 64 == 0 && (L.group == 32 || L.group % 64 == 0); }
void q8_int8_rows_vnni(const Int8Layer& L, const Q8Activations& x, float* y, int64_t r0, int64_t r1);
