"""Linear probe on frozen MAGE features (docs/REFERENCE.md 6): the mean of the encoder's token outputs with
no masking, then a BatchNorm + Linear head, against the same probe on raw pixels. Data: scikit-learn's
8x8 digits; the encoder here is random (pass --checkpoint for a trained one, e.g. examples/train.py's).

    python examples/linear_probe.py [--epochs 10] [--checkpoint FOLDER]
"""

from __future__ import annotations

import argparse

import torch

import mage


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--checkpoint", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    images, labels = mage.load_digits()
    if args.checkpoint:
        model = mage.load_any(args.checkpoint)
    else:
        tokenizer = mage.TokenizerConfig(resolution=8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                                         embed_dim=8, n_embed=32, norm_groups=4)
        model = mage.create_model("mage_vit_tiny", tokenizer=tokenizer, embed_dim=64, depth=2, num_heads=2,
                                  decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)
    model.eval()
    order = torch.randperm(len(images))
    train, test = order[:1400], order[1400:]

    def mage_features(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.forward_features(model.vqgan.encode(x))  # [B, D]

    config = mage.ProbeConfig(epochs=args.epochs, warmup_epochs=1, batch_size=128, optimizer="sgd")
    results = {}
    for name, extractor in (("MAGE features", mage_features), ("raw pixels", lambda x: x.flatten(1))):
        f_train, y_train = mage.extract_features(extractor, (images[train], labels[train]))
        f_test, y_test = mage.extract_features(extractor, (images[test], labels[test]))
        result = mage.linear_probe(f_train, y_train, f_test, y_test, config)
        results[name] = result.top1
        print(f"{name:14s} top-1 {100 * result.top1:5.1f} %  (features {f_train.shape[1]})")
    return results


if __name__ == "__main__":
    main()
