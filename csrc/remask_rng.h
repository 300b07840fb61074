// Counter-based noise of the re-masking op (docs/OPS.md op 5), shared by the C++ and CUDA kernels and
// mirrored bit for bit by mage_kernels/reference.py (remask_token_keys, ...) and the Triton kernel:
// every 32-bit word is a lowbias32 hash of (seed, offset, row b, position l, vocab index v), so a
// (seed, offset) pair gives the same tokens on every backend, with no state and no host sync.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MAGE_RNG_HD __host__ __device__ __forceinline__
#else
#define MAGE_RNG_HD __attribute__((always_inline)) inline  // also into the CPU kernel's AVX2 clones
#endif

namespace mage::remask_rng {

constexpr uint32_t kMixC1 = 0x21F0AAADu, kMixC2 = 0xD35A2D97u, kGolden = 0x9E3779B9u;
constexpr uint32_t kSeedSalt = 0x243F6A88u, kOffsetSalt = 0x85A308D3u, kChoiceSalt = 0x6A09E667u;

// The hash on a uint32_t or on a vector of them (the CPU kernel's eight lanes).
template <class U>
MAGE_RNG_HD U mix32_lanes(U x) {
  x ^= x >> 16;
  x *= kMixC1;
  x ^= x >> 15;
  x *= kMixC2;
  return x ^ (x >> 15);
}

MAGE_RNG_HD uint32_t mix32(uint32_t x) { return mix32_lanes(x); }

// The two call keys from the (seed, offset) pair.
MAGE_RNG_HD void call_keys(int64_t seed, int64_t offset, uint32_t& k0, uint32_t& k1) {
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  k0 = mix32(mix32(static_cast<uint32_t>(s) ^ kSeedSalt) ^ static_cast<uint32_t>(s >> 32));
  k1 = mix32(mix32(static_cast<uint32_t>(o) ^ kOffsetSalt) ^ static_cast<uint32_t>(o >> 32));
}

// The stream keys (h, g) of token (b, l).
MAGE_RNG_HD void token_keys(uint32_t k0, uint32_t k1, int64_t b, int64_t l, uint32_t& h, uint32_t& g) {
  h = mix32(mix32(k0 ^ static_cast<uint32_t>(b)) + static_cast<uint32_t>(l));
  g = mix32(k1 ^ h);
}

MAGE_RNG_HD uint32_t token_word(uint32_t h, uint32_t g, uint32_t v) { return mix32((h + v * kGolden) ^ g); }

MAGE_RNG_HD uint32_t choice_word(uint32_t g) { return mix32(g + kChoiceSalt); }

// u = (top 23 bits + 1/2) / 2^23: exact in float32, in [2^-24, 1 - 2^-24], so -log(u) > 0 and -log(-log(u)) are finite.
MAGE_RNG_HD float word_to_uniform(uint32_t w) {
  return (static_cast<float>(w >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

// Natural log of a positive normal float (Cephes logf, ~1 ulp, and accurate near 1 where -log(u) is
// tiny, unlike approximate hardware logs). The CPU kernel's vector code (on eight lanes) and the Triton
// kernel use the same formula, so the backends' noise agrees to the last ulp whatever their libm.
// log_reduced is its last step, on a float or a float vector: log(x) for x = 2^e * (1 + m), with m in
// [sqrt(1/2) - 1, sqrt(2) - 1) and ef = e as a float.
template <class F>
MAGE_RNG_HD F log_reduced(F m, F ef) {
  const F z = m * m;
  F y = m * 7.0376836292e-2f - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + ef * -2.12194440e-4f - 0.5f * z;
  return m + y + ef * 0.693359375f;
}

MAGE_RNG_HD float log_pos(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  int32_t e = (bits >> 23) - 126;
  const int32_t mb = (bits & 0x7FFFFF) | 0x3F000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &mb, sizeof m);
  if (m < 0.707106781186547524f) {
    e -= 1;
    m = m + m - 1.0f;
  } else {
    m = m - 1.0f;
  }
  return log_reduced(m, static_cast<float>(e));
}

// Exp(1) and Gumbel(0, 1) noise of a hash word.
MAGE_RNG_HD float exponential(uint32_t w) { return -log_pos(word_to_uniform(w)); }
MAGE_RNG_HD float gumbel(uint32_t w) { return -log_pos(exponential(w)); }

}  // namespace mage::remask_rng
