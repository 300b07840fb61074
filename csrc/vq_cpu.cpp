// Nearest-code quantization on CPU (docs/OPS.md op 1; the tokenizer's quantizer, docs/REFERENCE.md 3.3).
//
// Rows of z are processed in tiles: one GEMM tile (rows x K, oneDNN/MKL via at::mm) gives the expanded
// distance d'(k) = |e_k|^2 - 2 z.e_k, then each row is decided exactly (vq_bound.h):
//  - exact, on CPUs with native bf16 dot products: a bf16 GEMM (2x the fp32 rate) ranks the codes; every
//    code within the bf16 rounding bound of the best is a candidate, and the candidates are compared in
//    fp64. The true nearest code is always among them.
//  - otherwise an fp32 GEMM; the two smallest d' decide whether the fp32 winner is certainly the exact
//    winner; if not (exact mode), the row is re-ranked in fp64.
// The [N, K] distance matrix never exists: extra memory is one (tile x K) buffer per thread plus
// copies of the codebook.
#include "checks.h"
#include "vq.h"
#include "vq_bound.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace mage {
namespace {

constexpr int64_t kRowTile = 256;
constexpr double kFp32Roundoff = 0x1p-24;
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Codebook {
  at::Tensor f32;          // (K, D) fp32, feeds the fp32 GEMM
  at::Tensor bf16;         // (K, D) bf16, feeds the bf16 GEMM (defined only when that search is used)
  at::Tensor f64;          // (K, D) fp64, for exact distances
  std::vector<float> e2;   // |e_k|^2, NaN for codes with non-finite entries (never chosen)
  double max_norm = 0.0;   // max |e_k| over finite codes
};

Codebook prepare_codebook(const at::Tensor& codebook, bool with_bf16) {
  Codebook cb;
  cb.f64 = codebook.to(at::kDouble).contiguous();
  cb.f32 = codebook.to(at::kFloat).contiguous();
  if (with_bf16) cb.bf16 = codebook.to(at::kBFloat16).contiguous();
  const int64_t K = codebook.size(0), D = codebook.size(1);
  const double* e = cb.f64.const_data_ptr<double>();
  cb.e2.resize(K);
  for (int64_t k = 0; k < K; ++k) {
    double s = 0.0;
    for (int64_t d = 0; d < D; ++d) s += e[k * D + d] * e[k * D + d];
    if (std::isfinite(s)) {
      cb.e2[k] = static_cast<float>(s);
      cb.max_norm = std::max(cb.max_norm, std::sqrt(s));
    } else {
      cb.e2[k] = std::numeric_limits<float>::quiet_NaN();
    }
  }
  return cb;
}

// Row scans over the K expanded distances. Explicit AVX2, chosen at run time (no -march flags):
// compilers do not vectorize a NaN-aware min reduction on their own.
struct Scan {
  float best;     // min_k d'(k); +inf if no code is finite
  int64_t index;  // first k with d'(k) == best, -1 if none
  float second;   // min over the other k; == best when the minimum is tied
};

// d'(k) = |e_k|^2 - 2 z.e_k written over `dots`; returns the minimum. NaN codes never win.
float expanded_min_scalar(float* dots, const float* e2, int64_t K) {
  float m = kInf;
  for (int64_t k = 0; k < K; ++k) {
    const float d = e2[k] - 2.0f * dots[k];
    dots[k] = d;
    m = d < m ? d : m;
  }
  return m;
}

Scan locate_scalar(const float* d, int64_t K, float best) {
  Scan s{best, -1, kInf};
  for (int64_t k = 0; k < K; ++k) {
    if (d[k] == best) {
      if (s.index >= 0) s.second = best;
      if (s.index < 0) s.index = k;
    } else if (d[k] < s.second) {
      s.second = d[k];
    }
  }
  return s;
}

__attribute__((target("avx2,fma"))) float hmin8(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

__attribute__((target("avx2,fma"))) float expanded_min_avx2(float* dots, const float* e2, int64_t K) {
  const __m256 two = _mm256_set1_ps(2.0f);
  __m256 m = _mm256_set1_ps(kInf);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 d = _mm256_fnmadd_ps(two, _mm256_loadu_ps(dots + k), _mm256_loadu_ps(e2 + k));
    _mm256_storeu_ps(dots + k, d);
    m = _mm256_min_ps(d, m);  // min_ps(a, b) returns b when a is NaN
  }
  float best = hmin8(m);
  for (; k < K; ++k) {
    const float d = e2[k] - 2.0f * dots[k];
    dots[k] = d;
    best = d < best ? d : best;
  }
  return best;
}

__attribute__((target("avx2,fma"))) Scan locate_avx2(const float* d, int64_t K, float best) {
  const __m256 vb = _mm256_set1_ps(best), inf = _mm256_set1_ps(kInf);
  __m256 sec = inf;
  int64_t first = -1, ties = 0, k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_loadu_ps(d + k);
    const __m256 eq = _mm256_cmp_ps(v, vb, _CMP_EQ_OQ);
    const int mask = _mm256_movemask_ps(eq);
    if (mask) {
      if (first < 0) first = k + __builtin_ctz(mask);
      ties += __builtin_popcount(mask);
    }
    sec = _mm256_min_ps(_mm256_blendv_ps(v, inf, eq), sec);
  }
  Scan s{best, first, hmin8(sec)};
  for (; k < K; ++k) {
    if (d[k] == best) {
      if (s.index < 0) s.index = k;
      ++ties;
    } else if (d[k] < s.second) {
      s.second = d[k];
    }
  }
  if (ties > 1) s.second = best;
  return s;
}

const bool kHasAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
// Without native bf16 dot products a bf16 GEMM is emulated and slower than fp32.
const bool kHasBf16 = __builtin_cpu_supports("avx512bf16");

// Indices of every d[k] <= threshold, ascending.
void collect_scalar(const float* d, int64_t K, float threshold, std::vector<int64_t>& out) {
  out.clear();
  for (int64_t k = 0; k < K; ++k) {
    if (d[k] <= threshold) out.push_back(k);
  }
}

__attribute__((target("avx2,fma"))) void collect_avx2(const float* d, int64_t K, float threshold,
                                                        std::vector<int64_t>& out) {
  out.clear();
  const __m256 t = _mm256_set1_ps(threshold);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(d + k), t, _CMP_LE_OQ));
    while (mask) {
      out.push_back(k + __builtin_ctz(mask));
      mask &= mask - 1;
    }
  }
  for (; k < K; ++k) {
    if (d[k] <= threshold) out.push_back(k);
  }
}

void collect_candidates(const float* d, int64_t K, float threshold, std::vector<int64_t>& out) {
  kHasAvx2 ? collect_avx2(d, K, threshold, out) : collect_scalar(d, K, threshold, out);
}

Scan scan_row(float* dots, const float* e2, int64_t K) {
  const float best = kHasAvx2 ? expanded_min_avx2(dots, e2, K) : expanded_min_scalar(dots, e2, K);
  if (!(best < kInf)) return {kInf, -1, kInf};
  return kHasAvx2 ? locate_avx2(dots, K, best) : locate_scalar(dots, K, best);
}

// Eight independent fp64 accumulators so the loop vectorizes (a single running sum is a serial chain of
// dependent adds); the order is fixed, so equal codes still give bit-equal distances.
__attribute__((target_clones("avx2", "default")))
double exact_sqdist(const double* z, const double* e, int64_t D) {
  double s[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    for (int j = 0; j < 8; ++j) {
      const double t = z[d + j] - e[d + j];
      s[j] += t * t;
    }
  }
  double tail = 0.0;
  for (; d < D; ++d) {
    const double t = z[d] - e[d];
    tail += t * t;
  }
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + tail;
}

struct Nearest {
  int64_t index;
  double sqdist;
};

// The exact nearest among `candidates` (ascending), ties to the lowest index.
Nearest rerank(const double* z, const Codebook& cb, const int64_t* candidates, int64_t count, int64_t D) {
  const double* e = cb.f64.const_data_ptr<double>();
  Nearest best{-1, std::numeric_limits<double>::infinity()};
  for (int64_t j = 0; j < count; ++j) {
    const int64_t k = candidates[j];
    if (std::isnan(cb.e2[k])) continue;
    const double s = exact_sqdist(z, e + k * D, D);
    if (s < best.sqdist) best = {k, s};
  }
  return best;
}

enum class Search { kFp32, kFp32Exact, kBf16Exact };

// One row: `dots` holds z.e_k (overwritten with d'), `z` the row in fp64, `scratch` a candidate buffer.
Nearest nearest_row(float* dots, const double* z, const Codebook& cb, int64_t K, int64_t D, Search search,
                    std::vector<int64_t>& scratch) {
  constexpr Nearest kInvalid{-1, std::numeric_limits<double>::quiet_NaN()};
  double z2 = 0.0;
  for (int64_t d = 0; d < D; ++d) z2 += z[d] * z[d];
  if (!std::isfinite(z2)) return kInvalid;
  const double* e = cb.f64.const_data_ptr<double>();
  if (search == Search::kBf16Exact) {
    const float best = kHasAvx2 ? expanded_min_avx2(dots, cb.e2.data(), K) : expanded_min_scalar(dots, cb.e2.data(), K);
    if (!(best < kInf)) return kInvalid;  // no finite code
    const double bound = vq_bf16_candidate_bound(D, std::sqrt(z2), cb.max_norm);
    collect_candidates(dots, K, static_cast<float>(static_cast<double>(best) + bound), scratch);
    if (scratch.size() == 1) return {scratch[0], exact_sqdist(z, e + scratch[0] * D, D)};
    return rerank(z, cb, scratch.data(), static_cast<int64_t>(scratch.size()), D);
  }
  const Scan scan = scan_row(dots, cb.e2.data(), K);
  if (scan.index < 0) return kInvalid;  // no finite code
  const int64_t i = scan.index;
  if (search == Search::kFp32) return {i, std::max(0.0, static_cast<double>(scan.best) + z2)};
  const double gap = static_cast<double>(scan.second) - static_cast<double>(scan.best);
  if (gap > vq_gap_bound(D, kFp32Roundoff, std::sqrt(z2), cb.max_norm)) {
    return {i, exact_sqdist(z, e + i * D, D)};
  }
  // Near-tie in fp32: re-rank every code exactly.
  scratch.resize(K);
  for (int64_t k = 0; k < K; ++k) scratch[k] = k;
  return rerank(z, cb, scratch.data(), K, D);
}

// Calls fn(b, r0, rows, nearest[rows]) for every chunk of rows. The GEMM of a chunk runs on all
// threads inside at::mm (oneDNN/MKL re-plan a GEMM called inside a parallel region on every call),
// then the rows of the chunk are decided in parallel.
template <typename Fn>
void for_each_chunk(const at::Tensor& zv, const Codebook& cb, Search search, Fn&& fn) {
  const int64_t B = zv.size(0), R = zv.size(1), D = zv.size(2), K = cb.f32.size(0);
  const int64_t chunk = std::clamp<int64_t>((int64_t{1} << 22) / K, kRowTile, 16 * kRowTile);
  const at::Tensor cbT = search == Search::kBf16Exact ? cb.bf16.t() : cb.f32.t();
  at::Tensor dots = at::empty({std::min(chunk, R), K}, cb.f32.options());
  std::vector<Nearest> out(std::min(chunk, R));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t r0 = 0; r0 < R; r0 += chunk) {
      const int64_t rows = std::min(chunk, R - r0);
      const at::Tensor tile = zv.select(0, b).narrow(0, r0, rows);
      const at::Tensor z64 = tile.to(at::kDouble).contiguous();
      at::Tensor d = dots.narrow(0, 0, rows);
      if (search == Search::kBf16Exact) {
        d.copy_(at::mm(tile.to(at::kBFloat16), cbT));
      } else {
        at::mm_out(d, tile.to(at::kFloat), cbT);
      }
      float* dp = d.data_ptr<float>();
      const double* zp = z64.const_data_ptr<double>();
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        std::vector<int64_t> scratch;
        for (int64_t r = begin; r < end; ++r) out[r] = nearest_row(dp + r * K, zp + r * D, cb, K, D, search, scratch);
      });
      fn(b, r0, rows, out.data());
    }
  }
}

// bf16 ranking pays off once the GEMM dominates; tiny D or K stay on the fp32 path.
Search exact_search(int64_t K, int64_t D) {
  return kHasBf16 && D >= 32 && K >= 64 ? Search::kBf16Exact : Search::kFp32Exact;
}

at::Tensor index_shape_empty(const at::Tensor& z, at::ScalarType dtype) {
  auto opts = z.options().dtype(dtype);
  return z.dim() == 2 ? at::empty({z.size(0)}, opts) : at::empty({z.size(0), z.size(2) * z.size(3)}, opts);
}

at::ScalarType sqdist_dtype(const at::Tensor& z) {
  return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

at::Tensor vq_rows_view(const at::Tensor& z, const at::Tensor& codebook, const char* op) {
  check_float(z, op, "z");
  check_float(codebook, op, "codebook");
  check_same_device(z, codebook, op, "z", "codebook");
  TORCH_CHECK_VALUE(codebook.dim() == 2, op, ": codebook must be [K, D], got shape ", codebook.sizes());
  TORCH_CHECK_VALUE(codebook.size(0) >= 1, op, ": codebook must hold at least one code (K >= 1), got shape ",
                    codebook.sizes());
  const int64_t D = codebook.size(1);
  TORCH_CHECK_VALUE(z.dim() == 2 || z.dim() == 4, op, ": z must be [N, D] or [B, D, H, W], got shape ",
                    z.sizes());
  TORCH_CHECK_VALUE(z.size(1) == D, op, ": z's channel dim must equal codebook.size(1) = ", D, ", got z shape ",
                    z.sizes());
  TORCH_CHECK_VALUE(D >= 1, op, ": code dimension D must be >= 1, got codebook shape ", codebook.sizes());
  return z.dim() == 2 ? z.unsqueeze(0) : z.flatten(2).transpose(1, 2);  // (B, R, D), a view for NCHW z
}

std::tuple<at::Tensor, at::Tensor> vq_nearest_cpu(const at::Tensor& z, const at::Tensor& codebook, bool exact) {
  const at::Tensor zv = vq_rows_view(z, codebook, "vq_nearest");
  at::Tensor indices = index_shape_empty(z, at::kLong);
  at::Tensor sqdist = index_shape_empty(z, sqdist_dtype(z));
  if (z.numel() == 0) return {indices, sqdist};
  const Search search = exact ? exact_search(codebook.size(0), codebook.size(1)) : Search::kFp32;
  const Codebook cb = prepare_codebook(codebook, search == Search::kBf16Exact);
  const int64_t R = zv.size(1);
  int64_t* ip = indices.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(sqdist.scalar_type(), "vq_nearest_cpu", [&] {
    scalar_t* sp = sqdist.data_ptr<scalar_t>();
    for_each_chunk(zv, cb, search, [&](int64_t b, int64_t r0, int64_t rows, const Nearest* nn) {
      for (int64_t r = 0; r < rows; ++r) {
        ip[b * R + r0 + r] = nn[r].index;
        sp[b * R + r0 + r] = static_cast<scalar_t>(nn[r].sqdist);
      }
    });
  });
  return {indices, sqdist};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vq_quantize_cpu(const at::Tensor& z,
                                                                           const at::Tensor& codebook,
                                                                           double beta) {
  const at::Tensor zv = vq_rows_view(z, codebook, "vq_quantize");
  const int64_t K = codebook.size(0), D = codebook.size(1), R = zv.size(1);
  at::Tensor z_q = at::empty(z.sizes(), z.options());  // contiguous in z's logical layout (NCHW stays NCHW)
  at::Tensor indices = index_shape_empty(z, at::kLong);
  at::Tensor counts = at::zeros({K}, z.options().dtype(at::kLong));
  const auto loss_dtype = sqdist_dtype(z);
  if (z.numel() == 0) {
    return {z_q, indices, at::zeros({}, z.options().dtype(loss_dtype)), counts};
  }
  const Search search = exact_search(K, D);
  const Codebook cb = prepare_codebook(codebook, search == Search::kBf16Exact);
  const at::Tensor zqv = z.dim() == 2 ? z_q.unsqueeze(0) : z_q.flatten(2).transpose(1, 2);
  const int64_t qs0 = zqv.stride(0), qs1 = zqv.stride(1), qs2 = zqv.stride(2);
  int64_t* ip = indices.data_ptr<int64_t>();
  int64_t* cp = counts.data_ptr<int64_t>();
  const double* e = cb.f64.const_data_ptr<double>();
  double total = 0.0;  // summed in row order: the loss does not depend on the thread count
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "vq_quantize_cpu", [&] {
    scalar_t* qp = z_q.data_ptr<scalar_t>();
    for_each_chunk(zv, cb, search, [&](int64_t b, int64_t r0, int64_t rows, const Nearest* nn) {
      at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t i = nn[r].index;
          scalar_t* q = qp + b * qs0 + (r0 + r) * qs1;
          for (int64_t d = 0; d < D; ++d) {
            q[d * qs2] = static_cast<scalar_t>(i < 0 ? std::numeric_limits<double>::quiet_NaN() : e[i * D + d]);
          }
        }
      });
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = nn[r].index;
        ip[b * R + r0 + r] = i;
        total += nn[r].sqdist;  // NaN for a row without a code
        if (i >= 0) cp[i] += 1;
      }
    });
  });
  // Legacy taming VectorQuantizer2: mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2); both means equal.
  const double loss = (1.0 + beta) * total / static_cast<double>(z.numel());
  at::Tensor loss_t = at::empty({}, z.options().dtype(loss_dtype));
  AT_DISPATCH_FLOATING_TYPES(loss_dtype, "vq_quantize_loss", [&] { *loss_t.data_ptr<scalar_t>() = static_cast<scalar_t>(loss); });
  return {z_q, indices, loss_t, counts};
}

TORCH_LIBRARY_IMPL(mage, CPU, m) {
  m.impl("vq_nearest", &vq_nearest_cpu);
  m.impl("vq_quantize", &vq_quantize_cpu);
}

}  // namespace mage
