// The native decoder's vector math besides the matrix products: attention and the gated MLP's
// activation, in AVX-512 or AVX2 where the CPU has it (decoder_math.cpp), else scalar loops.
//
// Attention scores are q·k·scaling, then — where `softcap` > 0 (Gemma 2) — softcap·tanh(s/softcap).
#pragma once
#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

// One token's attention for the query heads that share one key/value head (grouped-query
// attention): the keys and values of each cached position are read once for the whole group.
// For g = 0 .. G−1: out[g·out_stride ..][0..D) = softmax(q_g·Kᵀ·scaling)·V over positions
// 0 .. span−1 (K, V: [span, D] rows); q_g at q + g·q_stride; scores: room for G·span floats.
// With `stats`, each head's largest score and its softmax's denominator go to stats[2g], [2g + 1]
// (what merging attention over parts of the positions needs: attend_merge); a span of 0 gives
// −∞, 0 and zero outputs.
void attend_group(const float* q, int64_t G, int64_t q_stride, const float* K, const float* V, int64_t span,
                  int64_t D, float scaling, float softcap, float* scores, float* out, int64_t out_stride,
                  float* stats = nullptr);
// The same over a float16 cache (the decoder's default; exact mode keeps float32).
void attend_group(const float* q, int64_t G, int64_t q_stride, const c10::Half* K, const c10::Half* V, int64_t span,
                  int64_t D, float scaling, float softcap, float* scores, float* out, int64_t out_stride,
                  float* stats = nullptr);

// Attention over all positions from `parts` attentions over disjoint parts of them (attend_group
// with stats): out[h·D ..] = Σ_p w_p·o_p / Σ_p w_p, w_p = total_p·e^(max_p − max), for the H heads;
// part p's outputs at outputs + p·part_stride, its stats at stats + p·2·H.
void attend_merge(const float* outputs, const float* stats, int64_t parts, int64_t part_stride, int64_t H, int64_t D,
                  float* out);

// A block of a prompt's tokens' attention for the query heads of one key/value head, as two
// matrix products (PyTorch's BLAS, one thread: the caller is a thread of the decoder's team):
// S = Q·Kᵀ for the block's G·tokens queries against every position any of them sees, a causal
// softmax per row, then S·V. Token i (0 .. tokens−1) sees positions 0 .. first + i, or with a
// sliding `window` > 0 the last `window` of them (first + i − window + 1 .. first + i, as
// transformers' sliding-window mask); its heads' queries are at q + i·q_token_stride + g·D and its
// outputs go to out + i·out_token_stride + g·D. `work` is scratch the call grows as it needs.
void attend_block(const float* q, int64_t tokens, int64_t G, int64_t q_token_stride, const float* K, const float* V,
                  int64_t first, int64_t window, int64_t D, float scaling, float softcap, float* out,
                  int64_t out_token_stride, std::vector<float>& work);
// The same over a float16 cache: the positions the block sees widened to float32 first (in `work`).
void attend_block(const float* q, int64_t tokens, int64_t G, int64_t q_token_stride, const c10::Half* K,
                  const c10::Half* V, int64_t first, int64_t window, int64_t D, float scaling, float softcap, float* out,
                  int64_t out_token_stride, std::vector<float>& work);

// The gated MLP's activation, as the model names it.
enum class Activation { kSilu = 0, kGeluTanh = 1 };

// out[j] = act(gate[j])·up[j] for j < n: SwiGLU's silu(g) = g·σ(g), or GeGLU's tanh-approximated
// gelu(g) = ½g(1 + tanh(√(2/π)(g + 0.044715g³))) = g·σ(2√(2/π)(g + 0.044715g³)) — one sigmoid form.
void gated_activation(Activation act, const float* gate, const float* up, float* out, int64_t n);

// p[j] = cap·tanh(p[j]/cap) for j < n (Gemma 2's soft-capping of attention scores and logits).
void soft_cap(float* p, int64_t n, float cap);
