// CUDA registrations of the nearest-code ops, kept out of vq_cuda.cu so nvcc never parses torch/library.h
//. Compiled only when the CUDA kernels are built.
#include "vq.h"

#include <torch/library.h>

namespace mage {

TORCH_LIBRARY_IMPL(mage, CUDA, m) {
  m.impl("vq_nearest", &vq_nearest_cuda);
  m.impl("vq_quantize", &vq_quantize_cuda);
}

}  // namespace mage
