// Confidence re-masking on CUDA (docs/OPS.md op 5; one step of MAGE's iterative decoding, docs/REFERENCE.md 5).
//
// Kernel 1, one warp per token: an unknown token's candidate logits are read once, coalesced (up to
// 32 per lane kept in registers: the whole row for a 1024-code vocabulary), for the max; then exp-sum
// and the Gumbel-max argmax (exponential-race form: argmax exp(d) / E, sharing the exp) run over the
// registers. expf and the hardware division keep it near the bandwidth bound; the noise's log is the
// shared Cephes one, accurate near 1 where an approximate log would distort small E. Known tokens read nothing. The noise is the
// counter-based hash of remask_rng.h, keyed by the (seed, offset) pair read from device memory, so a
// step has no host sync and can be captured in a CUDA graph.
// Kernel 2, one block per row: rank every unknown token's confidence among its row's unknown tokens
// (ties by position) through shared-memory tiles and re-mask ranks < k, or, in the published mode,
// every confidence <= the one ranked k-1. num_masked is clamped into [0, unknown] (checking it would
// cost a host sync; the CPU kernel raises instead).
#include "remask.h"
#include "remask_rng.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

namespace mage {
namespace {

using namespace remask_rng;

constexpr int kWarps = 8;       // tokens per block in kernel 1
constexpr int kCache = 32;      // logits per lane kept in registers (a 1024-code row)
constexpr int kSelectThreads = 256;
constexpr int kSelectTile = 1024;  // confidences per shared-memory tile in kernel 2

template <typename scalar_t>
__device__ __forceinline__ float load_scaled(const scalar_t* row, int64_t v, int64_t stride, float inv_t) {
  const float s = static_cast<float>(row[v * stride]) * inv_t;
  return s != s ? -INFINITY : s;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kWarps * 32) sample_kernel(
    const scalar_t* __restrict__ logits,  // (B, L, V') strided
    int64_t s0, int64_t s1, int64_t s2,
    const int64_t* __restrict__ ids,  // (B, L) contiguous
    const int64_t* __restrict__ seed,  // (2)
    int64_t* __restrict__ sampled,  // (B, L)
    float* __restrict__ conf,  // (B, L)
    int64_t N, int64_t L, int64_t vocab, int64_t mask_id, float inv_t, float tau) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t >= N) return;
  const int64_t tok = ids[t];
  if (tok != mask_id) {
    if (lane == 0) {
      sampled[t] = tok;
      conf[t] = INFINITY;
    }
    return;
  }
  const int64_t b = t / L, l = t % L;
  const scalar_t* row = logits + b * s0 + l * s1;
  float cache[kCache];
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < kCache; ++i) {
    const int64_t v = lane + 32 * i;
    cache[i] = v < vocab ? load_scaled(row, v, s2, inv_t) : -INFINITY;
    m = fmaxf(m, cache[i]);
  }
  for (int64_t v = lane + 32 * kCache; v < vocab; v += 32) m = fmaxf(m, load_scaled(row, v, s2, inv_t));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  uint32_t k0, k1, h, g;
  call_keys(seed[0], seed[1], k0, k1);
  token_keys(k0, k1, b, l, h, g);
  float sum = 0.f, best = -1.f, best_d = 0.f;  // keys are >= 0
  int64_t best_v = vocab;
  auto visit = [&](float s, int64_t v) {
    const float d = s == m ? 0.f : s - m;
    const float e = expf(d);  // the accurate exp: __expf's error grows with |d| (2 + 1.2|d| ulp)
    sum += e;
    const float key = __fdividef(e, exponential(token_word(h, g, static_cast<uint32_t>(v))));
    if (key > best) {  // lanes visit v in increasing order: the first maximum is kept
      best = key;
      best_v = v;
      best_d = d;
    }
  };
#pragma unroll
  for (int i = 0; i < kCache; ++i) {
    const int64_t v = lane + 32 * i;
    if (v < vocab) visit(cache[i], v);
  }
  for (int64_t v = lane + 32 * kCache; v < vocab; v += 32) visit(load_scaled(row, v, s2, inv_t), v);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int64_t ov = __shfl_xor_sync(0xffffffffu, best_v, o);
    const float od = __shfl_xor_sync(0xffffffffu, best_d, o);
    if (ob > best || (ob == best && ov < best_v)) {
      best = ob;
      best_v = ov;
      best_d = od;
    }
  }
  if (lane == 0) {
    sampled[t] = best_v;
    const float logp = best_d - logf(sum);
    conf[t] = __fadd_rn(logp, __fmul_rn(tau, gumbel(choice_word(g))));
  }
}

__global__ void __launch_bounds__(kSelectThreads) select_kernel(
    const float* __restrict__ conf,  // (B, L)
    const int64_t* __restrict__ ids,  // (B, L) contiguous
    const int64_t* __restrict__ sampled,  // (B, L)
    const int64_t* __restrict__ num_masked,  // (B)
    int64_t* __restrict__ new_ids,  // (B, L)
    int64_t L, int64_t mask_id, bool reference_ties) {
  __shared__ float tile_c[kSelectTile];
  __shared__ unsigned char tile_u[kSelectTile];
  __shared__ int64_t s_count[kSelectThreads / 32];
  __shared__ float s_cutoff;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * L;
  const int tid = threadIdx.x;

  int64_t count = 0;
  for (int64_t i = tid; i < L; i += kSelectThreads) count += ids[row + i] == mask_id;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) count += __shfl_xor_sync(0xffffffffu, count, o);
  if ((tid & 31) == 0) s_count[tid >> 5] = count;
  if (tid == 0) s_cutoff = -INFINITY;
  __syncthreads();
  int64_t unknown = 0;
  for (int w = 0; w < kSelectThreads / 32; ++w) unknown += s_count[w];
  const int64_t k = min(max(num_masked[blockIdx.x], int64_t(0)), unknown);

  for (int64_t i0 = 0; i0 < L; i0 += kSelectThreads) {
    const int64_t i = i0 + tid;
    const bool live = i < L;
    const bool ui = live && ids[row + i] == mask_id;
    const float ci = live ? conf[row + i] : INFINITY;
    int64_t rank = 0;
    for (int64_t j0 = 0; j0 < L; j0 += kSelectTile) {
      const int64_t n = min(static_cast<int64_t>(kSelectTile), L - j0);
      __syncthreads();
      for (int64_t j = tid; j < n; j += kSelectThreads) {
        tile_c[j] = conf[row + j0 + j];
        tile_u[j] = ids[row + j0 + j] == mask_id;
      }
      __syncthreads();
      if (ui) {
        for (int64_t j = 0; j < n; ++j) {
          const float cj = tile_c[j];
          rank += tile_u[j] && (cj < ci || (cj == ci && j0 + j < i));
        }
      }
    }
    if (!live) continue;
    if (reference_ties) {
      if (ui && rank == k - 1) s_cutoff = ci;  // ranks are a permutation: one writer
    } else {
      new_ids[row + i] = ui && rank < k ? mask_id : sampled[row + i];
    }
  }
  if (!reference_ties) return;
  __syncthreads();
  const float cutoff = s_cutoff;
  for (int64_t i = tid; i < L; i += kSelectThreads) {
    const bool ui = ids[row + i] == mask_id;
    new_ids[row + i] = ui && k > 0 && conf[row + i] <= cutoff ? mask_id : sampled[row + i];
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> remask_step_cuda(const at::Tensor& logits, const at::Tensor& ids,
                                                    const at::Tensor& num_masked, const at::Tensor& seed,
                                                    int64_t mask_id, double choice_temperature, int64_t vocab_size,
                                                    double temperature, bool reference_ties) {
  constexpr const char* op = "remask_step";
  check_remask_logits(op, logits, ids);
  check_remask_args(op, logits.size(2), ids, num_masked, seed, mask_id, vocab_size, temperature, choice_temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor ids_c = ids.contiguous(), k_c = num_masked.contiguous(), seed_c = seed.contiguous();
  const int64_t B = ids.size(0), L = ids.size(1), N = B * L;
  at::Tensor sampled = at::empty({B, L}, ids.options());
  at::Tensor new_ids = at::empty({B, L}, ids.options());
  if (N == 0) return {sampled, new_ids};
  TORCH_CHECK_VALUE((N + kWarps - 1) / kWarps <= INT32_MAX && B <= INT32_MAX,
                    "remask_step: too many tokens for one launch, got B=", B, ", L=", L);
  at::Tensor conf = at::empty({B, L}, ids.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float inv_t = static_cast<float>(1.0 / temperature);
  const float tau = static_cast<float>(choice_temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "remask_step_cuda", [&] {
    sample_kernel<scalar_t><<<(N + kWarps - 1) / kWarps, kWarps * 32, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1), logits.stride(2),
        ids_c.const_data_ptr<int64_t>(), seed_c.const_data_ptr<int64_t>(), sampled.data_ptr<int64_t>(),
        conf.data_ptr<float>(), N, L, vocab_size, mask_id, inv_t, tau);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  select_kernel<<<B, kSelectThreads, 0, stream>>>(conf.const_data_ptr<float>(), ids_c.const_data_ptr<int64_t>(),
                                                  sampled.const_data_ptr<int64_t>(), k_c.const_data_ptr<int64_t>(),
                                                  new_ids.data_ptr<int64_t>(), L, mask_id, reference_ties);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sampled, new_ids};
}

}  // namespace mage
