"""Call every op once per backend on small CUDA tensors, for compute-sanitizer (scripts/gpu_check.sh)."""

import torch

import mage_kernels as mk
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
    torch.cuda.synchronize()
    print("sanitize: all ops ran", mk.build_info()["ops"])


if __name__ == "__main__":
    main()
