"""Benchmark plumbing shared by every op family.

A family module `benchmarks/bench_<family>.py` exposes `cases(device) -> list[Case]`; `run.py` times
them and writes long-format CSV rows (Liger-Kernel style). The same modules hold pytest-benchmark
tests for CPU. Ratios are only ever taken between rows of one run on one machine.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import statistics
import subprocess
import time
from typing import Callable

import torch

import cpu_roofline


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    provider: str  # mage | eager-ref | eager-best | compile | faiss
    backend: str  # cpu | cuda | triton | reference | torch | faiss
    mode: str  # forward | backward | forward+backward | no-grad
    shape: str
    dtype: str
    fn: Callable[[], object]
    bytes: float = 0.0  # minimum bytes moved, for GB/s and % of the bandwidth roofline
    flops: float = 0.0
    setup: Callable[[], object] | None = None  # run before each timed call (e.g. zero grads), untimed


@dataclasses.dataclass
class Row:
    op: str
    provider: str
    backend: str
    mode: str
    shape: str
    dtype: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_extra_mb: float
    gbps: float
    tflops: float
    roofline_pct: float
    device: str
    isa: str  # CPU rows: the CPU's vector ISA and the path our kernels took; GPU rows: "-"
    load: float  # 1-minute load average when the row was measured (the machine may be shared)
    threads: int
    torch: str
    triton: str
    git_sha: str


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_roofline.cpu_model()} ({os.cpu_count()} cpus)"


def device_isa(device: str) -> str:
    return "-" if device == "cuda" else cpu_roofline.isa()


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "-"


# Peak memory bandwidth used for the roofline column of GPU rows (CPU rows measure theirs: cpu_roofline.py).
HBM_GBPS = {"H100": 3350.0, "H200": 4800.0}


def roofline_gbps(device: str) -> float:
    name = device_name(device)
    return next((v for k, v in HBM_GBPS.items() if k in name), 0.0)


def time_cpu(fn: Callable, setup: Callable | None, min_time: float = 0.5, max_rounds: int = 50) -> list[float]:
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_rounds):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_cuda(fn: Callable, setup: Callable | None) -> list[float]:
    """Every timed call in ms, for make_row's median and quantiles (given `quantiles`, do_bench returns
    those three numbers instead, whatever return_mode says)."""
    import triton.testing

    if setup is None:
        return triton.testing.do_bench(fn, return_mode="all")  # type: ignore[return-value]

    def call():
        setup()
        fn()

    return triton.testing.do_bench(call, return_mode="all")


def peak_extra_mb(fn: Callable, device: str) -> float:
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def time_round_robin(cases: list[Case], rounds: int) -> list[list[float]]:
    """Each round times one call of every case, so a change of machine load hits every provider alike."""
    for case in cases:
        case.fn()  # warm-up
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(rounds):
        for i, case in enumerate(cases):
            if case.setup:
                case.setup()
            t0 = time.perf_counter()
            case.fn()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return times


def time_threads_round_robin(cases: list[Case], thread_counts: list[int], rounds: int) -> dict[int, list[list[float]]]:
    """time_round_robin over every thread count too: each round times every case at every thread count, so
    a change of machine load between thread counts cannot pass for a scaling effect. {threads: times}."""
    for t in thread_counts:
        torch.set_num_threads(t)
        for case in cases:
            case.fn()  # warm-up
    times = {t: [[] for _ in cases] for t in thread_counts}
    for _ in range(rounds):
        for t in thread_counts:
            torch.set_num_threads(t)
            for i, case in enumerate(cases):
                if case.setup:
                    case.setup()
                t0 = time.perf_counter()
                case.fn()
                times[t][i].append((time.perf_counter() - t0) * 1e3)
    return times


def stream_copy_case(mib: int = 256) -> Case:
    """A copy of `mib` MiB (bytes read + written), timed among a family's cases in run.py's rounds: the
    bandwidth its memory-bound CPU rows are a share of, taken under the same load as they are (median
    against median) rather than at one moment before them."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    return Case("stream_copy", "torch", "aten", "copy", f"{mib} MiB", "float32", lambda: dst.copy_(src),
                bytes=2.0 * src.nbytes)


def make_row(case: Case, device: str, times: list[float], copy_gbps: float | None = None) -> Row:
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    median = statistics.median(times)
    gbps = case.bytes / (median * 1e-3) / 1e9 if case.bytes else 0.0
    if device == "cuda":
        roof = roofline_gbps(device)
        roofline = 100.0 * gbps / roof if roof and gbps else 0.0
    else:
        roofline = cpu_roofline.roofline_pct(case.flops, case.bytes, median, torch.get_num_threads(), copy_gbps)
    return Row(
        op=case.op, provider=case.provider, backend=case.backend, mode=case.mode, shape=case.shape,
        dtype=case.dtype, median_ms=median, p20_ms=q[1], p80_ms=q[7],
        peak_extra_mb=peak_extra_mb(case.fn, device), gbps=gbps,
        tflops=case.flops / (median * 1e-3) / 1e12 if case.flops else 0.0,
        roofline_pct=roofline, device=device_name(device), isa=device_isa(device), load=load_average(),
        threads=torch.get_num_threads(), torch=torch.__version__, triton=triton_version(), git_sha=git_sha(),
    )


def measure(case: Case, device: str) -> Row:
    times = time_cuda(case.fn, case.setup) if device == "cuda" else time_cpu(case.fn, case.setup)
    return make_row(case, device, times)


def write_csv(rows: list[Row] | list[dict], path: str) -> None:
    """Op rows (`Row`) or the end-to-end benchmarks' dict rows, columns in the first row's order."""
    dicts = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r for r in rows]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dicts[0]) if dicts else [f.name for f in dataclasses.fields(Row)])
        writer.writeheader()
        writer.writerows(dicts)
