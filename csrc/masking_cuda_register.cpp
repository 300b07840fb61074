// CUDA registrations of the masked-token ops (kernels in masking_cuda.cu, compiled only with CUDA).
#include "masking.h"

#include <torch/library.h>

namespace mage {

TORCH_LIBRARY_IMPL(mage, CUDA, m) {
  m.impl("mask_plan", &mask_plan_cuda);
  m.impl("gather_keep", &gather_keep_cuda);
  m.impl("scatter_keep", &scatter_keep_cuda);
  m.impl("pad_with_cls", &pad_with_cls_cuda);
  m.impl("pad_with_cls_backward", &pad_with_cls_backward_cuda);
}

}  // namespace mage
