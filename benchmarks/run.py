"""Run every op benchmark on one device and write one CSV (the README's benchmark job).

    python benchmarks/run.py --device cpu --threads 1 2 all --rounds 9 --out benchmarks/results/cpu.csv
    python benchmarks/run.py --device cuda --out benchmarks/results/h100.csv

With several thread counts every case runs at each (the `threads` column tells them apart) and a
scaling table follows: per case, the speed-up over the fewest threads and the efficiency (speed-up
divided by the thread ratio).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import make_row, measure, stream_copy_case, time_threads_round_robin, write_csv  # noqa: E402

FAMILIES = ["bench_vq", "bench_remask", "bench_masking", "bench_sampling", "bench_vectorquantize"]


def thread_count(text: str) -> int:
    return os.cpu_count() or 1 if text == "all" else int(text)


def scaling_table(rows) -> list[str]:
    """Speed-up and efficiency of each case over its run with the fewest threads."""
    by_case: dict[tuple, dict[int, float]] = {}
    for r in rows:
        by_case.setdefault((r.op, r.provider, r.backend, r.mode, r.shape, r.dtype), {})[r.threads] = r.median_ms
    lines = []
    for key, times in by_case.items():
        base = min(times)
        cells = [f"{t}t {ms:9.3f} ms x{times[base] / ms:4.2f} eff {times[base] / ms * base / t:4.2f}"
                 for t, ms in sorted(times.items())]
        lines.append(f"{key[0]:14s} {key[1]:10s} {key[3]:16s} {key[4]:24s} {key[5]:9s} " + "  ".join(cells))
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", nargs="+", type=thread_count, default=None,
                   help="CPU thread counts, e.g. 1 2 all (default: torch's choice)")
    p.add_argument("--only", nargs="+", default=None, help="run only families whose name contains one of these")
    p.add_argument("--rounds", type=int, default=0,
                   help="CPU: time each family's cases at every thread count round-robin, this many rounds "
                        "(fair under changing load)")
    p.add_argument("--quick", action="store_true", help="small shapes, for smoke tests")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    thread_counts = sorted(set(args.threads or [torch.get_num_threads()]))
    families = [f for f in FAMILIES if not args.only or any(o in f for o in args.only)]

    def report(family_rows) -> None:
        for row in family_rows:
            rows.append(row)
            print(f"{row.op:14s} {row.provider:10s} {row.backend:9s} {row.mode:8s} {row.shape:24s} {row.dtype:9s} "
                  f"{row.threads}t {row.median_ms:9.3f} ms  {row.gbps:8.1f} GB/s  {row.tflops:6.2f} TFLOP/s  "
                  f"roofline {row.roofline_pct:5.1f}%  load {row.load:.1f}", flush=True)

    if args.rounds and args.device == "cpu":
        # Round-robin over cases and thread counts alike (common.time_threads_round_robin). A family with
        # memory-bound rows times a stream copy in the same rounds: their roofline_pct is a share of it.
        for family in families:
            cases = importlib.import_module(family).cases(args.device, quick=args.quick)
            copy = stream_copy_case() if any(c.bytes and not c.flops for c in cases) else None
            cases += [copy] if copy else []
            times = time_threads_round_robin(cases, thread_counts, args.rounds)
            for threads in thread_counts:
                torch.set_num_threads(threads)  # make_row reads the thread count
                copy_gbps = copy.bytes / (statistics.median(times[threads][-1]) * 1e-3) / 1e9 if copy else None
                report([make_row(c, args.device, t, copy_gbps) for c, t in zip(cases, times[threads])])
    else:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for family in families:
                report([measure(c, args.device) for c in importlib.import_module(family).cases(args.device, quick=args.quick)])
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"{args.device}.csv")
    write_csv(rows, out)
    print(f"wrote {len(rows)} rows to {out} (isa: {rows[0].isa if rows else '-'})")
    if args.threads and len(set(args.threads)) > 1:
        table = scaling_table(rows)
        print("\n".join(table))
        with open(os.path.splitext(out)[0] + "-scaling.txt", "w") as f:
            f.write("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
