"""CPU roofline for the benchmark rows: the fp32 FMA peak and the memory bandwidth of this machine.

Peak FLOP/s is measured, not computed from a data sheet: a loop of independent FMAs in the widest vectors
the CPU has (mage_cpu_fma_gflops in csrc/cpu_isa.cpp), run on `threads` threads at once. Bandwidth is a
stream copy of 256 MiB with `threads` torch threads (read + write bytes). Both take the best of short
repeats, the figure least disturbed by other processes on a shared machine.

    python benchmarks/cpu_roofline.py --threads 1 2
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import threading
import time

import torch

from mage_kernels import _cpu_isa


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa() -> str:
    """The widest vector ISA of this CPU as /proc/cpuinfo tells it, and the path our kernels take."""
    flags = cpu_flags()
    if {"avx512f", "avx512_bf16"} <= flags:
        hw = "avx512_bf16"
    elif "avx512f" in flags:
        hw = "avx512f"
    elif {"avx2", "fma"} <= flags:
        hw = "avx2+fma"
    else:
        hw = "sse"
    info = _cpu_isa.cpu_isa()
    if info["path"] is None:
        return hw
    return f"{hw} (mage path {info['path']}{', avx512_bf16 adds' if info['avx512_bf16_loops'] else ''})"


def _lib():
    lib = _cpu_isa._lib()
    if lib is None:
        raise RuntimeError("the CPU roofline needs the native library (build mage_kernels first)")
    lib.mage_cpu_fma_gflops.restype = ctypes.c_double
    lib.mage_cpu_fma_gflops.argtypes = [ctypes.c_double, ctypes.POINTER(ctypes.c_int)]
    return lib


@functools.cache
def peak_gflops(threads: int, seconds: float = 0.3) -> float:
    """fp32 FMA peak (GFLOP/s) of `threads` cores: the loop on that many threads at once (ctypes releases
    the GIL), the sum of their best rates."""
    lib = _lib()
    results = [0.0] * threads

    def work(i: int) -> None:
        lanes = ctypes.c_int()
        results[i] = lib.mage_cpu_fma_gflops(seconds, ctypes.byref(lanes))

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(results)


@functools.cache
def stream_gbps(threads: int, mib: int = 256, repeats: int = 8) -> float:
    """Copy bandwidth (GB/s, bytes read + written) with `threads` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(mib * 2**20 // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)  # fault the pages in
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
        return 2 * src.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(before)


def roofline_pct(flops: float, nbytes: float, median_ms: float, threads: int, copy_gbps: float | None = None) -> float:
    """% of the machine's limit for this row: the FMA peak when the case counts FLOPs (compute-bound ops),
    else the copy bandwidth (memory-bound ops): `copy_gbps` where the caller timed a copy beside the row
    (run.py --rounds), else stream_gbps's best of short repeats; 0 when the case counts neither."""
    if median_ms <= 0:
        return 0.0
    if flops:
        return 100.0 * flops / (median_ms * 1e-3) / 1e9 / peak_gflops(threads)
    if nbytes:
        return 100.0 * nbytes / (median_ms * 1e-3) / 1e9 / (copy_gbps or stream_gbps(threads))
    return 0.0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    args = p.parse_args(argv)
    lanes = ctypes.c_int()
    _lib().mage_cpu_fma_gflops(0.01, ctypes.byref(lanes))
    print(f"cpu: {cpu_model()}; isa: {isa()}; fp32 lanes per FMA: {lanes.value}; "
          f"load average {os.getloadavg()}")
    for t in args.threads:
        print(f"threads {t}: fp32 FMA peak {peak_gflops(t):7.1f} GFLOP/s, stream copy {stream_gbps(t):6.1f} GB/s")


if __name__ == "__main__":
    main()
