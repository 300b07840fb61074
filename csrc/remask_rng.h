// Counter-based noise of the re-masking op (DESIGN.md op 5), shared by the C++ and CUDA kernels and
// mirrored bit for bit by mage_kernels/reference.py (remask_token_keys, ...) and the Triton kernel:
// every 32-bit word is a lowbias32 hash of (seed, offset, row b, position l, vocab index v), so a
// (seed, offset) pair gives the same tokens on every backend, with no state and no host sync.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MAGE_RNG_HD __host__ __device__ __forceinline__
#else
#define MAGE_RNG_HD inline
#endif

namespace mage::remask_rng {

constexpr uint32_t kMixC1 = 0x21F0AAADu, kMixC2 = 0xD35A2D97u, kGolden = 0x9E3779B9u;
constexpr uint32_t kSeedSalt = 0x243F6A88u, kOffsetSalt = 0x85A308D3u, kChoiceSalt = 0x6A09E667u;

MAGE_RNG_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMixC1;
  x ^= x >> 15;
  x *= kMixC2;
  return x ^ (x >> 15);
}

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

// u = (top 23 bits + 1/2) / 2^23: exact in float32, in [2^-24, 1 - 2^-24], so -log(-log(u)) is finite.
MAGE_RNG_HD float word_to_uniform(uint32_t w) {
  return (static_cast<float>(w >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

}  // namespace mage::remask_rng
