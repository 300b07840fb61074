"""Train MAGE for a few steps with our ops in a plain PyTorch loop (docs/REFERENCE.md 4.4-4.7): tokenise,
draw the paper's mask ratio, plan masked and dropped tokens, run the encoder on the kept ones, pad the
decoder with [C], and take the label-smoothed loss on the masked tokens only. Data: scikit-learn's 8x8
digits. `mage train` (README) is the full loop: tokenizer training, MAGE-C, DDP, checkpoints, logging.

    python examples/train.py [--steps 20] [--batch-size 64] [--out examples-out]
"""

from __future__ import annotations

import argparse
import os

import torch

import mage
import mage_kernels as mk
from mage.losses import masked_positions, masked_token_loss


def main(argv: list[str] | None = None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default="examples-out")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    images, _ = mage.load_digits()  # [1797, 1, 8, 8] in [0, 1]
    # An 8x8 -> 4x4-token tokenizer. It stays frozen here; train one first with `mage train --objective tokenizer`.
    tokenizer = mage.TokenizerConfig(resolution=8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                                     embed_dim=8, n_embed=32, norm_groups=4)
    model = mage.create_model("mage_vit_tiny", tokenizer=tokenizer, embed_dim=64, depth=2, num_heads=2,
                              decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)
    c = model.config
    params = [p for p in model.parameters() if p.requires_grad]  # the tokenizer is frozen
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for step in range(args.steps):
        x = images[torch.randint(0, len(images), (args.batch_size,), generator=g)]
        ids = model.vqgan.encode(x)  # [B, L] codebook ids (no gradient)
        B, L = ids.shape
        num_masked, num_dropped = mk.sample_mask_counts(L, generator=g)  # r ~ TN(0.55, 0.25; [0.5, 1])
        masked, _, keep_idx = mk.mask_plan(torch.rand(B, L, generator=g), num_masked, num_dropped)
        hidden = model.head_hidden(ids, mask=masked, keep_idx=keep_idx)[:, 1:]  # [B, L, C], class slot dropped
        weight, bias = model.head_weight()
        loss = masked_token_loss(hidden, weight, bias, ids, masked_positions(masked, num_masked), c.codebook_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        losses.append(loss.item())
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  masked {num_masked:2d}/{L}  loss {loss.item():.4f}")
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(os.path.join(args.out, "mage-digits"))
    print(f"saved {os.path.join(args.out, 'mage-digits')} (load with mage.MAGE.from_pretrained)")
    return losses


if __name__ == "__main__":
    main()
