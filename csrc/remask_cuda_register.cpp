// CUDA registration of the re-masking op (kernels in remask_cuda.cu; compiled only with CUDA). The fused
// head (remask_step_from_hidden) runs its Triton kernel on CUDA tensors: a tensor-core GEMM tile loop
// with the online log-sum-exp and Gumbel-max in its epilogue.
#include "remask.h"

#include <torch/library.h>

namespace mage {

TORCH_LIBRARY_IMPL(mage, CUDA, m) { m.impl("remask_step", &remask_step_cuda); }

}  // namespace mage
