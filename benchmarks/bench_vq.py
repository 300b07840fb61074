"""Nearest-code quantization benchmarks (issue 2). Providers: mage (each backend), eager-ref (the
published expanded distance + argmin), eager-best (cdist + argmin), compile (of eager-best), faiss."""

from __future__ import annotations

import importlib.util

import torch
from common import Case

import mage_kernels as mk
from mage_kernels import reference


def _faiss_case(z: torch.Tensor, e: torch.Tensor, shape: str) -> Case | None:
    if importlib.util.find_spec("faiss") is None:
        return None
    import faiss

    index = faiss.IndexFlatL2(e.shape[1])
    index.add(e.numpy())
    zn = z.numpy()

    def search():
        faiss.omp_set_num_threads(torch.get_num_threads())  # the same thread count as every other provider
        return index.search(zn, 1)

    return Case("vq_nearest", "faiss", "faiss", "no-grad", shape, "float32", search,
                flops=2.0 * z.shape[0] * e.shape[0] * e.shape[1])


def cases(device: str, quick: bool = False) -> list[Case]:
    shapes = [(16384, 1024, 256)] if device == "cpu" else [(65536, 1024, 256), (65536, 8192, 256), (65536, 1024, 8)]
    if quick:
        shapes = [(2048, 512, 64)]
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    out = []
    for n, k, d in shapes:
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            z = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
            e = torch.randn(k, d, generator=g).to(device=device, dtype=dtype)
            shape, dt = f"N={n},K={k},D={d}", str(dtype).replace("torch.", "")
            nbytes = (n * d + k * d) * z.element_size() + n * 8
            flops = 2.0 * n * k * d
            best = lambda z=z, e=e: torch.cdist(z, e).argmin(1)  # noqa: E731
            compiled = torch.compile(best, fullgraph=True)
            out += [
                Case("vq_nearest", "mage", mk.build_info()["ops"]["vq_nearest"][device], "no-grad", shape, dt,
                     lambda z=z, e=e: mk.vq_nearest(z, e, check_finite=False), nbytes, flops),
                Case("vq_nearest", "mage-fast", mk.build_info()["ops"]["vq_nearest"][device], "no-grad", shape, dt,
                     lambda z=z, e=e: mk.vq_nearest(z, e, exact=False, check_finite=False), nbytes, flops),
                Case("vq_nearest", "eager-ref", "torch", "no-grad", shape, dt,
                     lambda z=z, e=e: reference.vq_nearest_expanded(z, e), nbytes, flops),
                Case("vq_nearest", "eager-best", "torch", "no-grad", shape, dt, best, nbytes, flops),
                Case("vq_nearest", "compile", "inductor", "no-grad", shape, dt, compiled, nbytes, flops),
            ]
            if device == "cuda":
                from mage_kernels.triton import vq as tvq

                out.append(Case("vq_nearest", "mage", "triton", "no-grad", shape, dt,
                                lambda z=z, e=e: tvq.vq_nearest(z, e), nbytes, flops))
            if device == "cpu" and dtype == torch.float32:
                faiss_case = _faiss_case(z, e, shape)
                if faiss_case:
                    out.append(faiss_case)
            zg = z.clone().requires_grad_(True)
            out.append(Case("vq_quantize", "mage", mk.build_info()["ops"]["vq_quantize"][device], "forward+backward",
                            shape, dt, lambda zg=zg, e=e: _quantize_fwd_bwd(zg, e), nbytes * 3, flops))
    return out


def _quantize_fwd_bwd(z: torch.Tensor, e: torch.Tensor) -> None:
    z_q, _, loss, _ = mk.vq_quantize(z, e, check_finite=False)
    (z_q.sum() + loss).backward()


def test_bench_vq_nearest_cpu(benchmark):
    torch.set_num_threads(2)
    z = torch.randn(4096, 256)
    e = torch.randn(1024, 256)
    benchmark(lambda: mk.vq_nearest(z, e))


def test_bench_vq_nearest_eager_ref_cpu(benchmark):
    torch.set_num_threads(2)
    z = torch.randn(4096, 256)
    e = torch.randn(1024, 256)
    benchmark(lambda: reference.vq_nearest_expanded(z, e))
