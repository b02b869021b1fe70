// potq's native decoder: one call per token runs the whole model — embedding, every block's
// RMSNorms, projections, rotary embedding, KV cache and grouped-query attention, the gated MLP, the
// final norm and the output head — with no Python between the layers (llama.cpp's "one graph per
// token").
//
// The model is the LLaMA-style block every dense family potq takes shares, with the options the
// families add: Qwen2's q/k/v biases, Qwen3's and Gemma 3's per-head q/k norms, Gemma's norms of
// each sublayer's output ("sandwich" norms), scaled token table, GeGLU and soft-capped scores and
// logits, sliding-window attention per layer with its own rotary tables (Mistral, Gemma 2/3,
// Phi-3), partial rotary embeddings (Phi-3 variants). It is described to this file by the Python
// side (potq/models/native_decoder.py) from the loaded module: sizes, the rotary tables the
// model's own rotary embedding computed, and one `Matrix` per linear layer — packed PoT codes (the fused
// kernel), PoT codes in the runtime's 8-bit-activation layout (q8_layout.h), symmetric 8-bit codes
// (integer dot products against 8-bit activations, or the float 8-bit GEMV) or float32 — so mixed
// formats in one model are one switch, not a copy of the block per format.
//
// Threads: one OpenMP parallel region per call. Each thread takes a fixed slice of every
// projection's output rows (for all the tokens fed), of the attention items (blocks of tokens for a
// kv head) and of the tokens for the elementwise steps (norms, residual adds, the activations'
// 8-bit rounding) — or, decoding one token, every thread computes those few small vectors itself,
// which saves half the barriers, and attends over its share of the cached positions; potq's own
// barrier (spin briefly, then yield the core) separates the phases that read other threads'
// results. A prompt goes through each layer as one batch, so a weight unit decoded once serves up
// to eight tokens (q8_kernel.cpp, q8_vnni.cpp).
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "decoder_math.h"
#include "pot_gemv_layout.h"
#include "pot_gemv_scalar.h"
#include "q8_layout.h"

// defined in pot_gemv.cpp
Args packed_layer(const torch::Tensor& codes, const torch::Tensor& scales, int64_t in_features, int64_t bits,
                  int64_t group, int64_t top, bool with_zero);
void dequantize_scalar(const Args& A, float* w, int64_t r0, int64_t r1);

namespace {

enum Kind { kDense = 0, kPot = 1, kInt8 = 2, kPotQ8 = 3 };

bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

}  // namespace

// One linear layer (or a token table) as the decoder reads it; the tensors it points into are kept.
struct Matrix {
  int kind = kDense;
  int64_t out = 0, in = 0;
  Args pot{};                 // kPot
  Int8Layer int8{};           // kInt8
  Q8Layer q8{};               // kPotQ8
  const float* dense = nullptr;  // kDense
  const float* bias = nullptr;
  int64_t act_block = 0;  // the width of the 8-bit activations' blocks it reads (0: it reads floats)
  int q8_isa = kQ8Scalar;  // the 8-bit-activation kernel's instruction set (an 8-bit layer's; a PoT one's is q8.isa)
  std::vector<torch::Tensor> keep;

  // y[b·out + r] for rows [r0, r1) and the nb vectors x[b·in ..] (xq: their 8-bit form, which
  // the layers with an act_block read instead)
  void rows(const float* x, const Q8Activations& xq, float* y, int64_t nb, int64_t r0, int64_t r1) const {
    if (r0 >= r1) return;
    static const bool avx512 = has_avx512(), avx2 = has_avx2();
    switch (kind) {
      case kPot:
        (pot.layout.bits > 4 || !avx2 ? rows_scalar : avx512 ? rows_avx512 : rows_avx2)(pot, nb, x, y, r0, r1);
        break;
      case kInt8:
        if (act_block) q8_int8_rows(int8, xq, y, r0, r1, q8_isa);
        else if (avx2) (avx512 ? int8_rows_avx512 : int8_rows_avx2)(int8, nb, x, y, r0, r1);
        else
          for (int64_t b = 0; b < nb; ++b)
            for (int64_t r = r0; r < r1; ++r) {
              float acc = 0.0f;
              for (int64_t j = 0; j < in; ++j)
                acc += (float(int8.codes[r * in + j]) - 127.0f) *
                       half_to_float(int8.scales[r * int8.groups + j / int8.group]) * x[b * in + j];
              y[b * out + r] = acc;
            }
        break;
      case kPotQ8:
        q8_rows(q8, xq, y, r0, r1);
        break;
      default:
        for (int64_t b = 0; b < nb; ++b) {
          if (avx2) (avx512 ? dense_rows_avx512 : dense_rows_avx2)(dense, in, x + b * in, y + b * out, r0, r1);
          else
            for (int64_t r = r0; r < r1; ++r) {
              float acc = 0.0f;
              for (int64_t j = 0; j < in; ++j) acc += dense[r * in + j] * x[b * in + j];
              y[b * out + r] = acc;
            }
        }
    }
    if (bias)
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t r = r0; r < r1; ++r) y[b * out + r] += bias[r];
  }

  // Row `r` itself as float32 (an embedding lookup).
  void row(int64_t r, float* out_row) const {
    switch (kind) {
      case kPot: {
        Args one = pot;
        one.codes = pot.codes + r * pot.layout.row_bytes;
        one.scales = pot.scales + r * pot.groups;
        one.out_features = 1;
        dequantize_scalar(one, out_row, 0, 1);
        break;
      }
      case kInt8:
        for (int64_t j = 0; j < in; ++j)
          out_row[j] = (float(int8.codes[r * in + j]) - 127.0f) * half_to_float(int8.scales[r * int8.groups + j / int8.group]);
        break;
      case kPotQ8:
        q8_row(q8, r, out_row);
        break;
      default:
        std::copy(dense + r * in, dense + (r + 1) * in, out_row);
    }
  }
};

using MatrixPtr = std::shared_ptr<Matrix>;

namespace {

const float* optional_bias(const c10::optional<torch::Tensor>& bias, int64_t out, Matrix& m) {
  if (!bias) return nullptr;
  TORCH_CHECK(bias->dtype() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == out, "bias: float32 [out]");
  m.keep.push_back(*bias);
  return bias->data_ptr<float>();
}

MatrixPtr dense_matrix(torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(weight.dtype() == torch::kFloat32 && weight.dim() == 2 && weight.is_contiguous(), "weight: float32 [out, in]");
  auto m = std::make_shared<Matrix>();
  m->kind = kDense, m->out = weight.size(0), m->in = weight.size(1), m->dense = weight.data_ptr<float>();
  m->keep.push_back(weight);
  m->bias = optional_bias(bias, m->out, *m);
  return m;
}

// A packed sign-magnitude layer. `magnitudes` empty: PoT (field f is 2^f, or zero for pot-zero's
// field 0); else a table of the integer magnitudes of the fields (APoT), which only the
// 8-bit-activation kernels read (their byte tables take any magnitudes up to 127).
MatrixPtr pot_matrix(torch::Tensor codes, torch::Tensor scales, int64_t in, int64_t bits, int64_t group, int64_t top,
                     bool with_zero, c10::optional<torch::Tensor> bias, bool q8, const std::string& isa,
                     const std::vector<int64_t>& magnitudes) {
  auto m = std::make_shared<Matrix>();
  m->pot = packed_layer(codes, scales, in, bits, group, top, with_zero);
  m->kind = kPot, m->out = codes.size(0), m->in = in;
  m->keep = {codes, scales};
  TORCH_CHECK(magnitudes.empty() || (q8 && q8_serves(m->pot.layout)),
              "a table of magnitudes needs the 8-bit-activation kernel (see q8_serves)");
  if (q8 && q8_serves(m->pot.layout)) {
    for (auto& t : q8_repack(m->pot, m->q8, q8_isa_named(isa))) m->keep.push_back(t);
    if (!magnitudes.empty()) q8_use_magnitudes(m->q8, magnitudes);
    m->kind = kPotQ8, m->act_block = group, m->q8_isa = m->q8.isa;
  }
  m->bias = optional_bias(bias, m->out, *m);
  return m;
}

MatrixPtr int8_matrix(torch::Tensor codes, torch::Tensor scales, int64_t group, c10::optional<torch::Tensor> bias,
                      bool q8, const std::string& isa) {
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.dim() == 2 && codes.is_contiguous(), "codes: uint8 [out, in]");
  TORCH_CHECK(scales.dtype() == torch::kFloat16 && scales.is_contiguous() && scales.size(0) == codes.size(0) &&
                  group > 0 && scales.size(1) * group >= codes.size(1),
              "scales: float16 [out, groups]");
  auto m = std::make_shared<Matrix>();
  m->kind = kInt8, m->out = codes.size(0), m->in = codes.size(1);
  m->int8 = {codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()), codes.size(1),
             codes.size(0), group, scales.size(1)};
  m->keep = {codes, scales};
  if (q8 && q8_int8_serves(m->int8)) {
    m->act_block = group, m->q8_isa = q8_isa_named(isa);
    if (m->q8_isa == kQ8Vnni && !q8_int8_vnni_serves(m->int8)) m->q8_isa = kQ8Avx2;
  }
  m->bias = optional_bias(bias, m->out, *m);
  return m;
}

// Rows [r0, r1) of `out` rows for thread t of n, on multiples of 4 (the PoT kernel's row block).
std::pair<int64_t, int64_t> slice(int64_t out, int t, int n) {
  const int64_t quads = (out + 3) / 4;
  const int64_t q0 = quads * t / n, q1 = quads * (t + 1) / n;
  return {std::min(out, q0 * 4), std::min(out, q1 * 4)};
}

void rms_norm_into(const float* x, const float* w, int64_t n, float eps, float* y) {
  float squares = 0.0f;
  for (int64_t j = 0; j < n; ++j) squares += x[j] * x[j];
  const float inv = 1.0f / std::sqrt(squares / float(n) + eps);
  for (int64_t j = 0; j < n; ++j) y[j] = x[j] * inv * w[j];
}

// [begin, end) of `count` items for thread t of n
std::pair<int64_t, int64_t> share(int64_t count, int t, int n) { return {count * t / n, count * (t + 1) / n}; }

}  // namespace

// The barrier between a token's phases (dozens a token, each phase some microseconds): waiting
// threads spin briefly, then yield the core, so that on a machine with other work they give way
// instead of burning the time the thread they wait for needs — whatever OpenMP's wait policy.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void resize(int n) { n_ = n; }
  void wait() {
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins < kSpins) _mm_pause();
      else sched_yield();
    }
  }

 private:
  static constexpr int kSpins = 4000;  // about 0.1 ms of pause instructions
  std::atomic<int> arrived_{0}, generation_{0};
  int n_;
};

// Where a profiled call's time goes, per thread (Decoder::profile): each phase's milliseconds,
// charged when the phase ends — the layers' products, attention (rotary embedding and KV cache
// included), the elementwise steps (embedding lookup, norms, the activations' 8-bit rounding,
// the gated activation, residual adds), waiting at barriers, and the output head with its final
// norm. Off (no clock read) unless the decoder is profiling.
enum Phase { kProject = 0, kAttend, kElementwise, kWait, kHead, kPhases };
const char* const kPhaseNames[kPhases] = {"projections", "attention", "elementwise", "waiting", "output head"};

class PhaseClock {
 public:
  explicit PhaseClock(double* ms) : ms_(ms), last_(ms ? Clock::now() : Clock::time_point{}) {}
  // the time since the previous charge was spent on `phase`
  void charge(int phase) {
    if (!ms_) return;
    const auto now = Clock::now();
    ms_[phase] += std::chrono::duration<double, std::milli>(now - last_).count();
    last_ = now;
  }

 private:
  using Clock = std::chrono::steady_clock;
  double* ms_;
  Clock::time_point last_;
};

// One block's layers, norm weights (each as it multiplies: Gemma's 1 + w already added) and
// attention options.
struct Block {
  MatrixPtr q, k, v, o, gate, up, down;
  torch::Tensor attn_norm, mlp_norm;              // the norms before attention and before the MLP
  c10::optional<torch::Tensor> q_norm, k_norm;    // Qwen3, Gemma 3: RMSNorm over each head's D values
  c10::optional<torch::Tensor> attn_out_norm, mlp_out_norm;  // Gemma 2/3: RMSNorm of each sublayer's output
  int64_t window = 0;  // attention over the last `window` positions (0: all of them)
};
using BlockPtr = std::shared_ptr<Block>;

class Decoder {
 public:
  // The model-wide options: the token table's rows are multiplied by `embed_scale` (Gemma: √hidden);
  // attention scores and the logits soft-capped where `attn_softcap`, `final_softcap` > 0 (Gemma 2);
  // `activation` is the gated MLP's ("silu": SwiGLU, "gelu_tanh": GeGLU). cos[i], sin[i]: block i's
  // rotary tables [max_len, R], R <= head_dim (the first R of a head's values rotate); blocks of one
  // kind share the tensors. They set the positions the decoder holds. `half_cache`: keep the KV
  // cache in float16 (llama.cpp's default: half the bytes a step's attention reads), else float32.
  Decoder(std::vector<BlockPtr> blocks, MatrixPtr embed, MatrixPtr head, torch::Tensor final_norm,
          std::vector<torch::Tensor> cos, std::vector<torch::Tensor> sin, int64_t heads, int64_t kv_heads,
          int64_t head_dim, double eps, double scaling, double embed_scale, double attn_softcap, double final_softcap,
          const std::string& activation, bool half_cache)
      : blocks_(std::move(blocks)), embed_(std::move(embed)), head_(std::move(head)), final_norm_(final_norm),
        cos_(std::move(cos)), sin_(std::move(sin)), H_(heads), KV_(kv_heads), D_(head_dim), eps_(float(eps)),
        scaling_(float(scaling)),
        embed_scale_(float(embed_scale)), attn_softcap_(float(attn_softcap)), final_softcap_(float(final_softcap)),
        half_cache_(half_cache) {
    TORCH_CHECK(!blocks_.empty() && heads % kv_heads == 0, "the decoder needs blocks and heads divisible by kv heads");
    TORCH_CHECK(activation == "silu" || activation == "gelu_tanh", "activation: silu or gelu_tanh, not ", activation);
    activation_ = activation == "silu" ? Activation::kSilu : Activation::kGeluTanh;
    TORCH_CHECK(final_norm.dtype() == torch::kFloat32 && final_norm.is_contiguous(), "norms: contiguous float32");
    hidden_ = embed_->in;
    TORCH_CHECK(cos_.size() == blocks_.size() && sin_.size() == blocks_.size(), "rotary tables: one pair per block");
    max_len_ = cos_[0].size(0), inter_ = blocks_[0]->gate->out;
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const Block* b = blocks_[i].get();
      for (const auto& t : {cos_[i], sin_[i]})
        TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous() && t.dim() == 2, "rotary tables: contiguous float32");
      TORCH_CHECK(cos_[i].sizes() == sin_[i].sizes() && cos_[i].size(0) == max_len_ && cos_[i].size(1) % 2 == 0 &&
                      cos_[i].size(1) <= D_ && b->window >= 0,
                  "rotary tables: [max_len, R] for every block, R even and at most head_dim");
      TORCH_CHECK(b->attn_norm.numel() == hidden_ && b->mlp_norm.numel() == hidden_ &&
                      (!b->attn_out_norm || b->attn_out_norm->numel() == hidden_) &&
                      (!b->mlp_out_norm || b->mlp_out_norm->numel() == hidden_) &&
                      (!b->q_norm || b->q_norm->numel() == D_) && (!b->k_norm || b->k_norm->numel() == D_),
                  "norm weights: [hidden] (q/k norms: [head_dim])");
      TORCH_CHECK(b->q->out == H_ * D_ && b->k->out == KV_ * D_ && b->v->out == KV_ * D_ && b->o->in == H_ * D_ &&
                      b->o->out == hidden_ && b->gate->in == hidden_ && b->down->in == inter_ &&
                      b->down->out == hidden_ && b->up->out == inter_ && b->q->in == hidden_,
                  "a block's layer shapes do not fit the decoder's sizes");
      TORCH_CHECK(b->q->act_block == b->k->act_block && b->q->act_block == b->v->act_block &&
                      b->gate->act_block == b->up->act_block,
                  "q/k/v (and gate/up) must read the same activation blocks");
    }
    const size_t cache = blocks_.size() * KV_ * max_len_ * D_;
    if (half_cache_) keys16_.resize(cache), values16_.resize(cache);
    else keys_.resize(cache), values_.resize(cache);
  }

  // Feed `tokens` at positions pos, pos + 1, ...; when `logits` is given, write into it the logits
  // after the last token ([vocab]) or after each ([T, vocab]: a perplexity window). One token is a
  // decoding step; several (a prompt) go through each layer together.
  void feed(std::vector<int64_t> tokens, int64_t pos, c10::optional<torch::Tensor> logits) {
    const int64_t T = static_cast<int64_t>(tokens.size());
    TORCH_CHECK(T > 0 && pos >= 0 && pos + T <= max_len_, "positions ", pos, "..", pos + T - 1,
                " are outside the decoder's ", max_len_, " positions");
    for (int64_t token : tokens) TORCH_CHECK(token >= 0 && token < embed_->out, "token ", token, " is outside the vocabulary");
    float* out = nullptr;
    if (logits) {
      TORCH_CHECK(logits->dtype() == torch::kFloat32 && logits->is_contiguous() &&
                      (logits->numel() == head_->out || logits->numel() == T * head_->out),
                  "logits: float32 [vocab] or [tokens, vocab]");
      out = logits->data_ptr<float>();
      every_ = logits->numel() == T * head_->out && T > 1;
    }
    const int threads = std::max(1, at::get_num_threads());
    Batch batch(T, hidden_, H_ * D_, KV_ * D_, inter_, H_, threads);
    pybind11::gil_scoped_release no_gil;
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
      {
        batch.barrier.resize(omp_get_num_threads());  // the team OpenMP gave (its implicit barrier: before any wait)
        if (profiling_) {
          phase_ms_.resize(std::max<size_t>(phase_ms_.size(), omp_get_num_threads() * kPhases), 0.0);
          profile_threads_ = std::max(profile_threads_, omp_get_num_threads());
        }
      }
      const int t = omp_get_thread_num(), n = omp_get_num_threads();
      PhaseClock clock(profiling_ ? phase_ms_.data() + t * kPhases : nullptr);
      if (half_cache_) run(tokens, pos, batch, out, t, n, clock, keys16_, values16_);
      else run(tokens, pos, batch, out, t, n, clock, keys_, values_);
    }
  }

  // Start (afresh) or stop adding up where the calls' time goes.
  void profile(bool on) {
    profiling_ = on;
    if (on) phase_ms_.assign(phase_ms_.size(), 0.0), profile_threads_ = 0;
  }
  // Milliseconds per phase since profile(true), the mean over the threads of the team.
  std::map<std::string, double> phase_ms() const {
    std::map<std::string, double> ms;
    for (int p = 0; p < kPhases; ++p) {
      double sum = 0.0;
      for (int t = 0; t < profile_threads_; ++t) sum += phase_ms_[t * kPhases + p];
      ms[kPhaseNames[p]] = profile_threads_ ? sum / profile_threads_ : 0.0;
    }
    return ms;
  }

 private:
  // What the threads share while T tokens go through the layers: row b of each is token b's.
  struct Batch {
    Barrier barrier;  // first: constructed before the vectors, as the initialiser list is ordered
    int64_t T;
    std::vector<float> h, x, q, k, v, attended, y, gate, up, act;
    std::vector<float> parts, stats;  // one token: each thread's attention over its share of the positions
    Q8Activations xq, aq, iq;
    Batch(int64_t T, int64_t hidden, int64_t qd, int64_t kvd, int64_t inter, int64_t heads, int threads)
        : barrier(threads), T(T), h(T * hidden), x(T * hidden), q(T * qd), k(T * kvd), v(T * kvd), attended(T * qd), y(T * hidden),
          gate(T * inter), up(T * inter), act(T * inter), parts(T == 1 ? threads * qd : 0),
          stats(T == 1 ? threads * 2 * heads : 0), xq(hidden, T), aq(qd, T), iq(inter, T) {
      xq.reset(x.data()), aq.reset(attended.data()), iq.reset(act.data());
    }
  };

  // What one token's step keeps per thread: the residual stream, its norm and the 8-bit forms of
  // the vectors the layers read. Each thread computes these few small vectors itself, which costs
  // less than the barriers that sharing them would take.
  struct Own {
    std::vector<float> h, x, q, attended;  // q: every query head, normed and rotated
    Q8Activations xq, aq, iq;
    Own(int64_t hidden, int64_t qd, int64_t inter)
        : h(hidden), x(hidden), q(qd), attended(qd), xq(hidden), aq(qd), iq(inter) {}
  };

  static constexpr int64_t kAttentionBlock = 16;  // a prompt's tokens per attention item

  // Every thread runs this; barriers separate the phases that read other threads' results.
  // Cached: the KV cache's element (float, or c10::Half: half the bytes a step's attention reads).
  template <typename Cached>
  void run(const std::vector<int64_t>& tokens, int64_t pos, Batch& B, float* logits, int t, int n, PhaseClock& clock,
           std::vector<Cached>& keys, std::vector<Cached>& values) {
    const int64_t T = B.T, group = H_ / KV_;
    std::vector<float> normed(hidden_);  // a sublayer's output normed before the residual add (Gemma)
    const bool step = T == 1;  // one token: each thread keeps the token's small vectors itself
    std::unique_ptr<Own> own = step ? std::make_unique<Own>(hidden_, H_ * D_, inter_) : nullptr;
    float* h = step ? own->h.data() : B.h.data();
    float* x = step ? own->x.data() : B.x.data();
    Q8Activations& xq = step ? own->xq : B.xq;
    Q8Activations& aq = step ? own->aq : B.aq;
    Q8Activations& iq = step ? own->iq : B.iq;
    float* attended = step ? own->attended.data() : B.attended.data();
    if (step) xq.reset(x), aq.reset(attended), iq.reset(B.act.data());
    const auto [b0, b1] = step ? std::pair<int64_t, int64_t>{0, 1} : share(T, t, n);  // the tokens it keeps
    auto wait = [&]() {
      B.barrier.wait();
      clock.charge(kWait);
    };
    auto publish = [&]() { if (!step) wait(); };  // only a prompt's tokens are shared out
    // h += m(in) (normed by out_norm where given) for the tokens this thread keeps: in's 8-bit form,
    // the product, then the residual add
    auto add_to_stream = [&](const Matrix& m, const float* in, Q8Activations& in_q,
                             const c10::optional<torch::Tensor>& out_norm) {
      if (m.act_block) {
        in_q.quantize(m.act_block, b0, b1);
        clock.charge(kElementwise);
        publish();
      }
      project(m, in, in_q, B.y.data(), T, t, n);
      clock.charge(kProject);
      wait();
      for (int64_t b = b0; b < b1; ++b) {
        const float* y = B.y.data() + b * hidden_;
        if (out_norm) rms_norm_into(y, out_norm->data_ptr<float>(), hidden_, eps_, normed.data()), y = normed.data();
        for (int64_t j = 0; j < hidden_; ++j) h[b * hidden_ + j] += y[j];
      }
      clock.charge(kElementwise);
    };
    for (int64_t b = b0; b < b1; ++b) {
      embed_->row(tokens[b], h + b * hidden_);
      if (embed_scale_ != 1.0f)
        for (int64_t j = 0; j < hidden_; ++j) h[b * hidden_ + j] *= embed_scale_;
    }
    // the rotary embedding's items (token b, kv head g), every n-th to this thread
    const int64_t items = T * KV_;
    std::vector<float> scores(group * (pos + T)), rotated(D_), work;
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const Block& L = *blocks_[i];
      Cached* K = keys.data() + i * KV_ * max_len_ * D_;
      Cached* V = values.data() + i * KV_ * max_len_ * D_;
      norm_rows(h, L.attn_norm.data_ptr<float>(), x, xq, L.q->act_block, b0, b1);
      clock.charge(kElementwise);
      publish();
      project(*L.q, x, xq, B.q.data(), T, t, n);
      project(*L.k, x, xq, B.k.data(), T, t, n);
      project(*L.v, x, xq, B.v.data(), T, t, n);
      clock.charge(kProject);
      wait();
      if (step) {
        // one token: the positions split between the threads, each attending every query head over
        // its share (a kv head's keys read once for its heads), then every thread merging the shares
        // into its own copy — even work whatever the number of kv heads. Each thread norms and rotates
        // every query head for itself; the thread whose share holds this token's position (the last)
        // writes the token's keys and values into the cache.
        const int64_t earliest = L.window ? std::max<int64_t>(0, pos + 1 - L.window) : 0;
        const auto [part0, part1] = share(pos + 1 - earliest, t, n);
        const int64_t s0 = earliest + part0, s1 = earliest + part1;
        for (int64_t hd = 0; hd < H_; ++hd) {
          const float* q = B.q.data() + hd * D_;
          if (L.q_norm) rms_norm_into(q, L.q_norm->data_ptr<float>(), D_, eps_, rotated.data()), q = rotated.data();
          rotate(i, q, pos, own->q.data() + hd * D_);
        }
        if (s1 == pos + 1)
          for (int64_t g = 0; g < KV_; ++g) {
            float* k = B.k.data() + g * D_;
            if (L.k_norm) rms_norm_into(k, L.k_norm->data_ptr<float>(), D_, eps_, k);
            rotate(i, k, pos, rotated.data());
            store(rotated.data(), K + (g * max_len_ + pos) * D_);
            store(B.v.data() + g * D_, V + (g * max_len_ + pos) * D_);
          }
        for (int64_t g = 0; g < KV_; ++g)
          attend_group(own->q.data() + g * group * D_, group, D_, K + (g * max_len_ + s0) * D_,
                       V + (g * max_len_ + s0) * D_, s1 - s0, D_, scaling_, attn_softcap_, scores.data(),
                       B.parts.data() + (t * H_ + g * group) * D_, D_, B.stats.data() + 2 * (t * H_ + g * group));
        clock.charge(kAttend);
        wait();
        attend_merge(B.parts.data(), B.stats.data(), n, H_ * D_, H_, D_, attended);
        clock.charge(kAttend);
      } else {
        for (int64_t item = t; item < items; item += n) {  // its key (normed, rotated) and value into the
          const int64_t b = item / KV_, g = item % KV_;      // cache, its query heads normed and rotated in place
          float* k = B.k.data() + item * D_;
          if (L.k_norm) rms_norm_into(k, L.k_norm->data_ptr<float>(), D_, eps_, k);
          rotate(i, k, pos + b, rotated.data());
          store(rotated.data(), K + (g * max_len_ + pos + b) * D_);
          store(B.v.data() + item * D_, V + (g * max_len_ + pos + b) * D_);
          for (int64_t hd = g * group; hd < (g + 1) * group; ++hd) {
            float* q = B.q.data() + (b * H_ + hd) * D_;
            if (L.q_norm) rms_norm_into(q, L.q_norm->data_ptr<float>(), D_, eps_, q);
            rotate(i, q, pos + b, rotated.data());
            std::copy(rotated.begin(), rotated.end(), q);
          }
        }
        clock.charge(kAttend);
        wait();  // the tokens attend to keys other threads wrote
        // blocks of tokens for one kv head as two matrix products (every n-th block to this thread:
        // later tokens see more positions, so contiguous shares would be uneven)
        const int64_t blocks = (T + kAttentionBlock - 1) / kAttentionBlock;
        for (int64_t item = t; item < blocks * KV_; item += n) {
          const int64_t b = item / KV_ * kAttentionBlock, g = item % KV_, count = std::min(kAttentionBlock, T - b);
          attend_block(B.q.data() + (b * H_ + g * group) * D_, count, group, H_ * D_, K + g * max_len_ * D_,
                       V + g * max_len_ * D_, pos + b, L.window, D_, scaling_, attn_softcap_,
                       B.attended.data() + (b * H_ + g * group) * D_, H_ * D_, work);
        }
        clock.charge(kAttend);
        wait();
      }
      add_to_stream(*L.o, attended, aq, L.attn_out_norm);
      norm_rows(h, L.mlp_norm.data_ptr<float>(), x, xq, L.gate->act_block, b0, b1);
      clock.charge(kElementwise);
      publish();
      {  // gate and up rows of the same slice, so act(gate)·up needs no barrier between them
        const auto [r0, r1] = slice(inter_, t, n);
        L.gate->rows(x, xq, B.gate.data(), T, r0, r1);
        L.up->rows(x, xq, B.up.data(), T, r0, r1);
        clock.charge(kProject);
        for (int64_t b = 0; b < T; ++b)
          gated_activation(activation_, B.gate.data() + b * inter_ + r0, B.up.data() + b * inter_ + r0,
                           B.act.data() + b * inter_ + r0, r1 - r0);
        clock.charge(kElementwise);
      }
      wait();
      add_to_stream(*L.down, B.act.data(), iq, L.mlp_out_norm);
    }
    if (!logits) return;
    publish();
    if (every_) {  // every token's logits: the final norm of this thread's tokens, then the head for all
      norm_rows(h, final_norm_.data_ptr<float>(), x, xq, head_->act_block, b0, b1);
      clock.charge(kHead);
      wait();
      const auto [r0, r1] = slice(head_->out, t, n);
      head_->rows(x, xq, logits, T, r0, r1);
      if (final_softcap_ > 0.0f)
        for (int64_t b = 0; b < T; ++b) soft_cap(logits + b * head_->out + r0, r1 - r0, final_softcap_);
      clock.charge(kHead);
      return;
    }
    std::vector<float> last(hidden_);  // the last token's final norm, each thread its own copy
    rms_norm_into(h + (T - 1) * hidden_, final_norm_.data_ptr<float>(), hidden_, eps_, last.data());
    Q8Activations lq(hidden_);
    lq.reset(last.data());
    lq.ensure(head_->act_block);
    const auto [r0, r1] = slice(head_->out, t, n);
    head_->rows(last.data(), lq, logits, 1, r0, r1);
    if (final_softcap_ > 0.0f) soft_cap(logits + r0, r1 - r0, final_softcap_);
    clock.charge(kHead);
  }

  // RMSNorm of rows [b0, b1) of h into x, and their 8-bit form for blocks of `block` (0: none)
  void norm_rows(const float* h, const float* w, float* x, Q8Activations& xq, int64_t block, int64_t b0,
                 int64_t b1) const {
    for (int64_t b = b0; b < b1; ++b) rms_norm_into(h + b * hidden_, w, hidden_, eps_, x + b * hidden_);
    if (block) xq.quantize(block, b0, b1);
  }

  // This thread's slice of a layer's output rows, for all T tokens.
  static void project(const Matrix& m, const float* x, const Q8Activations& xq, float* y, int64_t T, int t, int n) {
    const auto [r0, r1] = slice(m.out, t, n);
    m.rows(x, xq, y, T, r0, r1);
  }

  // One head's D values into the cache: as they are, or rounded to float16.
  void store(const float* x, float* out) const { std::copy(x, x + D_, out); }
  void store(const float* x, c10::Half* out) const {
    for (int64_t j = 0; j < D_; ++j) out[j] = c10::Half(x[j]);
  }

  // The first R values: x·cos + halves-swapped(x)·sin at `pos` (sin's first half negated, as
  // LlamaDecoder keeps it) with the block's tables; the other D − R as they are.
  void rotate(size_t block, const float* x, int64_t pos, float* out) const {
    const int64_t R = cos_[block].size(1), half = R / 2;
    const float *c = cos_[block].data_ptr<float>() + pos * R, *s = sin_[block].data_ptr<float>() + pos * R;
    for (int64_t j = 0; j < R; ++j) out[j] = x[j] * c[j] + x[j < half ? j + half : j - half] * s[j];
    std::copy(x + R, x + D_, out + R);
  }

  std::vector<BlockPtr> blocks_;
  MatrixPtr embed_, head_;
  torch::Tensor final_norm_;
  std::vector<torch::Tensor> cos_, sin_;
  int64_t H_, KV_, D_, hidden_ = 0, inter_ = 0, max_len_ = 0;
  float eps_, scaling_, embed_scale_, attn_softcap_, final_softcap_;
  Activation activation_;
  bool every_ = false;  // this call writes every token's logits
  bool half_cache_;
  bool profiling_ = false;
  std::vector<double> phase_ms_;  // [thread, phase] while profiling
  int profile_threads_ = 0;       // the largest team a profiled call had
  std::vector<float> keys_, values_;         // the KV cache: [block, kv head, position, D], float32 ...
  std::vector<c10::Half> keys16_, values16_;  // ... or float16
};

void bind_native_decoder(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<Matrix, MatrixPtr>(m, "Matrix")
      .def_readonly("kind", &Matrix::kind)
      .def_readonly("isa", &Matrix::q8_isa)
      .def("gemv", [](const Matrix& mat, torch::Tensor x) {  // the tests' check of one layer alone
        TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.size(-1) == mat.in && x.dim() <= 2,
                    "x: float32 [in] or [rows, in]");
        const int64_t rows = x.dim() == 2 ? x.size(0) : 1;
        auto y = torch::empty(x.dim() == 2 ? std::vector<int64_t>{rows, mat.out} : std::vector<int64_t>{mat.out}, x.options());
        Q8Activations xq(mat.in, rows);
        xq.reset(x.data_ptr<float>());
        xq.ensure(mat.act_block);
        mat.rows(x.data_ptr<float>(), xq, y.data_ptr<float>(), rows, 0, mat.out);
        return y;
      });
  m.def("dense_matrix", &dense_matrix, py::arg("weight"), py::arg("bias") = py::none());
  m.def("pot_matrix", &pot_matrix, py::arg("codes"), py::arg("scales"), py::arg("in_features"), py::arg("bits"),
        py::arg("group"), py::arg("top"), py::arg("with_zero"), py::arg("bias") = py::none(), py::arg("q8") = true, py::arg("isa") = "",
        py::arg("magnitudes") = std::vector<int64_t>{});
  m.def("q8_serves", [](int64_t bits, int64_t group, int64_t in) { return q8_serves(Layout{bits, group, 0, in, 0, false}); },
        py::arg("bits"), py::arg("group"), py::arg("in_features"),
        "whether a packed sign-magnitude layer of this shape runs on the 8-bit-activation kernels");
  m.def("int8_matrix", &int8_matrix, py::arg("codes"), py::arg("scales"), py::arg("group"), py::arg("bias") = py::none(),
        py::arg("q8") = true, py::arg("isa") = "");
  m.def("q8_best_isa", [] { return q8_best_isa(); }, "the widest 8-bit-activation kernel here (0 scalar, 1 AVX2, 2 VNNI)");
  py::class_<Block, BlockPtr>(m, "Block")
      .def(py::init([](MatrixPtr q, MatrixPtr k, MatrixPtr v, MatrixPtr o, MatrixPtr gate, MatrixPtr up, MatrixPtr down,
                       torch::Tensor attn_norm, torch::Tensor mlp_norm, c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm,
                       c10::optional<torch::Tensor> attn_out_norm, c10::optional<torch::Tensor> mlp_out_norm,
                       int64_t window) {
             for (const auto& t : {attn_norm, mlp_norm})
               TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous(), "norm weights: contiguous float32");
             for (const auto& t : {q_norm, k_norm, attn_out_norm, mlp_out_norm})
               TORCH_CHECK(!t || (t->dtype() == torch::kFloat32 && t->is_contiguous()), "norm weights: contiguous float32");
             return std::make_shared<Block>(Block{q, k, v, o, gate, up, down, attn_norm, mlp_norm, q_norm, k_norm,
                                                  attn_out_norm, mlp_out_norm, window});
           }),
           py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("gate"), py::arg("up"), py::arg("down"),
           py::arg("attn_norm"), py::arg("mlp_norm"), py::arg("q_norm") = py::none(),
           py::arg("k_norm") = py::none(), py::arg("attn_out_norm") = py::none(), py::arg("mlp_out_norm") = py::none(),
           py::arg("window") = 0);
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<std::vector<BlockPtr>, MatrixPtr, MatrixPtr, torch::Tensor, std::vector<torch::Tensor>,
                    std::vector<torch::Tensor>, int64_t, int64_t, int64_t, double, double, double, double, double,
                    const std::string&, bool>(),
           py::arg("blocks"), py::arg("embed"), py::arg("head"), py::arg("final_norm"), py::arg("cos"), py::arg("sin"),
           py::arg("heads"),
           py::arg("kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("scaling"), py::arg("embed_scale") = 1.0,
           py::arg("attn_softcap") = 0.0, py::arg("final_softcap") = 0.0, py::arg("activation") = "silu",
           py::arg("half_cache") = false)
      .def("feed", &Decoder::feed, py::arg("tokens"), py::arg("pos"), py::arg("logits") = py::none())
      .def("profile", &Decoder::profile, py::arg("on"),
           "start (afresh) or stop adding up, per phase, where the calls' time goes")
      .def("phase_ms", &Decoder::phase_ms, "milliseconds per phase since profile(True), the mean over the threads");
}
