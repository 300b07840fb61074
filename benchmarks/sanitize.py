"""Call every op once per backend on small CUDA tensors, for compute-sanitizer (scripts/gpu_check.sh)."""

import torch

import mage_kernels as mk
from mage_kernels.triton import remask as triton_remask
from mage_kernels.triton import vq as triton_vq


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        z = torch.randn(2, 33, 7, 5, device="cuda", generator=g).to(dtype)
        e = torch.randn(100, 33, device="cuda", generator=g).to(dtype)
        for fn in (torch.ops.mage.vq_nearest, triton_vq.vq_nearest):
            fn(z, e)
            fn(z.flatten(2).transpose(1, 2).reshape(-1, 33), e, exact=False)
        torch.ops.mage.vq_quantize(z, e, 0.25)
        triton_vq.vq_quantize(z, e, 0.25)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(3, 18, 1100, device="cuda", generator=g).to(dtype)[:, 1:]
        ids = torch.where(torch.rand(3, 17, device="cuda", generator=g) < 0.3, 5, 2024)
        k = mk.remask_count(ids, mask_id=2024, mask_ratio=0.5)
        seed = mk.draw_seed("cuda", g)
        kw = dict(mask_id=2024, choice_temperature=2.0, vocab_size=1050, temperature=1.0)
        for ties in (False, True):
            torch.ops.mage.remask_step(logits, ids, k, seed, **kw, reference_ties=ties)
            triton_remask.remask_step(logits, ids, k, seed, **kw, reference_ties=ties)
            hidden = torch.randn(3, 17, 40, device="cuda", generator=g).to(dtype)
            weight = torch.randn(1100, 40, device="cuda", generator=g).to(dtype)
            triton_remask.remask_step_from_hidden(hidden, weight, weight[:, 0].contiguous(), ids, k, seed, **kw,
                                                  reference_ties=ties)
    torch.cuda.synchronize()
    print("sanitize: all ops ran", mk.build_info()["ops"])


if __name__ == "__main__":
    main()
