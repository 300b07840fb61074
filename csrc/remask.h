// Confidence re-masking for iterative decoding (docs/OPS.md op 5, docs/REFERENCE.md 5). Shapes:
//   logits     (B, L, V') float32/bfloat16/float16, any strides; the first vocab_size columns are candidates
//   hidden     (B, L, C), weight (V', C), bias (V') or none   (the fused-head variant)
//   ids        (B, L) int64, mask_id marks unknown tokens
//   num_masked (B) int64, seed (2) int64 = (seed, offset)
// Outputs: sampled (B, L) int64, new_ids (B, L) int64.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <tuple>

namespace mage {

// Validates the arguments shared by both variants (mirrors mage_kernels/_checks.py).
void check_remask_args(const char* op, int64_t vocab_rows, const at::Tensor& ids, const at::Tensor& num_masked,
                       const at::Tensor& seed, int64_t mask_id, int64_t vocab_size, double temperature,
                       double choice_temperature);
void check_remask_logits(const char* op, const at::Tensor& logits, const at::Tensor& ids);
void check_remask_hidden(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& ids);

std::tuple<at::Tensor, at::Tensor> remask_step_cpu(const at::Tensor& logits, const at::Tensor& ids,
                                                   const at::Tensor& num_masked, const at::Tensor& seed,
                                                   int64_t mask_id, double choice_temperature, int64_t vocab_size,
                                                   double temperature, bool reference_ties);
std::tuple<at::Tensor, at::Tensor> remask_step_from_hidden_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& ids,
    const at::Tensor& num_masked, const at::Tensor& seed, int64_t mask_id, double choice_temperature,
    int64_t vocab_size, double temperature, bool reference_ties);
#ifdef MAGE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> remask_step_cuda(const at::Tensor& logits, const at::Tensor& ids,
                                                    const at::Tensor& num_masked, const at::Tensor& seed,
                                                    int64_t mask_id, double choice_temperature, int64_t vocab_size,
                                                    double temperature, bool reference_ties);
#endif

}  // namespace mage
