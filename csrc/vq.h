// Nearest-code quantization (docs/OPS.md op 1). Shapes:
//   z        (N, D) or (B, D, H, W)   read in place, any strides
//   codebook (K, D)
// Outputs: indices int64 (N) or (B, H*W), sqdist float32 of the same shape,
//          z_q like z, loss float32 scalar, counts int64 (K).
#pragma once
#include <ATen/core/Tensor.h>
#include <tuple>

namespace mage {

// Validates shapes/dtypes/devices and returns z viewed as (B, R, D) without copying.
at::Tensor vq_rows_view(const at::Tensor& z, const at::Tensor& codebook, const char* op);
// An uninitialised per-row output of z's device in `dtype`: (N) for z (N, D), (B, H*W) for z (B, D, H, W).
at::Tensor vq_index_shape_empty(const at::Tensor& z, at::ScalarType dtype);
// The dtype of sqdist and of the loss: float64 for float64 z, float32 otherwise.
at::ScalarType vq_sqdist_dtype(const at::Tensor& z);

std::tuple<at::Tensor, at::Tensor> vq_nearest_cpu(const at::Tensor& z, const at::Tensor& codebook, bool exact);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vq_quantize_cpu(const at::Tensor& z,
                                                                           const at::Tensor& codebook,
                                                                           double beta);
#ifdef MAGE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> vq_nearest_cuda(const at::Tensor& z, const at::Tensor& codebook, bool exact);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vq_quantize_cuda(const at::Tensor& z,
                                                                            const at::Tensor& codebook,
                                                                            double beta);
#endif

}  // namespace mage
