// Masked-token ops (docs/OPS.md ops 2-4; docs/REFERENCE.md 4.4-4.5). Token t sits at slot t + 1, slot 0
// is the class slot; keep_idx holds ascending token positions, then -1 ("no token") as padding.
//   mask_plan             noise (B, L), num_masked / num_dropped int64 () or (B), num_kept
//                         -> masked bool (B, L), dropped bool (B, L), keep_idx int64 (B, num_kept)
//   gather_keep           x (B, 1+L, C), keep_idx (B, Lk)                 -> y (B, 1+Lk, C)
//   scatter_keep          y (B, 1+Lk, C), keep_idx (B, Lk), L              -> x (B, 1+L, C), zeros elsewhere
//   pad_with_cls          y (B, 1+Lk, C), keep_idx, masked (B, L), pos_embed (1+L, C)?, pad (C)?
//                         -> z (B, 1+L, C)
//   pad_with_cls_backward grad_z (B, 1+L, C), keep_idx, masked, mae, pos
//                         -> grad_y (B, 1+Lk, C), pad_sum fp32/fp64 (B, C) if mae else (0, C),
//                            grad_pos (1+L, C) = sum over the batch of grad_z if pos else (0, C)
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace mage {

// Shape / dtype / device checks shared by the CPU and CUDA kernels (values are checked on CPU only).
void check_mask_plan_shapes(const at::Tensor& noise, const at::Tensor& num_masked, const at::Tensor& num_dropped,
                            int64_t num_kept);
void check_keep_idx_shape(const at::Tensor& keep_idx, int64_t B, int64_t L, const at::Device& device,
                          const char* op);
void check_rows_shape(const at::Tensor& x, const char* op, const char* name);
void check_pad_with_cls_shapes(const at::Tensor& y, const at::Tensor& keep_idx, const at::Tensor& masked,
                               const std::optional<at::Tensor>& pos_embed, const std::optional<at::Tensor>& pad);
void check_pad_backward_shapes(const at::Tensor& grad_z, const at::Tensor& keep_idx, const at::Tensor& masked);

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_plan_cpu(const at::Tensor& noise, const at::Tensor& num_masked,
                                                             const at::Tensor& num_dropped, c10::SymInt num_kept);
at::Tensor gather_keep_cpu(const at::Tensor& x, const at::Tensor& keep_idx);
at::Tensor scatter_keep_cpu(const at::Tensor& y, const at::Tensor& keep_idx, c10::SymInt L);
at::Tensor pad_with_cls_cpu(const at::Tensor& y, const at::Tensor& keep_idx, const at::Tensor& masked,
                            const std::optional<at::Tensor>& pos_embed, const std::optional<at::Tensor>& pad);
std::tuple<at::Tensor, at::Tensor, at::Tensor> pad_with_cls_backward_cpu(const at::Tensor& grad_z,
                                                                         const at::Tensor& keep_idx,
                                                                         const at::Tensor& masked, bool mae, bool pos);
#ifdef MAGE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_plan_cuda(const at::Tensor& noise, const at::Tensor& num_masked,
                                                              const at::Tensor& num_dropped, c10::SymInt num_kept);
at::Tensor gather_keep_cuda(const at::Tensor& x, const at::Tensor& keep_idx);
at::Tensor scatter_keep_cuda(const at::Tensor& y, const at::Tensor& keep_idx, c10::SymInt L);
at::Tensor pad_with_cls_cuda(const at::Tensor& y, const at::Tensor& keep_idx, const at::Tensor& masked,
                             const std::optional<at::Tensor>& pos_embed, const std::optional<at::Tensor>& pad);
std::tuple<at::Tensor, at::Tensor, at::Tensor> pad_with_cls_backward_cuda(const at::Tensor& grad_z,
                                                                          const at::Tensor& keep_idx,
                                                                          const at::Tensor& masked, bool mae, bool pos);
#endif

}  // namespace mage
