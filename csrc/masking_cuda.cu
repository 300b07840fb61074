// Masked-token ops on CUDA (docs/OPS.md ops 2-4; docs/REFERENCE.md 4.4-4.5). See masking.h for shapes.
//
// Nothing here reads a value on the host, so every launcher is sync-free and CUDA-graph capturable.
// The price: keep_idx values and per-row counts are not validated (the CPU kernels and the Python
// checks on CPU tensors do that). The kernels stay in bounds for any input: counts are clamped to
// [0, L], keep_idx entries outside [0, L) count as -1, and keep_idx writes stop at num_kept.
//
// - mask_plan: one block per row. The row's (noise, position) order keys go to shared memory; each
//   thread counts, for its tokens, how many keys come first (O(L^2 / threads), L = 256 in MAGE: a few
//   hundred shared-memory compares per thread, no sort). Kept positions are compacted with a
//   ballot/popc block scan.
// - Row copies (gather_keep, scatter_keep, pad_with_cls and the gathered part of its backward): one
//   warp per output row, 16-byte loads and stores over C when rows are 16-byte aligned.
// - pad_with_cls backward: column sums, one block per (row, channel tile) over the row's padded tokens
//   and one per (slot, channel tile) over the batch for pos_embed; warps split the rows and their fp32
//   (fp64) partial sums meet in shared memory. (grad_z is read about twice: once for grad_y and the
//   padded sums, once for the pos_embed sum.)
#include "masking.h"
#include "cuda_plan.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <type_traits>

namespace mage {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// ------------------------------------------------------------------------------------------ mask_plan

// Monotone integer key of a float: -0.0 == 0.0 and every NaN above +inf (as a stable torch.sort).
__device__ __forceinline__ uint32_t ordered_key(float f) {
  if (f != f) return 0xFFFFFFFFu;
  if (f == 0.0f) f = 0.0f;
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ uint64_t ordered_key(double f) {
  if (f != f) return 0xFFFFFFFFFFFFFFFFull;
  if (f == 0.0) f = 0.0;
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(f));
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

template <typename scalar_t>
using key_t = std::conditional_t<std::is_same_v<scalar_t, double>, uint64_t, uint32_t>;

template <typename scalar_t>
__device__ __forceinline__ key_t<scalar_t> key_of(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return ordered_key(v);
  } else {
    return ordered_key(static_cast<float>(v));
  }
}

template <typename scalar_t, bool kSmem>
__global__ void __launch_bounds__(kThreads) mask_plan_kernel(
    const scalar_t* __restrict__ noise,  // (B, L), strides (stride_b, stride_l)
    int64_t stride_b,
    int64_t stride_l,
    const int64_t* __restrict__ num_masked,  // () or (B)
    int64_t m_step,
    const int64_t* __restrict__ num_dropped,
    int64_t d_step,
    bool* __restrict__ masked,    // (B, L)
    bool* __restrict__ dropped,   // (B, L)
    int64_t* __restrict__ keep,   // (B, num_kept)
    int64_t L,
    int64_t num_kept) {
  using Key = key_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Key* keys = reinterpret_cast<Key*>(smem_raw);
  __shared__ int warp_count[kWarps];
  __shared__ int64_t carried;
  const int64_t b = blockIdx.x;
  const scalar_t* row = noise + b * stride_b;
  auto key = [&](int64_t s) -> Key { return kSmem ? keys[s] : key_of(row[s * stride_l]); };
  if (kSmem) {
    for (int64_t s = threadIdx.x; s < L; s += blockDim.x) keys[s] = key_of(row[s * stride_l]);
  }
  if (threadIdx.x == 0) carried = 0;
  __syncthreads();
  const int64_t M = min(max(num_masked[b * m_step], int64_t(0)), L);
  const int64_t D = min(max(num_dropped[b * d_step], int64_t(0)), L);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t t0 = 0; t0 < L; t0 += blockDim.x) {
    const int64_t t = t0 + threadIdx.x;
    bool kept = false;
    if (t < L) {
      // rank(t) = #{s : (key_s, s) < (key_t, t)}; keys are broadcast reads from shared memory.
      const Key kt = key(t);
      int64_t rank = 0;
      for (int64_t s = 0; s < L; ++s) {
        const Key ks = key(s);
        rank += (ks < kt) || (ks == kt && s < t);
      }
      masked[b * L + t] = rank < M;
      dropped[b * L + t] = rank < D;
      kept = rank >= D;
    }
    // Block scan of the kept flags: ballot/popc within a warp, warp totals through shared memory.
    const unsigned ballot = __ballot_sync(0xFFFFFFFFu, kept);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int64_t slot = carried + __popc(ballot & ((1u << lane) - 1u));
    for (int w = 0; w < warp; ++w) slot += warp_count[w];
    if (kept && slot < num_kept) keep[b * num_kept + slot] = t;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) carried += warp_count[w];
    }
    __syncthreads();
  }
  for (int64_t j = carried + threadIdx.x; j < num_kept; j += blockDim.x) keep[b * num_kept + j] = -1;
}

// ------------------------------------------------------------------------------------------ row copies

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Rows of a (B, S, C) tensor with unit channel stride.
template <typename T>
struct RowsView {
  const T* data;
  int64_t stride_b, stride_s;
  __device__ const T* row(int64_t b, int64_t s) const { return data + b * stride_b + s * stride_s; }
};

// gather: output row (b, s) of (B, 1+Lk) is slot 0, the kept token's slot, or zeros (nullptr).
template <typename T>
struct GatherSource {
  RowsView<T> x;
  const int64_t* keep;  // (B, Lk)
  const bool* masked;   // (B, L) or nullptr: masked tokens give zero rows (pad_with_cls backward)
  int64_t L, Lk;
  __device__ const T* operator()(int64_t b, int64_t s) const {
    if (s == 0) return x.row(b, 0);
    const int64_t t = keep[b * Lk + s - 1];
    if (t < 0 || t >= L || (masked && masked[b * L + t])) return nullptr;
    return x.row(b, 1 + t);
  }
};

// expand: output row (b, s) of (B, 1+L) is slot 0, the kept row feeding token s-1, or the fill.
template <typename T>
struct ExpandSource {
  RowsView<T> y;
  const int64_t* src;  // (B, L): kept row j of token t, or -1
  const T* pad;        // the shared fill vector (C), or nullptr
  bool fill_cls;       // fill with the row's slot 0 (when pad is nullptr), else zeros
  int64_t L;
  __device__ const T* operator()(int64_t b, int64_t s) const {
    const int64_t j = s == 0 ? -1 : src[b * L + s - 1];
    if (s == 0 || j >= 0) return y.row(b, s == 0 ? 0 : 1 + j);
    if (pad) return pad;
    return fill_cls ? y.row(b, 0) : nullptr;
  }
};

// One warp per output row; N elements (16 bytes when aligned) per lane per step.
template <typename T, int N, bool kHasPos, typename Source>
__global__ void __launch_bounds__(kThreads) rows_kernel(
    T* __restrict__ out,  // (B, S, C) contiguous
    int64_t S,
    int64_t total_rows,   // B * S
    int64_t C,
    const T* __restrict__ pos,  // (S, C) contiguous, when kHasPos
    Source source) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, N>;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= total_rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t s = r % S;
  const P* from = reinterpret_cast<const P*>(source(r / S, s));
  P* o = reinterpret_cast<P*>(out + r * C);
  const P* p = kHasPos ? reinterpret_cast<const P*>(pos + s * C) : nullptr;
  for (int64_t c = lane; c < C / N; c += 32) {
    P v;
    if (from) {
      v = from[c];
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) v.v[i] = T(0);
    }
    if constexpr (kHasPos) {
      const P q = p[c];
#pragma unroll
      for (int i = 0; i < N; ++i) v.v[i] = static_cast<T>(static_cast<acc_t>(v.v[i]) + static_cast<acc_t>(q.v[i]));
    }
    o[c] = v;
  }
}

__global__ void __launch_bounds__(kThreads) slot_source_kernel(
    const int64_t* __restrict__ keep,  // (B, Lk)
    const bool* __restrict__ masked,   // (B, L) or nullptr
    int64_t* __restrict__ src,         // (B, L)
    int64_t L,
    int64_t Lk) {
  const int64_t b = blockIdx.x;
  for (int64_t t = threadIdx.x; t < L; t += blockDim.x) src[b * L + t] = -1;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < Lk; j += blockDim.x) {
    const int64_t t = keep[b * Lk + j];
    if (t >= 0 && t < L && !(masked && masked[b * L + t])) src[b * L + t] = j;
  }
}

// Column sums: block (group g, channel tile); its warps split the group's rows, N channels per lane,
// and their fp32 (fp64) partial sums meet in shared memory. Task gives the rows and the epilogue.
template <typename T, int N, typename Task>
__global__ void __launch_bounds__(kThreads) column_sum_kernel(Task task, int64_t C) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, N>;
  __shared__ acc_t partial[kWarps][32 * N];
  const int64_t g = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * 32 * N;  // first channel of this tile
  const int64_t pc = c0 / N + lane;                                // this lane's pack
  acc_t acc[N];
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = acc_t(0);
  if (pc < C / N) {
    for (int64_t i = warp; i < task.count(); i += kWarps) {
      const T* row = task.row(g, i);
      if (!row) continue;
      const P v = reinterpret_cast<const P*>(row)[pc];
#pragma unroll
      for (int k = 0; k < N; ++k) acc[k] += static_cast<acc_t>(v.v[k]);
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) partial[warp][lane * N + i] = acc[i];
  __syncthreads();
  for (int64_t k = threadIdx.x; k < 32 * N; k += blockDim.x) {
    if (c0 + k >= C) continue;
    acc_t total = acc_t(0);
    for (int w = 0; w < kWarps; ++w) total += partial[w][k];
    task.finish(g, c0 + k, total);
  }
}

// Group b: the padded tokens of row b; into grad_y[b, 0] (+ grad_z[b, 0]) or pad_sum[b].
template <typename T>
struct PadSumTask {
  RowsView<T> gz;      // (B, 1+L, C)
  const int64_t* src;  // (B, L), -1 = padded
  T* grad_y;           // (B, 1+Lk, C)
  at::opmath_type<T>* pad_sum;  // (B, C) when mae
  int64_t L, Lk, C;
  bool mae;
  __device__ int64_t count() const { return L; }
  __device__ const T* row(int64_t b, int64_t t) const { return src[b * L + t] < 0 ? gz.row(b, 1 + t) : nullptr; }
  __device__ void finish(int64_t b, int64_t c, at::opmath_type<T> total) const {
    if (mae) {
      pad_sum[b * C + c] = total;
    } else {
      grad_y[b * (1 + Lk) * C + c] = static_cast<T>(static_cast<at::opmath_type<T>>(gz.row(b, 0)[c]) + total);
    }
  }
};

// Group s: slot s of every row; into grad_pos[s] (the positional embedding's gradient).
template <typename T>
struct PosSumTask {
  RowsView<T> gz;  // (B, 1+L, C)
  T* grad_pos;     // (1+L, C)
  int64_t B, C;
  __device__ int64_t count() const { return B; }
  __device__ const T* row(int64_t s, int64_t b) const { return gz.row(b, s); }
  __device__ void finish(int64_t s, int64_t c, at::opmath_type<T> total) const {
    grad_pos[s * C + c] = static_cast<T>(total);
  }
};

// ------------------------------------------------------------------------------------------ launchers

template <typename T>
RowsView<T> rows_view(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1)};
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte packs when C and every row start allow them, else one element per step.
int pack_width(int64_t C, int64_t elem_size, std::initializer_list<const at::Tensor*> rows) {
  const int64_t n = 16 / elem_size;
  if (C % n != 0) return 1;
  for (const at::Tensor* t : rows) {
    if (!t->defined()) continue;
    if (!aligned16(t->const_data_ptr())) return 1;
    for (int64_t d = 0; d + 1 < t->dim(); ++d) {
      if (t->stride(d) % n != 0) return 1;
    }
  }
  return static_cast<int>(n);
}

template <typename T, bool kHasPos, typename Source>
void launch_rows(at::Tensor& out, int pack, const T* pos, const Source& source) {
  const int64_t B = out.size(0), S = out.size(1), C = out.size(2), total = B * S;
  if (total == 0 || C == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>((total + kWarps - 1) / kWarps));
  T* o = out.data_ptr<T>();
  constexpr int kPack = 16 / sizeof(T);
  if (pack == kPack) {
    rows_kernel<T, kPack, kHasPos><<<grid, kThreads, 0, stream>>>(o, S, total, C, pos, source);
  } else {
    rows_kernel<T, 1, kHasPos><<<grid, kThreads, 0, stream>>>(o, S, total, C, pos, source);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Task>
void launch_column_sums(const Task& task, int64_t groups, int64_t C, int pack) {
  if (groups == 0 || C == 0) return;
  constexpr int kPack = 16 / sizeof(T);
  const int n = pack == kPack ? kPack : 1;
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>((C + 32 * n - 1) / (32 * n)));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (n == kPack) {
    column_sum_kernel<T, kPack><<<grid, kThreads, 0, stream>>>(task, C);
  } else {
    column_sum_kernel<T, 1><<<grid, kThreads, 0, stream>>>(task, C);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor slot_sources(const at::Tensor& keep_idx, const at::Tensor& masked, int64_t L) {
  const int64_t B = keep_idx.size(0), Lk = keep_idx.size(1);
  at::Tensor src = at::empty({B, L}, keep_idx.options());
  if (B == 0 || L == 0) return src;
  slot_source_kernel<<<static_cast<unsigned>(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      keep_idx.const_data_ptr<int64_t>(), masked.defined() ? masked.const_data_ptr<bool>() : nullptr,
      src.data_ptr<int64_t>(), L, Lk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return src;
}

at::Tensor unit_channel_stride(const at::Tensor& t) { return t.stride(2) == 1 ? t : t.contiguous(); }

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

#define MAGE_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_plan_cuda(const at::Tensor& noise, const at::Tensor& num_masked,
                                                              const at::Tensor& num_dropped, c10::SymInt num_kept_s) {
  const int64_t num_kept = num_kept_s.expect_int();
  check_mask_plan_shapes(noise, num_masked, num_dropped, num_kept);
  check_cuda(noise, "mask_plan", "noise");
  const c10::cuda::CUDAGuard guard(noise.device());
  const int64_t B = noise.size(0), L = noise.size(1);
  at::Tensor masked = at::empty({B, L}, noise.options().dtype(at::kBool));
  at::Tensor dropped = at::empty({B, L}, noise.options().dtype(at::kBool));
  at::Tensor keep_idx = at::empty({B, num_kept}, noise.options().dtype(at::kLong));
  if (B == 0) return {masked, dropped, keep_idx};
  const at::Tensor m_counts = num_masked.contiguous(), d_counts = num_dropped.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, (L + 31) / 32 * 32)));
  MAGE_DISPATCH_FLOATS(noise.scalar_type(), "mask_plan_cuda", [&] {
    // The keys go to dynamic shared memory when they fit beside the kernel's own static shared memory.
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, mask_plan_kernel<scalar_t, true>));
    const int64_t smem = plan::mask_plan_dynamic_smem(L, sizeof(key_t<scalar_t>), attr.sharedSizeBytes);
    const auto args = std::make_tuple(noise.const_data_ptr<scalar_t>(), noise.stride(0), noise.stride(1),
                                      m_counts.const_data_ptr<int64_t>(), int64_t(m_counts.dim() ? 1 : 0),
                                      d_counts.const_data_ptr<int64_t>(), int64_t(d_counts.dim() ? 1 : 0),
                                      masked.data_ptr<bool>(), dropped.data_ptr<bool>(),
                                      keep_idx.data_ptr<int64_t>(), L, num_kept);
    if (smem > 0) {
      std::apply([&](auto... a) {
        mask_plan_kernel<scalar_t, true><<<static_cast<unsigned>(B), threads, smem, stream>>>(a...);
      }, args);
    } else {
      std::apply([&](auto... a) {
        mask_plan_kernel<scalar_t, false><<<static_cast<unsigned>(B), threads, 0, stream>>>(a...);
      }, args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {masked, dropped, keep_idx};
}

at::Tensor gather_keep_cuda(const at::Tensor& x_in, const at::Tensor& keep_in) {
  check_rows_shape(x_in, "gather_keep", "x");
  const int64_t B = x_in.size(0), L = x_in.size(1) - 1, C = x_in.size(2);
  check_keep_idx_shape(keep_in, B, L, x_in.device(), "gather_keep");
  check_cuda(x_in, "gather_keep", "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor keep_idx = keep_in.contiguous(), x = unit_channel_stride(x_in);
  const int64_t Lk = keep_idx.size(1);
  at::Tensor y = at::empty({B, 1 + Lk, C}, x.options());
  const int pack = pack_width(C, x.element_size(), {&x});
  MAGE_DISPATCH_FLOATS(x.scalar_type(), "gather_keep_cuda", [&] {
    const GatherSource<scalar_t> src{rows_view<scalar_t>(x), keep_idx.const_data_ptr<int64_t>(), nullptr, L, Lk};
    launch_rows<scalar_t, false>(y, pack, nullptr, src);
  });
  return y;
}

at::Tensor scatter_keep_cuda(const at::Tensor& y_in, const at::Tensor& keep_in, c10::SymInt L_s) {
  const int64_t L = L_s.expect_int();
  check_rows_shape(y_in, "scatter_keep", "grad");
  const int64_t B = y_in.size(0), C = y_in.size(2);
  check_keep_idx_shape(keep_in, B, L, y_in.device(), "scatter_keep");
  TORCH_CHECK_VALUE(y_in.size(1) == 1 + keep_in.size(1), "scatter_keep: grad must be [B, 1+Lk, C] with Lk = ",
                    "keep_idx.size(1) = ", keep_in.size(1), ", got shape ", y_in.sizes());
  check_cuda(y_in, "scatter_keep", "grad");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor keep_idx = keep_in.contiguous(), y = unit_channel_stride(y_in);
  at::Tensor x = at::empty({B, 1 + L, C}, y.options());
  const at::Tensor src = slot_sources(keep_idx, at::Tensor(), L);
  const int pack = pack_width(C, y.element_size(), {&y});
  MAGE_DISPATCH_FLOATS(y.scalar_type(), "scatter_keep_cuda", [&] {
    const ExpandSource<scalar_t> source{rows_view<scalar_t>(y), src.const_data_ptr<int64_t>(), nullptr, false, L};
    launch_rows<scalar_t, false>(x, pack, nullptr, source);
  });
  return x;
}

at::Tensor pad_with_cls_cuda(const at::Tensor& y_in, const at::Tensor& keep_in, const at::Tensor& masked_in,
                             const std::optional<at::Tensor>& pos_embed, const std::optional<at::Tensor>& pad) {
  check_pad_with_cls_shapes(y_in, keep_in, masked_in, pos_embed, pad);
  check_cuda(y_in, "pad_with_cls", "y");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const int64_t B = y_in.size(0), C = y_in.size(2), L = masked_in.size(1);
  const at::Tensor keep_idx = keep_in.contiguous(), masked = masked_in.contiguous(), y = unit_channel_stride(y_in);
  const at::Tensor pe = pos_embed ? pos_embed->contiguous() : at::Tensor();
  const at::Tensor pd = pad ? pad->contiguous() : at::Tensor();
  at::Tensor z = at::empty({B, 1 + L, C}, y.options());
  const at::Tensor src = slot_sources(keep_idx, masked, L);
  const int pack = pack_width(C, y.element_size(), {&y, &pe, &pd});
  MAGE_DISPATCH_FLOATS(y.scalar_type(), "pad_with_cls_cuda", [&] {
    const ExpandSource<scalar_t> source{rows_view<scalar_t>(y), src.const_data_ptr<int64_t>(),
                                        pd.defined() ? pd.const_data_ptr<scalar_t>() : nullptr, true, L};
    if (pe.defined()) {
      launch_rows<scalar_t, true>(z, pack, pe.const_data_ptr<scalar_t>(), source);
    } else {
      launch_rows<scalar_t, false>(z, pack, nullptr, source);
    }
  });
  return z;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pad_with_cls_backward_cuda(const at::Tensor& gz_in,
                                                                          const at::Tensor& keep_in,
                                                                          const at::Tensor& masked_in, bool mae,
                                                                          bool pos) {
  check_pad_backward_shapes(gz_in, keep_in, masked_in);
  const int64_t B = gz_in.size(0), C = gz_in.size(2), L = masked_in.size(1);
  check_cuda(gz_in, "pad_with_cls_backward", "grad_z");
  const c10::cuda::CUDAGuard guard(gz_in.device());
  const at::Tensor keep_idx = keep_in.contiguous(), masked = masked_in.contiguous(), gz = unit_channel_stride(gz_in);
  const int64_t Lk = keep_idx.size(1);
  const auto acc_dtype = gz.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_y = at::empty({B, 1 + Lk, C}, gz.options());
  at::Tensor pad_sum = at::empty({mae ? B : 0, C}, gz.options().dtype(acc_dtype));
  at::Tensor grad_pos = at::empty({pos ? 1 + L : 0, C}, gz.options());
  if (C == 0) return {grad_y, pad_sum, grad_pos};
  const at::Tensor src = slot_sources(keep_idx, masked, L);
  const int pack = pack_width(C, gz.element_size(), {&gz});
  MAGE_DISPATCH_FLOATS(gz.scalar_type(), "pad_with_cls_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const RowsView<scalar_t> rows = rows_view<scalar_t>(gz);
    const GatherSource<scalar_t> source{rows, keep_idx.const_data_ptr<int64_t>(), masked.const_data_ptr<bool>(), L, Lk};
    launch_rows<scalar_t, false>(grad_y, pack, nullptr, source);
    const PadSumTask<scalar_t> pad_task{rows, src.const_data_ptr<int64_t>(), grad_y.data_ptr<scalar_t>(),
                                        mae ? pad_sum.data_ptr<acc_t>() : nullptr, L, Lk, C, mae};
    launch_column_sums<scalar_t>(pad_task, B, C, pack);
    if (pos) {
      const PosSumTask<scalar_t> pos_task{rows, grad_pos.data_ptr<scalar_t>(), B, C};
      launch_column_sums<scalar_t>(pos_task, 1 + L, C, pack);
    }
  });
  return {grad_y, pad_sum, grad_pos};
}

}  // namespace mage
