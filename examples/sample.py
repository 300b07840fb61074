"""Sample images from a MAGE model by iterative decoding (docs/REFERENCE.md 5.2), here a small random one;
pass --checkpoint for a trained model (our .safetensors file, a pretrained folder, or a released .pth).

    python examples/sample.py [--num 8] [--steps 8] [--checkpoint PATH] [--out examples-out]
"""

from __future__ import annotations

import argparse
import os

import torch

import mage
from mage.report import save_image_grid


def main(argv: list[str] | None = None) -> torch.Tensor:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--choice-temperature", type=float, default=6.0)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", default="examples-out")
    args = p.parse_args(argv)

    if args.checkpoint:
        model = mage.load_any(args.checkpoint)
    else:  # random weights, 32x32 images as 8x8 tokens: the pipeline runs, the images are noise
        torch.manual_seed(0)
        model = mage.create_model("mage_vit_tiny", tokenizer=mage.TokenizerConfig.tiny(), depth=4)
    c = model.config
    print(f"{c.num_tokens} tokens per image; still masked after each step: {mage.mask_schedule(c.num_tokens, args.steps)}")
    images = mage.generate(model, args.num, steps=args.steps, choice_temperature=args.choice_temperature,
                           generator=torch.Generator().manual_seed(0))  # [num, 3, H, W] in [0, 1]
    os.makedirs(args.out, exist_ok=True)
    path = save_image_grid(images, os.path.join(args.out, "samples.png"), nrow=4, scale=2)
    print(f"wrote {path} ({tuple(images.shape)})")
    return images


if __name__ == "__main__":
    main()
