// The native decoder's vector math besides the matrix products: attention and SwiGLU's
// activation, in AVX2 where the CPU has it (decoder_math.cpp), else scalar loops.
#pragma once
#include <cstdint>

// One token's attention for the query heads that share one key/value head (grouped-query
// attention): the keys and values of each cached position are read once for the whole group.
// For g = 0 .. G−1: out[g·out_stride ..][0..D) = softmax(q_g·Kᵀ·scaling)·V over positions
// 0 .. span−1 (K, V: [span, D] rows); q_g at q + g·q_stride; scores: room for G·span floats.
void attend_group(const float* q, int64_t G, int64_t q_stride, const float* K, const float* V, int64_t span,
                  int64_t D, float scaling, float* scores, float* out, int64_t out_stride);

// out[j] = silu(gate[j])·up[j] = gate[j]·up[j] / (1 + e^−gate[j]) for j < n.
void silu_mul(const float* gate, const float* up, float* out, int64_t n);
