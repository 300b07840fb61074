#include "cpu_isa.h"
#include "cpu_parallel.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace mage {
namespace {

struct Features {
  bool avx2 = false;
  bool avx512_bf16 = false;  // with the AVX-512 F/BW/DQ/VL it comes with
};

Features detect() {
  Features f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  f.avx512_bf16 = f.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#endif
  return f;
}

const Features kFeatures = detect();

}  // namespace

bool cpu_has_avx2() { return kFeatures.avx2; }

// AVX2 also on CPUs with native bf16: on a Zen 4 EPYC (AVX-512 BF16, no AMX) the int16 search took 33 ms
// where the bf16 GEMM ranking took 67-72 (vq_nearest at the benchmark shape, 2 threads), so that ranking
// is only taken when MAGE_CPU_ISA=avx512_bf16 asks for it.
CpuIsa cpu_isa_detected() { return kFeatures.avx2 ? CpuIsa::kAvx2 : CpuIsa::kScalar; }

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kScalar: return "scalar";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512Bf16: return "avx512_bf16";
  }
  return "unknown";
}

namespace {

// MAGE_CPU_ISA, validated: the path it asks for, and whether it names one (false: unset or auto).
struct Request {
  CpuIsa isa;
  bool named;
};

Request requested() {
  const char* env = std::getenv("MAGE_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return {cpu_isa_detected(), false};
  const std::string name(env);
  if (name == "scalar") return {CpuIsa::kScalar, true};
  if (name == "avx512_bf16") return {CpuIsa::kAvx512Bf16, true};  // runs everywhere (see cpu_isa.h)
  TORCH_CHECK_VALUE(name == "avx2", "MAGE_CPU_ISA must be one of auto, scalar, avx2, avx512_bf16, got '", name, "'");
  TORCH_CHECK_VALUE(kFeatures.avx2, "MAGE_CPU_ISA=avx2 asks for AVX2/FMA kernels, but this CPU lacks AVX2 or FMA; "
                    "unset MAGE_CPU_ISA or set it to scalar");
  return {CpuIsa::kAvx2, true};
}

}  // namespace

CpuIsa cpu_isa() { return requested().isa; }

bool cpu_avx2_kernels() { return cpu_isa() != CpuIsa::kScalar && kFeatures.avx2; }  // cpu_isa() validates

bool cpu_avx512_bf16_loops() {
  const Request r = requested();  // validates MAGE_CPU_ISA on every CPU
  return kFeatures.avx512_bf16 && (r.isa == CpuIsa::kAvx512Bf16 || (r.isa == CpuIsa::kAvx2 && !r.named));
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

// 1 when this call's bf16 element-wise loops take AVX-512 BF16, 0 when not, -1 when MAGE_CPU_ISA is unusable.
extern "C" int mage_cpu_avx512_bf16_loops() {
  try {
    return mage::cpu_avx512_bf16_loops() ? 1 : 0;
  } catch (const std::exception&) {
    return -1;
  }
}

// For tests (ctypes): how many threads one at::parallel_for region of this library runs on; 1 when the
// library was built without OpenMP (then every region is serial, whatever torch.set_num_threads says).
extern "C" int mage_parallel_threads() {
  std::atomic<int> calls{0};
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) { calls.fetch_add(1); });
  return calls.load();
}

// For tests (ctypes): parallel_chunks over `chunks` chunks of one index each, on up to every torch thread,
// where the first chunk stalls for `stall_ms`. Returns how many chunks the stalled thread ran (1 when the
// others take the rest while it waits; half of them under a static split), or -1 unless every chunk ran
// exactly once.
extern "C" int mage_parallel_chunks_stalled(int chunks, int stall_ms) {
  std::vector<std::atomic<int>> runs(chunks);
  std::vector<int> thread_of(chunks, -1);
  mage::parallel_chunks(
      chunks, 1,
      [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          if (k == 0) std::this_thread::sleep_for(std::chrono::milliseconds(stall_ms));
          runs[k].fetch_add(1);
          thread_of[k] = at::get_thread_num();
        }
      },
      1);
  int stalled = 0;
  for (int k = 0; k < chunks; ++k) {
    if (runs[k].load() != 1) return -1;
    stalled += thread_of[k] == thread_of[0];
  }
  return stalled;
}

// The compute limit for the benchmarks' CPU roofline (benchmarks/cpu_roofline.py), measured on the calling
// thread for about `seconds`: the fp32 FMA rate of a loop of independent FMAs in the widest vectors the
// CPU has (GFLOP/s, 2 per FMA lane).
namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Twelve independent accumulators (named: an array would live in memory) cover the FMA latency (4-5
// cycles) on two FMA pipes; the empty asm keeps the compiler from folding the loop.
#define MAGE_FMA_LOOP(V, SET1, FMA, ADD, STORE, LANES)                                                \
  const V a = SET1(1.0f), b = SET1(0.999999f);                                                         \
  V c0 = SET1(0.f), c1 = SET1(1.f), c2 = SET1(2.f), c3 = SET1(3.f), c4 = SET1(4.f), c5 = SET1(5.f);      \
  V c6 = SET1(6.f), c7 = SET1(7.f), c8 = SET1(8.f), c9 = SET1(9.f), c10 = SET1(10.f), c11 = SET1(11.f);  \
  for (int64_t i = 0; i < iters; ++i) {                                                                \
    c0 = FMA(c0, b, a), c1 = FMA(c1, b, a), c2 = FMA(c2, b, a), c3 = FMA(c3, b, a);                    \
    c4 = FMA(c4, b, a), c5 = FMA(c5, b, a), c6 = FMA(c6, b, a), c7 = FMA(c7, b, a);                    \
    c8 = FMA(c8, b, a), c9 = FMA(c9, b, a), c10 = FMA(c10, b, a), c11 = FMA(c11, b, a);                \
    __asm__ volatile("" : "+x"(c0), "+x"(c1), "+x"(c2), "+x"(c3), "+x"(c4), "+x"(c5), "+x"(c6),         \
                     "+x"(c7), "+x"(c8), "+x"(c9), "+x"(c10), "+x"(c11));                              \
  }                                                                                                    \
  const V s = ADD(ADD(ADD(ADD(c0, c1), ADD(c2, c3)), ADD(ADD(c4, c5), ADD(c6, c7))),                    \
                  ADD(ADD(c8, c9), ADD(c10, c11)));                                                    \
  float out[LANES];                                                                                    \
  STORE(out, s);                                                                                       \
  return out[0];

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) float fma_loop_avx2(int64_t iters) {
  MAGE_FMA_LOOP(__m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps, _mm256_storeu_ps, 8)
}

__attribute__((target("avx512f"))) float fma_loop_avx512(int64_t iters) {
  MAGE_FMA_LOOP(__m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps, _mm512_storeu_ps, 16)
}
#endif

// Without FMA: separate multiplies and adds on 4-lane SSE vectors (what portable code may reach).
float mul_add_loop_sse(int64_t iters) {
  typedef float v4 __attribute__((vector_size(16)));
  auto set1 = [](float x) { return v4{x, x, x, x}; };
  auto fma = [](v4 x, v4 y, v4 z) { return x * y + z; };
  auto add = [](v4 x, v4 y) { return x + y; };
  auto store = [](float* out, v4 x) { std::memcpy(out, &x, sizeof x); };
  MAGE_FMA_LOOP(v4, set1, fma, add, store, 4)
}
#undef MAGE_FMA_LOOP

}  // namespace

// Best GFLOP/s over repeated short runs (the least disturbed by other processes) of the widest FMA
// loop; *lanes receives the fp32 lanes per vector of that loop (16, 8, or 4 without FMA).
extern "C" double mage_cpu_fma_gflops(double seconds, int* lanes) {
  const int64_t iters = 20000;
  float (*loop)(int64_t) = mul_add_loop_sse;
  int w = 4;
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx512f")) {
    loop = fma_loop_avx512;
    w = 16;
  } else if (mage::cpu_has_avx2()) {
    loop = fma_loop_avx2;
    w = 8;
  }
#endif
  if (lanes) *lanes = w;
  volatile float sink = 0.0f;
  double best = 0.0;
  const double end = now_s() + seconds;
  do {
    const double t0 = now_s();
    sink = sink + loop(iters);
    const double dt = now_s() - t0;
    best = std::max(best, 12.0 * w * 2.0 * static_cast<double>(iters) / dt / 1e9);
  } while (now_s() < end);
  return best;
}
