// Nearest-code quantization on CPU (docs/OPS.md op 1; the tokenizer's quantizer, docs/REFERENCE.md 3.3).
//
// Every row is decided exactly: a fast ranking of the K codes, a proven bound E on the ranking's error,
// and fp64 distances for the codes the bound cannot rule out.
//
// Scaled domain. Row z is scaled by a power of two s_z, the codebook by a power of two s_e, and code k
// ranks by
//     r(k) = sigma |e_k|^2 - f dot(k),    f = 2 sigma / (s_z s_e),
// where dot(k) approximates (s_z z).(s_e e_k) and sigma (a power of two) puts max_k sigma |e_k|^2 in
// [1/2, 1). So r(k) = sigma (|z - e_k|^2 - |z|^2) up to rounding, and as powers of two scale exactly, any
// finite magnitude ranks without overflow (fp32 inputs up to 3.4e38, fp64 inputs beyond the fp32 range).
//
// The ranking arithmetic depends on the CPU (cpu_isa.h):
//  - avx2: s_z z and s_e e rounded to int16 and multiplied exactly in int32 (vpmaddwd: 16 products per
//    instruction, against 8 for an fp32 FMA), in a register-blocked micro-kernel that also keeps every
//    row's running minimum and second minimum; the products never leave a per-thread block of rows.
//  - avx512_bf16: a bf16 GEMM (native bf16 dot products) over chunks of rows, then a scan of each row.
//  - scalar: the same with an fp32 GEMM.
// Decision: every code with r(k) <= min_k r(k) + 2E may be the nearest. When the second smallest r is
// above that threshold (nearly every row) the smallest is the answer; otherwise the codes within it are
// compared in fp64 (ties to the lowest index). Rows whose scale leaves the fp32 range (|z| and the codes
// more than ~2^100 apart) are compared with every code in fp64.
#include "checks.h"
#include "cpu_isa.h"
#include "vq.h"
#include "vq_bound.h"
#include "vq_exact.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace mage {
namespace {

#if defined(__x86_64__)
#define MAGE_AVX2 __attribute__((target("avx2,fma")))
#define MAGE_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline
#endif

constexpr double kU32 = 0x1p-24;  // fp32 unit round-off
constexpr float kInf = std::numeric_limits<float>::infinity();
// Absolute error of one fp32 operation whose result is subnormal or flushed to zero (FTZ/DAZ modes).
constexpr double kTiny = 0x1p-125;

// int16 ranking: |s_z z|_2 and |s_e e|_2 are kept <= kInt16Norm and every element <= 32767, so
// |sum zq eq| <= (kInt16Norm + sqrt(D) / 2)^2 < 2^31 fits the int32 accumulators (checked per row).
constexpr double kInt16Norm = 46000.0;
constexpr int kMR = 6;              // rows per micro-tile
constexpr int kNR = 16;             // codes per micro-tile (two 8-lane vectors)
constexpr int64_t kBlockRows = 48;  // rows per block of the int16 search (a multiple of kMR)
// Beyond this D the int16 resolution (the norm cap is shared by more entries) makes near-ties common.
constexpr int64_t kInt16MaxD = 4096;

// x = m 2^e with m in [1/2, 1) (x > 0).
int exponent_of(double x) {
  int e;
  std::frexp(x, &e);
  return e;
}

// |x|_2^2 = n2 4^ex without overflow or underflow: n2 = sum (x_i 2^-ex)^2 with amax 2^-ex in [1/2, 1).
struct Norm {
  bool finite = true;
  double amax = 0.0;  // max |x_i|
  double n2 = 0.0;    // 0 for a zero vector
  int ex = 0;
  double log2_sq() const { return std::log2(n2) + 2.0 * ex; }  // log2 |x|^2 (n2 > 0)
};

// x 2^t without a libm call, exact whenever the result is a normal double (two factors, so t may exceed
// the exponent range of one).
struct Pow2 {
  double a, b;
  explicit Pow2(int t) : a(std::ldexp(1.0, t / 2)), b(std::ldexp(1.0, t - t / 2)) {}
  double operator()(double x) const { return x * a * b; }
};

template <typename T>
Norm robust_norm(const T* x, int64_t n) {
  Norm r;
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    if (!std::isfinite(v)) {
      r.finite = false;
      return r;
    }
    r.amax = std::max(r.amax, std::fabs(v));
  }
  if (r.amax == 0.0) return r;
  r.ex = exponent_of(r.amax);
  const Pow2 scale(-r.ex);
  double s[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int j = 0; j < 4; ++j) {
      const double v = scale(static_cast<double>(x[i + j]));
      s[j] += v * v;
    }
  }
  for (; i < n; ++i) {
    const double v = scale(static_cast<double>(x[i]));
    s[0] += v * v;
  }
  r.n2 = (s[0] + s[1]) + (s[2] + s[3]);
  return r;
}

// The largest t with 2^t |x|_2 <= norm_cap and 2^t amax <= elem_cap (|x| > 0), from the robust norm.
int fit_exponent(const Norm& n, double norm_cap, double elem_cap) {
  int t = static_cast<int>(std::floor(std::min(std::log2(norm_cap) - 0.5 * n.log2_sq(), std::log2(elem_cap / n.amax))));
  while (std::ldexp(n.n2, 2 * (n.ex + t)) > norm_cap * norm_cap || std::ldexp(n.amax, t) > elem_cap) --t;
  return t;
}


#if defined(__x86_64__)
// One vector of entries into the running max |x| and the running mask of entries that are inf or NaN (the
// unordered compare is true for NaN).
MAGE_AVX2_INLINE void abs_max_step(const float* x, __m256& amax, __m256& bad) {
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_loadu_ps(x));
  bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, _mm256_set1_ps(kInf), _CMP_NLT_UQ));
  amax = _mm256_max_ps(amax, a);
}
MAGE_AVX2_INLINE void abs_max_step(const double* x, __m256d& amax, __m256d& bad) {
  const __m256d a = _mm256_andnot_pd(_mm256_set1_pd(-0.0), _mm256_loadu_pd(x));
  bad = _mm256_or_pd(bad, _mm256_cmp_pd(a, _mm256_set1_pd(kInf), _CMP_NLT_UQ));
  amax = _mm256_max_pd(amax, a);
}

template <typename T>
struct AbsMax {
  bool finite = true;
  T amax = 0;  // max |x_i|; meaningless when not finite
};

// The AVX2 vector of T (a member type: as a template argument __m256 would lose its attributes).
template <typename T>
struct Avx2Of;
template <>
struct Avx2Of<float> { using V = __m256; };
template <>
struct Avx2Of<double> { using V = __m256d; };

// Whether every entry of an fp32 or fp64 array is finite, and its largest magnitude, a vector at a time: the
// first scan of every row's scaling.
template <typename T>
MAGE_AVX2_INLINE AbsMax<T> abs_max_avx2(const T* x, int64_t n) {
  using V = typename Avx2Of<T>::V;
  constexpr int64_t kLanes = sizeof(V) / sizeof(T);
  V amax{}, bad{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) abs_max_step(x + i, amax, bad);
  T lanes[kLanes];
  uint64_t flags[4];
  std::memcpy(lanes, &amax, sizeof(V));
  std::memcpy(flags, &bad, sizeof(V));
  AbsMax<T> r;
  r.finite = (flags[0] | flags[1] | flags[2] | flags[3]) == 0;
  for (const T v : lanes) r.amax = std::max(r.amax, v);
  for (; i < n; ++i) {
    r.finite = r.finite && std::isfinite(x[i]);
    r.amax = std::max(r.amax, std::fabs(x[i]));
  }
  return r;
}

// robust_norm of an fp64 array, four entries at a time.
MAGE_AVX2 Norm robust_norm_f64_avx2(const double* x, int64_t n) {
  const AbsMax<double> scan = abs_max_avx2(x, n);
  Norm r;
  r.finite = scan.finite;
  r.amax = scan.amax;
  if (!r.finite || r.amax == 0.0) return r;
  r.ex = exponent_of(r.amax);
  const Pow2 p(-r.ex);
  const __m256d pa = _mm256_set1_pd(p.a), pb = _mm256_set1_pd(p.b);
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256d v0 = _mm256_mul_pd(_mm256_mul_pd(_mm256_loadu_pd(x + i), pa), pb);
    const __m256d v1 = _mm256_mul_pd(_mm256_mul_pd(_mm256_loadu_pd(x + i + 4), pa), pb);
    s0 = _mm256_fmadd_pd(v0, v0, s0);
    s1 = _mm256_fmadd_pd(v1, v1, s1);
  }
  alignas(32) double l[4];
  _mm256_store_pd(l, _mm256_add_pd(s0, s1));
  r.n2 = (l[0] + l[1]) + (l[2] + l[3]);
  for (; i < n; ++i) {
    const double v = p(x[i]);
    r.n2 += v * v;
  }
  return r;
}

// out = round(2^t x) for an fp64 array with |2^t x| <= 32767, and the exact l1, l2^2 of out.
MAGE_AVX2 void quantize_f64_avx2(const double* x, int64_t n, int t, int16_t* out, double& l1, double& l2) {
  const Pow2 p(t);
  const __m256d pa = _mm256_set1_pd(p.a), pb = _mm256_set1_pd(p.b), sign = _mm256_set1_pd(-0.0);
  __m256d a1 = _mm256_setzero_pd(), a2 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m256d q = _mm256_round_pd(_mm256_mul_pd(_mm256_mul_pd(_mm256_loadu_pd(x + i), pa), pb),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    a1 = _mm256_add_pd(a1, _mm256_andnot_pd(sign, q));
    a2 = _mm256_fmadd_pd(q, q, a2);  // exact: integers below 2^53
    const __m128i w = _mm256_cvtpd_epi32(q);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packs_epi32(w, w));
  }
  alignas(32) double l[4];
  _mm256_store_pd(l, a1);
  l1 = (l[0] + l[1]) + (l[2] + l[3]);
  _mm256_store_pd(l, a2);
  l2 = (l[0] + l[1]) + (l[2] + l[3]);
  for (; i < n; ++i) {
    const double q = std::nearbyint(p(x[i]));
    out[i] = static_cast<int16_t>(q);
    l1 += std::fabs(q);
    l2 += q * q;
  }
}
#endif

// ------------------------------------------------------------------------------------------ codebook

enum class Ranking { kInt16, kFp32, kBf16 };

struct Codebook {
  int64_t K = 0, D = 0;
  at::Tensor f64;           // (K, D) fp64, for exact distances
  std::vector<float> e2s;   // sigma |e_k|^2 in fp32; +inf for codes with a non-finite entry (never chosen)
  int log2_sigma = 0, log2_se = 0;
  double max_e2s = 0.0;     // max_k sigma |e_k|^2, < 1
  double amax = 0.0;        // max |e_ki| over finite codes
  bool any_finite = false;
  // int16 ranking: codes in panels of kNR, [Kp / kNR][Dp / 2][kNR][2], zero for padding and excluded codes.
  int64_t Kp = 0, Dp = 0;
  at::Tensor packed;
  double max_l1q = 0.0, max_l2q = 0.0;  // max_k |eq_k|_1, |eq_k|_2 of the int16 codes
  // GEMM rankings: (K, D) s_e e in fp32 or bf16, |s_e e_k|_2 <= 1.
  at::Tensor scaled;
  double max_l2s = 0.0;

  bool excluded(int64_t k) const { return std::isinf(e2s[k]); }
};

Codebook prepare_codebook(const at::Tensor& codebook, Ranking ranking) {
  Codebook cb;
  cb.K = codebook.size(0);
  cb.D = codebook.size(1);
  const int64_t K = cb.K, D = cb.D;
  cb.f64 = codebook.to(at::kDouble).contiguous();
  const double* e = cb.f64.const_data_ptr<double>();
  std::vector<Norm> norms(K);
  at::parallel_for(0, K, 64, [&](int64_t b, int64_t end) {
#if defined(__x86_64__)
    if (ranking == Ranking::kInt16) {  // only chosen on AVX2 CPUs
      for (int64_t k = b; k < end; ++k) norms[k] = robust_norm_f64_avx2(e + k * D, D);
      return;
    }
#endif
    for (int64_t k = b; k < end; ++k) norms[k] = robust_norm(e + k * D, D);
  });
  // sigma from the largest code: sigma |e|^2 = m in [1/2, 1) for |e|^2 = m 2^(en + 2 ex).
  int64_t top = -1;
  int top_exp = 0;
  double amax = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const Norm& n = norms[k];
    if (!n.finite) continue;
    cb.any_finite = true;
    amax = std::max(amax, n.amax);
    if (n.n2 == 0.0) continue;
    const int ek = exponent_of(n.n2) + 2 * n.ex;
    if (top < 0 || ek > top_exp || (ek == top_exp && std::ldexp(n.n2, -exponent_of(n.n2)) >
                                                         std::ldexp(norms[top].n2, -exponent_of(norms[top].n2)))) {
      top = k;
      top_exp = ek;
    }
  }
  cb.log2_sigma = top < 0 ? 0 : -top_exp;
  cb.amax = amax;
  const int64_t Kpad = (K + kNR - 1) / kNR * kNR;
  cb.e2s.assign(Kpad, kInf);
  for (int64_t k = 0; k < K; ++k) {
    if (!norms[k].finite) continue;
    const double v = std::ldexp(norms[k].n2, 2 * norms[k].ex + cb.log2_sigma);
    cb.e2s[k] = static_cast<float>(v);
    cb.max_e2s = std::max(cb.max_e2s, v);
  }
  if (top >= 0) {
    const Norm& n = norms[top];
    Norm whole = n;  // the largest norm, with the largest element of any code
    whole.amax = amax;
    cb.log2_se = ranking == Ranking::kInt16 ? fit_exponent(whole, kInt16Norm, 32767.0)
                                             : fit_exponent(whole, 1.0, 1.0);
  }
  if (ranking == Ranking::kInt16) {
    cb.Kp = Kpad;
    cb.Dp = (D + 3) / 4 * 4;  // whole pairs, and an even number of them (the micro-kernel does two per step)
    cb.packed = at::zeros({cb.Kp * cb.Dp}, codebook.options().dtype(at::kShort));
    int16_t* p = cb.packed.data_ptr<int16_t>();
    const int64_t Dp = cb.Dp;
    std::vector<double> l1(K, 0.0), l2(K, 0.0);
#if defined(__x86_64__)
    at::parallel_for(0, K, 64, [&](int64_t b, int64_t end) {
      std::vector<int16_t> q(Dp, 0);
      for (int64_t k = b; k < end; ++k) {
        if (!norms[k].finite) continue;
        quantize_f64_avx2(e + k * D, D, cb.log2_se, q.data(), l1[k], l2[k]);
        int16_t* panel = p + (k / kNR) * kNR * Dp + (k % kNR) * 2;
        for (int64_t j = 0; j < Dp / 2; ++j) std::memcpy(panel + j * 2 * kNR, q.data() + 2 * j, 2 * sizeof(int16_t));
      }
    });
#endif
    cb.max_l1q = *std::max_element(l1.begin(), l1.end());
    cb.max_l2q = std::sqrt(*std::max_element(l2.begin(), l2.end()));
  } else {
    at::Tensor s = at::empty({K, D}, codebook.options().dtype(at::kFloat));
    float* sp = s.data_ptr<float>();
    double max_sq = 0.0;
    const Pow2 scale(cb.log2_se);
    for (int64_t k = 0; k < K; ++k) {
      double sq = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const float v = norms[k].finite ? static_cast<float>(scale(e[k * D + d])) : 0.0f;
        sp[k * D + d] = v;
        sq += static_cast<double>(v) * v;
      }
      max_sq = std::max(max_sq, sq);
    }
    cb.max_l2s = std::sqrt(max_sq) * (1.0 + 0x1p-40);
    cb.scaled = ranking == Ranking::kBf16 ? s.to(at::kBFloat16) : s;
  }
  return cb;
}

// --------------------------------------------------------------------------------------------- rows

// Rows of z viewed as (B, R, D) with arbitrary strides (an NCHW map is read in place).
struct RowSource {
  const char* data;
  at::ScalarType dtype;
  int64_t es, sb, sr, sd;  // element size, strides in elements
};

RowSource row_source(const at::Tensor& zv) {
  return {static_cast<const char*>(zv.const_data_ptr()), zv.scalar_type(), zv.element_size(),
          zv.stride(0), zv.stride(1), zv.stride(2)};
}

template <typename T, typename Buf>
void gather_rows(const T* base, int64_t sr, int64_t sd, int64_t rows, int64_t D, Buf* out) {
  if (sd == 1) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < D; ++d) out[r * D + d] = static_cast<Buf>(base[r * sr + d]);
  } else {  // e.g. NCHW: rows are adjacent for a fixed channel
    for (int64_t d = 0; d < D; ++d)
      for (int64_t r = 0; r < rows; ++r) out[r * D + d] = static_cast<Buf>(base[r * sr + d * sd]);
  }
}

// Rows r0..r0+rows of batch b as a contiguous (rows, D) array of Buf: in place when z already is one,
// else converted into `scratch`.
template <typename Buf>
bool rows_in_place(const RowSource& src, int64_t D, int64_t rows) {
  const bool same = (std::is_same_v<Buf, float> && src.dtype == at::kFloat) ||
                    (std::is_same_v<Buf, double> && src.dtype == at::kDouble);
  return same && src.sd == 1 && (src.sr == D || rows == 1);
}

template <typename Buf>
const Buf* load_rows(const RowSource& src, int64_t b, int64_t r0, int64_t rows, int64_t D, Buf* scratch) {
  const char* base = src.data + (b * src.sb + r0 * src.sr) * src.es;
  if (rows_in_place<Buf>(src, D, rows)) return reinterpret_cast<const Buf*>(base);
  switch (src.dtype) {
    case at::kFloat: gather_rows(reinterpret_cast<const float*>(base), src.sr, src.sd, rows, D, scratch); break;
    case at::kDouble: gather_rows(reinterpret_cast<const double*>(base), src.sr, src.sd, rows, D, scratch); break;
    case at::kBFloat16: gather_rows(reinterpret_cast<const c10::BFloat16*>(base), src.sr, src.sd, rows, D, scratch); break;
    case at::kHalf: gather_rows(reinterpret_cast<const c10::Half*>(base), src.sr, src.sd, rows, D, scratch); break;
    default: TORCH_CHECK(false, "vq: unexpected dtype ", src.dtype);
  }
  return scratch;
}

// Per row: validity, the ranking factor f and the bound sigma E.
struct RowInfo {
  bool valid = false;    // every entry finite
  bool extreme = false;  // f outside the fp32 range: compare with every code in fp64
  float f = 0.0f;
  double bound = 0.0;    // sigma E
  double amax = 0.0;     // max |z_i|
};

// f = 2^log2_f, when it is a usable fp32 factor (exact products, no overflow of f dot).
bool ranking_factor(int log2_f, float& f) {
  if (log2_f < -149 || log2_f > 95) return false;
  f = std::ldexp(1.0f, log2_f);
  return true;
}

// The error terms shared by every ranking: sigma |e|^2 rounded to fp32 (after an fp64 sum of D squares),
// one rounding of r = sigma |e|^2 - f dot, and subnormal results.
double formation_bound(const Codebook& cb, double f_dot_max) {
  const double u_e2 = kU32 + static_cast<double>(cb.D + 2) * 0x1p-52;
  return (u_e2 + kU32 * (1.0 + u_e2)) * cb.max_e2s + 1.0001 * kU32 * f_dot_max + 3.0 * kTiny;
}

// The int16 row's factor and bound, from t and the exact l1 / l2^2 of its zq: the quantization
// (|z' - zq| <= 1/2 per entry, |e' - eq| likewise), the int32 -> fp32 conversion and the formation.
RowInfo int16_row_info(const Codebook& cb, int t, double l1, double l2sq, double amax) {
  RowInfo info;
  info.valid = true;
  info.amax = amax;
  if (!ranking_factor(1 + cb.log2_sigma - t - cb.log2_se, info.f)) {
    info.extreme = true;
    info.f = 0.0f;
    return info;
  }
  const double f = info.f;
  const double dot_max = std::sqrt(l2sq) * cb.max_l2q;  // >= |sum zq eq|
  const double quant = 0.5 * (cb.max_l1q + 0.5 * static_cast<double>(cb.D) + l1);
  info.bound = f * (quant + kU32 * dot_max) + formation_bound(cb, f * dot_max * (1.0 + kU32));
  return info;
}

// |sum zq eq| < 2^31 for every code: the int32 accumulators cannot overflow.
bool int16_fits(const Codebook& cb, double l2sq) { return l2sq * cb.max_l2q * cb.max_l2q < 0x1p62 * (1.0 - 0x1p-20); }

// The int16 rows' loops lower t from t0 = fit_exponent(...) until the row fits. For a finite row t0 puts every
// |z 2^t0| <= 32767 < 2^15, so at t0 - 16 every entry rounds to 0 (|zq|^2 = 0 fits): the loops end within 17
// passes. They stop there in any case: a NaN or inf that got past the row scans (which reject them first, and
// the finite sum of squares checked before fit_exponent) ends as an invalid row, never as an endless loop.
constexpr int kMaxShrink = 16;

// int16 row, any input: zq = round(2^t z) with t from fit_exponent. `zq` has cb.Dp entries (padding 0).
template <typename Buf>
RowInfo prepare_row_int16(const Buf* z, const Codebook& cb, int16_t* zq) {
  const int64_t D = cb.D;
  std::fill(zq, zq + cb.Dp, int16_t{0});
  const Norm n = robust_norm(z, D);
  if (!n.finite || !std::isfinite(n.n2)) return RowInfo{};
  if (n.amax == 0.0) return int16_row_info(cb, 0, 0.0, 0.0, 0.0);
  const int t0 = fit_exponent(n, kInt16Norm, 32767.0);
  for (int t = t0; t >= t0 - kMaxShrink; --t) {  // t drops only if the sum could overflow
    const Pow2 scale(t);
    double l1 = 0.0, l2 = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double q = std::nearbyint(scale(static_cast<double>(z[d])));
      zq[d] = static_cast<int16_t>(q);
      l1 += std::fabs(q);
      l2 += q * q;  // exact: integers below 2^53
    }
    if (int16_fits(cb, l2)) return int16_row_info(cb, t, l1, l2, n.amax);
  }
  return RowInfo{};  // only for a non-finite row (kMaxShrink)
}

// GEMM row (fp32 or bf16 ranking): z' = 2^t z with |z'|_2 <= 1, rounded to fp32 into `zs`.
template <typename Buf>
RowInfo prepare_row_gemm(const Buf* z, const Codebook& cb, bool bf16, float* zs) {
  const int64_t D = cb.D;
  RowInfo info;
  const Norm n = robust_norm(z, D);
  if (!n.finite) {
    std::fill(zs, zs + D, 0.0f);
    return info;
  }
  info.valid = true;
  info.amax = n.amax;
  const int t = n.amax > 0.0 ? fit_exponent(n, 1.0, 1.0) : 0;
  double sq = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    zs[d] = static_cast<float>(std::ldexp(static_cast<double>(z[d]), t));
    sq += static_cast<double>(zs[d]) * zs[d];
  }
  const int log2_f = 1 + cb.log2_sigma - t - cb.log2_se;
  if (!ranking_factor(log2_f, info.f)) {
    info.extreme = true;
    info.f = 0.0f;
    return info;
  }
  const double f = info.f;
  const double zn = std::sqrt(sq) * (1.0 + 0x1p-40);
  const double ze = zn * cb.max_l2s;
  const double n_ops = static_cast<double>(D + 2);
  const double gamma = n_ops * kU32 / (1.0 - n_ops * kU32);
  double dot_err;
  if (bf16) {
    // z' and e' rounded to bf16 (2 u16 + u16^2), their exact products summed in fp32 (gamma, on norms
    // grown by (1 + u16)^2), the sum rounded to bf16 (u16).
    const double u16 = 0x1p-8;
    dot_err = (3.0 * u16 + 4.0 * u16 * u16 + 2.0 * gamma + 4.0 * kU32) * ze;
  } else {  // fp64 inputs were rounded to fp32 (|z' - zs| <= u |z'|, the codes likewise)
    dot_err = (gamma + 2.0 * kU32 + kU32 * kU32) * (1.0 + 2.0 * kU32) * ze;
  }
  dot_err += 2.0 * static_cast<double>(D) * 0x1p-149;  // entries that became subnormal
  info.bound = f * dot_err + formation_bound(cb, f * (ze + dot_err));
  return info;
}

// ------------------------------------------------------------------------------------- decision

struct Nearest {
  int64_t index;
  double sqdist;
};

// min_k r(k), its first index, and the smallest r over the other codes (== best on a tie), from
// per-lane running minima (lanes hold disjoint codes, each lane in increasing k).
struct Scan {
  float best = kInf;
  int64_t index = -1;
  float second = kInf;
};

Scan finish_lanes(const float* min1, const int32_t* idx, const float* min2, int lanes) {
  Scan s;
  int lane = -1;
  for (int l = 0; l < lanes; ++l) {
    if (idx[l] < 0) continue;
    if (min1[l] < s.best || (min1[l] == s.best && idx[l] < s.index)) {
      s.best = min1[l];
      s.index = idx[l];
      lane = l;
    }
  }
  for (int l = 0; l < lanes; ++l) {
    s.second = std::min(s.second, min2[l]);
    if (l != lane) s.second = std::min(s.second, min1[l]);
  }
  return s;
}

// Eight independent fp64 accumulators so the loop vectorizes; the order is fixed, so equal codes give
// bit-equal distances.
template <typename Buf>
[[gnu::always_inline]] inline double sqdist_body(const Buf* z, const double* e, int64_t D) {
  double s[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    for (int j = 0; j < 8; ++j) {
      const double t = static_cast<double>(z[d + j]) - e[d + j];
      s[j] += t * t;
    }
  }
  double tail = 0.0;
  for (; d < D; ++d) {
    const double t = static_cast<double>(z[d]) - e[d];
    tail += t * t;
  }
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + tail;
}

// sqdist_body on z 2^-c and e 2^-c (exact scalings), for fp64 inputs whose squares would overflow or
// underflow: the result is |z - e|^2 4^-c.
template <typename Buf>
double sqdist_scaled(const Buf* z, const double* e, int64_t D, int c) {
  const Pow2 p(-c);
  double s = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double t = p(static_cast<double>(z[d])) - p(e[d]);
    s += t * t;
  }
  return s;
}

// The exponent c for sqdist_scaled: 0 (no scaling) unless an entry is beyond 2^+-300.
int distance_exponent(double row_amax, double cb_amax) {
  const double m = std::max(row_amax, cb_amax);
  if (m == 0.0 || (m <= 0x1p300 && m >= 0x1p-300)) return 0;
  return exponent_of(m);
}

// The reported distance of the chosen code: scaled by the exponent of this row and this code only, so a
// huge other code (which set the row's common scale c) does not flush a small distance to zero.
template <typename Buf>
double chosen_sqdist(const Buf* z, const double* ek, int64_t D, int c) {
  if (c == 0) return sqdist_body(z, ek, D);
  double m = 0.0;
  for (int64_t d = 0; d < D; ++d) m = std::max({m, std::fabs(static_cast<double>(z[d])), std::fabs(ek[d])});
  const int own = distance_exponent(m, 0.0);
  return own == 0 ? sqdist_body(z, ek, D) : std::ldexp(sqdist_scaled(z, ek, D, own), 2 * own);
}

// The nearest of `candidates` (ascending), ties to the lowest index: fp64 distances, each within
// gamma_{D+4} of the exact one (plus underflow), and exact arithmetic among those fp64 cannot separate.
template <typename Buf>
Nearest nearest_among(const Buf* z, const Codebook& cb, const std::vector<int64_t>& candidates, int c) {
  const int64_t D = cb.D;
  const double* e = cb.f64.const_data_ptr<double>();
  std::vector<double> s(candidates.size()), err(candidates.size());
  double top = std::numeric_limits<double>::infinity();  // min over candidates of s + err
  for (size_t j = 0; j < candidates.size(); ++j) {
    const double* ek = e + candidates[j] * D;
    s[j] = c == 0 ? sqdist_body(z, ek, D) : sqdist_scaled(z, ek, D, c);
    err[j] = vq_exact::fp64_distance_error(s[j], D);
    top = std::min(top, s[j] + err[j]);
  }
  size_t best = candidates.size();
  for (size_t j = 0; j < candidates.size(); ++j) {
    if (s[j] - err[j] > top) continue;  // certainly farther than another candidate
    if (best == candidates.size()) {
      best = j;
      continue;
    }
    int cmp;  // sign(|z - e_j|^2 - |z - e_best|^2)
    if (s[j] + err[j] < s[best] - err[best]) {
      cmp = -1;
    } else if (s[j] - err[j] > s[best] + err[best]) {
      cmp = 1;
    } else {  // fp64 cannot tell: exact integer arithmetic (csrc/vq_exact.h, shared with the CUDA re-rank)
      vq_exact::Scratch scratch;
      const auto zd = [z](int64_t d) { return static_cast<double>(z[d]); };
      cmp = vq_exact::compare_distances(zd, e + candidates[j] * D, e + candidates[best] * D, D, scratch);
    }
    if (cmp < 0) best = j;  // a tie keeps the lower index
  }
  return {candidates[best], c == 0 ? s[best] : chosen_sqdist(z, e + candidates[best] * D, D, c)};
}

// The decision for one row, given its scan and its r(k) (K values, for the rare candidate pass). Inlined
// into each search, so it compiles to the instructions of the caller's target.
template <typename Buf>
[[gnu::always_inline]] inline Nearest decide(const Buf* z, const RowInfo& info, const Scan& scan, const float* r,
                                             const Codebook& cb, bool exact) {
  constexpr Nearest kInvalid{-1, std::numeric_limits<double>::quiet_NaN()};
  const int64_t K = cb.K, D = cb.D;
  const double* e = cb.f64.const_data_ptr<double>();
  if (!info.valid || !cb.any_finite) return kInvalid;
  const int c = distance_exponent(info.amax, cb.amax);
  std::vector<int64_t> candidates;
  if (info.extreme) {  // every finite code
    for (int64_t k = 0; k < K; ++k)
      if (!cb.excluded(k)) candidates.push_back(k);
    return nearest_among(z, cb, candidates, c);
  }
  if (scan.index < 0) return kInvalid;
  const double threshold = static_cast<double>(scan.best) + 2.0 * info.bound * (1.0 + 0x1p-20);
  float t = static_cast<float>(threshold);
  if (static_cast<double>(t) < threshold) t = std::nextafter(t, kInf);
  if (!exact || !(scan.second <= t)) {
    const double* ek = e + scan.index * D;
    return {scan.index, chosen_sqdist(z, ek, D, c)};
  }
  for (int64_t k = 0; k < K; ++k)  // ascending: ties go to the lowest index
    if (r[k] <= t) candidates.push_back(k);
  return nearest_among(z, cb, candidates, c);
}

// --------------------------------------------------------------------------- int16 search (AVX2)

#if defined(__x86_64__)
struct alignas(32) LaneState {
  float min1[8];
  int32_t idx[8];
  float min2[8];
};

// Row-major int16 rows (a multiple of kMR) into micro-kernel tiles: per kMR rows, [Dp / 2][kMR] int32
// pairs, so the kernel's six broadcasts per pair read one contiguous stream.
void pack_tiles(const int16_t* zq, int64_t rows, int64_t Dp, int32_t* tiles) {
  const int64_t pairs = Dp / 2;
  for (int64_t i = 0; i < rows; i += kMR) {
    int32_t* t = tiles + i * pairs;
    for (int m = 0; m < kMR; ++m) {
      const int16_t* row = zq + (i + m) * Dp;
      for (int64_t p = 0; p < pairs; ++p) std::memcpy(t + p * kMR + m, row + 2 * p, sizeof(int32_t));
    }
  }
}

// prepare_row_int16 for fp64 rows.
MAGE_AVX2 RowInfo prepare_row_int16_f64_avx2(const double* z, const Codebook& cb, int16_t* zq) {
  std::fill(zq, zq + cb.Dp, int16_t{0});
  const Norm n = robust_norm_f64_avx2(z, cb.D);
  if (!n.finite || !std::isfinite(n.n2)) return RowInfo{};
  if (n.amax == 0.0) return int16_row_info(cb, 0, 0.0, 0.0, 0.0);
  const int t0 = fit_exponent(n, kInt16Norm, 32767.0);
  for (int t = t0; t >= t0 - kMaxShrink; --t) {
    double l1, l2;
    quantize_f64_avx2(z, cb.D, t, zq, l1, l2);
    if (int16_fits(cb, l2)) return int16_row_info(cb, t, l1, l2, n.amax);
  }
  return RowInfo{};  // only for a non-finite row (kMaxShrink)
}

// One vector of r values into a row's lane state: the running minimum, its index (the first, as codes
// arrive in increasing order per lane) and the running second minimum (== min1 on a tie).
MAGE_AVX2_INLINE void lane_update(__m256 x, __m256i k, __m256& min1, __m256& min2, __m256& idx) {
  const __m256 lt = _mm256_cmp_ps(x, min1, _CMP_LT_OQ);
  min2 = _mm256_min_ps(min2, _mm256_max_ps(x, min1));
  min1 = _mm256_min_ps(x, min1);
  idx = _mm256_blendv_ps(idx, _mm256_castsi256_ps(k), lt);
}

// prepare_row_int16 for fp32 rows with D >= 8 whose largest entry is within 2^+-100 (every other row
// takes the generic code): the same zq, l1 and l2, eight entries at a time.
MAGE_AVX2 RowInfo prepare_row_int16_avx2(const float* z, const Codebook& cb, int16_t* zq) {
  const int64_t D = cb.D;
  const AbsMax<float> scan = abs_max_avx2(z, D);
  if (!scan.finite) return RowInfo{};
  const float m = scan.amax;
  if (m == 0.0f) {
    std::fill(zq, zq + cb.Dp, int16_t{0});
    return int16_row_info(cb, 0, 0.0, 0.0, 0.0);
  }
  Norm n;
  n.amax = m;
  n.ex = exponent_of(m);
  if (n.ex < -100 || n.ex > 100) return prepare_row_int16(z, cb, zq);
  const __m256 p = _mm256_set1_ps(std::ldexp(1.0f, -n.ex));
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(z + d), p);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  double n2 = 0.0;
  for (int l = 0; l < 8; ++l) n2 += lanes[l];
  for (int64_t j = d; j < D; ++j) n2 += std::ldexp(static_cast<double>(z[j]), -n.ex) * std::ldexp(static_cast<double>(z[j]), -n.ex);
  n.n2 = n2 * (1.0 + 0x1p-16);  // fp32 sum: only an estimate, for choosing t (the int16 sums are exact)
  if (!std::isfinite(n.n2)) return RowInfo{};  // a NaN or inf the scan missed (kMaxShrink)
  const int t0 = fit_exponent(n, kInt16Norm, 32767.0);
  for (int t = t0; t >= t0 - kMaxShrink; --t) {
    const __m256 s = _mm256_set1_ps(std::ldexp(1.0f, t));  // |t| < 128 here: z 2^t is exact or rounds to 0
    __m256i l1v = _mm256_setzero_si256();
    __m256d l2a = _mm256_setzero_pd(), l2b = _mm256_setzero_pd();
    for (d = 0; d + 16 <= D; d += 16) {
      const __m256i q0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(z + d), s),
                                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      const __m256i q1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(z + d + 8), s),
                                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      const __m256i q = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(zq + d), q);
      l1v = _mm256_add_epi32(l1v, _mm256_add_epi32(_mm256_abs_epi32(q0), _mm256_abs_epi32(q1)));
      const __m256i sq = _mm256_madd_epi16(q, q);  // pairs of squares, < 2^31
      l2a = _mm256_add_pd(l2a, _mm256_cvtepi32_pd(_mm256_castsi256_si128(sq)));
      l2b = _mm256_add_pd(l2b, _mm256_cvtepi32_pd(_mm256_extracti128_si256(sq, 1)));
    }
    alignas(32) int32_t l1l[8];
    alignas(32) double l2l[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(l1l), l1v);
    _mm256_store_pd(l2l, _mm256_add_pd(l2a, l2b));
    double l1 = 0.0, l2 = (l2l[0] + l2l[1]) + (l2l[2] + l2l[3]);
    for (int l = 0; l < 8; ++l) l1 += l1l[l];
    const float sf = std::ldexp(1.0f, t);
    for (; d < D; ++d) {
      const float q = std::nearbyint(z[d] * sf);
      zq[d] = static_cast<int16_t>(q);
      l1 += std::fabs(q);
      l2 += static_cast<double>(q) * q;
    }
    for (; d < cb.Dp; ++d) zq[d] = 0;
    if (int16_fits(cb, l2)) return int16_row_info(cb, t, l1, l2, m);
  }
  return RowInfo{};  // only for a non-finite row (kMaxShrink)
}

// The int32 dot products of 6 rows with the 16 codes of a panel, over `pairs` (even) pairs of entries:
// acc[m][0..15]. The rows come packed as [pairs][6] int32 (one pair of int16 entries per row), the codes
// as [pairs][16][2] int16. Written in assembly so the twelve accumulators, the two code vectors, the
// broadcast row pair and the product stay in the 16 registers (compilers spill here). Per pair: 2 code
// loads, 6 broadcasts, 12 vpmaddwd, 12 vpaddd.
MAGE_AVX2 void micro_6x16(const int32_t* a, const int16_t* b, int64_t pairs, int32_t* acc) {
  int64_t steps = pairs / 2;
#define MAGE_ROW(off, c0, c1)                    \
  "vpbroadcastd " #off "(%[a]), %%ymm14\n\t"     \
  "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"       \
  "vpaddd %%ymm15, %%" #c0 ", %%" #c0 "\n\t"     \
  "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t"       \
  "vpaddd %%ymm15, %%" #c1 ", %%" #c1 "\n\t"
#define MAGE_PAIR(boff, a0, a1, a2, a3, a4, a5) \
  "vmovdqu " #boff "(%[b]), %%ymm12\n\t"        \
  "vmovdqu " #boff "+32(%[b]), %%ymm13\n\t"     \
  MAGE_ROW(a0, ymm0, ymm1)                      \
  MAGE_ROW(a1, ymm2, ymm3)                      \
  MAGE_ROW(a2, ymm4, ymm5)                      \
  MAGE_ROW(a3, ymm6, ymm7)                      \
  MAGE_ROW(a4, ymm8, ymm9)                      \
  MAGE_ROW(a5, ymm10, ymm11)
  __asm__ volatile(
      "vpxor %%ymm0, %%ymm0, %%ymm0\n\t"
      "vpxor %%ymm1, %%ymm1, %%ymm1\n\t"
      "vpxor %%ymm2, %%ymm2, %%ymm2\n\t"
      "vpxor %%ymm3, %%ymm3, %%ymm3\n\t"
      "vpxor %%ymm4, %%ymm4, %%ymm4\n\t"
      "vpxor %%ymm5, %%ymm5, %%ymm5\n\t"
      "vpxor %%ymm6, %%ymm6, %%ymm6\n\t"
      "vpxor %%ymm7, %%ymm7, %%ymm7\n\t"
      "vpxor %%ymm8, %%ymm8, %%ymm8\n\t"
      "vpxor %%ymm9, %%ymm9, %%ymm9\n\t"
      "vpxor %%ymm10, %%ymm10, %%ymm10\n\t"
      "vpxor %%ymm11, %%ymm11, %%ymm11\n\t"
      "test %[n], %[n]\n\t"
      "jz 2f\n\t"
      "1:\n\t"
      MAGE_PAIR(0, 0, 4, 8, 12, 16, 20)
      MAGE_PAIR(64, 24, 28, 32, 36, 40, 44)
      "add $128, %[b]\n\t"
      "add $48, %[a]\n\t"
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      "2:\n\t"
      "vmovdqa %%ymm0, (%[acc])\n\t"
      "vmovdqa %%ymm1, 32(%[acc])\n\t"
      "vmovdqa %%ymm2, 64(%[acc])\n\t"
      "vmovdqa %%ymm3, 96(%[acc])\n\t"
      "vmovdqa %%ymm4, 128(%[acc])\n\t"
      "vmovdqa %%ymm5, 160(%[acc])\n\t"
      "vmovdqa %%ymm6, 192(%[acc])\n\t"
      "vmovdqa %%ymm7, 224(%[acc])\n\t"
      "vmovdqa %%ymm8, 256(%[acc])\n\t"
      "vmovdqa %%ymm9, 288(%[acc])\n\t"
      "vmovdqa %%ymm10, 320(%[acc])\n\t"
      "vmovdqa %%ymm11, 352(%[acc])\n\t"
      : [a] "+r"(a), [b] "+r"(b), [n] "+r"(steps)
      : [acc] "r"(acc)
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
        "xmm12", "xmm13", "xmm14", "xmm15", "memory", "cc");
#undef MAGE_PAIR
#undef MAGE_ROW
}

// r(k) for a block of rows (a multiple of kMR, packed by pack_tile) against every code: writes r (rows,
// Kp) and each row's lane minima. The codebook panel (kNR codes x Dp) stays in L1 while the row tiles pass.
MAGE_AVX2 void rank_block_int16(const int32_t* tiles, int64_t rows, const Codebook& cb, const float* f, float* r,
                                LaneState* st) {
  const int64_t Dp = cb.Dp, Kp = cb.Kp;
  const int16_t* packed = cb.packed.const_data_ptr<int16_t>();
  const float* e2s = cb.e2s.data();
  for (int64_t i = 0; i < rows; ++i) {
    _mm256_store_ps(st[i].min1, _mm256_set1_ps(kInf));
    _mm256_store_si256(reinterpret_cast<__m256i*>(st[i].idx), _mm256_set1_epi32(-1));
    _mm256_store_ps(st[i].min2, _mm256_set1_ps(kInf));
  }
  alignas(32) int32_t acc[kMR][kNR];
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t k0 = 0; k0 < Kp; k0 += kNR) {
    const int16_t* panel = packed + k0 * Dp;
    const __m256 e0 = _mm256_loadu_ps(e2s + k0), e1 = _mm256_loadu_ps(e2s + k0 + 8);
    const __m256i k_0 = _mm256_add_epi32(iota, _mm256_set1_epi32(static_cast<int32_t>(k0)));
    const __m256i k_1 = _mm256_add_epi32(k_0, _mm256_set1_epi32(8));
    for (int64_t i = 0; i < rows; i += kMR) {
      micro_6x16(tiles + i * Dp / 2, panel, Dp / 2, &acc[0][0]);
      for (int m = 0; m < kMR; ++m) {
        const __m256 fv = _mm256_set1_ps(f[i + m]);
        float* rr = r + (i + m) * Kp + k0;
        LaneState& s = st[i + m];
        __m256 min1 = _mm256_load_ps(s.min1), min2 = _mm256_load_ps(s.min2);
        __m256 idx = _mm256_load_ps(reinterpret_cast<const float*>(s.idx));
        const __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(acc[m]));
        const __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(acc[m] + 8));
        const __m256 x0 = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(c0), fv, e0);  // sigma |e|^2 - f dot
        const __m256 x1 = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(c1), fv, e1);
        _mm256_storeu_ps(rr, x0);
        _mm256_storeu_ps(rr + 8, x1);
        lane_update(x0, k_0, min1, min2, idx);
        lane_update(x1, k_1, min1, min2, idx);
        _mm256_store_ps(s.min1, min1);
        _mm256_store_ps(s.min2, min2);
        _mm256_store_ps(reinterpret_cast<float*>(s.idx), idx);
      }
    }
  }
}

// Takes blocks of rows from `next` until none is left (dynamic scheduling: on a shared machine a thread
// that loses its core does not hold the others back).
template <typename Buf, typename Sink>
MAGE_AVX2 void search_blocks_int16(const RowSource& src, int64_t R, const Codebook& cb, bool exact,
                                   std::atomic<int64_t>& next, int64_t blocks, Sink& sink) {
  const int64_t D = cb.D, Dp = cb.Dp, Kp = cb.Kp;
  const int64_t blocks_per_b = (R + kBlockRows - 1) / kBlockRows;
  std::vector<Buf> scratch(kBlockRows * D);
  at::Tensor zq_t = at::empty({kBlockRows * Dp}, at::kShort);
  at::Tensor tiles_t = at::empty({kBlockRows * Dp / 2}, at::kInt);
  int32_t* tiles = tiles_t.data_ptr<int32_t>();
  at::Tensor r_t = at::empty({kBlockRows * Kp}, at::kFloat);
  int16_t* zq = zq_t.data_ptr<int16_t>();
  float* r = r_t.data_ptr<float>();
  std::vector<LaneState> st(kBlockRows);
  RowInfo info[kBlockRows];
  float f[kBlockRows];
  for (int64_t blk = next++; blk < blocks; blk = next++) {
    const int64_t b = blk / blocks_per_b, r0 = (blk % blocks_per_b) * kBlockRows;
    const int64_t rows = std::min(kBlockRows, R - r0), rows_p = (rows + kMR - 1) / kMR * kMR;
    const Buf* z = load_rows<Buf>(src, b, r0, rows, D, scratch.data());
    for (int64_t i = 0; i < rows_p; ++i) {
      if (i < rows) {
        if constexpr (std::is_same_v<Buf, float>) {
          info[i] = D >= 8 ? prepare_row_int16_avx2(z + i * D, cb, zq + i * Dp)
                           : prepare_row_int16(z + i * D, cb, zq + i * Dp);
        } else {
          info[i] = prepare_row_int16_f64_avx2(z + i * D, cb, zq + i * Dp);
        }
      } else {
        info[i] = RowInfo{};
        std::fill(zq + i * Dp, zq + (i + 1) * Dp, int16_t{0});
      }
      f[i] = info[i].f;
    }
    pack_tiles(zq, rows_p, Dp, tiles);
    rank_block_int16(tiles, rows_p, cb, f, r, st.data());
    for (int64_t i = 0; i < rows; ++i) {
      const Scan scan = finish_lanes(st[i].min1, st[i].idx, st[i].min2, 8);
      sink(b, r0 + i, decide(z + i * D, info[i], scan, r + i * Kp, cb, exact));
    }
  }
}
#endif

template <typename Buf, typename Sink>
void search_int16(const at::Tensor& zv, const Codebook& cb, bool exact, Sink& sink) {
#if defined(__x86_64__)
  const RowSource src = row_source(zv);
  const int64_t B = zv.size(0), R = zv.size(1);
  const int64_t blocks = B * ((R + kBlockRows - 1) / kBlockRows);
  // A thread per ~2^22 products at least, so small calls stay on one thread (no wake-up or spin cost).
  const int64_t work = blocks * kBlockRows * cb.Kp * cb.Dp;
  const int64_t threads = std::clamp<int64_t>(work >> 22, 1, at::get_num_threads());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    search_blocks_int16<Buf>(src, R, cb, exact, next, blocks, sink);
  });
#else
  TORCH_CHECK(false, "vq: the int16 search needs an x86-64 CPU");
#endif
}

// ------------------------------------------------------------------------------ GEMM searches

// r(k) = e2s[k] - f dots[k] over `r` in place, and the row's scan. NaN never occurs (finite inputs).
Scan scan_row_scalar(float* r, const float* e2s, float f, int64_t K) {
  float min1 = kInf, min2 = kInf;
  int32_t idx = -1;
  for (int64_t k = 0; k < K; ++k) {
    const float x = e2s[k] - r[k] * f;
    r[k] = x;
    if (x < min1) {
      min2 = min1;
      min1 = x;
      idx = static_cast<int32_t>(k);
    } else if (x < min2) {
      min2 = x;
    }
  }
  return finish_lanes(&min1, &idx, &min2, 1);
}

#if defined(__x86_64__)
MAGE_AVX2 Scan scan_row_avx2(float* r, const float* e2s, float f, int64_t K) {
  const __m256 fv = _mm256_set1_ps(f);
  __m256 min1 = _mm256_set1_ps(kInf), min2 = min1;
  __m256 idx = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  __m256i kv = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i eight = _mm256_set1_epi32(8);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8, kv = _mm256_add_epi32(kv, eight)) {
    const __m256 x = _mm256_fnmadd_ps(_mm256_loadu_ps(r + k), fv, _mm256_loadu_ps(e2s + k));
    _mm256_storeu_ps(r + k, x);
    lane_update(x, kv, min1, min2, idx);
  }
  alignas(32) LaneState s;
  _mm256_store_ps(s.min1, min1);
  _mm256_store_ps(s.min2, min2);
  _mm256_store_ps(reinterpret_cast<float*>(s.idx), idx);
  for (; k < K; ++k) {  // the tail, into lane 0 (its codes come after lane 0's)
    const float x = std::fma(-r[k], f, e2s[k]);
    r[k] = x;
    if (x < s.min1[0] || s.idx[0] < 0) {
      s.min2[0] = std::min(s.min2[0], s.min1[0]);
      s.min1[0] = x;
      s.idx[0] = static_cast<int32_t>(k);
    } else {
      s.min2[0] = std::min(s.min2[0], x);
    }
  }
  return finish_lanes(s.min1, s.idx, s.min2, 8);
}

template <typename Buf, typename Sink>
MAGE_AVX2 void decide_rows_avx2(const Buf* z, const RowInfo* info, float* dots, const Codebook& cb, bool exact,
                                int64_t b, int64_t r0, int64_t begin, int64_t end, Sink& sink) {
  const int64_t K = cb.K, D = cb.D;
  for (int64_t i = begin; i < end; ++i) {
    float* r = dots + i * K;
    const Scan scan = info[i].valid && !info[i].extreme ? scan_row_avx2(r, cb.e2s.data(), info[i].f, K) : Scan{};
    sink(b, r0 + i, decide(z + i * D, info[i], scan, r, cb, exact));
  }
}
#endif

template <typename Buf, typename Sink>
void decide_rows_scalar(const Buf* z, const RowInfo* info, float* dots, const Codebook& cb, bool exact, int64_t b,
                        int64_t r0, int64_t begin, int64_t end, Sink& sink) {
  const int64_t K = cb.K, D = cb.D;
  for (int64_t i = begin; i < end; ++i) {
    float* r = dots + i * K;
    const Scan scan = info[i].valid && !info[i].extreme ? scan_row_scalar(r, cb.e2s.data(), info[i].f, K) : Scan{};
    sink(b, r0 + i, decide(z + i * D, info[i], scan, r, cb, exact));
  }
}

// Chunks of rows: scaled rows, one GEMM over all threads (oneDNN/MKL re-plan a GEMM called inside a
// parallel region on every call), then the rows of the chunk decided in parallel.
template <typename Buf, typename Sink>
void search_gemm(const at::Tensor& zv, const Codebook& cb, bool bf16, bool exact, bool avx2, Sink& sink) {
  const RowSource src = row_source(zv);
  const int64_t B = zv.size(0), R = zv.size(1), D = cb.D, K = cb.K;
  const int64_t chunk = std::min(R, std::clamp<int64_t>((int64_t{1} << 22) / K, 256, 4096));
  const auto opts = zv.options();
  at::Tensor zs = at::empty({chunk, D}, opts.dtype(at::kFloat));
  at::Tensor dots = at::empty({chunk, K}, opts.dtype(at::kFloat));
  at::Tensor rows_t = at::empty({chunk * D}, opts.dtype(std::is_same_v<Buf, double> ? at::kDouble : at::kFloat));
  std::vector<RowInfo> info(chunk);
  const at::Tensor cbT = cb.scaled.t();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t r0 = 0; r0 < R; r0 += chunk) {
      const int64_t rows = std::min(chunk, R - r0);
      const bool in_place = rows_in_place<Buf>(src, D, rows);
      Buf* scratch = rows_t.data_ptr<Buf>();
      const Buf* z = in_place ? load_rows<Buf>(src, b, r0, rows, D, scratch) : scratch;
      at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
        if (!in_place) load_rows<Buf>(src, b, r0 + begin, end - begin, D, scratch + begin * D);
        for (int64_t i = begin; i < end; ++i)
          info[i] = prepare_row_gemm(z + i * D, cb, bf16, zs.data_ptr<float>() + i * D);
      });
      at::Tensor d = dots.narrow(0, 0, rows);
      const at::Tensor zc = zs.narrow(0, 0, rows);
      if (bf16) {
        d.copy_(at::mm(zc.to(at::kBFloat16), cbT));
      } else {
        at::mm_out(d, zc, cbT);
      }
      float* dp = d.data_ptr<float>();
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__)
        if (avx2) return decide_rows_avx2(z, info.data(), dp, cb, exact, b, r0, begin, end, sink);
#endif
        decide_rows_scalar(z, info.data(), dp, cb, exact, b, r0, begin, end, sink);
      });
    }
  }
}

// ------------------------------------------------------------------------------------ dispatch

Ranking choose_ranking(CpuIsa isa, int64_t K, int64_t D) {
  switch (isa) {
    case CpuIsa::kScalar: return Ranking::kFp32;
    case CpuIsa::kAvx2: return D <= kInt16MaxD ? Ranking::kInt16 : Ranking::kFp32;
    case CpuIsa::kAvx512Bf16:
      // bf16 ranking pays off once the GEMM dominates; tiny D or K stay on the int16 kernel.
      if (D >= 32 && K >= 64) return Ranking::kBf16;
      return cpu_has_avx2() && D <= kInt16MaxD ? Ranking::kInt16 : Ranking::kFp32;
  }
  return Ranking::kFp32;
}

// Calls sink(b, r, Nearest) once for every row (from several threads, each row once).
template <typename Sink>
void search(const at::Tensor& zv, const at::Tensor& codebook, bool exact, Sink& sink) {
  const CpuIsa isa = cpu_isa();
  const Ranking ranking = choose_ranking(isa, codebook.size(0), codebook.size(1));
  const Codebook cb = prepare_codebook(codebook, ranking);
  const bool f64 = zv.scalar_type() == at::kDouble;
  if (ranking == Ranking::kInt16) {
    f64 ? search_int16<double>(zv, cb, exact, sink) : search_int16<float>(zv, cb, exact, sink);
  } else {
    const bool bf16 = ranking == Ranking::kBf16, avx2 = isa != CpuIsa::kScalar && cpu_has_avx2();
    f64 ? search_gemm<double>(zv, cb, bf16, exact, avx2, sink) : search_gemm<float>(zv, cb, bf16, exact, avx2, sink);
  }
}

}  // namespace

at::Tensor vq_index_shape_empty(const at::Tensor& z, at::ScalarType dtype) {
  auto opts = z.options().dtype(dtype);
  return z.dim() == 2 ? at::empty({z.size(0)}, opts) : at::empty({z.size(0), z.size(2) * z.size(3)}, opts);
}

at::ScalarType vq_sqdist_dtype(const at::Tensor& z) {
  return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

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
  at::Tensor indices = vq_index_shape_empty(z, at::kLong);
  at::Tensor sqdist = vq_index_shape_empty(z, vq_sqdist_dtype(z));
  if (z.numel() == 0) return {indices, sqdist};
  const int64_t R = zv.size(1);
  int64_t* ip = indices.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(sqdist.scalar_type(), "vq_nearest_cpu", [&] {
    scalar_t* sp = sqdist.data_ptr<scalar_t>();
    auto sink = [&](int64_t b, int64_t r, const Nearest& nn) {
      ip[b * R + r] = nn.index;
      sp[b * R + r] = static_cast<scalar_t>(nn.sqdist);
    };
    search(zv, codebook, exact, sink);
  });
  return {indices, sqdist};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vq_quantize_cpu(const at::Tensor& z,
                                                                           const at::Tensor& codebook,
                                                                           double beta) {
  const at::Tensor zv = vq_rows_view(z, codebook, "vq_quantize");
  const int64_t K = codebook.size(0), D = codebook.size(1), B = zv.size(0), R = zv.size(1);
  at::Tensor z_q = at::empty(z.sizes(), z.options());  // contiguous in z's logical layout (NCHW stays NCHW)
  at::Tensor indices = vq_index_shape_empty(z, at::kLong);
  at::Tensor counts = at::zeros({K}, z.options().dtype(at::kLong));
  const auto loss_dtype = vq_sqdist_dtype(z);
  if (z.numel() == 0) {
    return {z_q, indices, at::zeros({}, z.options().dtype(loss_dtype)), counts};
  }
  const at::Tensor zqv = z.dim() == 2 ? z_q.unsqueeze(0) : z_q.flatten(2).transpose(1, 2);
  const int64_t qs0 = zqv.stride(0), qs1 = zqv.stride(1), qs2 = zqv.stride(2);
  int64_t* ip = indices.data_ptr<int64_t>();
  std::vector<double> sq(B * R);
  // The code rows come from an fp64 copy (each value rounded once to z's dtype).
  const at::Tensor e64 = codebook.to(at::kDouble).contiguous();
  const double* e = e64.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "vq_quantize_cpu", [&] {
    scalar_t* qp = z_q.data_ptr<scalar_t>();
    auto sink = [&](int64_t b, int64_t r, const Nearest& nn) {
      const int64_t i = nn.index;
      ip[b * R + r] = i;
      sq[b * R + r] = nn.sqdist;
      scalar_t* q = qp + b * qs0 + r * qs1;
      for (int64_t d = 0; d < D; ++d) {
        q[d * qs2] = static_cast<scalar_t>(i < 0 ? std::numeric_limits<double>::quiet_NaN() : e[i * D + d]);
      }
    };
    search(zv, codebook, /*exact=*/true, sink);
  });
  double total = 0.0;  // summed in row order: the loss does not depend on the thread count
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t j = 0; j < B * R; ++j) {
    total += sq[j];  // NaN for a row without a code
    if (ip[j] >= 0) cp[ip[j]] += 1;
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
