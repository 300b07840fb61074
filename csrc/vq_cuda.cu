// Nearest-code quantization on CUDA (docs/OPS.md op 1; the tokenizer's quantizer, docs/REFERENCE.md 3.3).
//
// Same contract as csrc/vq_cpu.cpp, with no host sync:
//   1. prepare, two kernels over the codebook (one warp per code):
//      stats: which codes are valid (every entry finite), the largest magnitude, and a hash of each code
//             into an open-addressing table that keeps the lowest index per hash;
//      codes: one power-of-two scale that brings the largest magnitude near 1 (none for moderate
//             codebooks), exact duplicates of an earlier code dropped from the search (ties go to the lower
//             index, so a later copy never wins and would only force re-ranks), the scaled fp32 copy
//             (transposed, for the FFMA search) or 16-bit copy (tensor cores), |e_k|^2 in fp32, the fp64
//             codebook and the largest scaled code norm for the rounding bound (csrc/vq_bound.h).
//   2. search: a tiled matmul of the scaled z against the codebook that keeps, per row, the best and
//      second-best expanded distance d'(k) = |e_k|^2 - 2 z.e_k and the best index (fp32 FFMA; for
//      exact=False with bf16/fp16 z and codebook, mma.sync tensor cores: products of 16-bit values are
//      exact, sums fp32). The [N, K] matrix never exists. When the row tiles alone would leave SMs idle, the
//      codebook is split across blocks and finalize merges the partial results.
//   3. finalize, 32 rows per block: z is staged through shared memory in 64-deep chunks, so reads (and
//      vq_quantize's writes of z_q) are coalesced for row-major and NCHW z alike; |z|^2 and the distance to
//      the winner in fp64. A row whose two best d' are within the rounding bound, or whose scaled search
//      overflowed, goes to a list.
//   4. re-rank: the listed rows (rare) against every used code in fp64, on the unscaled values; codes whose
//      fp64 distances are within their rounding bound of the best are compared exactly (csrc/vq_exact.h,
//      the code the CPU kernel runs for the same rows).
// Scaling by a power of two is exact barring underflow, which the bound counts, so finite inputs of any
// magnitude rank correctly. vq_quantize then sums the fp64 per-row distances in a fixed order.
#include "cuda_plan.h"
#include "vq.h"
#include "vq_bound.h"
#include "vq_exact.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace mage {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr double kFp32Roundoff = 0x1p-24;
constexpr long long kScaleExp = 32;  // codebooks whose largest magnitude is in [2^-32, 2^32) are not scaled
constexpr int64_t kMaxDedupCodes = 1 << 20;  // larger codebooks skip duplicate detection (a 16 MB table)

// FFMA search: 256 threads as 16 row groups x 16 code groups, each thread a 4 (rows) x 8 (codes) register
// micro-tile, so a block covers 64 rows x 128 codes and steps through D 16 at a time.
constexpr int kSearchThreads = 256;  // two blocks per SM: at most 128 registers per thread
constexpr int kTM = 4;
constexpr int kTN = 8;
constexpr int kBM = 16 * kTM;  // 64 rows
constexpr int kBN = 16 * kTN;  // 128 codes
constexpr int kBK = 16;        // depth of one shared-memory tile
constexpr int kZPad = 4;       // keeps the transposing z-tile stores at most 2-way bank-conflicted

// Tensor-core search (sizes in cuda_plan.h): 8 warps as 4 (32 rows each) x 2 (64 codes each), so a block
// covers 128 rows x 128 codes; its z tile stays in shared memory for all of D, the codebook streams through
// two 64-deep buffers filled by cp.async while the previous one is multiplied.
constexpr int kTcThreads = 256;
constexpr int kTcBM = plan::kTcRows;
constexpr int kTcBN = plan::kTcCodes;
constexpr int kTcBK = plan::kTcDepth;
constexpr int kTcPad = plan::kTcPad;
constexpr int kTcLdc = kTcBK + kTcPad;
static_assert(kTcBN == kBN, "both searches pad the codebook to the same code tile");

constexpr int kRowWarps = 8;  // warps per block in the one-warp-per-code / per-row kernels
constexpr int kFinThreads = kRowWarps * kWarp;
constexpr int kFinRows = 32;   // rows per finalize block, 4 per warp
constexpr int kFinChunk = 64;  // depth of the staged z tile
constexpr int kRowsPerWarp = kFinRows / kRowWarps;
constexpr int kReduceThreads = 256;
constexpr int kReduceMaxBlocks = 1024;

template <typename T>
__device__ __forceinline__ float to_f32(T v) {
  return static_cast<float>(v);
}
template <typename T>
__device__ __forceinline__ double to_f64(T v) {
  return static_cast<double>(v);
}

// Butterflies: every lane ends with the same bits (each step combines the same two values, commuted).
__device__ __forceinline__ double warp_sum(double v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}
__device__ __forceinline__ double warp_max(double v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v = fmax(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}
__device__ __forceinline__ unsigned long long warp_sum_u64(unsigned long long v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Smaller distance wins, the lower index on equal distance (torch.argmin's tie rule).
__device__ __forceinline__ bool precedes(double d, long long k, double best_d, long long best_k) {
  return d < best_d || (d == best_d && k < best_k);
}

// 2^-e for the largest magnitude m 2^e, as fp64 and as two fp32 factors (exact for fp32/bf16/fp16 codebooks,
// where e lies in [-149, 127]), and its inverse 2^e; 1 when e is moderate.
struct Scale {
  double s;
  float s1, s2;
  double inv;
};

__device__ __forceinline__ Scale scale_of(unsigned long long amax_bits) {
  long long e = static_cast<long long>((amax_bits >> 52) & 0x7FF) - 1023;
  if (amax_bits == 0 || (e >= -kScaleExp && e < kScaleExp)) e = 0;
  e = e < 1022 ? e : 1022;
  const long long half = e / 2;
  return {__longlong_as_double((1023 - e) << 52), __int_as_float(static_cast<int>((127 - half) << 23)),
          __int_as_float(static_cast<int>((127 - (e - half)) << 23)), __longlong_as_double((1023 + e) << 52)};
}

// ---------------------------------------------------------------------------------------------------
// 1. Codebook preparation: one warp per code.
// ---------------------------------------------------------------------------------------------------
template <typename cb_t>
__global__ void __launch_bounds__(kRowWarps * kWarp) vq_prepare_stats_kernel(
    const cb_t* __restrict__ codebook,       // (K, D) strides (sk, sd), any float dtype
    int* __restrict__ table,                 // (2T + 1) zeroed: hashes (0 = empty), K - lowest index, a spare
    int8_t* __restrict__ valid,              // (K,) out: every entry finite
    int* __restrict__ hashes,                // (K,) out
    unsigned long long* __restrict__ amax,   // () zeroed: fp64 bits of the largest |entry| of a valid code
    int64_t K,
    int64_t D,
    int64_t T,  // table size, a power of two >= 2K; 0 skips duplicate detection
    int64_t sk,
    int64_t sd) {
  const int lane = threadIdx.x % kWarp;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (k >= K) return;  // uniform per warp
  double probe = 0.0, big = 0.0;
  unsigned long long h = 0;
  for (int64_t d = lane; d < D; d += kWarp) {
    const double v = to_f64(codebook[k * sk + d * sd]);
    probe += v * 0.0;  // NaN if an entry is inf or NaN
    big = fmax(big, fabs(v));
    // -0.0 hashes as 0.0: they are equal in every distance.
    unsigned long long bits = static_cast<unsigned long long>(__double_as_longlong(v + 0.0));
    bits = (bits ^ (bits >> 29)) * (2ull * static_cast<unsigned long long>(d) + 0x5851F42D4C957F2Dull);
    h += bits ^ (bits >> 32);
  }
  probe = warp_sum(probe);
  big = warp_max(big);
  h = warp_sum_u64(h);
  if (lane != 0) return;
  const bool ok = probe == 0.0;
  const int hv = static_cast<int>(((h ^ (h >> 31)) & 0x7FFFFFFFull) | 1ull);
  valid[k] = ok;
  hashes[k] = hv;
  if (!ok) return;
  atomicMax(amax, static_cast<unsigned long long>(__double_as_longlong(big)));  // non-negative: bits order as values
  if (T == 0) return;
  int64_t slot = hv & (T - 1);
  for (;;) {  // terminates: at most K of the T >= 2K slots are ever taken
    const int prev = atomicCAS(table + slot, 0, hv);
    if (prev == 0 || prev == hv) break;
    slot = (slot + 1) & (T - 1);
  }
  atomicMax(table + T + slot, static_cast<int>(K - k));
}

// Rounded to nearest even (the values are finite: codes with non-finite entries are zeroed before).
template <typename cb_t>
__device__ __forceinline__ uint16_t to_bits16(float v) {
  if constexpr (std::is_same_v<cb_t, at::BFloat16>) {
    const uint32_t u = __float_as_uint(v);
    return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  } else {
    return __half_as_ushort(__float2half_rn(v));
  }
}

template <typename cb_t>
__global__ void __launch_bounds__(kRowWarps * kWarp) vq_prepare_codes_kernel(
    const cb_t* __restrict__ codebook,               // (K, D) strides (sk, sd)
    const int* __restrict__ table,                   // from the stats kernel
    int8_t* __restrict__ use,                        // (K,) in: valid; out: valid and not a later duplicate
    const int* __restrict__ hashes,                  // (K,)
    const unsigned long long* __restrict__ amax,     // () bits of the largest |entry|
    double* __restrict__ scale,                      // (4,) out: the scale, its two fp32 factors, its inverse
    float* __restrict__ cb_t32,                      // (Dp, Kp) out: scaled, transposed, zero padded; or null
    uint16_t* __restrict__ cb_h,                     // (Kp, Dp) out: scaled 16-bit codes, zero padded; or null
    float* __restrict__ e2_32,                       // (Kp,) out: scaled |e_k|^2, +inf for unused and padding codes
    double* __restrict__ cb64,                       // (K, D) out: the codes as given, 0 for invalid ones
    unsigned long long* __restrict__ max_norm,       // () zeroed: fp64 bits of the largest scaled norm of a used code
    int64_t K,
    int64_t D,
    int64_t Kp,
    int64_t Dp,
    int64_t T,
    int64_t sk,
    int64_t sd) {
  const Scale sc = scale_of(*amax);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    scale[0] = sc.s;
    scale[1] = sc.s1;
    scale[2] = sc.s2;
    scale[3] = sc.inv;
  }
  const int lane = threadIdx.x % kWarp;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (k >= Kp) return;  // uniform per warp
  const float inf = std::numeric_limits<float>::infinity();
  if (k >= K) {
    for (int64_t d = lane; d < Dp; d += kWarp) {
      if (cb_t32 != nullptr) cb_t32[d * Kp + k] = 0.0f;
      if (cb_h != nullptr) cb_h[k * Dp + d] = 0;
    }
    if (lane == 0) e2_32[k] = inf;
    return;
  }
  const bool valid = use[k] != 0;
  bool keep = valid;
  if (valid && T > 0) {
    int first = 0;
    if (lane == 0) {
      const int hv = hashes[k];
      int64_t slot = hv & (T - 1);
      while (table[slot] != hv) slot = (slot + 1) & (T - 1);
      first = static_cast<int>(K - table[T + slot]);
    }
    first = __shfl_sync(kFullMask, first, 0);
    if (first < k) {  // an earlier code has the same hash: a duplicate if every entry is equal
      bool differ = false;
      for (int64_t d = lane; d < D; d += kWarp) {
        differ |= to_f64(codebook[k * sk + d * sd]) != to_f64(codebook[first * sk + d * sd]);
      }
      keep = __any_sync(kFullMask, differ);
    }
  }
  double s = 0.0;
  for (int64_t d = lane; d < Dp; d += kWarp) {
    double v = 0.0;
    if (d < D) {
      v = valid ? to_f64(codebook[k * sk + d * sd]) : 0.0;
      cb64[k * D + d] = v;
    }
    const double vs = keep ? v * sc.s : 0.0;
    s += vs * vs;
    if (cb_t32 != nullptr) cb_t32[d * Kp + k] = static_cast<float>(vs);
    if constexpr (sizeof(cb_t) == 2) {  // only bf16/fp16 codebooks feed the tensor cores
      if (cb_h != nullptr) cb_h[k * Dp + d] = to_bits16<cb_t>(static_cast<float>(vs));
    }
  }
  s = warp_sum(s);
  if (lane == 0) {
    use[k] = keep;
    e2_32[k] = keep ? static_cast<float>(s) : inf;
    if (keep) atomicMax(max_norm, static_cast<unsigned long long>(__double_as_longlong(sqrt(s))));
  }
}

// ---------------------------------------------------------------------------------------------------
// 2. Candidate search in fp32.
// ---------------------------------------------------------------------------------------------------
struct Candidates {
  float best;
  float second;
  int index;  // -1 while no finite d' has been seen
};

// Candidates are offered in increasing code index per thread, so strict < keeps the lowest index.
__device__ __forceinline__ void offer(Candidates& c, float d, int k) {
  // NaN d' (a non-finite or overflowed z row) fails both tests and is never kept.
  if (d < c.best) {
    c.second = c.best;
    c.best = d;
    c.index = k;
  } else if (d < c.second) {
    c.second = d;
  }
}

// Union of two candidate sets: the winner by (d', index), the second is the smaller of both seconds and
// the loser's best (an exact tie thus leaves second == best, which forces a re-rank).
__device__ __forceinline__ void merge(Candidates& c, const Candidates& o) {
  const bool other_wins = o.best < c.best || (o.best == c.best && o.index < c.index);
  const float loser = other_wins ? c.best : o.best;
  c.second = fminf(fminf(c.second, o.second), loser);
  if (other_wins) {
    c.best = o.best;
    c.index = o.index;
  }
}

__device__ __forceinline__ Candidates shfl_xor(const Candidates& c, int off) {
  return {__shfl_xor_sync(kFullMask, c.best, off), __shfl_xor_sync(kFullMask, c.second, off),
          __shfl_xor_sync(kFullMask, c.index, off)};
}

// Search outputs, one set per codebook split: (splits, n).
struct Partials {
  int* index;
  float* best;
  float* second;
  __device__ void store(int64_t split, int64_t n, int64_t row, const Candidates& c) const {
    index[split * n + row] = c.index;
    best[split * n + row] = c.best;
    second[split * n + row] = c.second;
  }
};

template <typename scalar_t, bool kFp64Scale>
__device__ __forceinline__ float scaled_f32(scalar_t v, const Scale& sc) {
  if constexpr (kFp64Scale) {
    return static_cast<float>(to_f64(v) * sc.s);
  } else {
    return to_f32(v) * sc.s1 * sc.s2;  // two exact power-of-two factors
  }
}

// kFp64Scale: z or the codebook is fp64 (the fp64 conversions need more than the 128 registers of two blocks).
template <typename scalar_t, bool kFp64Scale>
__global__ void __launch_bounds__(kSearchThreads, kFp64Scale ? 1 : 2) vq_search_kernel(
    const scalar_t* __restrict__ z,      // (B, R, D) strides (sb, sr, sd), read in place
    const float* __restrict__ cb_t32,    // (Dp, Kp) fp32, scaled, transposed and zero padded
    const float* __restrict__ e2_32,     // (Kp,) fp32, +inf for unused and padding codes
    const double* __restrict__ scale,    // (4,)
    Partials out,                        // (splits, n): blockIdx.y is the split
    int64_t n,
    int64_t R,
    int64_t D,
    int64_t Kp,
    int64_t Dp,
    int64_t sb,
    int64_t sr,
    int64_t sd,
    int64_t tiles_per_b,
    int64_t codes_per_split,
    bool d_fastest) {  // z's D stride is the smallest: load the z tile along D for coalescing
  __shared__ __align__(16) float zs[kBK][kBM + kZPad];  // z tile, depth-major
  __shared__ __align__(16) float cs[kBK][kBN];          // codebook tile, depth-major

  const int tid = threadIdx.x;
  const int tx = tid % 16;  // code group: codes tx*4 + {0..3} and 64 + tx*4 + {0..3} of the tile
  const int ty = tid / 16;  // row group: rows ty*4 + {0..3} of the tile
  const int64_t b = blockIdx.x / static_cast<unsigned>(tiles_per_b);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x % static_cast<unsigned>(tiles_per_b)) * kBM;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * codes_per_split;
  const int64_t k_end = k_begin + codes_per_split < Kp ? k_begin + codes_per_split : Kp;
  const scalar_t* zb = z + b * sb;
  const Scale sc{scale[0], static_cast<float>(scale[1]), static_cast<float>(scale[2]), scale[3]};
  const float inf = std::numeric_limits<float>::infinity();

  Candidates cand[kTM];
#pragma unroll
  for (int i = 0; i < kTM; ++i) cand[i] = {inf, inf, -1};

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBN) {
    float acc[kTM][kTN];
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = 0.0f;

    for (int64_t d0 = 0; d0 < Dp; d0 += kBK) {
      // z tile: kBM x kBK elements, 4 per thread, masked (rows past R and depth past D read as 0).
#pragma unroll
      for (int i = 0; i < kBM * kBK / kSearchThreads; ++i) {
        const int e = tid + i * kSearchThreads;
        const int r = d_fastest ? e / kBK : e % kBM;
        const int d = d_fastest ? e % kBK : e / kBM;
        const int64_t row = row0 + r;
        const int64_t dd = d0 + d;
        zs[d][r] = (row < R && dd < D) ? scaled_f32<scalar_t, kFp64Scale>(zb[row * sr + dd * sd], sc) : 0.0f;
      }
      // Codebook tile: kBK x kBN, padded in memory, so unmasked 16-byte loads (Kp % 4 == 0, k0 % 4 == 0).
#pragma unroll
      for (int i = 0; i < kBK * kBN / 4 / kSearchThreads; ++i) {
        const int e = tid + i * kSearchThreads;
        const int d = e / (kBN / 4);
        const int c = (e % (kBN / 4)) * 4;
        *reinterpret_cast<float4*>(&cs[d][c]) =
            *reinterpret_cast<const float4*>(cb_t32 + (d0 + d) * Kp + k0 + c);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        const float4 a = *reinterpret_cast<const float4*>(&zs[kk][ty * kTM]);
        const float4 b0 = *reinterpret_cast<const float4*>(&cs[kk][tx * 4]);
        const float4 b1 = *reinterpret_cast<const float4*>(&cs[kk][kBN / 2 + tx * 4]);
        const float av[kTM] = {a.x, a.y, a.z, a.w};
        const float bv[kTN] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
        for (int i = 0; i < kTM; ++i)
#pragma unroll
          for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();  // the next tile overwrites zs/cs
    }

#pragma unroll
    for (int j = 0; j < kTN; ++j) {  // j ascending = code index ascending
      const int k = static_cast<int>(k0) + (j < 4 ? tx * 4 + j : kBN / 2 + tx * 4 + (j - 4));
      const float e2 = e2_32[k];
#pragma unroll
      for (int i = 0; i < kTM; ++i) offer(cand[i], fmaf(-2.0f, acc[i][j], e2), k);
    }
  }

  // The 16 threads of a row group are 16 consecutive lanes of one warp: reduce with xor shuffles.
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
#pragma unroll
    for (int off = 8; off > 0; off /= 2) merge(cand[i], shfl_xor(cand[i], off));
  }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int64_t row = row0 + ty * kTM + i;
      if (row < R) out.store(blockIdx.y, n, b * R + row, cand[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// 2'. Tensor-core search (exact=False, bf16/fp16 z and codebook of that dtype), mma.sync m16n8k16.
// ---------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without passing through registers; zero-filled when !pred.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// Four 8x8 16-bit matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives it.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// D = A (16x16, row-major) * B (16x8, column-major) + D, fp32 accumulators.
template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <bool kBf16>
__device__ __forceinline__ uint16_t scale_bits16(uint16_t v, float s1, float s2) {
  if constexpr (kBf16) {
    const float f = __bfloat162float(__ushort_as_bfloat16(v)) * s1 * s2;
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  } else {
    const float f = __half2float(__ushort_as_half(v)) * s1 * s2;
    return __half_as_ushort(__float2half_rn(f));
  }
}

template <bool kBf16>
__global__ void __launch_bounds__(kTcThreads, 2) vq_search_tc_kernel(
    const uint16_t* __restrict__ z,     // (B, R, D) strides (sb, sr, sd): bf16/fp16 bits, read in place
    const uint16_t* __restrict__ cb_h,  // (Kp, Dp) same format, scaled, zero padded, 0 for unused codes
    const float* __restrict__ e2_32,    // (Kp,) fp32, +inf for unused and padding codes
    const double* __restrict__ scale,   // (4,)
    Partials out,                       // (splits, n): blockIdx.y is the split
    int64_t n,
    int64_t R,
    int64_t D,
    int64_t Kp,
    int64_t Dp,  // a multiple of kTcBK
    int64_t sb,
    int64_t sr,
    int64_t sd,
    int64_t tiles_per_b,
    int64_t codes_per_split,
    bool d_fastest,
    bool vector_z) {  // rows of z are 16-byte aligned with unit D stride and D % 8 == 0: 16-byte copies
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host only launches this on compute capability >= 8.0
#else
  extern __shared__ __align__(128) unsigned char smem[];
  const int ldz = static_cast<int>(Dp) + kTcPad;
  uint16_t* zs = reinterpret_cast<uint16_t*>(smem);                           // [kTcBM][ldz]
  uint16_t* cs = zs + kTcBM * ldz;                                            // [2][kTcBN][kTcLdc]
  float* e2s = reinterpret_cast<float*>(cs + 2 * kTcBN * kTcLdc);             // [2][kTcBN]
  Candidates* merged = reinterpret_cast<Candidates*>(e2s + 2 * kTcBN);       // [kTcBM]

  const int tid = threadIdx.x;
  const int warp = tid / kWarp, lane = tid % kWarp;
  const int wm = warp % 4;    // rows wm*32 .. +32 of the tile
  const int wn = warp / 4;    // codes wn*64 .. +64 of each code tile
  const int g = lane >> 2;    // accumulator rows g and g + 8 of each 16-row fragment
  const int tig = lane & 3;   // accumulator columns 2 tig, 2 tig + 1 of each 8-code fragment
  const int64_t b = blockIdx.x / static_cast<unsigned>(tiles_per_b);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x % static_cast<unsigned>(tiles_per_b)) * kTcBM;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * codes_per_split;
  const int64_t k_end = k_begin + codes_per_split < Kp ? k_begin + codes_per_split : Kp;
  const uint16_t* zb = z + b * sb;
  const float s1 = static_cast<float>(scale[1]), s2 = static_cast<float>(scale[2]);
  const bool unit_scale = s1 * s2 == 1.0f;

  // The z tile, all of D; rows past R and depth past D are +0.
  if (vector_z && unit_scale) {
    const int pieces = static_cast<int>(Dp) / 8;
    for (int e = tid; e < kTcBM * pieces; e += kTcThreads) {
      const int r = e / pieces, c = (e % pieces) * 8;
      const int64_t row = row0 + r;
      const bool ok = row < R && c < D;
      cp_async16(zs + r * ldz + c, ok ? zb + row * sr + c : z, ok);
    }
  } else {
    const int tile = kTcBM * static_cast<int>(Dp);
    for (int e = tid; e < tile; e += kTcThreads) {
      const int r = d_fastest ? e / static_cast<int>(Dp) : e % kTcBM;
      const int d = d_fastest ? e % static_cast<int>(Dp) : e / kTcBM;
      const int64_t row = row0 + r;
      uint16_t v = (row < R && d < D) ? zb[row * sr + d * sd] : static_cast<uint16_t>(0);
      if (!unit_scale) v = scale_bits16<kBf16>(v, s1, s2);
      zs[r * ldz + d] = v;
    }
  }

  // Chunk q: code tile q / dchunks of this split, depth chunk q % dchunks; 128 codes x 64 elements = 1024
  // 16-byte pieces, 4 per thread, and with the first depth chunk the tile's 128 |e|^2 (32 pieces).
  const int dchunks = static_cast<int>(Dp / kTcBK);
  const int q_end = static_cast<int>((k_end - k_begin) / kTcBN) * dchunks;
  auto issue = [&](int q) {
    const int64_t k0 = k_begin + static_cast<int64_t>(q / dchunks) * kTcBN;
    const int64_t d0 = static_cast<int64_t>(q % dchunks) * kTcBK;
    uint16_t* dst = cs + (q & 1) * kTcBN * kTcLdc;
#pragma unroll
    for (int i = 0; i < kTcBN * kTcBK / 8 / kTcThreads; ++i) {
      const int e = tid + i * kTcThreads;
      const int c = e / (kTcBK / 8), piece = (e % (kTcBK / 8)) * 8;
      cp_async16(dst + c * kTcLdc + piece, cb_h + (k0 + c) * Dp + d0 + piece, true);
    }
    if (q % dchunks == 0 && tid < kTcBN / 4) {
      cp_async16(e2s + ((q / dchunks) & 1) * kTcBN + tid * 4, e2_32 + k0 + tid * 4, true);
    }
  };
  issue(0);
  cp_async_commit();  // the z tile's copies (if any) and chunk 0

  const float inf = std::numeric_limits<float>::infinity();
  Candidates cand[4];  // rows wm*32 + i*16 + g + 8h, as cand[2i + h]
#pragma unroll
  for (int c = 0; c < 4; ++c) cand[c] = {inf, inf, -1};
  float acc[2][8][4];
  for (int q = 0; q < q_end; ++q) {
    // One barrier per chunk: chunk q has landed for everyone, and everyone is done with chunk q - 1, whose
    // buffer the copy of chunk q + 1 now overwrites while chunk q is multiplied.
    cp_async_wait_all();
    __syncthreads();
    if (q + 1 < q_end) {
      issue(q + 1);
      cp_async_commit();
    }
    const int kt = q / dchunks, dc = q % dchunks;
    if (dc == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;
    }
    const uint16_t* cbuf = cs + (q & 1) * kTcBN * kTcLdc;
#pragma unroll
    for (int kk = 0; kk < kTcBK; kk += 16) {
      uint32_t a[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        ldmatrix_x4(a[i], zs + (wm * 32 + i * 16 + (lane & 15)) * ldz + dc * kTcBK + kk + (lane >> 4) * 8);
      }
#pragma unroll
      for (int p = 0; p < 4; ++p) {  // code fragments 2p and 2p + 1: codes wn*64 + p*16 .. +16
        uint32_t bq[4];
        ldmatrix_x4(bq, cbuf + (wn * 64 + p * 16 + (lane & 7) + ((lane >> 4) << 3)) * kTcLdc + kk +
                            ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          mma_16816<kBf16>(acc[i][2 * p], a[i], bq[0], bq[1]);
          mma_16816<kBf16>(acc[i][2 * p + 1], a[i], bq[2], bq[3]);
        }
      }
    }
    if (dc == dchunks - 1) {  // the code tile is complete: offer its distances, code index ascending
      const int64_t k0 = k_begin + static_cast<int64_t>(kt) * kTcBN;
      const float* e2t = e2s + (kt & 1) * kTcBN;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int col = 0; col < 2; ++col) {
          const int c = wn * 64 + j * 8 + tig * 2 + col;
          const float e2 = e2t[c];
#pragma unroll
          for (int i = 0; i < 2; ++i) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              offer(cand[2 * i + h], fmaf(-2.0f, acc[i][j][2 * h + col], e2), static_cast<int>(k0) + c);
            }
          }
        }
      }
    }
  }

  // Merge the four lanes of a row (tig), then the two code warps (wn = 0, 1).
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    merge(cand[c], shfl_xor(cand[c], 1));
    merge(cand[c], shfl_xor(cand[c], 2));
  }
  if (wn == 1 && tig == 0) {
#pragma unroll
    for (int c = 0; c < 4; ++c) merged[wm * 32 + (c >> 1) * 16 + g + (c & 1) * 8] = cand[c];
  }
  __syncthreads();
  if (wn == 0 && tig == 0) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int r = wm * 32 + (c >> 1) * 16 + g + (c & 1) * 8;
      merge(cand[c], merged[r]);
      const int64_t row = row0 + r;
      if (row < R) out.store(blockIdx.y, n, b * R + row, cand[c]);
    }
  }
#endif
}

// ---------------------------------------------------------------------------------------------------
// 3. Finalize: 32 rows per block, 4 per warp; z staged through shared memory.
// ---------------------------------------------------------------------------------------------------
struct RowsOut {
  int64_t* indices;         // (n,) final index, or -1
  void* sqdist;             // (n,) sq_t
  long long* counts;        // (K,) or null
  long long* list;          // (n,) rows left for the re-rank
  unsigned long long* listed;  // () their number
};

template <typename scalar_t, typename sq_t>
__global__ void __launch_bounds__(kFinThreads) vq_finalize_kernel(
    const scalar_t* __restrict__ z,           // (B, R, D) strides (sb, sr, sd)
    const double* __restrict__ cb64,          // (K, D)
    const double* __restrict__ scale,         // (4,)
    const unsigned long long* __restrict__ max_norm,  // () bits of the largest scaled code norm
    Partials part,                            // (splits, n) search results
    int splits,
    RowsOut out,
    scalar_t* __restrict__ z_q,               // (B, R, D) strides (qb, qr, qd) out, or null (vq_nearest)
    int64_t n,
    int64_t R,
    int64_t D,
    int64_t sb,
    int64_t sr,
    int64_t sd,
    int64_t qb,
    int64_t qr,
    int64_t qd,
    bool z_d_fastest,
    bool q_d_fastest,
    bool exact) {
  __shared__ double tile[kFinRows][kFinChunk + 1];
  __shared__ int64_t zbase[kFinRows], qbase[kFinRows];
  __shared__ long long chosen[kFinRows];  // code to write to z_q; -1: NaN row; -2: left to the re-rank
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  // Block (b, t) takes rows t * 32 .. of image b (32-bit division: 64-bit would be a subroutine call).
  const unsigned tiles = static_cast<unsigned>((R + kFinRows - 1) / kFinRows);
  const int64_t b = blockIdx.x / tiles;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x % tiles) * kFinRows;
  const int64_t rows = R - r0 < kFinRows ? R - r0 : kFinRows;  // rows of this block
  const int64_t row0 = b * R + r0;  // flat index of the first
  if (tid < kFinRows) {
    zbase[tid] = b * sb + (r0 + tid) * sr;
    qbase[tid] = b * qb + (r0 + tid) * qr;
  }
  const float inf = std::numeric_limits<float>::infinity();
  Candidates cand[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {  // lane s holds split s; the butterfly leaves the union in every lane
    const int rr = warp * kRowsPerWarp + i;
    const int64_t row = row0 + rr;
    cand[i] = {inf, inf, -1};
    if (rr < rows && lane < splits) {
      cand[i] = {part.best[lane * n + row], part.second[lane * n + row], part.index[lane * n + row]};
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) merge(cand[i], shfl_xor(cand[i], off));
  }
  __syncthreads();

  double z2[kRowsPerWarp] = {}, probe[kRowsPerWarp] = {}, dist[kRowsPerWarp] = {};
  for (int64_t d0 = 0; d0 < D; d0 += kFinChunk) {
    for (int e = tid; e < kFinRows * kFinChunk; e += kFinThreads) {  // coalesced for either layout
      const int r = z_d_fastest ? e / kFinChunk : e % kFinRows;
      const int d = z_d_fastest ? e % kFinChunk : e / kFinRows;
      tile[r][d] = (r < rows && d0 + d < D) ? to_f64(z[zbase[r] + (d0 + d) * sd]) : 0.0;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int rr = warp * kRowsPerWarp + i;
      const int64_t k = cand[i].index;
#pragma unroll
      for (int d = lane; d < kFinChunk; d += kWarp) {
        const double v = tile[rr][d];
        z2[i] += v * v;
        probe[i] += v * 0.0;  // NaN if the row has an inf or NaN
        if (exact && k >= 0 && d0 + d < D) {
          const double t = v - cb64[k * D + d0 + d];
          dist[i] += t * t;
        }
      }
    }
    __syncthreads();
  }

  const double s = scale[0], inv = scale[3];  // powers of two: multiplying by them is exact
  const double max_scaled = __longlong_as_double(static_cast<long long>(*max_norm));
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int rr = warp * kRowsPerWarp + i;
    const int64_t row = row0 + rr;
    const double zz = warp_sum(z2[i]), pr = warp_sum(probe[i]), dd = warp_sum(dist[i]);
    if (rr >= rows) {  // uniform per warp
      if (lane == 0) chosen[rr] = -1;
      continue;
    }
    const bool finite = pr == 0.0;
    const bool found = cand[i].index >= 0 && cand[i].best < inf;
    bool decided;
    double sq;
    if (exact) {
      const double zn = sqrt(zz) * s;
      const double bound = vq_gap_bound(D, kFp32Roundoff, zn, max_scaled) + vq_underflow_bound(D, zn, max_scaled);
      decided = found && static_cast<double>(cand[i].second) - static_cast<double>(cand[i].best) > bound;
      sq = dd;
    } else {
      decided = found;
      sq = fmax(0.0, static_cast<double>(cand[i].best) * inv * inv + zz);
    }
    long long code = -1;
    if (finite && decided) code = cand[i].index;
    if (finite && !decided) code = -2;
    if (lane == 0) {
      chosen[rr] = code;
      if (code == -2) {
        out.list[atomicAdd(out.listed, 1ull)] = row;
      } else {
        out.indices[row] = code;
        static_cast<sq_t*>(out.sqdist)[row] =
            static_cast<sq_t>(code >= 0 ? sq : std::numeric_limits<double>::quiet_NaN());
        if (out.counts != nullptr && code >= 0) atomicAdd(reinterpret_cast<unsigned long long*>(out.counts + code), 1ull);
      }
    }
  }
  if (z_q == nullptr) return;  // uniform per block
  __syncthreads();
  for (int64_t d0 = 0; d0 < D; d0 += kFinChunk) {
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {  // code rows in: coalesced along D
      const int rr = warp * kRowsPerWarp + i;
      const long long code = chosen[rr];
#pragma unroll
      for (int d = lane; d < kFinChunk; d += kWarp) {
        tile[rr][d] = code >= 0 && d0 + d < D ? cb64[code * D + d0 + d] : std::numeric_limits<double>::quiet_NaN();
      }
    }
    __syncthreads();
    for (int e = tid; e < kFinRows * kFinChunk; e += kFinThreads) {  // z_q out: coalesced for either layout
      const int r = q_d_fastest ? e / kFinChunk : e % kFinRows;
      const int d = q_d_fastest ? e % kFinChunk : e / kFinRows;
      if (r < rows && d0 + d < D && chosen[r] != -2) z_q[qbase[r] + (d0 + d) * qd] = static_cast<scalar_t>(tile[r][d]);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------
// 4. Re-rank of the listed rows: one warp per row, lanes over codes, fp64 on the unscaled values. When a
// second code's fp64 distance is within the rounding bound of the best one (fp64 cannot order them), a
// second pass visits the codes in increasing order and decides among those candidates exactly, on lane 0
// with this warp's scratch in shared memory (rows listed and tied in fp64: rare twice over).
// ---------------------------------------------------------------------------------------------------
// Entry d of a strided row as fp64 (exact for every input dtype). Functions, not lambdas, so that every
// call inlines: an ABI call would give the kernel a stack frame.
template <typename scalar_t>
struct StridedRow {
  const scalar_t* row;
  int64_t stride;
  __device__ __forceinline__ double operator()(int64_t d) const { return to_f64(row[d * stride]); }
};

// |z s - e_k s|^2 in fp64 (s a power of two).
template <typename scalar_t>
__device__ __forceinline__ double scaled_sqdist(const StridedRow<scalar_t>& z, const double* ek, int64_t D, double s) {
  double acc = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double t = z(d) * s - ek[d] * s;
    acc += t * t;
  }
  return acc;
}

template <typename scalar_t, typename sq_t>
__global__ void __launch_bounds__(kRowWarps * kWarp) vq_rerank_kernel(
    const scalar_t* __restrict__ z,           // (B, R, D) strides (sb, sr, sd)
    const double* __restrict__ cb64,          // (K, D)
    const int8_t* __restrict__ use,           // (K,) codes to consider
    const unsigned long long* __restrict__ amax,  // () bits of the codebook's largest |entry|
    RowsOut out,
    scalar_t* __restrict__ z_q,               // or null
    int64_t R,
    int64_t D,
    int64_t K,
    int64_t sb,
    int64_t sr,
    int64_t sd,
    int64_t qb,
    int64_t qr,
    int64_t qd) {
  __shared__ vq_exact::Scratch scratch[kRowWarps];
  const int lane = threadIdx.x % kWarp;
  const unsigned long long listed = *out.listed;
  for (unsigned long long w = static_cast<unsigned long long>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
       w < listed; w += static_cast<unsigned long long>(gridDim.x) * kRowWarps) {
    const int64_t row = out.list[w];
    const scalar_t* zr = z + (row / R) * sb + (row % R) * sr;
    // Squares overflow fp64 only beyond ~1e150: such rows are ranked on values scaled by a power of two
    // (exact barring underflow) that brings their largest magnitude below 2^501.
    double big = __longlong_as_double(static_cast<long long>(*amax));
    for (int64_t d = lane; d < D; d += kWarp) big = fmax(big, fabs(to_f64(zr[d * sd])));
    big = warp_max(big);
    const long long e = static_cast<long long>((__double_as_longlong(big) >> 52) & 0x7FF) - 1023;
    const long long shift = e > 500 ? e - 500 : 0;
    const double s = __longlong_as_double((1023 - shift) << 52), inv = __longlong_as_double((1023 + shift) << 52);
    // Lanes visit their codes in increasing order, so strict < keeps the lowest index, and the warp merge
    // breaks ties by index.
    const StridedRow<scalar_t> zd{zr, sd};
    // Each lane keeps its best and second-best code, so the warp learns the runner-up's distance too.
    const double inf = std::numeric_limits<double>::infinity();
    double lb = inf, l2 = inf;
    long long li = K;
    for (int64_t k = lane; k < K; k += kWarp) {
      if (!use[k]) continue;
      const double acc = scaled_sqdist(zd, cb64 + k * D, D, s);
      if (acc < lb) {
        l2 = lb;
        lb = acc;
        li = k;
      } else if (acc < l2) {
        l2 = acc;
      }
    }
    const double own_best = lb;
    for (int off = kWarp / 2; off > 0; off /= 2) {
      const double ob = __shfl_xor_sync(kFullMask, lb, off);
      const long long oi = __shfl_xor_sync(kFullMask, li, off);
      if (precedes(ob, oi, lb, li)) {
        lb = ob;
        li = oi;
      }
    }
    // The smallest distance of any other code: this lane's second best if it holds the winner, else its best.
    double runner_up = li < K && li % kWarp == lane ? l2 : own_best;
    for (int off = kWarp / 2; off > 0; off /= 2) {
      runner_up = fmin(runner_up, __shfl_xor_sync(kFullMask, runner_up, off));
    }
    const double top = lb + vq_exact::fp64_distance_error(lb, D);  // no code is nearer than this
    if (li < K && runner_up - vq_exact::fp64_distance_error(runner_up, D) <= top) {
      // fp64 cannot order the best few: every code within the bound is a candidate, compared in index
      // order (a tie keeps the lower index), exactly where their bounds overlap. Warp-uniform control flow.
      vq_exact::Scratch& mine = scratch[threadIdx.x / kWarp];
      long long best = -1;
      double best_s = 0.0, best_err = 0.0;
      for (int64_t k0 = 0; k0 < K; k0 += kWarp) {
        const int64_t k = k0 + lane;
        const double acc = k < K && use[k] ? scaled_sqdist(zd, cb64 + k * D, D, s) : inf;
        const double err = vq_exact::fp64_distance_error(acc, D);
        unsigned candidates = __ballot_sync(kFullMask, acc < inf && acc - err <= top);
        while (candidates != 0) {
          const int src = __ffs(candidates) - 1;
          candidates &= candidates - 1;
          const double sj = __shfl_sync(kFullMask, acc, src), ej = __shfl_sync(kFullMask, err, src);
          const long long kj = k0 + src;
          int cmp = 1;  // sign(|z - e_kj|^2 - |z - e_best|^2)
          if (best < 0 || sj + ej < best_s - best_err) {
            cmp = -1;
          } else if (sj - ej <= best_s + best_err) {
            if (lane == 0) cmp = vq_exact::compare_distances(zd, cb64 + kj * D, cb64 + best * D, D, mine);
            cmp = __shfl_sync(kFullMask, cmp, 0);
          }
          if (cmp < 0) {
            best = kj;
            best_s = sj;
            best_err = ej;
          }
        }
      }
      lb = best_s;
      li = best;
    }
    const long long index = li < K ? li : -1;  // li == K only if no code is usable
    if (lane == 0) {
      out.indices[row] = index;
      static_cast<sq_t*>(out.sqdist)[row] =
          static_cast<sq_t>(index >= 0 ? lb * inv * inv : std::numeric_limits<double>::quiet_NaN());
      if (out.counts != nullptr && index >= 0) atomicAdd(reinterpret_cast<unsigned long long*>(out.counts + index), 1ull);
    }
    if (z_q != nullptr) {
      scalar_t* q = z_q + (row / R) * qb + (row % R) * qr;
      for (int64_t d = lane; d < D; d += kWarp) {
        q[d * qd] = static_cast<scalar_t>(index < 0 ? std::numeric_limits<double>::quiet_NaN() : cb64[index * D + d]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// vq_quantize's loss: a fixed-shape two-pass sum, so the result does not depend on scheduling.
// ---------------------------------------------------------------------------------------------------
__device__ __forceinline__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int half = kReduceThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
    __syncthreads();
  }
  return shared[0];
}

__global__ void __launch_bounds__(kReduceThreads) vq_partial_sum_kernel(
    const double* __restrict__ x,   // (n,) per-row squared distances (NaN rows make the loss NaN)
    double* __restrict__ partial,   // (gridDim.x,) out
    int64_t n) {
  __shared__ double shared[kReduceThreads];
  double s = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kReduceThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x; i < n; i += stride) s += x[i];
  const double total = block_sum(s, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

template <typename loss_t>
__global__ void __launch_bounds__(kReduceThreads) vq_loss_kernel(
    const double* __restrict__ partial,  // (blocks,)
    loss_t* __restrict__ loss,           // () out
    int blocks,
    double beta,
    double numel) {
  __shared__ double shared[kReduceThreads];
  double s = 0.0;
  for (int i = threadIdx.x; i < blocks; i += kReduceThreads) s += partial[i];
  const double total = block_sum(s, shared);
  // Legacy taming VectorQuantizer2: mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2); both means equal.
  if (threadIdx.x == 0) *loss = static_cast<loss_t>((1.0 + beta) * total / numel);
}

// ---------------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------------
int64_t round_up(int64_t x, int64_t m) {
  return (x + m - 1) / m * m;
}

int64_t grid_for(int64_t items, int64_t per_block) {
  return (items + per_block - 1) / per_block;
}

unsigned blocks_1d(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "vq: too many rows or codes for one launch (",
              blocks, " blocks)");
  return static_cast<unsigned>(blocks);
}

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

template <bool kBf16>
int64_t tc_static_smem() {
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, vq_search_tc_kernel<kBf16>));
  return static_cast<int64_t>(attr.sharedSizeBytes);
}

// The tensor-core search serves exact=False for bf16/fp16 z with a codebook of the same dtype (exact
// products), on compute capability >= 8.0, when its shared memory fits the device's opt-in limit.
bool use_tensor_cores(const at::Tensor& z, const at::Tensor& codebook, bool exact) {
  const auto t = z.scalar_type();
  if (exact || (t != at::kHalf && t != at::kBFloat16) || codebook.scalar_type() != t) return false;
  const int dev = z.get_device();
  if (device_attribute(cudaDevAttrComputeCapabilityMajor, dev) < 8) return false;
  const int64_t static_smem = t == at::kBFloat16 ? tc_static_smem<true>() : tc_static_smem<false>();
  return plan::vq_tc_fits(codebook.size(1), static_smem,
                          device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
}

struct PreparedCodebook {
  at::Tensor cb_t32;  // (Dp, Kp) fp32 for the FFMA search, or undefined
  at::Tensor cb_h;    // (Kp, Dp) bf16/fp16 for the tensor-core search, or undefined
  at::Tensor e2_32, cb64, use, scale;
  at::Tensor work;    // int64: [0] amax bits, [1] max norm bits, [2] rows listed for the re-rank, then the table
  int64_t K, D, Kp, Dp, T;
  bool tensor_core;
  unsigned long long* word(int i) const {
    return reinterpret_cast<unsigned long long*>(work.data_ptr<int64_t>()) + i;
  }
  int* table() const { return reinterpret_cast<int*>(work.data_ptr<int64_t>() + 4); }
};

PreparedCodebook prepare_codebook(const at::Tensor& codebook, bool tensor_core, cudaStream_t stream) {
  PreparedCodebook p;
  p.K = codebook.size(0);
  p.D = codebook.size(1);
  p.tensor_core = tensor_core;
  TORCH_CHECK_VALUE(p.K <= std::numeric_limits<int32_t>::max() - kBN,
                    "vq: the CUDA kernels support up to 2^31 - 129 codes, got K = ", p.K);
  p.Kp = round_up(p.K, kBN);
  p.Dp = round_up(p.D, tensor_core ? kTcBK : kBK);
  p.T = 0;
  if (p.K <= kMaxDedupCodes) {
    p.T = 1;
    while (p.T < 2 * p.K) p.T *= 2;
  }
  const auto f32 = codebook.options().dtype(at::kFloat);
  if (tensor_core) {
    p.cb_h = at::empty({p.Kp, p.Dp}, codebook.options());
  } else {
    p.cb_t32 = at::empty({p.Dp, p.Kp}, f32);
  }
  p.e2_32 = at::empty({p.Kp}, f32);
  p.cb64 = at::empty({p.K, p.D}, codebook.options().dtype(at::kDouble));
  p.use = at::empty({p.K}, codebook.options().dtype(at::kChar));
  p.scale = at::empty({4}, codebook.options().dtype(at::kDouble));
  p.work = at::empty({4 + (2 * p.T + 2) / 2}, codebook.options().dtype(at::kLong));
  C10_CUDA_CHECK(cudaMemsetAsync(p.work.data_ptr(), 0, p.work.nbytes(), stream));
  at::Tensor hashes = at::empty({p.K}, codebook.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, codebook.scalar_type(), "vq_prepare_cuda", [&] {
    const scalar_t* cb = codebook.const_data_ptr<scalar_t>();
    vq_prepare_stats_kernel<scalar_t><<<blocks_1d(grid_for(p.K, kRowWarps)), kRowWarps * kWarp, 0, stream>>>(
        cb, p.table(), p.use.data_ptr<int8_t>(), hashes.data_ptr<int>(), p.word(0), p.K, p.D, p.T,
        codebook.stride(0), codebook.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    vq_prepare_codes_kernel<scalar_t><<<blocks_1d(grid_for(p.Kp, kRowWarps)), kRowWarps * kWarp, 0, stream>>>(
        cb, p.table(), p.use.data_ptr<int8_t>(), hashes.const_data_ptr<int>(), p.word(0),
        p.scale.data_ptr<double>(), tensor_core ? nullptr : p.cb_t32.data_ptr<float>(),
        tensor_core ? reinterpret_cast<uint16_t*>(p.cb_h.data_ptr()) : nullptr, p.e2_32.data_ptr<float>(),
        p.cb64.data_ptr<double>(), p.word(1), p.K, p.D, p.Kp, p.Dp, p.T, codebook.stride(0), codebook.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return p;
}

template <typename scalar_t, bool kFp64Scale>
void launch_ffma_search_as(const at::Tensor& zv, const PreparedCodebook& cb, const Partials& part, dim3 grid,
                           int64_t tiles_per_b, int64_t codes_per_split, cudaStream_t stream) {
  const int64_t B = zv.size(0), R = zv.size(1), D = zv.size(2);
  vq_search_kernel<scalar_t, kFp64Scale><<<grid, kSearchThreads, 0, stream>>>(
      zv.const_data_ptr<scalar_t>(), cb.cb_t32.const_data_ptr<float>(), cb.e2_32.const_data_ptr<float>(),
      cb.scale.const_data_ptr<double>(), part, B * R, R, D, cb.Kp, cb.Dp, zv.stride(0), zv.stride(1), zv.stride(2),
      tiles_per_b, codes_per_split, zv.stride(2) <= zv.stride(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_ffma_search(const at::Tensor& zv, const PreparedCodebook& cb, bool fp64_scale, const Partials& part,
                        dim3 grid, int64_t tiles_per_b, int64_t codes_per_split, cudaStream_t stream) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    launch_ffma_search_as<scalar_t, true>(zv, cb, part, grid, tiles_per_b, codes_per_split, stream);
  } else if (fp64_scale) {
    launch_ffma_search_as<scalar_t, true>(zv, cb, part, grid, tiles_per_b, codes_per_split, stream);
  } else {
    launch_ffma_search_as<scalar_t, false>(zv, cb, part, grid, tiles_per_b, codes_per_split, stream);
  }
}

// Search, finalize and re-rank for every row of zv (B, R, D). zqv / counts are undefined for vq_nearest.
void nearest_rows(const at::Tensor& zv,
                  const at::Tensor& codebook,
                  const PreparedCodebook& cb,
                  bool exact,
                  at::Tensor& indices,
                  at::Tensor& sqdist,
                  const at::Tensor& zqv,
                  const at::Tensor& counts,
                  cudaStream_t stream) {
  const int64_t B = zv.size(0), R = zv.size(1), D = zv.size(2), n = B * R;
  const int64_t sb = zv.stride(0), sr = zv.stride(1), sd = zv.stride(2);
  const int dev = zv.get_device();
  const int64_t rows_per_block = cb.tensor_core ? kTcBM : kBM;
  const int64_t tiles_per_b = grid_for(R, rows_per_block);
  const plan::Split split = plan::vq_split_codes(B * tiles_per_b, cb.Kp, kBN,
                                                 device_attribute(cudaDevAttrMultiProcessorCount, dev));
  at::Tensor part_index = at::empty({split.splits, n}, zv.options().dtype(at::kInt));
  at::Tensor part_best = at::empty({split.splits, n}, zv.options().dtype(at::kFloat));
  at::Tensor part_second = at::empty({split.splits, n}, zv.options().dtype(at::kFloat));
  const Partials part{part_index.data_ptr<int>(), part_best.data_ptr<float>(), part_second.data_ptr<float>()};
  const dim3 search_grid(blocks_1d(B * tiles_per_b), static_cast<unsigned>(split.splits));
  const bool fp64_scale = zv.scalar_type() == at::kDouble || codebook.scalar_type() == at::kDouble;
  at::Tensor list = at::empty({n}, zv.options().dtype(at::kLong));
  const RowsOut out{indices.data_ptr<int64_t>(), sqdist.data_ptr(),
                    counts.defined() ? reinterpret_cast<long long*>(counts.data_ptr<int64_t>()) : nullptr,
                    reinterpret_cast<long long*>(list.data_ptr<int64_t>()), cb.word(2)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, zv.scalar_type(), "vq_nearest_cuda", [&] {
    if constexpr (sizeof(scalar_t) == 2) {
      if (cb.tensor_core) {
        constexpr bool kBf16 = std::is_same_v<scalar_t, at::BFloat16>;
        const int shared = static_cast<int>(plan::vq_tc_dynamic_smem(D));
        C10_CUDA_CHECK(cudaFuncSetAttribute(vq_search_tc_kernel<kBf16>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            shared));
        const bool vector_z = sd == 1 && sr % 8 == 0 && sb % 8 == 0 && D % 8 == 0 &&
                              reinterpret_cast<uintptr_t>(zv.const_data_ptr()) % 16 == 0;
        vq_search_tc_kernel<kBf16><<<search_grid, kTcThreads, shared, stream>>>(
            reinterpret_cast<const uint16_t*>(zv.const_data_ptr()),
            reinterpret_cast<const uint16_t*>(cb.cb_h.const_data_ptr()), cb.e2_32.const_data_ptr<float>(),
            cb.scale.const_data_ptr<double>(), part, n, R, D, cb.Kp, cb.Dp, sb, sr, sd, tiles_per_b,
            split.codes_per_split, sd <= sr, vector_z);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (!cb.tensor_core) {
      launch_ffma_search<scalar_t>(zv, cb, fp64_scale, part, search_grid, tiles_per_b, split.codes_per_split, stream);
    }
    const bool quantize = zqv.defined();
    scalar_t* zq = quantize ? zqv.data_ptr<scalar_t>() : nullptr;
    const int64_t qb = quantize ? zqv.stride(0) : 0, qr = quantize ? zqv.stride(1) : 0,
                  qd = quantize ? zqv.stride(2) : 0;
    // sqdist is fp32 (fp64 for fp64 z, and for vq_quantize's per-row loss terms).
    auto launch = [&](auto sq_tag) {
      using sq_t = decltype(sq_tag);
      vq_finalize_kernel<scalar_t, sq_t><<<blocks_1d(B * grid_for(R, kFinRows)), kFinThreads, 0, stream>>>(
          zv.const_data_ptr<scalar_t>(), cb.cb64.const_data_ptr<double>(), cb.scale.const_data_ptr<double>(),
          cb.word(1), part, static_cast<int>(split.splits), out, zq, n, R, D, sb, sr, sd, qb, qr, qd, sd <= sr,
          qd <= qr, exact);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // Grid-stride over the listed rows (their number is only known on the device).
      const int64_t blocks = std::min<int64_t>(grid_for(n, kRowWarps),
                                               4 * device_attribute(cudaDevAttrMultiProcessorCount, dev));
      vq_rerank_kernel<scalar_t, sq_t><<<blocks_1d(blocks), kRowWarps * kWarp, 0, stream>>>(
          zv.const_data_ptr<scalar_t>(), cb.cb64.const_data_ptr<double>(), cb.use.const_data_ptr<int8_t>(),
          cb.word(0), out, zq, R, D, cb.K, sb, sr, sd, qb, qr, qd);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (sqdist.scalar_type() == at::kDouble) {
      launch(double{});
    } else {
      launch(float{});
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> vq_nearest_cuda(const at::Tensor& z, const at::Tensor& codebook, bool exact) {
  const at::Tensor zv = vq_rows_view(z, codebook, "vq_nearest");
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor indices = vq_index_shape_empty(z, at::kLong);
  at::Tensor sqdist = vq_index_shape_empty(z, vq_sqdist_dtype(z));
  if (z.numel() == 0) return {indices, sqdist};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const PreparedCodebook cb = prepare_codebook(codebook, use_tensor_cores(z, codebook, exact), stream);
  nearest_rows(zv, codebook, cb, exact, indices, sqdist, at::Tensor(), at::Tensor(), stream);
  return {indices, sqdist};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vq_quantize_cuda(const at::Tensor& z,
                                                                            const at::Tensor& codebook,
                                                                            double beta) {
  const at::Tensor zv = vq_rows_view(z, codebook, "vq_quantize");
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t K = codebook.size(0);
  at::Tensor z_q = at::empty(z.sizes(), z.options());  // contiguous in z's logical layout (NCHW stays NCHW)
  at::Tensor indices = vq_index_shape_empty(z, at::kLong);
  at::Tensor counts = at::zeros({K}, z.options().dtype(at::kLong));
  const auto loss_dtype = vq_sqdist_dtype(z);
  if (z.numel() == 0) return {z_q, indices, at::zeros({}, z.options().dtype(loss_dtype)), counts};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const PreparedCodebook cb = prepare_codebook(codebook, /*tensor_core=*/false, stream);
  const at::Tensor zqv = z.dim() == 2 ? z_q.unsqueeze(0) : z_q.flatten(2).transpose(1, 2);
  const int64_t n = zv.size(0) * zv.size(1);
  at::Tensor sq64 = at::empty({n}, z.options().dtype(at::kDouble));  // per-row distances for the loss
  nearest_rows(zv, codebook, cb, /*exact=*/true, indices, sq64, zqv, counts, stream);

  const int blocks = static_cast<int>(std::min<int64_t>(grid_for(n, kReduceThreads), kReduceMaxBlocks));
  at::Tensor partial = at::empty({blocks}, z.options().dtype(at::kDouble));
  vq_partial_sum_kernel<<<blocks, kReduceThreads, 0, stream>>>(sq64.const_data_ptr<double>(),
                                                               partial.data_ptr<double>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor loss = at::empty({}, z.options().dtype(loss_dtype));
  AT_DISPATCH_FLOATING_TYPES(loss_dtype, "vq_quantize_loss_cuda", [&] {
    vq_loss_kernel<scalar_t><<<1, kReduceThreads, 0, stream>>>(partial.const_data_ptr<double>(),
                                                               loss.data_ptr<scalar_t>(), blocks, beta,
                                                               static_cast<double>(z.numel()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {z_q, indices, loss, counts};
}

}  // namespace mage
