"""Masked-token op benchmarks (issue 3): mask plan, gather-drop and [C] padding, forward and backward.

Providers: mage (each backend); eager-ref, the published code (sort + cut-off masks, boolean index /
nonzero drop and pad: host syncs); eager-best, a sync-free rewrite (argsort plan, gather / scatter);
compile, torch.compile(fullgraph=True) of eager-best.
"""

from __future__ import annotations

import torch
from common import Case

import mage_kernels as mk
from mage_kernels import reference

# ------------------------------------------------------------------------------- eager-best (sync-free)


def best_mask_plan(noise: torch.Tensor, num_masked: int, num_dropped: int):
    """MAE-style: one argsort, masks by scattering the rank cut-offs, kept positions sorted back."""
    order = torch.argsort(noise, dim=1, stable=True)
    B, L = noise.shape
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=noise.device).expand(B, L))
    keep_idx = torch.sort(order[:, num_dropped:], dim=1).values
    return rank < num_masked, rank < num_dropped, keep_idx


def best_gather_keep(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    tokens = x[:, 1:].gather(1, keep_idx[..., None].expand(-1, -1, x.shape[2]))
    return torch.cat([x[:, :1], tokens], 1)


def best_pad_with_cls(y: torch.Tensor, keep_idx: torch.Tensor, masked: torch.Tensor, pos_embed: torch.Tensor):
    """Scatter the kept rows into a [C]-filled sequence, then overwrite the masked tokens with [C]."""
    B, L = masked.shape
    C = y.shape[2]
    cls = y[:, :1]
    full = cls.expand(B, L, C).scatter(1, keep_idx[..., None].expand(-1, -1, C), y[:, 1:])
    tokens = torch.where(masked[..., None], cls, full)
    return torch.cat([cls, tokens], 1) + pos_embed


# ------------------------------------------------------------------------------------------ cases


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _backward_case(op, provider, backend, shape, dt, forward, inputs, nbytes):
    """Time the backward alone: the forward graph is built once and kept."""
    out = forward()
    grad = torch.randn_like(out)
    return Case(op, provider, backend, "backward", shape, dt,
                lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True), nbytes)


def _fwd_bwd_case(op, provider, backend, shape, dt, forward, inputs, nbytes):
    # The incoming gradient is made (and its pages faulted in) once, outside the timed call: a fresh
    # [B, 257, 768] ones_like per call cost ~2x the ops themselves in page faults.
    grad = torch.ones_like(forward().detach())

    def run():
        torch.autograd.grad(forward(), inputs, grad)

    return Case(op, provider, backend, "forward+backward", shape, dt, run, nbytes)


def _providers(x, y, pos, keep, masked, pub_mask, pub_drop, backend):
    """{(provider, backend): forward} for gather_keep and pad_with_cls, bound to these tensors."""
    compiled_gather = torch.compile(best_gather_keep, fullgraph=True)
    compiled_pad = torch.compile(best_pad_with_cls, fullgraph=True)
    gathers = {
        ("mage", backend["gather_keep"]): lambda: mk.gather_keep(x, keep),
        ("eager-ref", "torch"): lambda: reference.published_gather_keep(x, pub_drop),
        ("eager-best", "torch"): lambda: best_gather_keep(x, keep),
        ("compile", "inductor"): lambda: compiled_gather(x, keep),
    }
    pads = {
        ("mage", backend["pad_with_cls"]): lambda: mk.pad_with_cls(y, keep, masked, pos_embed=pos),
        ("eager-ref", "torch"): lambda: reference.published_pad_with_cls(y, pub_drop, pub_mask, pos),
        ("eager-best", "torch"): lambda: best_pad_with_cls(y, keep, masked, pos),
        ("compile", "inductor"): lambda: compiled_pad(y, keep, masked, pos),
    }
    return gathers, pads


def _shape_cases(device, B, L, C, dtypes, backend) -> list[Case]:
    out: list[Case] = []
    M, D = 180 * L // 256, L // 2  # the reference's mean masked count and its fixed drop count
    Lk = L - D
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(B, L, generator=g).to(device)
    masked, _, keep = mk.mask_plan(noise, M, D)
    pub_mask, pub_drop = reference.published_mask_plan(noise, M, D)
    shape = f"B={B},L={L},C={C}"
    plan_bytes = B * L * 4 + 2 * B * L + B * Lk * 8
    compiled_plan = torch.compile(best_mask_plan, fullgraph=True)
    out += [
        Case("mask_plan", "mage", backend["mask_plan"], "no-grad", shape, "float32",
             lambda: mk.mask_plan(noise, M, D), plan_bytes),
        Case("mask_plan", "eager-ref", "torch", "no-grad", shape, "float32",
             lambda: reference.published_mask_plan(noise, M, D), plan_bytes),
        Case("mask_plan", "eager-best", "torch", "no-grad", shape, "float32",
             lambda: best_mask_plan(noise, M, D), plan_bytes),
        Case("mask_plan", "compile", "inductor", "no-grad", shape, "float32",
             lambda: compiled_plan(noise, M, D), plan_bytes),
    ]
    for dtype in dtypes:
        dt = _dtype_name(dtype)
        es = torch.empty((), dtype=dtype).element_size()
        x = torch.randn(B, 1 + L, C, generator=g).to(device=device, dtype=dtype).requires_grad_()
        y = torch.randn(B, 1 + Lk, C, generator=g).to(device=device, dtype=dtype).requires_grad_()
        pos = torch.randn(1 + L, C, generator=g).to(device=device, dtype=dtype).requires_grad_()
        gather_bytes = 2 * B * (1 + Lk) * C * es
        pad_bytes = (B * (1 + Lk) + B * (1 + L) + (1 + L)) * C * es
        gathers, pads = _providers(x, y, pos, keep, masked, pub_mask, pub_drop, backend)
        for (provider, be), fn in gathers.items():
            out.append(Case("gather_keep", provider, be, "forward", shape, dt, fn, gather_bytes))
            out.append(_backward_case("gather_keep", provider, be, shape, dt, fn, (x,),
                                      gather_bytes + B * (L - Lk) * C * es))
        for (provider, be), fn in pads.items():
            out.append(Case("pad_with_cls", provider, be, "forward", shape, dt, fn, pad_bytes))
            out.append(_backward_case("pad_with_cls", provider, be, shape, dt, fn, (y, pos), pad_bytes))
            out.append(_fwd_bwd_case("pad_with_cls", provider, be, shape, dt, fn, (y, pos), 2 * pad_bytes))
        if device == "cuda":
            from mage_kernels.triton import masking as tri

            out += [
                Case("gather_keep", "mage", "triton", "forward", shape, dt,
                     lambda x=x: tri.gather_keep(x, keep), gather_bytes),
                Case("pad_with_cls", "mage", "triton", "forward", shape, dt,
                     lambda y=y, pos=pos: tri.pad_with_cls(y, keep, masked, pos, None), pad_bytes),
                Case("mask_plan", "mage", "triton", "no-grad", shape, "float32",
                     lambda: tri.mask_plan(noise, masked.new_full((), M, dtype=torch.long),
                                           masked.new_full((), D, dtype=torch.long), Lk), plan_bytes),
            ]
    return out


def cases(device: str, quick: bool = False) -> list[Case]:
    # MAGE-B training shapes (L = 256 tokens, C = 768); on GPU the target, bf16 at B = 256.
    if quick:
        shapes, dtypes = [(8, 64, 64)], [torch.float32]
    elif device == "cpu":
        # Every new output above glibc's mmap threshold is fresh pages: at B = 64 one [B, 257, 768] fp32
        # buffer costs ~30-40 ms of page faults on the 2-core CI VM (torch.zeros alone), a floor shared
        # by every provider; B = 32 shows the ops with less of that floor.
        shapes, dtypes = [(32, 256, 768), (64, 256, 768)], [torch.float32, torch.bfloat16]
    else:
        shapes, dtypes = [(256, 256, 768)], [torch.bfloat16]
    backend = {op: mk.build_info()["ops"][op][device] for op in ("mask_plan", "gather_keep", "pad_with_cls")}
    out: list[Case] = []
    for B, L, C in shapes:
        out += _shape_cases(device, B, L, C, dtypes, backend)
    return out


def _bench_inputs(B=16, L=256, C=768):
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(B, L, generator=g)
    masked, _, keep = mk.mask_plan(noise, 180, 128)
    pub_mask, pub_drop = reference.published_mask_plan(noise, 180, 128)
    y = torch.randn(B, 1 + L - 128, C, generator=g)
    pos = torch.randn(1 + L, C, generator=g)
    return masked, keep, pub_mask, pub_drop, y, pos


def test_bench_pad_with_cls_cpu(benchmark):
    torch.set_num_threads(2)
    masked, keep, _, _, y, pos = _bench_inputs()
    benchmark(lambda: mk.pad_with_cls(y, keep, masked, pos_embed=pos))


def test_bench_pad_with_cls_eager_ref_cpu(benchmark):
    torch.set_num_threads(2)
    _, _, pub_mask, pub_drop, y, pos = _bench_inputs()
    benchmark(lambda: reference.published_pad_with_cls(y, pub_drop, pub_mask, pos))


def interleaved(device: str = "cpu", rounds: int = 15, quick: bool = False) -> list[tuple]:
    """Median ms per provider, timing the providers of one (op, mode, shape, dtype) round-robin, so
    that load from other processes on a shared machine falls on all of them alike (run.py times them
    one after another). Returns (op, mode, shape, dtype, {provider: median_ms})."""
    import statistics
    import time

    groups: dict[tuple, list[Case]] = {}
    for case in cases(device, quick=quick):
        groups.setdefault((case.op, case.mode, case.shape, case.dtype), []).append(case)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = []
    for key, group in groups.items():
        times: dict[str, list[float]] = {f"{c.provider}/{c.backend}": [] for c in group}
        for case in group:
            case.fn()
        for _ in range(rounds):
            for case in group:
                if case.setup:
                    case.setup()
                sync()
                t0 = time.perf_counter()
                case.fn()
                sync()
                times[f"{case.provider}/{case.backend}"].append((time.perf_counter() - t0) * 1e3)
        out.append((*key, {name: statistics.median(t) for name, t in times.items()}))
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Masking benchmarks, providers timed round-robin.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for op, mode, shape, dtype, medians in interleaved(args.device, args.rounds, args.quick):
        mage = next(v for k, v in medians.items() if k.startswith("mage/"))
        ref = medians.get("eager-ref/torch", float("nan"))
        cells = "  ".join(f"{k.split('/')[0]} {v:8.3f}" for k, v in medians.items())
        print(f"{op:12s} {mode:16s} {shape:17s} {dtype:8s} {cells}  eager-ref/mage {ref / mage:6.2f}", flush=True)
