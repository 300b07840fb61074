// Rounding bound for the candidate search of nearest-code quantization (docs/OPS.md op 1).
//
// The fast search ranks codes by d'(k) = |e_k|^2 - 2 z.e_k computed in fp32 (GEMM / tensor cores).
// Standard dot-product error analysis (Higham, "Accuracy and Stability", eq. 3.5) bounds its error by
// gamma_n * (|e_k|^2 + 2 |z| |e_k|) with gamma_n = n u / (1 - n u), u the unit round-off of the
// arithmetic, n = D + a few operations for the input conversions and the subtraction. If the two
// smallest d' differ by more than twice that bound, the fp32 winner is the exact winner; otherwise the
// row is re-ranked in fp64. So `exact` costs a rare fallback, never a wrong index.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define MAGE_HD __host__ __device__ __forceinline__
#else
#define MAGE_HD inline
#endif

namespace mage {

// u = 2^-24 for fp32 FFMA; tensor-core paths pass the round-off of their input format (tf32: 2^-11).
MAGE_HD double vq_gap_bound(long long D, double unit_roundoff, double z_norm, double max_code_norm) {
  const double n = static_cast<double>(D + 5);
  const double gamma = n * unit_roundoff / (1.0 - n * unit_roundoff);
  // Two candidates may each be off by the bound; a factor 2 more for safety, as it only costs fallbacks.
  return 4.0 * gamma * (max_code_norm * max_code_norm + 2.0 * z_norm * max_code_norm);
}

// What fp32 underflow (gradual, or flushed to zero) adds to the gap the two best d' must exceed, when the
// values are scaled by a power of two: each d' may be off by up to 2^-126 per rounded product, converted
// input and final fma, times the magnitudes involved (z_norm and max_code_norm in the same scaled units),
// so about 2 (D + 2) 2^-126 (1 + |z| + max |e|); the same factor 4 as vq_gap_bound. Negligible unless the
// values are tiny.
MAGE_HD double vq_underflow_bound(long long D, double z_norm, double max_code_norm) {
  return 8.0 * static_cast<double>(D + 2) * 0x1p-126 * (1.0 + z_norm + max_code_norm);
}

// The CPU's bf16 search: z and e rounded to bf16 (unit round-off 2^-8 each; their products are exact in
// fp32), fp32 accumulation (gamma_n at 2^-24), the GEMM output rounded to bf16 once more, and
// d' = |e|^2 - 2 z.e formed in fp32. Every code whose d' is within this bound of the smallest d' is a
// candidate for the exact minimum; all others are certainly farther.
MAGE_HD double vq_bf16_candidate_bound(long long D, double z_norm, double max_code_norm) {
  const double u16 = 0x1p-8, u32 = 0x1p-24, n = static_cast<double>(D + 5);
  const double gamma = n * u32 / (1.0 - n * u32);
  const double zn_en = z_norm * max_code_norm;
  const double dot_err = (3.0 * u16 + u16 * u16 + gamma) * (1.0 + u16) * (1.0 + u16) * zn_en;
  const double form_err = u32 * (max_code_norm * max_code_norm + 2.0 * zn_en);
  // The best and the candidate may each be off by (2 dot_err + form_err); a factor 1.25 more for safety.
  return 2.5 * (2.0 * dot_err + form_err);
}

}  // namespace mage
