"""Where the CPU masking ops' time goes: page faults on a fresh output (issue 14).

gather_keep's backward writes a fresh [B, 1+L, C] gradient (48 MiB at B=64, L=256, C=768, fp32). glibc
serves allocations above its mmap threshold (at most 32 MiB by default) with fresh pages from the kernel
and returns them on free, so every call faults in and zeroes every page again, whatever the op does.
Our CPU ops take outputs of 8 MiB and up from a cache of freed blocks (csrc/masking_cpu.cpp), so in a
loop they fault only on the first call; `MAGE_CPU_OUTPUT_CACHE_MIB=0` turns the cache off (new blocks
still on 2 MiB pages). This script times, round-robin in one process, the backward and forward of ours
and of the published code next to that floor (a fresh tensor filled with zeros) and the same fill into a
reused buffer, with the minor page faults of each call. Run it as is, with `MAGE_CPU_OUTPUT_CACHE_MIB=0`,
with `THP_MEM_ALLOC_ENABLE=1` (torch's 2 MiB pages for large CPU tensors) or with
`MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824` (glibc keeps freed memory):

    python benchmarks/page_faults.py --threads 2 --rounds 15 --dtype float32
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

import mage_kernels as mk
from mage_kernels import reference


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    dt = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    B, L, C = args.batch, 256, 768
    M, D = 180 * L // 256, L // 2
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(B, L, generator=g)
    masked, _, keep = mk.mask_plan(noise, M, D)
    pub_mask, pub_drop = reference.published_mask_plan(noise, M, D)
    x = torch.randn(B, 1 + L, C, generator=g).to(dt).requires_grad_()
    out_m, out_e = mk.gather_keep(x, keep), reference.published_gather_keep(x, pub_drop)
    grad_m, grad_e = torch.randn_like(out_m), torch.randn_like(out_e)
    buf = torch.empty(B, 1 + L, C, dtype=dt)
    y = torch.randn(B, 1 + L - D, C, generator=g).to(dt).requires_grad_()
    pos = torch.randn(1 + L, C, generator=g).to(dt).requires_grad_()
    out_p = mk.pad_with_cls(y, keep, masked, pos_embed=pos)
    grad_p = torch.randn_like(out_p)
    cases = {
        "gather_keep backward, mage": lambda: torch.autograd.grad(out_m, (x,), grad_m, retain_graph=True),
        "gather_keep backward, eager-ref": lambda: torch.autograd.grad(out_e, (x,), grad_e, retain_graph=True),
        "pad_with_cls backward, mage": lambda: torch.autograd.grad(out_p, (y, pos), grad_p, retain_graph=True),
        "fresh [B,1+L,C] zero fill (floor)": lambda: torch.empty(B, 1 + L, C, dtype=dt).fill_(0),
        "reused [B,1+L,C] zero fill": lambda: buf.fill_(0),
        "gather_keep forward, mage": lambda: mk.gather_keep(x.detach(), keep),
        "gather_keep forward, eager-ref": lambda: reference.published_gather_keep(x.detach(), pub_drop),
        "pad_with_cls forward, mage": lambda: mk.pad_with_cls(y.detach(), keep, masked, pos_embed=pos.detach()),
        "pad_with_cls forward, eager-ref": lambda: reference.published_pad_with_cls(y.detach(), pub_drop, pub_mask,
                                                                                    pos.detach()),
    }
    times = {k: [] for k in cases}
    faults = {k: [] for k in cases}
    for fn in cases.values():
        fn()
    for _ in range(args.rounds):
        for name, fn in cases.items():
            f0, t0 = minor_faults(), time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
            faults[name].append(minor_faults() - f0)
    env = " ".join(f"{k}={os.environ[k]}" for k in ("MAGE_CPU_OUTPUT_CACHE_MIB", "THP_MEM_ALLOC_ENABLE",
                                                    "MALLOC_MMAP_THRESHOLD_") if k in os.environ)
    print(f"# B={B},L={L},C={C} {args.dtype}, {args.threads} threads, {args.rounds} rounds, load average "
          f"{os.getloadavg()[0]:.1f}, env: {env or 'default'}; gradient {B * (1 + L) * C * buf.element_size() / 2**20:.1f} MiB")
    for name in cases:
        print(f"{name:36s} median {statistics.median(times[name]):8.2f} ms  p20 "
              f"{statistics.quantiles(times[name], n=10)[1]:8.2f} ms  minor faults/call {statistics.median(faults[name]):7.0f}")


if __name__ == "__main__":
    main()
