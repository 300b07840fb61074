#!/usr/bin/env python3
"""Static GPU checks for an H100 (sm_90) on a machine without a GPU or a driver.

Triton: every kernel the Triton launchers can launch is compiled (not interpreted) for sm_90. A stand-in
driver reports GPUTarget("cuda", 90, 32); the launchers themselves run, on meta tensors (shapes, dtypes,
strides and alignment, no memory), with mage_kernels.triton._launch.hook set, so each launch is compiled
with the grid, block sizes and num_warps the launcher chose (kernel.warmup) instead of running. The
cases below are inputs (dtypes, layouts, sizes), never launch numbers. Each PTX then goes through the
ptxas that ships with Triton, with -v.

CUDA C++: the `ptxas -v` output of the compile-only build (scripts/cuda_compile_check.sh, which passes
--cuda-log and --cuda-lib here) is parsed, and the launch bound (threads per block) of each kernel is
read from the library's ELF notes.

Fails (exit status 1) on: a kernel that does not compile; spills or a stack frame (unless ALLOWED
below says why); shared memory over the launch's limit; a grid or block over the hardware limits; a
CUDA kernel without __launch_bounds__. Writes the table to benchmarks/results/static-sm90.md.

    python scripts/static_sm90.py [--cuda-log LOG --cuda-lib _C.so] [--out FILE] [--only vq] [--cases REGEX]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]

# H100 SXM / H200 (compute capability 9.0) limits.
SM = dict(regs=65536, threads=2048, blocks=32, smem=233472, smem_block_optin=232448, smem_block_default=49152,
          reserved_smem=1024, reg_unit=256, smem_unit=128, max_grid_x=2**31 - 1, max_grid_yz=65535)

# Kernels allowed to spill or use a stack frame: name pattern -> (the most bytes of spill stores, of spill
# loads and of stack frame allowed, the reason, read from the SASS). Keep this short.
ALLOWED: dict[str, tuple[int, str]] = {
    r"^vq_search_tc_kernel$": (8, "at the 128 registers of __launch_bounds__(256, 2) (two blocks per SM), ptxas "
                               "keeps one loop-invariant 4-byte value on the stack: one STL before the main loop "
                               "and one L1-resident LDL per 64-deep chunk, against 64 HMMAs per chunk"),
    r"^vq_rerank_kernel$": (64, "the 64-bit division row / R is a CALL to ptxas's division routine; around it "
                            "ptxas keeps the listed-row count and the row counter's high word on the stack: two "
                            "STL at kernel entry and a few LDL per listed row (a rare row, re-ranked against "
                            "every code in fp64: K * D loads and FMAs), none in the per-code loops"),
}
# Triton before 3.8 (3.6 is on the GPU machines; it ships CUDA 12.8's ptxas, 3.8 ships 12.9's) keeps a value or
# two of these kernels on the stack that 3.8 holds in registers. Allowed only when such a Triton compiles.
ALLOWED_BEFORE_TRITON_3_8: dict[str, tuple[int, str]] = {
    r"^_rerank_kernel$": (16, "fp64 rows, D = 256 (Triton 3.6): STLs at kernel entry and once per listed row, LDLs "
                          "after each row's loop over the codes, none inside the per-code loops (rows are rare)"),
    r"^_pad_sum_kernel$": (8, "fp64, 128-channel blocks (Triton 3.6): one STL before the loop over the tokens and "
                           "one LDL after it, per program"),
}


def allowed() -> dict[str, tuple[int, str]]:
    """ALLOWED, plus the entries for the Triton in use."""
    import triton

    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return {**ALLOWED, **(ALLOWED_BEFORE_TRITON_3_8 if (major, minor) < (3, 8) else {})}


@dataclasses.dataclass
class Stat:
    source: str  # triton | cuda
    kernel: str
    config: str
    threads: int | None
    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem_static: int = 0
    smem_dynamic: int = 0
    smem_limit: int = SM["smem_block_default"]
    error: str = ""

    @property
    def blocks_per_sm(self) -> int:
        if self.threads is None or self.error:
            return 0
        warps = math.ceil(self.threads / 32)
        by_threads = SM["threads"] // (warps * 32)
        regs_per_warp = math.ceil(max(self.regs, 1) * 32 / SM["reg_unit"]) * SM["reg_unit"]
        by_regs = (SM["regs"] // regs_per_warp) // warps
        smem = self.smem_static + self.smem_dynamic + SM["reserved_smem"]
        by_smem = SM["smem"] // (math.ceil(smem / SM["smem_unit"]) * SM["smem_unit"])
        return min(SM["blocks"], by_threads, by_regs, by_smem)

    def problems(self) -> list[str]:
        if self.error:
            return [f"does not compile: {self.error}"]
        out = []
        if self.spill_stores or self.spill_loads or self.stack:
            limit = next((n for pat, (n, _) in allowed().items() if re.search(pat, self.kernel)), -1)
            if max(self.spill_stores, self.spill_loads, self.stack) > limit:
                out.append(f"spills {self.spill_stores}/{self.spill_loads} B, stack {self.stack} B")
        if self.smem_static + self.smem_dynamic > self.smem_limit:
            out.append(f"shared memory {self.smem_static} + {self.smem_dynamic} B over the launch limit {self.smem_limit}")
        if self.threads is None:
            out.append("no launch bound (threads per block unknown)")
        elif self.threads > 1024:
            out.append(f"{self.threads} threads per block")
        return out


# ------------------------------------------------------------------------------------------ Triton


def _stand_in_driver():
    """A Triton driver that compiles for sm_90 and launches nothing."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandIn(DriverBase):
        target = GPUTarget("cuda", 90, 32)

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("meta")

        def get_benchmarker(self):
            raise NotImplementedError

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    return StandIn()


def _dtype_label(kernel, args) -> str:
    """The dtypes of the kernel's floating-point inputs among its first three tensor arguments."""
    import torch

    tensors = [a for a in args if isinstance(a, torch.Tensor)][:3]
    tags = []
    for t in tensors:
        tag = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(t.dtype)
        if tag and tag not in tags:
            tags.append(tag)
    return "/".join(tags) or "int"


def triton_cases():
    """(op, callable) pairs: every dtype, layout and size class the Triton launchers treat differently."""
    import torch

    from mage_kernels.triton import masking as tm
    from mage_kernels.triton import remask as tr
    from mage_kernels.triton import vq as tv

    meta = dict(device="meta")
    floats = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    cases = []
    add = lambda family, label, fn: cases.append((family, label, fn))  # noqa: E731
    # vq: row-major z with aligned and unaligned D, an NCHW map (channel stride H*W), a batch beyond 65535,
    # mixed dtypes (fp32 factors vs fp64 scaling), exact and fast (TF32) searches.
    for dt in floats:
        for D in (256, 33, 8):
            z, e = torch.empty(4096, D, dtype=dt, **meta), torch.empty(1024, D, dtype=dt, **meta)
            for exact in (True, False):
                add("vq", f"N=4096 K=1024 D={D} exact={exact}", lambda z=z, e=e, x=exact: tv.vq_nearest(z, e, exact=x))
        nchw = torch.empty(70000, 256, 2, 2, dtype=dt, **meta)
        add("vq", "NCHW B=70000 D=256 quantize", lambda z=nchw, e=torch.empty(8192, 256, dtype=dt, **meta):
            tv.vq_quantize(z, e, 0.25))
    for zt, et in ((torch.bfloat16, torch.float32), (torch.float32, torch.float64)):
        add("vq", "mixed dtypes D=32", lambda z=torch.empty(100, 32, dtype=zt, **meta),
            e=torch.empty(10, 32, dtype=et, **meta): tv.vq_nearest(z, e))
    # masking: noise contiguous and column-major, per-batch and per-row counts, short and long rows;
    # channel widths with and without 16-element rows; sequence-first (L, B, C) views.
    for dt in floats:
        for B, L in ((64, 256), (3, 37), (2, 1)):
            noise = torch.empty(B, L, dtype=dt, **meta)
            for n_m in (torch.empty((), dtype=torch.long, **meta), torch.empty(B, dtype=torch.long, **meta)):
                for nz, lay in ((noise, "rows"), (noise.t().contiguous().t(), "column-major")):
                    add("masking", f"B={B} L={L} {lay} counts={list(n_m.shape)}",
                        lambda nz=nz, n_m=n_m, L=L: tm.mask_plan(nz, n_m, n_m, L))
        for C in (768, 13):
            B, L, Lk = 64, 256, 64
            x = torch.empty(B, 1 + L, C, dtype=dt, **meta)
            xt = torch.empty(1 + L, B, C, dtype=dt, **meta).transpose(0, 1)
            keep = torch.empty(B, Lk, dtype=torch.long, **meta)
            masked = torch.empty(B, L, dtype=torch.bool, **meta)
            y = torch.empty(B, 1 + Lk, C, dtype=dt, **meta)
            pos, pad = torch.empty(1 + L, C, dtype=dt, **meta), torch.empty(C, dtype=dt, **meta)
            for xx, lay in ((x, "batch-first"), (xt, "sequence-first")):
                add("masking", f"gather C={C} {lay}", lambda xx=xx, keep=keep: tm.gather_keep(xx, keep))
                for mae in (False, True):
                    for p in (False, True):
                        add("masking", f"pad backward C={C} {lay} mae={mae} pos={p}",
                            lambda xx=xx, keep=keep, masked=masked, mae=mae, p=p:
                            tm.pad_with_cls_backward(xx, keep, masked, mae, p))
            add("masking", f"scatter C={C}", lambda y=y, keep=keep, L=L: tm.scatter_keep(y, keep, L))
            for pe, pd in ((pos, None), (None, pad), (None, None), (pos, pad)):
                add("masking", f"pad C={C} pos={pe is not None} pad={pd is not None}",
                    lambda y=y, keep=keep, masked=masked, pe=pe, pd=pd: tm.pad_with_cls(y, keep, masked, pe, pd))
    # remask: logits dtypes and strides, vocabularies below and above one block, both tie rules; the fused
    # head in every dtype pair, with and without bias, exact fp32 and TF32.
    ids_l = lambda B, L: torch.empty(B, L, dtype=torch.long, **meta)  # noqa: E731
    seed, kw = torch.empty(2, dtype=torch.long, **meta), dict(mask_id=2024, choice_temperature=1.0, temperature=1.0)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for B, L, V, vocab in ((32, 256, 2025, 1024), (3, 17, 70, 64)):
            logits = torch.empty(B, L + 1, V, dtype=dt, **meta)[:, 1:]
            for ties in (False, True):
                add("remask", f"B={B} L={L} vocab={vocab} ties={ties}",
                    lambda lg=logits, B=B, L=L, vocab=vocab, ties=ties: tr.remask_step(
                        lg, ids_l(B, L), torch.empty(B, dtype=torch.long, **meta), seed, vocab_size=vocab,
                        reference_ties=ties, **kw))
    pairs = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
             (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
    for hd, wd in pairs:
        for B, L, C, V, vocab in ((32, 256, 768, 2025, 1024), (2, 10, 40, 70, 64)):
            hidden = torch.empty(B, L + 1, C, dtype=hd, **meta)[:, 1:]
            weight = torch.empty(V, C, dtype=wd, **meta)
            for bias in (None, torch.empty(V, dtype=wd, **meta)):
                for tf32 in ((False, True) if torch.float32 in (hd, wd) else (False,)):
                    def fused(h=hidden, w=weight, b=bias, B=B, L=L, vocab=vocab, tf32=tf32):
                        with _allow_tf32(tf32):
                            tr.remask_step_from_hidden(h, w, b, ids_l(B, L), torch.empty(B, dtype=torch.long, **meta),
                                                       seed, vocab_size=vocab, reference_ties=False, **kw)
                    add("remask", f"fused B={B} L={L} C={C} vocab={vocab} bias={bias is not None} tf32={tf32}", fused)
    return cases


@contextlib.contextmanager
def _allow_tf32(flag: bool):
    import torch

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = flag
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def check_triton(only: str | None, cases: str | None = None, jobs: int = 1) -> list[Stat]:
    """Compile the selected cases, split over `jobs` forked processes (compiling is single-threaded)."""
    chosen = [i for i, (family, label, _) in enumerate(triton_cases())
              if (only is None or only in family) and (cases is None or re.search(cases, label))]
    if jobs <= 1:
        return _check_triton_cases(chosen)
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        parts = pool.map(_check_triton_cases, [chosen[i::jobs] for i in range(jobs)])
    return sorted((s for part in parts for s in part), key=lambda s: (s.kernel, s.config))


def _check_triton_cases(chosen: list[int]) -> list[Stat]:
    import triton

    from mage_kernels.triton import _launch

    triton.runtime.driver.set_active(_stand_in_driver())
    triton.knobs.nvidia.dump_ptxas_log = True  # Triton's own `ptxas -v` call prints its report
    stats: list[Stat] = []
    case_label = ""

    def hook(kernel, grid, args, kwargs):
        name = kernel.fn.__name__
        consts = " ".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("enable_fp_fusion",))
        label = f"{_dtype_label(kernel, args)} {consts} ({case_label})"
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                compiled = kernel.warmup(*args, grid=grid, **kwargs)
            if log.getvalue():  # compiled now, not found in this run's cache (another case compiled it)
                md = compiled.metadata
                st = Stat("triton", name, label, md.num_warps * 32, smem_dynamic=md.shared,
                          smem_limit=SM["smem_block_optin"])  # Triton opts in above 48 KiB
                kernels = parse_ptxas_log(log.getvalue(), arch="sm_90a")
                st.__dict__.update(next(iter(kernels.values())))
                stats.append(st)
        except Exception as err:  # a compile error is a finding, not a crash of the check
            msg = " ".join(str(err).split())[-300:]
            stats.append(Stat("triton", name, label, None, error=f"{type(err).__name__}: {msg}"))
        if grid[0] > SM["max_grid_x"] or any(g > SM["max_grid_yz"] for g in grid[1:]):
            stats.append(Stat("triton", name, label, None, error=f"grid {grid} over the hardware limits"))

    _launch.hook = hook
    try:
        all_cases = triton_cases()
        for i in chosen:
            _, case_label, case = all_cases[i]
            case()
    finally:
        _launch.hook = None
    return stats


# ------------------------------------------------------------------------------------------ CUDA


def parse_ptxas_log(log: str, arch: str = "sm_90") -> dict[str, dict]:
    """Per kernel compiled for `arch`: registers, spills, stack frame and static shared memory."""
    out: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            current = m.group(1) if m.group(2) == arch else None
            if current:
                out[current] = dict(regs=0, spill_stores=0, spill_loads=0, stack=0, smem_static=0)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[current]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            out[current]["smem_static"] = int(s.group(1)) if s else 0
    return out


def launch_bounds(lib: str) -> dict[str, int]:
    """Threads per block of every kernel with __launch_bounds__, from the sm_90 ELF notes of the library."""
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
    text = subprocess.run([cuobjdump, "-elf", lib], capture_output=True, text=True, check=True).stdout
    bounds, arch, section, want = {}, None, None, False
    for line in text.splitlines():
        if line.startswith("arch = "):
            arch = line.split("=")[1].strip()
        elif line.startswith(".nv.info._"):
            section = line[len(".nv.info."):].strip()
        elif "EIATTR_MAX_THREADS" in line:
            want = True
        elif want and line.strip().startswith("Value:"):
            if arch == "sm_90" and section:
                bounds[section] = int(line.split()[1], 16)
            want = False
    return bounds


def demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}
    return dict(zip(names, out.splitlines()))


def _short(demangled: str) -> tuple[str, str]:
    """'void mage::(anonymous namespace)::vq_search_kernel<float>(...)' -> ('vq_search_kernel', 'float')."""
    s = demangled.replace("(anonymous namespace)::", "").replace("mage::", "").replace("c10::", "")
    s = re.sub(r"^void ", "", s)
    m = re.match(r"([\w:]+)(?:<(.*?)>)?\(", s + "(")
    name, targs = (m.group(1), m.group(2) or "") if m else (s, "")
    return name, targs


def check_cuda(log_path: str, lib: str | None) -> list[Stat]:
    with open(log_path, errors="replace") as f:
        log = f.read()
    kernels = parse_ptxas_log(log)
    if not kernels:
        return [Stat("cuda", "(build log)", log_path, None, error="no sm_90 kernels in the ptxas log")]
    bounds = launch_bounds(lib) if lib else {}
    names = demangle(list(kernels))
    stats = []
    for mangled, st in sorted(kernels.items(), key=lambda kv: names[kv[0]]):
        name, targs = _short(names[mangled])
        threads = bounds.get(mangled) if lib else 0
        stats.append(Stat("cuda", name, targs, threads, **st))
    return stats


# ------------------------------------------------------------------------------------------ report


def write_table(stats: list[Stat], path: str, seconds: float) -> None:
    import torch
    import triton

    lines = [
        "# Static resource use for sm_90 (H100/H200)",
        "",
        "Written by `scripts/static_sm90.py` (run by `.ci/run`); compiled without a GPU. Triton kernels are",
        "compiled through their launchers' own configurations; CUDA kernels from the compile-only build",
        "(`-Xptxas -v`). Blocks/SM: resident blocks per SM from registers, threads and shared memory",
        "(65536 registers, 2048 threads, 228 KB per SM). Shared memory: static + dynamic bytes per block.",
        "",
        f"{len(stats)} kernel configurations, checked in {seconds:.0f} s with Triton {triton.__version__} "
        f"(torch {torch.__version__}).",
        "",
        "| source | kernel | dtype / config | threads | registers | spills (st/ld B) | stack B | smem B | blocks/SM | problems |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for s in stats:
        smem = f"{s.smem_static}+{s.smem_dynamic}" if s.smem_dynamic else f"{s.smem_static}"
        problems = "; ".join(s.problems()) or ""
        lines.append(f"| {s.source} | {s.kernel} | {s.config} | {s.threads or '-'} | {s.regs} | "
                     f"{s.spill_stores}/{s.spill_loads} | {s.stack} | {smem} | {s.blocks_per_sm} | {problems} |")
    if allowed():
        lines += ["", "Allowed exceptions (at most this many bytes of spills or stack):", ""]
        lines += [f"- `{k}` ({n} B): {why}" for k, (n, why) in allowed().items()]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cuda-log", help="ptxas -v output of the CUDA build (scripts/cuda_compile_check.sh)")
    p.add_argument("--cuda-lib", help="the CUDA build's _C.so (for the launch bounds)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "static-sm90.md"))
    p.add_argument("--only", help="Triton op family to check: vq, masking or remask (default all)")
    p.add_argument("--cases", help="only the Triton cases whose label matches this regular expression")
    p.add_argument("--no-triton", action="store_true")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="processes compiling Triton kernels")
    args = p.parse_args(argv)
    start = time.time()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # nothing cached across runs: every kernel is compiled
        stats = [] if args.no_triton else check_triton(args.only, args.cases, args.jobs)
    if args.cuda_log:
        stats += check_cuda(args.cuda_log, args.cuda_lib)
    write_table(stats, args.out, time.time() - start)
    bad = [(s, p) for s in stats for p in s.problems()]
    for s, prob in bad:
        print(f"FAIL {s.source} {s.kernel} [{s.config}]: {prob}")
    n_tri = sum(s.source == "triton" for s in stats)
    print(f"static sm_90 check: {n_tri} Triton and {len(stats) - n_tri} CUDA kernel configurations, "
          f"{len(bad)} problem(s), {time.time() - start:.0f} s; table in {os.path.relpath(args.out, ROOT)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
