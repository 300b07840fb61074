#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace mage {
namespace {

struct Features {
  bool avx2 = false, bf16 = false;
};

Features detect() {
  Features f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  f.bf16 = f.avx2 && __builtin_cpu_supports("avx512bf16");
#endif
  return f;
}

const Features kFeatures = detect();

}  // namespace

bool cpu_has_avx2() { return kFeatures.avx2; }

CpuIsa cpu_isa_detected() {
  if (kFeatures.bf16) return CpuIsa::kAvx512Bf16;
  return kFeatures.avx2 ? CpuIsa::kAvx2 : CpuIsa::kScalar;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kScalar: return "scalar";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512Bf16: return "avx512_bf16";
  }
  return "unknown";
}

CpuIsa cpu_isa() {
  const char* env = std::getenv("MAGE_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return cpu_isa_detected();
  const std::string name(env);
  if (name == "scalar") return CpuIsa::kScalar;
  if (name == "avx512_bf16") return CpuIsa::kAvx512Bf16;  // runs everywhere (see cpu_isa.h)
  TORCH_CHECK_VALUE(name == "avx2", "MAGE_CPU_ISA must be one of auto, scalar, avx2, avx512_bf16, got '", name, "'");
  TORCH_CHECK_VALUE(kFeatures.avx2, "MAGE_CPU_ISA=avx2 asks for AVX2/FMA kernels, but this CPU lacks AVX2 or FMA; "
                    "unset MAGE_CPU_ISA or set it to scalar");
  return CpuIsa::kAvx2;
}

}  // namespace mage

// For Python (ctypes), so build_info() and benchmarks can report the path: the name of the path a call
// would take now, or "invalid" when MAGE_CPU_ISA is set to something unusable.
extern "C" const char* mage_cpu_isa() {
  try {
    return mage::cpu_isa_name(mage::cpu_isa());
  } catch (const std::exception&) {
    return "invalid";
  }
}

extern "C" const char* mage_cpu_isa_detected() { return mage::cpu_isa_name(mage::cpu_isa_detected()); }
