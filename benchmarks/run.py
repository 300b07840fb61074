"""Run every op benchmark on one device and write one CSV (the README's benchmark job).

    python benchmarks/run.py --device cpu --threads 2 --out benchmarks/results/cpu.csv
    python benchmarks/run.py --device cuda --out benchmarks/results/h100.csv
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import measure, write_csv  # noqa: E402

FAMILIES = ["bench_vq", "bench_remask", "bench_masking", "bench_sampling", "bench_vectorquantize"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--only", default=None, help="run only families whose name contains this")
    p.add_argument("--quick", action="store_true", help="small shapes, for smoke tests")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for family in FAMILIES:
        if args.only and args.only not in family:
            continue
        module = importlib.import_module(family)
        for case in module.cases(args.device, quick=args.quick):
            row = measure(case, args.device)
            rows.append(row)
            print(f"{row.op:14s} {row.provider:10s} {row.backend:9s} {row.mode:8s} {row.shape:24s} {row.dtype:9s} "
                  f"{row.median_ms:9.3f} ms  {row.gbps:8.1f} GB/s  {row.tflops:6.2f} TFLOP/s", flush=True)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"{args.device}.csv")
    write_csv(rows, out)
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
