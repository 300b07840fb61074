// Nearest-code quantization on CPU (DESIGN.md op 1; the tokenizer's quantizer, MAGE_REFERENCE.md 3.3).
//
// Rows of z are processed in tiles: one fp32 GEMM tile (rows x K, MKL via at::mm) gives the expanded
// distance d'(k) = |e_k|^2 - 2 z.e_k; the two smallest d' per row decide whether the fp32 winner is
// certainly the exact winner (vq_bound.h); if not, that row is re-ranked in fp64. The [N, K] distance
// matrix never exists: extra memory is one (tile x K) buffer per thread plus fp32/fp64 codebook copies.
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

constexpr int64_t kRowTile = 64;
constexpr double kFp32Roundoff = 0x1p-24;
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Codebook {
  at::Tensor f32;          // (K, D) fp32, feeds the GEMM
  at::Tensor f64;          // (K, D) fp64, for exact distances
  std::vector<float> e2;   // |e_k|^2, NaN for codes with non-finite entries (never chosen)
  double max_norm = 0.0;   // max |e_k| over finite codes
};

Codebook prepare_codebook(const at::Tensor& codebook) {
  Codebook cb;
  cb.f64 = codebook.to(at::kDouble).contiguous();
  cb.f32 = codebook.to(at::kFloat).contiguous();
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

Scan scan_row(float* dots, const float* e2, int64_t K) {
  const float best = kHasAvx2 ? expanded_min_avx2(dots, e2, K) : expanded_min_scalar(dots, e2, K);
  if (!(best < kInf)) return {kInf, -1, kInf};
  return kHasAvx2 ? locate_avx2(dots, K, best) : locate_scalar(dots, K, best);
}

double exact_sqdist(const double* z, const double* e, int64_t D) {
  double s = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double t = z[d] - e[d];
    s += t * t;
  }
  return s;
}

struct Nearest {
  int64_t index;
  double sqdist;
};

// One row: `dots` holds z.e_k (fp32, overwritten), `z` the row in fp64.
Nearest nearest_row(float* dots, const double* z, const Codebook& cb, int64_t K, int64_t D, bool exact) {
  constexpr Nearest kInvalid{-1, std::numeric_limits<double>::quiet_NaN()};
  double z2 = 0.0;
  for (int64_t d = 0; d < D; ++d) z2 += z[d] * z[d];
  if (!std::isfinite(z2)) return kInvalid;
  const Scan scan = scan_row(dots, cb.e2.data(), K);
  if (scan.index < 0) return kInvalid;  // no finite code
  const int64_t i = scan.index;
  if (!exact) return {i, std::max(0.0, static_cast<double>(scan.best) + z2)};
  const double* e = cb.f64.const_data_ptr<double>();
  const double gap = static_cast<double>(scan.second) - static_cast<double>(scan.best);
  if (gap > vq_gap_bound(D, kFp32Roundoff, std::sqrt(z2), cb.max_norm)) {
    return {i, exact_sqdist(z, e + i * D, D)};
  }
  // Near-tie in fp32: re-rank every finite code exactly.
  double best64 = std::numeric_limits<double>::infinity();
  int64_t best_k = -1;
  for (int64_t k = 0; k < K; ++k) {
    if (std::isnan(cb.e2[k])) continue;
    const double s = exact_sqdist(z, e + k * D, D);
    if (s < best64) {
      best64 = s;
      best_k = k;
    }
  }
  return {best_k, best64};
}

// Calls fn(b, r0, rows, nearest[rows], z64 rows) for every tile of rows, in parallel.
template <typename Fn>
void for_each_tile(const at::Tensor& zv, const Codebook& cb, bool exact, Fn&& fn) {
  const int64_t B = zv.size(0), R = zv.size(1), D = zv.size(2), K = cb.f32.size(0);
  const int64_t tiles_per_b = (R + kRowTile - 1) / kRowTile;
  const at::Tensor cbT = cb.f32.t();
  at::parallel_for(0, B * tiles_per_b, 1, [&](int64_t begin, int64_t end) {
    at::Tensor dots = at::empty({kRowTile, K}, cb.f32.options());
    std::vector<Nearest> out(kRowTile);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / tiles_per_b, r0 = (t % tiles_per_b) * kRowTile;
      const int64_t rows = std::min(kRowTile, R - r0);
      const at::Tensor tile = zv.select(0, b).narrow(0, r0, rows);
      const at::Tensor z64 = tile.to(at::kDouble).contiguous();
      at::Tensor d = dots.narrow(0, 0, rows);
      at::mm_out(d, tile.to(at::kFloat), cbT);
      float* dp = d.data_ptr<float>();
      const double* zp = z64.const_data_ptr<double>();
      for (int64_t r = 0; r < rows; ++r) out[r] = nearest_row(dp + r * K, zp + r * D, cb, K, D, exact);
      fn(b, r0, rows, out.data(), zp);
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
  const Codebook cb = prepare_codebook(codebook);
  const int64_t R = zv.size(1);
  int64_t* ip = indices.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(sqdist.scalar_type(), "vq_nearest_cpu", [&] {
    scalar_t* sp = sqdist.data_ptr<scalar_t>();
    for_each_tile(zv, cb, exact, [&](int64_t b, int64_t r0, int64_t rows, const Nearest* nn, const double*) {
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
  const Codebook cb = prepare_codebook(codebook);
  const at::Tensor zqv = z.dim() == 2 ? z_q.unsqueeze(0) : z_q.flatten(2).transpose(1, 2);
  const int64_t qs0 = zqv.stride(0), qs1 = zqv.stride(1), qs2 = zqv.stride(2);
  const int64_t nthreads = at::get_num_threads();
  std::vector<std::vector<int64_t>> local_counts(nthreads, std::vector<int64_t>(K, 0));
  std::vector<double> local_sums(nthreads, 0.0);
  int64_t* ip = indices.data_ptr<int64_t>();
  const double* e = cb.f64.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "vq_quantize_cpu", [&] {
    scalar_t* qp = z_q.data_ptr<scalar_t>();
    for_each_tile(zv, cb, /*exact=*/true, [&](int64_t b, int64_t r0, int64_t rows, const Nearest* nn, const double*) {
      const int tid = at::get_thread_num();
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = nn[r].index;
        ip[b * R + r0 + r] = i;
        scalar_t* q = qp + b * qs0 + (r0 + r) * qs1;
        if (i < 0) {
          for (int64_t d = 0; d < D; ++d) q[d * qs2] = static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
          local_sums[tid] += std::numeric_limits<double>::quiet_NaN();
          continue;
        }
        for (int64_t d = 0; d < D; ++d) q[d * qs2] = static_cast<scalar_t>(e[i * D + d]);
        local_counts[tid][i] += 1;
        local_sums[tid] += nn[r].sqdist;
      }
    });
  });
  int64_t* cp = counts.data_ptr<int64_t>();
  double total = 0.0;
  for (int64_t t = 0; t < nthreads; ++t) {
    total += local_sums[t];
    for (int64_t k = 0; k < K; ++k) cp[k] += local_counts[t][k];
  }
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
