// Confidence re-masking on CPU (docs/OPS.md op 5; one step of MAGE's iterative decoding, docs/REFERENCE.md 5).
//
// Phase 1, parallel over tokens: an unknown token's candidate logits are read once into a per-chunk
// fp32 row (L1-resident: 4 KB for 1024 codes), then one vectorized loop computes exp for the
// log-sum-exp, the counter-based noise and the Gumbel-max argmax (exponential-race form, which reuses
// that exp) together. Known tokens are
// skipped: their logits are never read. Phase 2, parallel over rows: exactly k least confident
// unknown tokens are re-masked with a linear-time selection (nth_element), ties to the lower position.
// The fused-head variant runs phase 1 on logits it computes itself for a tile of unknown tokens at a
// time (one small GEMM per tile), so the (B, L, V) logits never exist. Both phases hand out chunks from a
// shared counter (cpu_parallel.h), so a thread that loses its core does not hold the step back.
#include "checks.h"
#include "cpu_isa.h"
#include "cpu_parallel.h"
#include "remask.h"
// remask_rng's helpers take eight-lane vectors here; they are always inlined, so the ABI of an out-of-line
// copy (what -Wpsabi warns about) never matters.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#include "remask_rng.h"
#pragma GCC diagnostic pop

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace mage {

void check_remask_args(const char* op, int64_t vocab_rows, const at::Tensor& ids, const at::Tensor& num_masked,
                       const at::Tensor& seed, int64_t mask_id, int64_t vocab_size, double temperature,
                       double choice_temperature) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, op, ": ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK_TYPE(num_masked.scalar_type() == at::kLong, op, ": num_masked must be int64, got ",
                   num_masked.scalar_type());
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, op, ": seed must be int64, got ", seed.scalar_type());
  check_same_device(ids, num_masked, op, "ids", "num_masked");
  check_same_device(ids, seed, op, "ids", "seed");
  TORCH_CHECK_VALUE(ids.dim() == 2, op, ": ids must be [B, L], got shape ", ids.sizes());
  TORCH_CHECK_VALUE(num_masked.dim() == 1 && num_masked.size(0) == ids.size(0), op, ": num_masked must be [B] = [",
                    ids.size(0), "], got shape ", num_masked.sizes());
  TORCH_CHECK_VALUE(seed.dim() == 1 && seed.size(0) == 2, op, ": seed must be [2] (seed, offset), got shape ",
                    seed.sizes());
  TORCH_CHECK_VALUE(vocab_size >= 1 && vocab_size <= vocab_rows, op, ": vocab_size must be in [1, ", vocab_rows,
                    "] (the logits' last dim), got ", vocab_size);
  TORCH_CHECK_VALUE(vocab_size < (int64_t(1) << 31) - 64, op, ": vocab_size must be < 2^31 - 64, got ", vocab_size);
  // A sampled token equal to mask_id would read as still masked: rows would end with extra masks.
  TORCH_CHECK_VALUE(mask_id < 0 || mask_id >= vocab_size, op,
                    ": mask_id must not be a token that can be sampled, i.e. outside [0, vocab_size) = [0, ",
                    vocab_size, "), got mask_id = ", mask_id);
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), op,
                    ": temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(choice_temperature >= 0.0 && std::isfinite(choice_temperature), op,
                    ": choice_temperature must be finite and >= 0, got ", choice_temperature);
}

static bool is_logit_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

void check_remask_logits(const char* op, const at::Tensor& logits, const at::Tensor& ids) {
  TORCH_CHECK_TYPE(is_logit_dtype(logits.scalar_type()), op, ": logits must be float32, bfloat16 or float16, got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() == 3, op, ": logits must be [B, L, V], got shape ", logits.sizes());
  check_same_device(logits, ids, op, "logits", "ids");
  TORCH_CHECK_VALUE(ids.dim() != 2 || (logits.size(0) == ids.size(0) && logits.size(1) == ids.size(1)), op,
                    ": logits [B, L, V] and ids [B, L] disagree: logits ", logits.sizes(), ", ids ", ids.sizes());
}

void check_remask_hidden(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& ids) {
  TORCH_CHECK_TYPE(is_logit_dtype(hidden.scalar_type()), op, ": hidden must be float32, bfloat16 or float16, got ",
                   hidden.scalar_type());
  TORCH_CHECK_TYPE(is_logit_dtype(weight.scalar_type()), op, ": weight must be float32, bfloat16 or float16, got ",
                   weight.scalar_type());
  check_same_device(hidden, weight, op, "hidden", "weight");
  check_same_device(hidden, ids, op, "hidden", "ids");
  TORCH_CHECK_VALUE(hidden.dim() == 3, op, ": hidden must be [B, L, C], got shape ", hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == hidden.size(2), op,
                    ": weight must be [V, C] with C = hidden.size(2) = ", hidden.size(2), ", got shape ",
                    weight.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(is_logit_dtype(bias->scalar_type()), op, ": bias must be float32, bfloat16 or float16, got ",
                     bias->scalar_type());
    check_same_device(weight, *bias, op, "weight", "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be [V] = [",
                      weight.size(0), "], got shape ", bias->sizes());
  }
  TORCH_CHECK_VALUE(ids.dim() != 2 || (hidden.size(0) == ids.size(0) && hidden.size(1) == ids.size(1)), op,
                    ": hidden [B, L, C] and ids [B, L] disagree: hidden ", hidden.sizes(), ", ids ", ids.sizes());
}

namespace {

using namespace remask_rng;
constexpr float kInf = std::numeric_limits<float>::infinity();
// The vector helpers are always inlined into sample_token's two builds, so no vector crosses a call ABI
// (CMakeLists.txt silences GCC's note about the ABI of 32-byte vector arguments for this file).
constexpr int kW = 8;  // lanes of the GCC vector types below (one AVX2 register; two SSE ones otherwise)
typedef float vf __attribute__((vector_size(4 * kW)));
typedef int32_t vi __attribute__((vector_size(4 * kW)));
typedef uint32_t vu __attribute__((vector_size(4 * kW)));

[[gnu::always_inline]] inline vf splat(float x) { return vf{} + x; }
[[gnu::always_inline]] inline vi splat_i(int32_t x) { return vi{} + x; }
[[gnu::always_inline]] inline vf as_f(vi x) { vf r; std::memcpy(&r, &x, sizeof r); return r; }
[[gnu::always_inline]] inline vi as_i(vf x) { vi r; std::memcpy(&r, &x, sizeof r); return r; }

// exp for x <= 0 (Cephes expf, ~1 ulp); 0 below -87 (including -inf).
[[gnu::always_inline]] inline vf exp_nonpos(vf x) {
  const vf xc = x < splat(-87.0f) ? splat(-87.0f) : x;
  const vi n = __builtin_convertvector(xc * 1.44269504088896341f - 0.5f, vi);  // round half away (x <= 0)
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = xc - nf * 0.693359375f + nf * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vf y = p * as_f((n + 127) << 23);
  return x < splat(-87.0f) ? splat(0.0f) : y;
}

// remask_rng::log_pos, eight lanes at a time.
[[gnu::always_inline]] inline vf log_pos8(vf x) {
  const vi bits = as_i(x);
  vi e = (bits >> 23) - 126;
  vf m = as_f((bits & 0x7FFFFF) | 0x3F000000);  // [0.5, 1)
  const vi small = m < splat(0.707106781186547524f);
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  return log_reduced(m, __builtin_convertvector(e, vf));
}

struct Sample {
  int64_t token;
  float logp;
};

// One token from its scaled candidate logits s[0, V) (NaN already read as -inf; s has room for a
// multiple of kW floats). d = s - m (0 where s == m), token = argmax(exp(d) / E), E ~ Exp(1), with ties to
// the lowest index, log p = d[token] - log(sum exp d): the contract of reference.remask_sample.
[[gnu::always_inline]] inline Sample sample_token(float* s, int64_t V, uint32_t h, uint32_t g) {
  const int64_t Vp = (V + kW - 1) / kW * kW;
  for (int64_t v = V; v < Vp; ++v) s[v] = -kInf;
  vf mv = splat(-kInf);
  for (int64_t v = 0; v < Vp; v += kW) {
    vf x;
    std::memcpy(&x, s + v, sizeof x);
    mv = x > mv ? x : mv;
  }
  float m = -kInf;
  for (int i = 0; i < kW; ++i) m = std::max(m, mv[i]);
  const vf mm = splat(m);
  vi lane;
  for (int i = 0; i < kW; ++i) lane[i] = i;
  vf sum = splat(0.0f), best = splat(-1.0f);  // keys are >= 0
  vi best_i = splat_i(0);
  for (int64_t v = 0; v < Vp; v += kW) {
    vf x;
    std::memcpy(&x, s + v, sizeof x);
    const vi idx = lane + static_cast<int32_t>(v);
    const vi live = idx < splat_i(static_cast<int32_t>(V));
    const vf d = x == mm ? splat(0.0f) : x - mm;
    const vf e = live ? exp_nonpos(d) : splat(0.0f);
    sum += e;
    const vu w = mix32_lanes((vu{} + h + __builtin_convertvector(idx, vu) * kGolden) ^ g);
    // w >> 9 < 2^23: a signed conversion is exact and has an AVX2 instruction (unsigned has none).
    const vf u = (__builtin_convertvector(reinterpret_cast<vi>(w >> 9), vf) + 0.5f) * 1.1920928955078125e-07f;
    const vf key = live ? e / -log_pos8(u) : splat(-1.0f);
    const vi better = key > best;
    best = better ? key : best;
    best_i = better ? idx : best_i;
  }
  int j = 0;
  float total = 0.0f;
  for (int i = 0; i < kW; ++i) {
    total += sum[i];
    if (best[i] > best[j] || (best[i] == best[j] && best_i[i] < best_i[j])) j = i;
  }
  const int64_t t = best_i[j];
  const float dt = s[t] == m ? 0.0f : s[t] - m;
  return {t, dt - std::log(total)};
}

// sample_token compiled twice: for AVX2 and portable (two SSE registers per vector); the same bits either
// way (no FMA contraction in either). MAGE_CPU_ISA picks one per call (cpu_isa.h).
using SampleFn = Sample (*)(float*, int64_t, uint32_t, uint32_t);
#if defined(__x86_64__)
__attribute__((target("avx2"))) Sample sample_token_avx2(float* s, int64_t V, uint32_t h, uint32_t g) {
  return sample_token(s, V, h, g);
}
#endif
Sample sample_token_portable(float* s, int64_t V, uint32_t h, uint32_t g) { return sample_token(s, V, h, g); }

SampleFn sample_token_for(bool avx2) {
#if defined(__x86_64__)
  if (avx2) return sample_token_avx2;
#endif
  return sample_token_portable;
}

template <typename scalar_t>
void load_scaled(float* dst, const scalar_t* src, int64_t stride, int64_t V, float inv_t, const float* bias) {
  for (int64_t v = 0; v < V; ++v) {
    float x = static_cast<float>(src[v * stride]);
    if (bias) x += bias[v];
    x *= inv_t;
    dst[v] = x != x ? -kInf : x;
  }
}

struct Context {
  int64_t B, L, vocab;
  int64_t mask_id;
  float inv_t, tau;
  uint32_t k0, k1;
  const int64_t* ids;  // (B, L) contiguous copy
  int64_t* sampled;    // (B, L)
  float* confidence;   // (B, L)
  SampleFn sample_row;  // sample_token for this call's CPU path

  void finish_token(int64_t t, const Sample& smp) const {
    uint32_t h, g;
    token_keys(k0, k1, t / L, t % L, h, g);
    sampled[t] = smp.token;
    confidence[t] = smp.logp + tau * gumbel(choice_word(g));
  }
  Sample sample(float* row, int64_t t) const {
    uint32_t h, g;
    token_keys(k0, k1, t / L, t % L, h, g);
    return sample_row(row, vocab, h, g);
  }
};

// Known tokens keep their id (confidence +inf, set by Call); checks k against each row's unknowns.
void prepare_rows(const char* op, const Context& c, const at::Tensor& num_masked) {
  const auto k = num_masked.accessor<int64_t, 1>();
  for (int64_t b = 0; b < c.B; ++b) {
    int64_t unknown = 0;
    for (int64_t l = 0; l < c.L; ++l) {
      const int64_t t = b * c.L + l;
      unknown += c.ids[t] == c.mask_id;
      c.sampled[t] = c.ids[t];
    }
    TORCH_CHECK_VALUE(k[b] >= 0 && k[b] <= unknown, op,
                      ": num_masked must lie in [0, number of unknown tokens] per row; row ", b, " has num_masked = ",
                      k[b], " but ", unknown, " unknown tokens");
  }
}

// Phase 2: re-mask k[b] unknown tokens of each row (see reference.remask_select).
void select_rows(const Context& c, const at::Tensor& num_masked, bool reference_ties, int64_t* new_ids) {
  const auto k = num_masked.accessor<int64_t, 1>();
  // Rows of ~4096 tokens per chunk: one row of 256 takes about a microsecond.
  parallel_chunks(c.B, std::max<int64_t>(1, 4096 / std::max<int64_t>(c.L, 1)), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> pos;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = b * c.L;
      pos.clear();
      for (int64_t l = 0; l < c.L; ++l) {
        new_ids[row + l] = c.sampled[row + l];
        if (c.ids[row + l] == c.mask_id) pos.push_back(l);
      }
      const int64_t kb = k[b];
      if (kb == 0) continue;
      const float* conf = c.confidence + row;
      auto less = [conf](int64_t a, int64_t b2) { return conf[a] < conf[b2] || (conf[a] == conf[b2] && a < b2); };
      std::nth_element(pos.begin(), pos.begin() + (kb - 1), pos.end(), less);
      if (reference_ties) {
        const float cutoff = conf[pos[kb - 1]];
        for (int64_t l : pos) {
          if (conf[l] <= cutoff) new_ids[row + l] = c.mask_id;
        }
      } else {
        for (int64_t i = 0; i < kb; ++i) new_ids[row + pos[i]] = c.mask_id;
      }
    }
  });
}

// What both ops share around phase 1: the contiguous ids, the outputs and the call's context. Building it
// checks num_masked and fills the known tokens (prepare_rows); finish() runs phase 2.
struct Call {
  at::Tensor ids_c, sampled, new_ids, num_masked;
  std::vector<float> confidence;
  Context c;

  Call(const char* op, const at::Tensor& ids, const at::Tensor& num_masked_, const at::Tensor& seed, int64_t mask_id,
       double choice_temperature, int64_t vocab, double temperature)
      : ids_c(ids.contiguous()),
        sampled(at::empty(ids.sizes(), ids.options())),
        new_ids(at::empty(ids.sizes(), ids.options())),
        num_masked(num_masked_) {
    c.B = ids_c.size(0);
    c.L = ids_c.size(1);
    c.vocab = vocab;
    c.mask_id = mask_id;
    c.inv_t = static_cast<float>(1.0 / temperature);
    c.tau = static_cast<float>(choice_temperature);
    const auto sd = seed.accessor<int64_t, 1>();
    call_keys(sd[0], sd[1], c.k0, c.k1);
    c.ids = ids_c.const_data_ptr<int64_t>();
    c.sampled = sampled.data_ptr<int64_t>();
    confidence.assign(c.B * c.L, kInf);
    c.confidence = confidence.data();
    c.sample_row = sample_token_for(cpu_avx2_kernels());
    prepare_rows(op, c, num_masked);
  }
  Call(const Call&) = delete;
  Call& operator=(const Call&) = delete;

  std::tuple<at::Tensor, at::Tensor> finish(bool reference_ties) {
    select_rows(c, num_masked, reference_ties, new_ids.data_ptr<int64_t>());
    return {sampled, new_ids};
  }
};

int64_t padded(int64_t V) { return (V + kW - 1) / kW * kW; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> remask_step_cpu(const at::Tensor& logits, const at::Tensor& ids,
                                                   const at::Tensor& num_masked, const at::Tensor& seed,
                                                   int64_t mask_id, double choice_temperature, int64_t vocab_size,
                                                   double temperature, bool reference_ties) {
  constexpr const char* op = "remask_step";
  check_remask_logits(op, logits, ids);
  check_remask_args(op, logits.size(2), ids, num_masked, seed, mask_id, vocab_size, temperature, choice_temperature);
  Call call(op, ids, num_masked, seed, mask_id, choice_temperature, vocab_size, temperature);
  const Context& c = call.c;
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1), s2 = logits.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "remask_step_cpu", [&] {
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    parallel_chunks(c.B * c.L, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> row(padded(c.vocab));
      for (int64_t t = begin; t < end; ++t) {
        if (c.ids[t] != c.mask_id) continue;
        load_scaled(row.data(), lp + (t / c.L) * s0 + (t % c.L) * s1, s2, c.vocab, c.inv_t, nullptr);
        c.finish_token(t, c.sample(row.data(), t));
      }
    });
  });
  return call.finish(reference_ties);
}

std::tuple<at::Tensor, at::Tensor> remask_step_from_hidden_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& ids,
    const at::Tensor& num_masked, const at::Tensor& seed, int64_t mask_id, double choice_temperature,
    int64_t vocab_size, double temperature, bool reference_ties) {
  constexpr const char* op = "remask_step_from_hidden";
  // Unknown tokens per GEMM chunk: a (1024, 1024) fp32 logits chunk (4 MB) is reused from cache by the
  // sampling pass right after; the GEMM is one multithreaded at::mm per chunk (a GEMM per thread inside
  // a parallel region would serialize on small tiles).
  constexpr int64_t kChunk = 1024;
  check_remask_hidden(op, hidden, weight, bias, ids);
  check_remask_args(op, weight.size(0), ids, num_masked, seed, mask_id, vocab_size, temperature, choice_temperature);
  Call call(op, ids, num_masked, seed, mask_id, choice_temperature, vocab_size, temperature);
  const Context& c = call.c;
  // Only unknown tokens need logits: gather them into dense tiles.
  std::vector<int64_t> todo;
  for (int64_t t = 0; t < c.B * c.L; ++t) {
    if (c.ids[t] == c.mask_id) todo.push_back(t);
  }
  const int64_t C = hidden.size(2);
  const at::Tensor wT = weight.narrow(0, 0, vocab_size).to(at::kFloat).contiguous().t();  // (C, vocab)
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->narrow(0, 0, vocab_size).to(at::kFloat).contiguous();
  const float* bp = bias.has_value() ? bias_f.const_data_ptr<float>() : nullptr;
  const int64_t n = static_cast<int64_t>(todo.size());
  const int64_t h0 = hidden.stride(0), h1 = hidden.stride(1), h2 = hidden.stride(2);
  at::Tensor x = at::empty({std::min(kChunk, n), C}, wT.options());
  at::Tensor out = at::empty({std::min(kChunk, n), vocab_size}, wT.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "remask_from_hidden_cpu", [&] {
    const scalar_t* hp = hidden.const_data_ptr<scalar_t>();
    for (int64_t first = 0; first < n; first += kChunk) {
      const int64_t rows = std::min(kChunk, n - first);
      float* xp = x.data_ptr<float>();
      parallel_chunks(rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t t = todo[first + r];
          const scalar_t* src = hp + (t / c.L) * h0 + (t % c.L) * h1;
          for (int64_t k = 0; k < C; ++k) xp[r * C + k] = static_cast<float>(src[k * h2]);
        }
      });
      at::Tensor o = out.narrow(0, 0, rows);
      at::mm_out(o, x.narrow(0, 0, rows), wT);
      const float* op_ = o.const_data_ptr<float>();
      parallel_chunks(rows, 8, [&](int64_t begin, int64_t end) {
        std::vector<float> row(padded(c.vocab));
        for (int64_t r = begin; r < end; ++r) {
          load_scaled(row.data(), op_ + r * vocab_size, 1, c.vocab, c.inv_t, bp);
          c.finish_token(todo[first + r], c.sample(row.data(), todo[first + r]));
        }
      });
    }
  });
  return call.finish(reference_ties);
}

TORCH_LIBRARY_IMPL(mage, CPU, m) {
  m.impl("remask_step", &remask_step_cpu);
  m.impl("remask_step_from_hidden", &remask_step_from_hidden_cpu);
}

}  // namespace mage
