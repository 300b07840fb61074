// Nearest-code quantization on CUDA (docs/OPS.md op 1; the tokenizer's quantizer, docs/REFERENCE.md 3.3).
//
// Same algorithm and contract as csrc/vq_cpu.cpp, in three launches and without a host sync:
//   1. prepare:  the codebook once per call -> a zero-padded copy for the search (fp32 transposed, or the
//                16-bit values for tensor cores), an fp64 copy for exact distances, |e_k|^2 in fp32 and fp64 (+inf marks a code with a non-finite
//                entry, so it can never win) and max |e_k| for the rounding bound (csrc/vq_bound.h).
//   2. search:   a tiled fp32 FFMA GEMM (shared-memory tiles, 4x8 register micro-tiles) of z against the
//                codebook that keeps, per row, the best and second-best expanded distance
//                d'(k) = |e_k|^2 - 2 z.e_k and the best index. The [N, K] matrix never exists.
//                exact=False with bf16/fp16 z and a codebook of the same dtype uses tensor cores (WMMA)
//                instead: the products of 16-bit values are exact, the sums fp32, as the contract allows.
//   3. finalize: one warp per row: |z|^2 in fp64 (non-finite row -> index -1 and NaN); for exact=True a
//                row whose two best d' are within the bound is re-ranked over all codes in fp64, the
//                others only get their exact distance; vq_quantize also writes z_q and the counts here.
// vq_quantize then sums the fp64 per-row distances in a fixed order (deterministic loss).
#include "vq.h"
#include "vq_bound.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

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

// Search tiling: 256 threads as 16 row groups x 16 code groups, each thread a 4 (rows) x 8 (codes)
// register micro-tile, so a block covers 64 rows x 128 codes and steps through D 16 at a time.
constexpr int kSearchThreads = 256;  // two blocks per SM: at most 128 registers per thread
constexpr int kTM = 4;
constexpr int kTN = 8;
constexpr int kBM = 16 * kTM;  // 64 rows
constexpr int kBN = 16 * kTN;  // 128 codes
constexpr int kBK = 16;        // depth of one shared-memory tile
constexpr int kZPad = 4;       // keeps the transposing z-tile stores at most 2-way bank-conflicted

// Tensor-core search: 8 warps as 4 (32 rows each) x 2 (64 codes each), so a block covers 128 rows x 128
// codes; its z tile stays in shared memory for the whole D, the codebook streams through in 32-deep chunks.
constexpr int kTcThreads = 256;
constexpr int kTcBM = 128;
constexpr int kTcBN = kBN;  // the same code padding serves both searches
constexpr int kTcBK = 32;
constexpr int kTcPad = 8;  // 16-bit elements: ldm stays a multiple of 8 and fragment rows 32-byte aligned
constexpr int kTcLdc = kTcBK + kTcPad;

constexpr int kRowWarps = 8;  // warps per block in the one-warp-per-row/code kernels
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

__device__ __forceinline__ double warp_sum(double v) {
  // Butterfly: every lane ends with the same bits (each step adds the same two values, commuted).
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Smaller distance wins, the lower index on equal distance (torch.argmin's tie rule).
__device__ __forceinline__ bool precedes(double d, long long k, double best_d, long long best_k) {
  return d < best_d || (d == best_d && k < best_k);
}

// ---------------------------------------------------------------------------------------------------
// 1. Codebook preparation: one warp per code (padding codes K..Kp-1 included).
// ---------------------------------------------------------------------------------------------------
template <typename cb_t>
__global__ void __launch_bounds__(kRowWarps * kWarp) vq_prepare_kernel(
    const cb_t* __restrict__ codebook,              // (K, D) strides (sk, sd), any float dtype
    float* __restrict__ cb_t32,                     // (Dp, Kp) fp32 out: transposed, zero padded, 0 for invalid codes; or null
    uint16_t* __restrict__ cb_h,                    // (Kp, Dp) 16-bit out (cb_t's bits), zero padded, 0 for invalid codes; or null
    float* __restrict__ e2_32,                      // (Kp,) fp32 out: |e_k|^2, +inf for invalid and padding codes
    double* __restrict__ cb64,                      // (K, D) fp64 out: the codebook as given
    double* __restrict__ e2_64,                     // (K,) fp64 out: |e_k|^2, +inf for invalid codes
    unsigned long long* __restrict__ max_norm_bits, // () fp64 bits of max |e_k| over valid codes, zeroed before
    int64_t K,
    int64_t D,
    int64_t Kp,
    int64_t Dp,
    int64_t sk,
    int64_t sd) {
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
  double s = 0.0;
  for (int64_t d = lane; d < D; d += kWarp) {
    const double v = to_f64(codebook[k * sk + d * sd]);
    cb64[k * D + d] = v;
    s += v * v;
  }
  s = warp_sum(s);
  const bool valid = isfinite(s);
  // Each lane rereads only the cb64 entries it wrote itself above (same d = lane + 32 i), so no sync.
  for (int64_t d = lane; d < Dp; d += kWarp) {
    const bool keep = valid && d < D;
    if (cb_t32 != nullptr) cb_t32[d * Kp + k] = keep ? static_cast<float>(cb64[k * D + d]) : 0.0f;
    if constexpr (sizeof(cb_t) == 2) {  // only bf16/fp16 codebooks feed the tensor cores, bit for bit
      if (cb_h != nullptr) cb_h[k * Dp + d] = keep ? reinterpret_cast<const uint16_t*>(codebook)[k * sk + d * sd] : 0;
    }
  }
  if (lane == 0) {
    e2_32[k] = valid ? static_cast<float>(s) : inf;
    e2_64[k] = valid ? s : static_cast<double>(inf);
    // Non-negative doubles order like their bit patterns, so an integer max is a float max.
    if (valid) atomicMax(max_norm_bits, static_cast<unsigned long long>(__double_as_longlong(sqrt(s))));
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
  // NaN d' (only from a non-finite z row, flagged later) fails both tests and is never kept.
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

template <typename scalar_t>
__global__ void __launch_bounds__(kSearchThreads, 2) vq_search_kernel(
    const scalar_t* __restrict__ z,      // (B, R, D) strides (sb, sr, sd), read in place
    const float* __restrict__ cb_t32,    // (Dp, Kp) fp32, transposed and zero padded
    const float* __restrict__ e2_32,     // (Kp,) fp32, +inf for invalid and padding codes
    int64_t* __restrict__ indices,       // (B * R,) out: best code, -1 if no finite d'
    float* __restrict__ best_out,        // (B * R,) out: best d'
    float* __restrict__ second_out,      // (B * R,) out: second-best d' (+inf if none)
    int64_t R,
    int64_t D,
    int64_t Kp,
    int64_t Dp,
    int64_t sb,
    int64_t sr,
    int64_t sd,
    int64_t tiles_per_b,
    bool d_fastest) {  // z's D stride is the smallest: load the z tile along D for coalescing
  __shared__ __align__(16) float zs[kBK][kBM + kZPad];  // z tile, depth-major
  __shared__ __align__(16) float cs[kBK][kBN];          // codebook tile, depth-major

  const int tid = threadIdx.x;
  const int tx = tid % 16;  // code group: codes tx*4 + {0..3} and 64 + tx*4 + {0..3} of the tile
  const int ty = tid / 16;  // row group: rows ty*4 + {0..3} of the tile
  const int64_t b = static_cast<int64_t>(blockIdx.x) / tiles_per_b;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) % tiles_per_b) * kBM;
  const scalar_t* zb = z + b * sb;
  const float inf = std::numeric_limits<float>::infinity();

  Candidates cand[kTM];
#pragma unroll
  for (int i = 0; i < kTM; ++i) cand[i] = {inf, inf, -1};

  for (int64_t k0 = 0; k0 < Kp; k0 += kBN) {
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
        zs[d][r] = (row < R && dd < D) ? to_f32(zb[row * sr + dd * sd]) : 0.0f;
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
    for (int off = 8; off > 0; off /= 2) {
      Candidates o;
      o.best = __shfl_xor_sync(kFullMask, cand[i].best, off);
      o.second = __shfl_xor_sync(kFullMask, cand[i].second, off);
      o.index = __shfl_xor_sync(kFullMask, cand[i].index, off);
      merge(cand[i], o);
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int64_t row = row0 + ty * kTM + i;
      if (row < R) {
        const int64_t out = b * R + row;
        indices[out] = cand[i].index;
        best_out[out] = cand[i].best;
        second_out[out] = cand[i].second;
      }
    }
  }
}

// Tensor-core variant of the search (exact=False only). Same outputs and tie rules as vq_search_kernel;
// accumulators go through a per-warp 16x16 shared scratch because WMMA leaves their register layout open.
template <typename wmma_t>  // __half or __nv_bfloat16, matching z's and the codebook's dtype
__global__ void __launch_bounds__(kTcThreads, 2) vq_search_tc_kernel(
    const uint16_t* __restrict__ z,    // (B, R, D) strides (sb, sr, sd): bf16/fp16 bits, read in place
    const uint16_t* __restrict__ cb_h, // (Kp, Dp) same format, zero padded, 0 for invalid codes
    const float* __restrict__ e2_32,   // (Kp,) fp32, +inf for invalid and padding codes
    int64_t* __restrict__ indices,     // (B * R,) out: best code, -1 if no finite d'
    float* __restrict__ best_out,      // (B * R,) out: best d'
    float* __restrict__ second_out,    // (B * R,) out: second-best d'
    int64_t R,
    int64_t D,
    int64_t Kp,
    int64_t Dp,
    int64_t sb,
    int64_t sr,
    int64_t sd,
    int64_t tiles_per_b,
    bool d_fastest) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host only launches this on compute capability >= 8.0 (bf16 WMMA)
#else
  namespace wmma = nvcuda::wmma;
  extern __shared__ __align__(128) unsigned char smem[];
  const int ldz = static_cast<int>(Dp) + kTcPad;
  uint16_t* zs = reinterpret_cast<uint16_t*>(smem);                             // [kTcBM][ldz]
  uint16_t* cs = zs + kTcBM * ldz;                                              // [kTcBN][kTcLdc]
  float* scratch = reinterpret_cast<float*>(cs + kTcBN * kTcLdc);               // [warps][16 * 16]
  Candidates* merged = reinterpret_cast<Candidates*>(scratch + kTcThreads / kWarp * 256);  // [kTcBM]

  const int tid = threadIdx.x;
  const int warp = tid / kWarp, lane = tid % kWarp;
  const int wm = warp % 4;  // rows wm*32 .. +32 of the tile
  const int wn = warp / 4;  // codes wn*64 .. +64 of each code tile
  const int64_t b = static_cast<int64_t>(blockIdx.x) / tiles_per_b;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) % tiles_per_b) * kTcBM;
  const uint16_t* zb = z + b * sb;

  // The z tile, all of D, masked: rows past R and depth past D are +0.
  const int tile = kTcBM * static_cast<int>(Dp);
  for (int e = tid; e < tile; e += kTcThreads) {
    const int r = d_fastest ? e / static_cast<int>(Dp) : e % kTcBM;
    const int d = d_fastest ? e % static_cast<int>(Dp) : e / kTcBM;
    const int64_t row = row0 + r;
    zs[r * ldz + d] = (row < R && d < D) ? zb[row * sr + d * sd] : static_cast<uint16_t>(0);
  }

  const float inf = std::numeric_limits<float>::infinity();
  Candidates cand[2] = {{inf, inf, -1}, {inf, inf, -1}};  // rows wm*32 + i*16 + lane % 16
  float* sw = scratch + warp * 256;
  for (int64_t k0 = 0; k0 < Kp; k0 += kTcBN) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int d0 = 0; d0 < Dp; d0 += kTcBK) {
      __syncthreads();  // every warp is done with the previous codebook chunk (and the z tile is written)
      // 128 codes x 32 elements = 512 16-byte pieces, aligned because Dp % 32 == 0.
#pragma unroll
      for (int i = 0; i < kTcBN * kTcBK / 8 / kTcThreads; ++i) {
        const int e = tid + i * kTcThreads;
        const int c = e / (kTcBK / 8);
        const int piece = (e % (kTcBK / 8)) * 8;
        *reinterpret_cast<uint4*>(cs + c * kTcLdc + piece) =
            *reinterpret_cast<const uint4*>(cb_h + (k0 + c) * Dp + d0 + piece);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kTcBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, wmma_t, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, wmma_t, wmma::col_major> bf[4];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(a[i], reinterpret_cast<const wmma_t*>(zs + (wm * 32 + i * 16) * ldz + d0 + kk), ldz);
        }
        // B(d, c) = codebook[c][d]: the code-major tile is B in column-major order.
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          wmma::load_matrix_sync(bf[j], reinterpret_cast<const wmma_t*>(cs + (wn * 64 + j * 16) * kTcLdc + kk), kTcLdc);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i][j], a[i], bf[j], acc[i][j]);
      }
    }
    // Lane l takes row l % 16 and codes (l / 16) * 8 .. +8 of each 16x16 fragment: j and then c ascending
    // is code index ascending, as offer() needs.
    const int r = lane % 16, c0 = (lane / 16) * 8;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wmma::store_matrix_sync(sw, acc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          const int k = static_cast<int>(k0) + wn * 64 + j * 16 + c0 + c;
          offer(cand[i], fmaf(-2.0f, sw[r * 16 + c0 + c], e2_32[k]), k);
        }
        __syncwarp();  // the next fragment overwrites sw
      }
    }
  }

  // Merge the two code halves of a row (lanes l and l ^ 16), then the two code warps (wn = 0, 1).
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    Candidates o;
    o.best = __shfl_xor_sync(kFullMask, cand[i].best, 16);
    o.second = __shfl_xor_sync(kFullMask, cand[i].second, 16);
    o.index = __shfl_xor_sync(kFullMask, cand[i].index, 16);
    merge(cand[i], o);
  }
  if (wn == 1 && lane < 16) {
    for (int i = 0; i < 2; ++i) merged[wm * 32 + i * 16 + lane] = cand[i];
  }
  __syncthreads();
  if (wn == 0 && lane < 16) {
    for (int i = 0; i < 2; ++i) {
      const int r = wm * 32 + i * 16 + lane;
      merge(cand[i], merged[r]);
      const int64_t row = row0 + r;
      if (row < R) {
        const int64_t out = b * R + row;
        indices[out] = cand[i].index;
        best_out[out] = cand[i].best;
        second_out[out] = cand[i].second;
      }
    }
  }
#endif
}

// ---------------------------------------------------------------------------------------------------
// 3. Finalize: one warp per row.
// ---------------------------------------------------------------------------------------------------
template <typename scalar_t, typename sq_t>
__global__ void __launch_bounds__(kRowWarps * kWarp) vq_finalize_kernel(
    const scalar_t* __restrict__ z,         // (B, R, D) strides (sb, sr, sd)
    const double* __restrict__ cb64,        // (K, D) fp64
    const double* __restrict__ e2_64,       // (K,) fp64, +inf for invalid codes
    const double* __restrict__ max_norm,    // () max |e_k| over valid codes
    const float* __restrict__ best,         // (B * R,) best d' from the search
    const float* __restrict__ second,       // (B * R,) second-best d'
    int64_t* __restrict__ indices,          // (B * R,) in: search winner; out: final index or -1
    sq_t* __restrict__ sqdist,              // (B * R,) out: squared distance, NaN for invalid rows
    scalar_t* __restrict__ z_q,             // (B, R, D) strides (qb, qr, qd) out, or null (vq_nearest)
    long long* __restrict__ counts,         // (K,) int64 in/out (zeroed), or null
    int64_t n,
    int64_t R,
    int64_t D,
    int64_t K,
    int64_t sb,
    int64_t sr,
    int64_t sd,
    int64_t qb,
    int64_t qr,
    int64_t qd,
    bool exact) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (row >= n) return;  // uniform per warp, before any shuffle
  const int64_t b = row / R, r = row % R;
  const scalar_t* zr = z + b * sb + r * sr;
  // Read before the first shuffle, so no lane can see lane 0's final store to indices[row].
  long long index = indices[row];
  const double fbest = static_cast<double>(best[row]);
  const double fsecond = static_cast<double>(second[row]);

  double z2 = 0.0;
  for (int64_t d = lane; d < D; d += kWarp) {
    const double v = to_f64(zr[d * sd]);
    z2 += v * v;
  }
  z2 = warp_sum(z2);  // identical in every lane, so every branch below is warp-uniform

  double sq = std::numeric_limits<double>::quiet_NaN();
  if (index >= 0 && isfinite(z2)) {
    if (!exact) {
      sq = fmax(0.0, fbest + z2);
    } else if (fsecond - fbest >
               vq_gap_bound(D, kFp32Roundoff, sqrt(z2), *max_norm)) {
      // The fp32 winner is certainly the exact one: only its distance is needed, in fp64.
      const double* e = cb64 + index * D;
      double s = 0.0;
      for (int64_t d = lane; d < D; d += kWarp) {
        const double t = to_f64(zr[d * sd]) - e[d];
        s += t * t;
      }
      sq = warp_sum(s);
    } else {
      // Near-tie in fp32: re-rank every valid code exactly, lanes over codes (each lane visits its codes
      // in increasing order, so strict < keeps the lowest index, and the warp merge breaks ties by index).
      double lb = std::numeric_limits<double>::infinity();
      long long li = K;
      for (int64_t k = lane; k < K; k += kWarp) {
        if (!isfinite(e2_64[k])) continue;  // a code with a non-finite entry is never chosen
        const double* e = cb64 + k * D;
        double s = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          const double t = to_f64(zr[d * sd]) - e[d];
          s += t * t;
        }
        if (s < lb) {
          lb = s;
          li = k;
        }
      }
      for (int off = kWarp / 2; off > 0; off /= 2) {
        const double ob = __shfl_xor_sync(kFullMask, lb, off);
        const long long oi = __shfl_xor_sync(kFullMask, li, off);
        if (precedes(ob, oi, lb, li)) {
          lb = ob;
          li = oi;
        }
      }
      index = li < K ? li : -1;  // li == K only if every distance overflowed
      sq = lb;
    }
  } else {
    index = -1;
  }
  if (index < 0) sq = std::numeric_limits<double>::quiet_NaN();

  if (lane == 0) {
    indices[row] = index;
    sqdist[row] = static_cast<sq_t>(sq);
    if (counts != nullptr && index >= 0) {
      atomicAdd(reinterpret_cast<unsigned long long*>(counts + index), 1ull);
    }
  }
  if (z_q != nullptr) {
    scalar_t* q = z_q + b * qb + r * qr;
    const double* e = cb64 + (index < 0 ? 0 : index) * D;
    for (int64_t d = lane; d < D; d += kWarp) {
      q[d * qd] = static_cast<scalar_t>(index < 0 ? std::numeric_limits<double>::quiet_NaN() : e[d]);
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

dim3 blocks_1d(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "vq: too many rows or codes for one launch (",
              blocks, " blocks)");
  return dim3(static_cast<unsigned>(blocks));
}

size_t tc_shared_bytes(int64_t Dp) {
  return sizeof(uint16_t) * (kTcBM * (Dp + kTcPad) + kTcBN * kTcLdc) + sizeof(float) * (kTcThreads / kWarp) * 256 +
         sizeof(Candidates) * kTcBM;
}

// The tensor-core search serves exact=False for bf16/fp16 z with a codebook of the same dtype (exact
// products), on compute capability >= 8.0, when the z tile of all of D fits in shared memory.
bool use_tensor_cores(const at::Tensor& z, const at::Tensor& codebook, bool exact) {
  const auto t = z.scalar_type();
  if (exact || (t != at::kHalf && t != at::kBFloat16) || codebook.scalar_type() != t) return false;
  int major = 0, max_shared = 0;
  const int dev = z.get_device();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return major >= 8 && tc_shared_bytes(round_up(codebook.size(1), kTcBK)) <= static_cast<size_t>(max_shared);
}

struct PreparedCodebook {
  at::Tensor cb_t32;  // (Dp, Kp) fp32 for the FFMA search, or undefined
  at::Tensor cb_h;    // (Kp, Dp) bf16/fp16 for the tensor-core search, or undefined
  at::Tensor e2_32, cb64, e2_64, max_norm;
  int64_t K, D, Kp, Dp;
  bool tensor_core;
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
  const auto f32 = codebook.options().dtype(at::kFloat);
  const auto f64 = codebook.options().dtype(at::kDouble);
  if (tensor_core) {
    p.cb_h = at::empty({p.Kp, p.Dp}, codebook.options());
  } else {
    p.cb_t32 = at::empty({p.Dp, p.Kp}, f32);
  }
  p.e2_32 = at::empty({p.Kp}, f32);
  p.cb64 = at::empty({p.K, p.D}, f64);
  p.e2_64 = at::empty({p.K}, f64);
  p.max_norm = at::empty({}, f64);
  C10_CUDA_CHECK(cudaMemsetAsync(p.max_norm.data_ptr<double>(), 0, sizeof(double), stream));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, codebook.scalar_type(), "vq_prepare_cuda", [&] {
    vq_prepare_kernel<scalar_t><<<blocks_1d(grid_for(p.Kp, kRowWarps)), kRowWarps * kWarp, 0, stream>>>(
        codebook.const_data_ptr<scalar_t>(), tensor_core ? nullptr : p.cb_t32.data_ptr<float>(),
        tensor_core ? reinterpret_cast<uint16_t*>(p.cb_h.data_ptr()) : nullptr, p.e2_32.data_ptr<float>(),
        p.cb64.data_ptr<double>(), p.e2_64.data_ptr<double>(),
        reinterpret_cast<unsigned long long*>(p.max_norm.data_ptr<double>()), p.K, p.D, p.Kp, p.Dp,
        codebook.stride(0), codebook.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return p;
}

// Search + finalize for every row of zv (B, R, D). z_q / counts are undefined tensors for vq_nearest.
void nearest_rows(const at::Tensor& zv,
                  const PreparedCodebook& cb,
                  bool exact,
                  at::Tensor& indices,
                  at::Tensor& sqdist,
                  const at::Tensor& zqv,
                  const at::Tensor& counts,
                  cudaStream_t stream) {
  const int64_t B = zv.size(0), R = zv.size(1), D = zv.size(2), n = B * R;
  const int64_t sb = zv.stride(0), sr = zv.stride(1), sd = zv.stride(2);
  const auto f32 = zv.options().dtype(at::kFloat);
  at::Tensor best = at::empty({n}, f32);
  at::Tensor second = at::empty({n}, f32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, zv.scalar_type(), "vq_nearest_cuda", [&] {
    if constexpr (sizeof(scalar_t) == 2) {
      if (cb.tensor_core) {
        using wmma_t = std::conditional_t<std::is_same_v<scalar_t, at::Half>, __half, __nv_bfloat16>;
        const int64_t tiles_per_b = grid_for(R, kTcBM);
        const size_t shared = tc_shared_bytes(cb.Dp);
        C10_CUDA_CHECK(cudaFuncSetAttribute(vq_search_tc_kernel<wmma_t>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
        vq_search_tc_kernel<wmma_t><<<blocks_1d(B * tiles_per_b), kTcThreads, shared, stream>>>(
            reinterpret_cast<const uint16_t*>(zv.const_data_ptr()),
            reinterpret_cast<const uint16_t*>(cb.cb_h.const_data_ptr()), cb.e2_32.const_data_ptr<float>(),
            indices.data_ptr<int64_t>(), best.data_ptr<float>(), second.data_ptr<float>(), R, D, cb.Kp, cb.Dp,
            sb, sr, sd, tiles_per_b, sd <= sr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (!cb.tensor_core) {
      const int64_t tiles_per_b = grid_for(R, kBM);
      vq_search_kernel<scalar_t><<<blocks_1d(B * tiles_per_b), kSearchThreads, 0, stream>>>(
          zv.const_data_ptr<scalar_t>(), cb.cb_t32.const_data_ptr<float>(), cb.e2_32.const_data_ptr<float>(),
          indices.data_ptr<int64_t>(), best.data_ptr<float>(), second.data_ptr<float>(), R, D, cb.Kp, cb.Dp,
          sb, sr, sd, tiles_per_b, sd <= sr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const bool quantize = zqv.defined();
    // sqdist is fp32 (fp64 for fp64 z, and for vq_quantize's per-row loss terms).
    auto launch = [&](auto* sq_ptr) {
      using sq_t = std::remove_pointer_t<decltype(sq_ptr)>;
      vq_finalize_kernel<scalar_t, sq_t><<<blocks_1d(grid_for(n, kRowWarps)), kRowWarps * kWarp, 0, stream>>>(
          zv.const_data_ptr<scalar_t>(), cb.cb64.const_data_ptr<double>(), cb.e2_64.const_data_ptr<double>(),
          cb.max_norm.const_data_ptr<double>(), best.const_data_ptr<float>(), second.const_data_ptr<float>(),
          indices.data_ptr<int64_t>(), sq_ptr, quantize ? zqv.data_ptr<scalar_t>() : nullptr,
          quantize ? reinterpret_cast<long long*>(counts.data_ptr<int64_t>()) : nullptr, n, R, D, cb.K, sb, sr,
          sd, quantize ? zqv.stride(0) : 0, quantize ? zqv.stride(1) : 0, quantize ? zqv.stride(2) : 0, exact);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (sqdist.scalar_type() == at::kDouble) {
      launch(sqdist.data_ptr<double>());
    } else {
      launch(sqdist.data_ptr<float>());
    }
  });
}

at::Tensor index_shape_empty(const at::Tensor& z, at::ScalarType dtype) {
  auto opts = z.options().dtype(dtype);
  return z.dim() == 2 ? at::empty({z.size(0)}, opts) : at::empty({z.size(0), z.size(2) * z.size(3)}, opts);
}

at::ScalarType sqdist_dtype(const at::Tensor& z) {
  return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> vq_nearest_cuda(const at::Tensor& z, const at::Tensor& codebook, bool exact) {
  const at::Tensor zv = vq_rows_view(z, codebook, "vq_nearest");
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor indices = index_shape_empty(z, at::kLong);
  at::Tensor sqdist = index_shape_empty(z, sqdist_dtype(z));
  if (z.numel() == 0) return {indices, sqdist};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const PreparedCodebook cb = prepare_codebook(codebook, use_tensor_cores(z, codebook, exact), stream);
  nearest_rows(zv, cb, exact, indices, sqdist, at::Tensor(), at::Tensor(), stream);
  return {indices, sqdist};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vq_quantize_cuda(const at::Tensor& z,
                                                                            const at::Tensor& codebook,
                                                                            double beta) {
  const at::Tensor zv = vq_rows_view(z, codebook, "vq_quantize");
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t K = codebook.size(0);
  at::Tensor z_q = at::empty(z.sizes(), z.options());  // contiguous in z's logical layout (NCHW stays NCHW)
  at::Tensor indices = index_shape_empty(z, at::kLong);
  at::Tensor counts = at::zeros({K}, z.options().dtype(at::kLong));
  const auto loss_dtype = sqdist_dtype(z);
  if (z.numel() == 0) return {z_q, indices, at::zeros({}, z.options().dtype(loss_dtype)), counts};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const PreparedCodebook cb = prepare_codebook(codebook, /*tensor_core=*/false, stream);
  const at::Tensor zqv = z.dim() == 2 ? z_q.unsqueeze(0) : z_q.flatten(2).transpose(1, 2);
  const int64_t n = zv.size(0) * zv.size(1);
  at::Tensor sq64 = at::empty({n}, z.options().dtype(at::kDouble));  // per-row distances for the loss
  nearest_rows(zv, cb, /*exact=*/true, indices, sq64, zqv, counts, stream);

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
