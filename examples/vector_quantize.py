"""Quantize vectors with mage_kernels.nn.VectorQuantize: k-means init on the first batch, EMA codebook
updates, dead-code replacement, and the image-feature-map layout (docs/OPS.md, "VectorQuantize").

    python examples/vector_quantize.py [--steps 100] [--codebook-size 64] [--dim 32]

k-means on the first batch leaves some clusters without a code; the codes nobody uses then fall below
the dead-code threshold and are moved onto vectors of later batches, until the quantization error is
down to the data's noise.
"""

from __future__ import annotations

import argparse

import torch

from mage_kernels.nn import VectorQuantize


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--codebook-size", type=int, default=64)
    p.add_argument("--dim", type=int, default=32)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    K, dim = args.codebook_size, args.dim
    centers = torch.randn(K // 2, dim) * 3  # the data has half as many clusters as there are codes

    def batch() -> torch.Tensor:  # [16, 64, dim]: 16 sequences of 64 vectors
        return centers[torch.randint(0, K // 2, (16, 64))] + 0.1 * torch.randn(16, 64, dim)

    # vector-quantize-pytorch's EMA setup; the VQ-VAE default (decay=None) learns the codebook by gradient.
    vq = VectorQuantize(dim, K, decay=0.9, commitment_weight=1.0, kmeans_init=True, threshold_ema_dead_code=0.5)
    for step in range(args.steps):
        x = batch()
        quantized, indices, loss = vq(x)  # (16, 64, dim), (16, 64), ()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  commitment loss {loss.item():.4f}  codes used {indices.unique().numel()}/{K}")

    vq.eval()
    x = batch()
    quantized, indices, _ = vq(x)
    error = (quantized - x).pow(2).mean().item()
    assert torch.equal(vq.get_codes_from_indices(indices), quantized)
    print(f"eval: mean squared quantization error {error:.4f} (noise variance 0.01)")

    # Image feature maps [B, C, H, W] are read in place; indices come back as [B, H, W].
    fmap_vq = VectorQuantize(dim, K, accept_image_fmap=True)
    q, idx, loss = fmap_vq(torch.randn(2, dim, 8, 8))
    loss.backward()  # decay=None: the codebook is an nn.Parameter, learned by this loss
    print(f"feature map: quantized {tuple(q.shape)}, indices {tuple(idx.shape)}, loss {loss.item():.4f}")
    return error


if __name__ == "__main__":
    main()
