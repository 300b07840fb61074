"""VectorQuantize layer benchmarks (issue 13): forward + backward of one training step.

Providers: `mage` (mage_kernels.nn.VectorQuantize on the fused vq_quantize op), `vqp` (vector-quantize-
pytorch's VectorQuantize, when installed: it is not a dependency; install it in a benchmark venv only) and
`eager-ref` (the same layer written the common eager way: expanded distances, argmin, one-hot EMA sums).
Configurations: `ema` (decay 0.8, commitment 1, straight-through: vector-quantize-pytorch's defaults but
the gradient estimator), `ema-rotation` (their default estimator, the rotation trick) and `learned` (the
codebook learned by gradient, no EMA).

    python benchmarks/bench_vectorquantize.py --threads 2 --rounds 15 --out benchmarks/results/cpu-vectorquantize.csv

runs every case round-robin in one process (each round times one call of each case), so a change of
machine load hits every provider alike; `run.py --only vectorquantize` times them one after another.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import Case, Row, device_name, git_sha, triton_version, write_csv  # noqa: E402

import mage_kernels as mk  # noqa: E402
from mage_kernels.nn import VectorQuantize  # noqa: E402

CONFIGS = {
    "ema": dict(decay=0.8, rotation_trick=False),
    "ema-rotation": dict(decay=0.8, rotation_trick=True),
    "learned": dict(decay=None, rotation_trick=False),
}


class EagerVQ(nn.Module):
    """The layer as commonly written in eager PyTorch (one codebook, channel-last input)."""

    def __init__(self, dim: int, codebook_size: int, decay: float | None, commitment_weight: float = 1.0):
        super().__init__()
        embed = torch.randn(codebook_size, dim)
        self.decay, self.w = decay, commitment_weight
        if decay is None:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_avg", embed.clone())

    def forward(self, x: torch.Tensor):
        flat = x.reshape(-1, x.shape[-1])
        e = self.embed
        dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.detach().t() + e.detach().pow(2).sum(1))  # [N, K]
        idx = dist.argmin(1)
        q = F.embedding(idx, e).view_as(x)
        if self.decay is None:
            loss = F.mse_loss(q, x.detach()) + self.w * F.mse_loss(x, q.detach())
        else:
            loss = self.w * F.mse_loss(x, q.detach())
            with torch.no_grad():
                onehot = F.one_hot(idx, e.shape[0]).type(flat.dtype)
                self.cluster_size.lerp_(onehot.sum(0), 1 - self.decay)
                self.embed_avg.lerp_(onehot.t() @ flat, 1 - self.decay)
                n = self.cluster_size.sum()
                smoothed = (self.cluster_size + 1e-5) / (n + e.shape[0] * 1e-5) * n
                self.embed.copy_(self.embed_avg / smoothed[:, None])
        return x + (q - x).detach(), idx.view(x.shape[:-1]), loss


def _vqp_layer(dim: int, k: int, config: dict):
    import vector_quantize_pytorch as vqp

    if config["decay"] is None:
        return vqp.VectorQuantize(dim=dim, codebook_size=k, learnable_codebook=True, ema_update=False,
                                  rotation_trick=config["rotation_trick"], commitment_weight=1.0)
    return vqp.VectorQuantize(dim=dim, codebook_size=k, decay=config["decay"], rotation_trick=config["rotation_trick"],
                              commitment_weight=1.0)


def _step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    def fn():
        x.grad = None
        q, _, loss = layer(x)
        ((q * g).sum() + loss).backward()

    return fn


def cases(device: str, quick: bool = False) -> list[Case]:
    shapes = [(16, 1024, 256, 1024)] if device == "cpu" else [(64, 1024, 256, 1024), (64, 1024, 256, 8192)]
    if quick:
        shapes = [(4, 256, 64, 256)]
    has_vqp = importlib.util.find_spec("vector_quantize_pytorch") is not None
    backend = mk.build_info()["ops"]["vq_quantize"][device]
    out = []
    for b, n, d, k in shapes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(b, n, d, generator=gen).to(device).requires_grad_(True)
        g = torch.randn(b, n, d, generator=gen).to(device)
        shape = f"B={b},N={n},D={d},K={k}"
        flops = 2.0 * b * n * k * d
        for name, config in CONFIGS.items():
            torch.manual_seed(0)
            layers = [("mage", backend, VectorQuantize(d, k, commitment_weight=1.0, **config))]
            if has_vqp:
                torch.manual_seed(0)
                layers.append(("vqp", "torch", _vqp_layer(d, k, config)))
            if not config["rotation_trick"]:
                layers.append(("eager-ref", "torch", EagerVQ(d, k, config["decay"])))
            for provider, be, layer in layers:
                layer = layer.to(device).train()
                out.append(Case(f"VectorQuantize-{name}", provider, be, "forward+backward", shape, "float32",
                                _step(layer, x, g), flops=flops))
    return out


def round_robin(all_cases: list[Case], rounds: int) -> dict[int, list[float]]:
    for case in all_cases:
        case.fn()  # warm-up
    times: dict[int, list[float]] = {i: [] for i in range(len(all_cases))}
    for _ in range(rounds):
        for i, case in enumerate(all_cases):
            t0 = time.perf_counter()
            case.fn()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    all_cases = cases(args.device, args.quick)
    if args.device == "cuda":
        sync = torch.cuda.synchronize
        for c in all_cases:
            fn = c.fn
            object.__setattr__(c, "fn", lambda fn=fn: (fn(), sync()))
    times = round_robin(all_cases, args.rounds)
    rows = []
    for i, case in enumerate(all_cases):
        t = times[i]
        q = statistics.quantiles(t, n=10) if len(t) > 1 else t * 9
        med = statistics.median(t)
        rows.append(Row(op=case.op, provider=case.provider, backend=case.backend, mode=case.mode, shape=case.shape,
                        dtype=case.dtype, median_ms=med, p20_ms=q[1], p80_ms=q[7], peak_extra_mb=float("nan"),
                        gbps=0.0, tflops=case.flops / (med * 1e-3) / 1e12, roofline_pct=0.0,
                        device=device_name(args.device), threads=torch.get_num_threads(), torch=torch.__version__,
                        triton=triton_version(), git_sha=git_sha()))
        print(f"{case.op:28s} {case.provider:10s} {case.shape:24s} {med:9.2f} ms  (p20 {q[1]:.2f}, p80 {q[7]:.2f})",
              flush=True)
    if args.out:
        write_csv(rows, args.out)
        print(f"wrote {len(rows)} rows to {args.out}; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
