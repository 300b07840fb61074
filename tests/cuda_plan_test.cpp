// Prints the launch choices of csrc/cuda_plan.h for tests/test_cuda_plan.py (no GPU needed).
#include "cuda_plan.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

using namespace mage::plan;

int main(int argc, char** argv) {
  // mask_plan L key_bytes static_smem -> dynamic bytes (0: global-memory variant)
  if (argc == 5 && std::strcmp(argv[1], "mask_plan") == 0) {
    std::printf("%lld\n", static_cast<long long>(mask_plan_dynamic_smem(std::atoll(argv[2]), std::atoll(argv[3]),
                                                                        std::atoll(argv[4]))));
    return 0;
  }
  // vq_tc D static_smem optin -> dynamic bytes and whether it fits
  if (argc == 5 && std::strcmp(argv[1], "vq_tc") == 0) {
    const long long D = std::atoll(argv[2]);
    std::printf("%lld %d\n", static_cast<long long>(vq_tc_dynamic_smem(D)),
                vq_tc_fits(D, std::atoll(argv[3]), std::atoll(argv[4])) ? 1 : 0);
    return 0;
  }
  // split row_blocks Kp code_tile num_sms -> codes per split, splits
  if (argc == 6 && std::strcmp(argv[1], "split") == 0) {
    const Split s = vq_split_codes(std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4]), std::atoll(argv[5]));
    std::printf("%lld %lld\n", static_cast<long long>(s.codes_per_split), static_cast<long long>(s.splits));
    return 0;
  }
  std::fprintf(stderr, "usage: cuda_plan_test mask_plan|vq_tc|split ...\n");
  return 2;
}
