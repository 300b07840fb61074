// Launch choices of the CUDA kernels that depend on sizes and device limits, as pure host functions
// (no CUDA, no torch), so that tests can check them on a machine without a GPU
// (tests/test_cuda_plan.py compiles tests/cuda_plan_test.cpp against this header).
#pragma once
#include <algorithm>
#include <cstdint>

namespace mage::plan {

// Shared memory a block may use without opting in (cudaFuncAttributeMaxDynamicSharedMemorySize).
constexpr int64_t kDefaultSmemPerBlock = 48 << 10;

// mask_plan keeps a row's L order keys in dynamic shared memory when they fit next to the kernel's static
// shared memory within the default limit; otherwise it reads them from global memory. Returns the dynamic
// bytes to launch with, 0 for the global-memory variant.
inline int64_t mask_plan_dynamic_smem(int64_t L, int64_t key_bytes, int64_t static_smem,
                                      int64_t limit = kDefaultSmemPerBlock) {
  const int64_t keys = L * key_bytes;
  return keys > 0 && keys + static_smem <= limit ? keys : 0;
}

// vq tensor-core search: 128 rows x 128 codes per block; the z tile holds all of the (padded) D, the
// codebook streams through two 64-deep buffers; 16-bit elements, rows padded by 8 elements so that
// ldmatrix rows fall in distinct bank groups.
constexpr int64_t kTcRows = 128, kTcCodes = 128, kTcDepth = 64, kTcPad = 8;

inline int64_t vq_tc_padded_depth(int64_t D) { return (D + kTcDepth - 1) / kTcDepth * kTcDepth; }

inline int64_t vq_tc_dynamic_smem(int64_t D) {
  const int64_t Dp = vq_tc_padded_depth(D);
  const int64_t z_tile = kTcRows * (Dp + kTcPad) * 2;
  const int64_t code_buffers = 2 * kTcCodes * (kTcDepth + kTcPad) * 2;
  const int64_t e2 = 2 * kTcCodes * 4;  // double-buffered with the code tiles
  const int64_t merge = kTcRows * 12;  // one Candidates (best, second, index) per row
  return z_tile + code_buffers + e2 + merge;
}

// Whether the tensor-core search fits: static + dynamic shared memory within the opt-in limit.
inline bool vq_tc_fits(int64_t D, int64_t static_smem, int64_t optin_limit) {
  return vq_tc_dynamic_smem(D) + static_smem <= optin_limit;
}

// Split the codebook across blocks when the row tiles alone would leave SMs idle: enough splits for about
// two blocks per SM, each split at least `min_codes_per_split` codes (a multiple of the code tile), at
// most `max_splits`. Returns the codes per split (a multiple of code_tile) and the number of splits.
struct Split {
  int64_t codes_per_split;
  int64_t splits;
};

inline Split vq_split_codes(int64_t row_blocks, int64_t Kp, int64_t code_tile, int64_t num_sms,
                            int64_t min_codes_per_split = 512, int64_t max_splits = 32) {
  const int64_t tiles = std::max<int64_t>(1, Kp / code_tile);
  const int64_t want = row_blocks >= 2 * num_sms ? 1 : (2 * num_sms + row_blocks - 1) / std::max<int64_t>(row_blocks, 1);
  const int64_t by_size = std::max<int64_t>(1, Kp / std::max(min_codes_per_split, code_tile));
  const int64_t splits = std::clamp<int64_t>(std::min(want, by_size), 1, std::min(max_splits, tiles));
  const int64_t per = (tiles + splits - 1) / splits * code_tile;
  return {per, (Kp + per - 1) / per};
}

}  // namespace mage::plan
