// Exact comparison of two squared distances |z - a|^2 and |z - b|^2 (docs/OPS.md op 1, exact=True), shared
// by the CPU kernel (csrc/vq_cpu.cpp) and the CUDA re-rank (csrc/vq_cuda.cu), so the CPU tests exercise the
// code the GPU runs.
//
// It serves the rare rows where fp64 cannot order two codes: their distances agree to within fp64
// rounding (they differ by 2^-60 at 1, or only in entries 10^-600 times the others). Every finite double
// is m 2^q with an integer m < 2^53, so in units of 2^base (base the smallest q of the entries involved)
// every |z_d - e_d| is an integer below 2^2099 and |z - e|^2 an integer below D 2^4198, summed exactly in
// fixed-size arrays of 32-bit limbs (no allocation: the caller provides the scratch, on the CPU stack or in
// CUDA shared memory). The work grows with the square of the exponent range actually used: a few limbs for
// near-ties of ordinary values.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MAGE_EXACT_HD __host__ __device__ __forceinline__
#else
#define MAGE_EXACT_HD inline
#endif

namespace mage {
namespace vq_exact {

constexpr int kDiffLimbs = 67;  // |z_d - e_d| < 2^2099 (66 limbs) and one for a carry
constexpr int kSumLimbs = 136;  // squares < 2^4198 (132 limbs), summed over D < 2^63 terms (134)

struct Scratch {
  uint32_t diff[kDiffLimbs];
  uint32_t sum_a[kSumLimbs];
  uint32_t sum_b[kSumLimbs];
};

// A bound on |s - |z - e|^2| for s summed in fp64 (any order, fused or not) from entries that were scaled
// by a power of two and may have underflowed: gamma_{D+4} s for the roundings, with gamma_n = n u / (1 - n u)
// <= n u (1 + 2 n u) for n u <= 1/2, and per entry up to 2^-1074 absolute for the underflow, so
// 2 D 2^-1074 (1 + 2 sqrt(s)) <= 6 D 2^-1074 max(1, s), with a factor 4 of safety. No division or square
// root: on the GPU those are subroutine calls, which would give the re-rank kernel a stack frame.
MAGE_EXACT_HD double fp64_distance_error(double s, int64_t D) {
  const double nu = static_cast<double>(D + 4) * 0x1p-53;
  const double gamma = nu * (1.0 + 2.0 * nu);
  return 1.01 * gamma * s + 24.0 * static_cast<double>(D) * 0x1p-1074 * (s > 1.0 ? s : 1.0);
}

MAGE_EXACT_HD uint64_t bits_of(double v) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(v));
#else
  uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
#endif
}

// |v| = m 2^q with an integer m < 2^53 (v finite; m = 0 for v = 0).
MAGE_EXACT_HD void decompose(double v, uint64_t& m, int& q) {
  const uint64_t u = bits_of(v);
  const int biased = static_cast<int>((u >> 52) & 0x7FF);
  m = u & ((uint64_t{1} << 52) - 1);
  if (biased == 0) {
    q = -1074;  // subnormal (or zero)
  } else {
    m |= uint64_t{1} << 52;
    q = biased - 1075;
  }
}

// Limb j (0, 1, 2; 0 beyond) of m 2^b, for m < 2^53 and b < 32: selects, not an indexed array, so the
// GPU keeps it in registers.
MAGE_EXACT_HD uint32_t shifted_limb(uint64_t m, int b, int j) {
  const uint64_t lo = m << b, hi = b > 0 ? m >> (64 - b) : 0;
  const uint64_t limb = j == 0 ? lo : j == 1 ? lo >> 32 : j == 2 ? hi : 0;
  return static_cast<uint32_t>(limb);
}

// x[0, n) += m 2^shift; returns the new n.
MAGE_EXACT_HD int add_shifted(uint32_t* x, int n, uint64_t m, int shift) {
  const int w = shift / 32, b = shift % 32;
  while (n < w + 3) x[n++] = 0;
  uint64_t carry = 0;
  for (int i = w; i < n; ++i) {
    const uint64_t t = static_cast<uint64_t>(x[i]) + shifted_limb(m, b, i - w) + carry;
    x[i] = static_cast<uint32_t>(t);
    carry = t >> 32;
    if (carry == 0 && i - w >= 2) break;
  }
  if (carry != 0) x[n++] = static_cast<uint32_t>(carry);
  return n;
}

// x[0, n) -= m 2^shift, the result non-negative; returns n without leading zero limbs.
MAGE_EXACT_HD int subtract_shifted(uint32_t* x, int n, uint64_t m, int shift) {
  const int w = shift / 32, b = shift % 32;
  uint64_t borrow = 0;
  for (int i = w; i < n; ++i) {
    const uint64_t yi = shifted_limb(m, b, i - w) + borrow;
    borrow = static_cast<uint64_t>(x[i]) < yi ? 1 : 0;
    x[i] = static_cast<uint32_t>(static_cast<uint64_t>(x[i]) - yi);
    if (borrow == 0 && i - w >= 2) break;
  }
  while (n > 0 && x[n - 1] == 0) --n;
  return n;
}

// out = |x - y| in units of 2^base (base <= the q of every nonzero x, y); returns its number of limbs.
MAGE_EXACT_HD int abs_difference(double x, double y, int base, uint32_t* out) {
  const double ax = x < 0 ? -x : x, ay = y < 0 ? -y : y;
  const double big = ax >= ay ? ax : ay, small = ax >= ay ? ay : ax;
  if (big == 0.0) return 0;
  uint64_t m;
  int q;
  decompose(big, m, q);
  int n = 0;
  n = add_shifted(out, n, m, q - base);
  if (small == 0.0) return n;
  decompose(small, m, q);
  const bool opposite = (x < 0) != (y < 0);  // neither is zero here
  return opposite ? add_shifted(out, n, m, q - base) : subtract_shifted(out, n, m, q - base);
}

// acc += x^2 for x[0, n) (acc has room: see kSumLimbs).
MAGE_EXACT_HD void add_square(uint32_t* acc, const uint32_t* x, int n) {
  for (int i = 0; i < n; ++i) {
    if (x[i] == 0) continue;
    uint64_t carry = 0;
    for (int j = 0; j < n; ++j) {
      const uint64_t t = static_cast<uint64_t>(x[i]) * x[j] + acc[i + j] + carry;  // < 2^64
      acc[i + j] = static_cast<uint32_t>(t);
      carry = t >> 32;
    }
    for (int k = i + n; carry != 0; ++k) {
      const uint64_t t = static_cast<uint64_t>(acc[k]) + carry;
      acc[k] = static_cast<uint32_t>(t);
      carry = t >> 32;
    }
  }
}

// min(base, q) for x = m 2^q != 0; base for x = 0.
MAGE_EXACT_HD int lower_base(double x, int base) {
  uint64_t m;
  int q;
  decompose(x, m, q);
  return x != 0.0 && q < base ? q : base;
}

// sign(|z - a|^2 - |z - b|^2), exactly, for finite values. z(d) returns the d-th entry of z as a double
// (every input dtype converts to fp64 exactly).
#if defined(__CUDACC__)
#pragma nv_exec_check_disable  // z may be a device-only accessor (the CUDA re-rank's lambda)
#endif
template <typename ZAt>
MAGE_EXACT_HD int compare_distances(const ZAt& z, const double* a, const double* b, int64_t D, Scratch& s) {
  bool same = true;
  int base = 1 << 30;  // the smallest q of the nonzero entries (some are nonzero unless a == b == z == 0)
  for (int64_t d = 0; d < D; ++d) {
    same = same && a[d] == b[d];
    base = lower_base(z(d), lower_base(a[d], lower_base(b[d], base)));
  }
  if (same) return 0;
  for (int i = 0; i < kSumLimbs; ++i) s.sum_a[i] = s.sum_b[i] = 0;
  for (int64_t d = 0; d < D; ++d) {
    const double zd = z(d);
    add_square(s.sum_a, s.diff, abs_difference(zd, a[d], base, s.diff));
    add_square(s.sum_b, s.diff, abs_difference(zd, b[d], base, s.diff));
  }
  for (int i = kSumLimbs; i-- > 0;)
    if (s.sum_a[i] != s.sum_b[i]) return s.sum_a[i] < s.sum_b[i] ? -1 : 1;
  return 0;
}

}  // namespace vq_exact
}  // namespace mage
