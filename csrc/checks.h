// Input checks shared by the kernels. They raise ValueError / TypeError on the Python side
// (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) and always print what was expected and what came.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace mage {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// "torch.int64", as Python prints dtypes, so C++ and Python errors read the same.
inline std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), op, ": ", name,
                   " must be float32, bfloat16, float16 or float64, got ", dtype_name(t.scalar_type()));
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na,
                              const char* nb) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", na, " and ", nb,
                    " must be on the same device, got ", a.device(), " and ", b.device());
}

}  // namespace mage
