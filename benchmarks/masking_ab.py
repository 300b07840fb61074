"""A/B of two builds of the CPU masking ops at B=64, L=256, C=768 (issue 14), each build in its own processes.

Give two source trees, each with its library built in place (`-DMAGE_INPLACE=ON`), e.g. the main branch
checked out elsewhere and this one. Processes alternate between the builds (A, B, A, B, ...); each times
gather_keep (forward and its backward, scatter_keep) and pad_with_cls (forward with pos_embed, backward with
the positional gradient) in fp32 and bf16 on 1 and 2 threads, round-robin, reading a 64 MiB buffer before
every call so that the inputs are not in the 32 MiB L3 (as in the full benchmark, where other providers run
in between). % = share of the stream-copy bandwidth (minimum bytes moved, as bench_masking.py): the median
time of all of a build's calls against the median of the bandwidths that every process measured, so that A
and B share one denominator.

    python benchmarks/masking_ab.py /path/to/main /path/to/branch --processes 3 --rounds 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(rounds: int) -> None:
    import torch

    import cpu_roofline
    import mage_kernels as mk

    B, L, C = 64, 256, 768
    M, D = 180 * L // 256, L // 2
    Lk = L - D
    g = torch.Generator().manual_seed(0)
    masked, _, keep = mk.mask_plan(torch.rand(B, L, generator=g), M, D)
    cases = {}
    for dn in ("float32", "bfloat16"):
        dt = getattr(torch, dn)
        es = torch.empty((), dtype=dt).element_size()
        x = torch.randn(B, 1 + L, C, generator=g).to(dt)
        y = torch.randn(B, 1 + Lk, C, generator=g).to(dt)
        gy = torch.randn(B, 1 + Lk, C, generator=g).to(dt)
        gz = torch.randn(B, 1 + L, C, generator=g).to(dt)
        pos = torch.randn(1 + L, C, generator=g).to(dt)
        pad_bytes = (B * (1 + Lk) + B * (1 + L) + (1 + L)) * C * es
        gather_bytes = 2 * B * (1 + Lk) * C * es
        cases[f"gather_keep forward {dn}"] = (lambda x=x: mk.gather_keep(x, keep), gather_bytes)
        cases[f"gather_keep backward {dn}"] = (lambda gy=gy: torch.ops.mage.scatter_keep(gy, keep, L),
                                               gather_bytes + B * (L - Lk) * C * es)
        cases[f"pad_with_cls forward {dn}"] = (lambda y=y, pos=pos: mk.pad_with_cls(y, keep, masked, pos_embed=pos),
                                               pad_bytes)
        cases[f"pad_with_cls backward {dn}"] = (
            lambda gz=gz: torch.ops.mage.pad_with_cls_backward(gz, keep, masked, False, True), pad_bytes)
    flush = torch.zeros(16 << 20)
    bw = {t: cpu_roofline.stream_gbps(t) for t in (1, 2)}
    times = {f"{k}|{t}": [] for k in cases for t in (1, 2)}
    for fn, _ in cases.values():
        fn()
    for _ in range(rounds):
        for t in (1, 2):
            torch.set_num_threads(t)
            for k, (fn, _) in cases.items():
                flush.sum()
                t0 = time.perf_counter()
                fn()
                times[f"{k}|{t}"].append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"bw": bw, "bytes": {k: nb for k, (_, nb) in cases.items()}, "times": times,
                      "load": os.getloadavg()[0]}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("builds", nargs=2, help="source trees A and B, each with its library built in place")
    p.add_argument("--processes", type=int, default=3, help="processes per build, alternating")
    p.add_argument("--rounds", type=int, default=9, help="rounds per process")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.rounds)
        return
    here = os.path.dirname(os.path.abspath(__file__))
    runs: dict[str, list[dict]] = {b: [] for b in args.builds}
    for _ in range(args.processes):
        for b in args.builds:
            root = os.path.abspath(b)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, "python"), here]))
            out = subprocess.check_output([sys.executable, os.path.abspath(__file__), *args.builds, "--child",
                                           "--rounds", str(args.rounds)], env=env, text=True, cwd=root)
            runs[b].append(json.loads(out))
    loads = [r["load"] for rs in runs.values() for r in rs]
    bw = {t: statistics.median(r["bw"][str(t)] for rs in runs.values() for r in rs) for t in (1, 2)}
    print(f"# {args.processes} processes per build, alternating, {args.rounds} rounds each; load average "
          f"{min(loads):.1f}-{max(loads):.1f}; copy bandwidth (median of the processes) 1t {bw[1]:.1f}, "
          f"2t {bw[2]:.1f} GB/s")
    print("# A: " + args.builds[0] + "\n# B: " + args.builds[1])
    first = runs[args.builds[0]][0]
    for key in first["times"]:
        op, t = key.split("|")
        cells = []
        for name, b in zip("AB", args.builds):
            v = [x for r in runs[b] for x in r["times"][key]]
            pct = 100 * first["bytes"][op] / (statistics.median(v) * 1e-3) / 1e9 / bw[int(t)]
            cells.append(f"{name} {statistics.median(v):6.2f} ms (p20 {statistics.quantiles(v, n=10)[1]:6.2f}) "
                         f"{pct:4.0f}%")
        print(f"{op:32s} {t}t  " + "   ".join(cells))


if __name__ == "__main__":
    main()
