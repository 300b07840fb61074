// Which instruction-set path the CPU kernels take (docs/OPS.md, Backends).
//
// Detected from the CPU at run time (the library is built without -march flags), or forced with the
// environment variable MAGE_CPU_ISA, read on every call so tests can switch it:
//   scalar       portable code only (what a CPU without AVX2 runs);
//   avx2         AVX2 + FMA kernels, no AVX-512 instruction even where the CPU has them; refused with a clear
//                error on a CPU without AVX2 + FMA;
//   avx512_bf16  as auto, but the nearest-code search ranks with a bf16 GEMM (opt-in: on the CPU with
//                native bf16 dot products we measured, a Zen 4 EPYC, it is 2x slower than the int16
//                search). The GEMM is ATen's, which emulates bf16 where the CPU lacks it, so the path runs
//                (slowly) on every CPU: that is how it is tested on machines without it.
//   auto / unset the best path for this CPU: avx2 where the CPU has AVX2 + FMA, else scalar; on a CPU with
//                AVX-512 BF16 the masking ops' bf16 adds use it (cpu_avx512_bf16_loops).
#pragma once

namespace mage {

enum class CpuIsa { kScalar = 0, kAvx2 = 1, kAvx512Bf16 = 2 };

// The path for this call: MAGE_CPU_ISA if set (validated, raising ValueError on a bad value or an ISA the
// CPU lacks), else the best the CPU supports.
CpuIsa cpu_isa();

// The path auto takes on this CPU (avx2 or scalar), ignoring MAGE_CPU_ISA.
CpuIsa cpu_isa_detected();

const char* cpu_isa_name(CpuIsa isa);

// True when the CPU executes AVX2 and FMA instructions (independent of MAGE_CPU_ISA).
bool cpu_has_avx2();

// True when this call may run AVX2 + FMA code: the path is avx2, or avx512_bf16 (which runs everywhere) on a
// CPU that has AVX2 + FMA.
bool cpu_avx2_kernels();

// True when this call's element-wise bf16 loops may use AVX-512 BF16: the CPU has it (with AVX-512 F/BW/DQ/VL)
// and MAGE_CPU_ISA is unset, auto or avx512_bf16.
bool cpu_avx512_bf16_loops();

}  // namespace mage
