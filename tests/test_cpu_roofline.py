"""The CPU roofline the benchmark rows carry (benchmarks/cpu_roofline.py, csrc/cpu_isa.cpp)."""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

import mage_kernels as mk

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import common  # noqa: E402
import cpu_roofline  # noqa: E402

pytestmark = pytest.mark.skipif(mk.build_info()["native"] is None, reason="needs the native library")


def test_peak_and_bandwidth_are_measured():
    one = cpu_roofline.peak_gflops(1, seconds=0.05)
    # At least 4 fp32 lanes x 2 FLOPs per cycle at 0.5 GHz; at most 16 lanes x 2 FMA units x 2 at 6 GHz.
    assert 4.0 <= one <= 16 * 2 * 2 * 6.0
    assert 0.1 < cpu_roofline.stream_gbps(1, mib=16, repeats=2) < 10_000


def test_isa_names_the_cpu_and_our_path():
    flags = cpu_roofline.cpu_flags()
    text = cpu_roofline.isa()
    if {"avx2", "fma"} <= flags:
        assert text.startswith(("avx2+fma", "avx512"))
    assert f"mage path {mk.cpu_isa()['path']}" in text


def test_rows_carry_isa_load_and_roofline():
    x = torch.ones(1 << 16)
    flops_case = common.Case("op", "mage", "cpu", "no-grad", "s", "float32", lambda: x.add(1), flops=1e6)
    bytes_case = common.Case("op", "mage", "cpu", "no-grad", "s", "float32", lambda: x.add(1), bytes=8.0 * x.numel())
    times = common.time_round_robin([flops_case, bytes_case], rounds=3)
    flops_row, bytes_row = (common.make_row(c, "cpu", t) for c, t in zip((flops_case, bytes_case), times))
    for row in (flops_row, bytes_row):
        assert row.isa == cpu_roofline.isa() and row.load >= 0 and row.roofline_pct > 0
    peak = cpu_roofline.peak_gflops(torch.get_num_threads())
    assert flops_row.roofline_pct == pytest.approx(100 * 1e6 / (flops_row.median_ms * 1e-3) / 1e9 / peak)


def test_kernels_run_parallel_regions_on_torch_threads(on_threads):
    """at::parallel_for is inline in torch's headers: a library built without OpenMP runs every region on
    one thread. Ours must follow torch.set_num_threads."""
    import ctypes

    from mage_kernels import _cpu_isa

    fn = _cpu_isa._lib().mage_parallel_threads
    fn.restype = ctypes.c_int
    assert on_threads(fn) == [1, 2]


def test_parallel_chunks_hand_out_work_dynamically(on_threads):
    """The CPU kernels split work into fixed chunks taken from a shared counter: when one thread stalls
    (on a shared machine, descheduled), the others run the rest instead of waiting for it. Under a static
    split the stalled thread would still owe half the chunks."""
    import ctypes

    from mage_kernels import _cpu_isa

    fn = _cpu_isa._lib().mage_parallel_chunks_stalled
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    assert on_threads(lambda: fn(16, 1), 1) == [16]  # one thread runs every chunk, each once
    assert on_threads(lambda: fn(16, 200), 2)[0] <= 2


def test_cuda_rows_are_computed_from_every_timed_call(monkeypatch):
    """GPU rows' median and p20/p80 come from every call do_bench timed: given `quantiles`, do_bench returns
    just those three numbers (whatever return_mode says), and p20/p80 were then quantiles of three values."""
    testing = pytest.importorskip("triton.testing")
    if not hasattr(testing, "_summarize_statistics"):
        pytest.skip("this Triton summarizes do_bench's times elsewhere")
    times = [float(t) for t in range(1, 11)]
    monkeypatch.setattr(testing, "do_bench", lambda fn, quantiles=None, return_mode="mean", **kw:
                        testing._summarize_statistics(list(times), quantiles, return_mode))
    assert common.time_cuda(lambda: None, None) == times
    assert common.time_cuda(lambda: None, lambda: None) == times


def test_run_times_a_stream_copy_beside_memory_bound_rows(tmp_path, monkeypatch):
    """run.py --rounds: a family with memory-bound rows times a stream copy in the same rounds, writes it as
    a row, and takes those rows' roofline_pct against that copy's median bandwidth; FLOP rows keep the peak."""
    import csv
    import types

    import run

    x = torch.ones(1 << 16)
    family = types.ModuleType("bench_fake")
    family.cases = lambda device, quick: [
        common.Case("mem", "mage", "cpu", "no-grad", "s", "float32", lambda: x.add(1), bytes=8.0 * x.numel()),
        common.Case("fma", "mage", "cpu", "no-grad", "s", "float32", lambda: x.add(1), flops=1e6),
    ]
    monkeypatch.setitem(sys.modules, "bench_fake", family)
    monkeypatch.setattr(run, "FAMILIES", ["bench_fake"])
    monkeypatch.setattr(common, "stream_copy_case", functools.partial(common.stream_copy_case, mib=8))
    monkeypatch.setattr(run, "stream_copy_case", common.stream_copy_case)
    out = tmp_path / "rows.csv"
    threads = torch.get_num_threads()
    try:
        run.main(["--device", "cpu", "--threads", "1", "--rounds", "3", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    rows = {r["op"]: r for r in csv.DictReader(open(out))}
    assert set(rows) == {"mem", "fma", "stream_copy"} and rows["stream_copy"]["shape"] == "8 MiB"
    copy_gbps = float(rows["stream_copy"]["gbps"])
    assert float(rows["mem"]["roofline_pct"]) == pytest.approx(100 * float(rows["mem"]["gbps"]) / copy_gbps)
    assert float(rows["stream_copy"]["roofline_pct"]) == pytest.approx(100.0)
    peak = cpu_roofline.peak_gflops(1)
    assert float(rows["fma"]["roofline_pct"]) == pytest.approx(100 * float(rows["fma"]["tflops"]) * 1e3 / peak)
