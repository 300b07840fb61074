"""Call every op once per backend on small CUDA tensors, for compute-sanitizer (scripts/gpu_check.sh).
`--device cpu` runs the same calls on CPU tensors (Triton under TRITON_INTERPRET=1): the dry run of the script."""

import argparse

import torch

import mage_kernels as mk
from mage_kernels.triton import masking as triton_masking
from mage_kernels.triton import remask as triton_remask
from mage_kernels.triton import vq as triton_vq


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    dev = p.parse_args(argv).device
    g = torch.Generator(device=dev).manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        z = torch.randn(2, 33, 7, 5, device=dev, generator=g).to(dtype)
        e = torch.randn(100, 33, device=dev, generator=g).to(dtype)
        for fn in (torch.ops.mage.vq_nearest, triton_vq.vq_nearest):
            fn(z, e)
            fn(z.flatten(2).transpose(1, 2).reshape(-1, 33), e, exact=False)
        torch.ops.mage.vq_quantize(z, e, 0.25)
        triton_vq.vq_quantize(z, e, 0.25)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(3, 18, 1100, device=dev, generator=g).to(dtype)[:, 1:]
        ids = torch.where(torch.rand(3, 17, device=dev, generator=g) < 0.3, 5, 2024)
        k = mk.remask_count(ids, mask_id=2024, mask_ratio=0.5)
        seed = mk.draw_seed(dev, g)
        kw = dict(mask_id=2024, choice_temperature=2.0, vocab_size=1050, temperature=1.0)
        for ties in (False, True):
            torch.ops.mage.remask_step(logits, ids, k, seed, **kw, reference_ties=ties)
            triton_remask.remask_step(logits, ids, k, seed, **kw, reference_ties=ties)
            hidden = torch.randn(3, 17, 40, device=dev, generator=g).to(dtype)
            weight = torch.randn(1100, 40, device=dev, generator=g).to(dtype)
            triton_remask.remask_step_from_hidden(hidden, weight, weight[:, 0].contiguous(), ids, k, seed, **kw,
                                                  reference_ties=ties)
    masking(g, dev)
    if dev == "cuda":
        torch.cuda.synchronize()
    print("sanitize: all ops ran", mk.build_info()["ops"])


def masking(g: torch.Generator, dev: str) -> None:
    """Odd sizes, per-row counts with -1 padding, unaligned rows (C = 13) and 16-byte rows (C = 64)."""
    B, L = 3, 37
    noise = torch.rand(B, L, device=dev, generator=g)
    m = torch.tensor([0, 37, 20], device=dev)
    d = torch.tensor([37, 0, 11], device=dev)
    for plan in (torch.ops.mage.mask_plan, triton_masking.mask_plan):
        plan(noise, m, d, L)
        plan(noise.double().t().contiguous().t(), m, d, L)  # column-major noise
    masked, _, keep = torch.ops.mage.mask_plan(noise, m, d, L)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for C in (13, 64):
            x = torch.randn(B, 1 + L, C, device=dev, generator=g).to(dtype)
            pos, pad = x[0], x[0, 0]
            for ops in (torch.ops.mage, triton_masking):
                y = ops.gather_keep(x, keep)
                ops.scatter_keep(y, keep, L)
                ops.pad_with_cls(y, keep, masked, pos, None)
                ops.pad_with_cls(y, keep, masked, None, pad)
                ops.pad_with_cls_backward(x, keep, masked, False, True)
                ops.pad_with_cls_backward(x, keep, masked, True, False)


if __name__ == "__main__":
    main()
