"""Inpaint and outpaint with MAGE: the tokens under a pixel hole are re-generated, every other token is kept
(here a small random model and synthetic images; pass --checkpoint for a trained one).

    python examples/inpaint.py [--steps 8] [--checkpoint PATH] [--out examples-out]
"""

from __future__ import annotations

import argparse
import os

import torch

import mage
from mage.report import save_image_grid


def main(argv: list[str] | None = None) -> torch.Tensor:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", default="examples-out")
    args = p.parse_args(argv)

    if args.checkpoint:
        model = mage.load_any(args.checkpoint)
    else:
        torch.manual_seed(0)
        model = mage.create_model("mage_vit_tiny", tokenizer=mage.TokenizerConfig.tiny(), depth=4)
    r = model.config.tokenizer.resolution
    yy, xx = torch.meshgrid(torch.linspace(0, 1, r), torch.linspace(0, 1, r), indexing="ij")
    images = torch.stack([torch.stack([xx, yy, (xx + yy) / 2]), torch.stack([yy, 1 - xx, xx * yy])])  # [2, 3, r, r]

    hole = torch.zeros(2, r, r, dtype=torch.bool)
    hole[0, r // 4 : 3 * r // 4, r // 4 : 3 * r // 4] = True  # inpaint the centre of image 0
    keep = torch.zeros(r, r, dtype=torch.bool)
    keep[r // 4 : 3 * r // 4, r // 4 : 3 * r // 4] = True
    hole[1] = ~keep  # outpaint image 1 around its centre
    g = torch.Generator().manual_seed(0)
    filled, tokens, token_mask = mage.inpaint(model, images, hole, ring=1, steps=args.steps, generator=g,
                                              return_tokens=True)
    kept = model.vqgan.encode(images)
    assert torch.equal(tokens[~token_mask], kept[~token_mask])  # outside the hole the tokens are the image's own
    print(f"regenerated {token_mask.sum(1).tolist()} of {token_mask.shape[1]} tokens per image")
    os.makedirs(args.out, exist_ok=True)
    path = save_image_grid(torch.cat([images, filled]), os.path.join(args.out, "inpaint.png"), nrow=2, scale=4)
    print(f"wrote {path} (top: inputs, bottom: filled)")
    return filled


if __name__ == "__main__":
    main()
