"""VQ-VAE vs VQGAN tokenizer recipes on Fashion-MNIST (docs/TRAINING.md, "Tokenizer: VQ-VAE vs VQGAN").

    python benchmarks/tokenizer_recipes.py --out runs/recipes [--recipes vqvae vqgan] [--steps 1000] [--batch-size 64]
        [--threads 1]

Each recipe trains the demo's tokenizer (mage.demo.TOKENIZER, steps x batch 64, lr 2e-3, no weight decay,
dead-code restarts every 50 steps; the discriminator starts at a fraction of the run) and is measured on the
10000 test images: PSNR, codebook usage, and the Frechet distance between the reconstructions and the test
images in the feature space of the cached Fashion-MNIST classifier (mage.fmnist_classifier, the demo's).
Results go to <out>/results.json and one line per recipe.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mage import data as data_lib
from mage.demo import TOKENIZER
from mage.fmnist_classifier import ClassifierConfig, classifier_outputs, load_or_train_classifier
from mage.metrics import codebook_usage, frechet_distance_from_features, psnr
from mage.report import save_image_grid
from mage.tokenizer_io import load_tokenizer
from mage.train import TrainConfig, train

# disc_start is a fraction of --steps here.
RECIPES = {
    "vqvae": {},
    # VQGAN: hinge PatchGAN (2 strided layers: 5x5 patch logits on 28x28) from a quarter of the run, taming's 0.8.
    "vqgan": dict(disc_weight=0.8, disc_start=0.25, disc_layers=2),
    "vqgan-start-half": dict(disc_weight=0.8, disc_start=0.5, disc_layers=2),
    "vqgan-ns": dict(disc_weight=0.8, disc_start=0.25, disc_layers=2, disc_loss="non-saturating"),
    "vqgan-w0.1": dict(disc_weight=0.1, disc_start=0.25, disc_layers=2),
    "vqvae-ema": dict(ema_decay=0.999),
    "vqgan-ema": dict(disc_weight=0.8, disc_start=0.25, disc_layers=2, ema_decay=0.999),
}


def measure(path: Path, test_x: torch.Tensor, clf) -> dict:
    tok = load_tokenizer(path).eval()
    with torch.no_grad():
        ids = torch.cat([tok.encode(x) for x in test_x.split(1000)])
        recon = torch.cat([tok.decode(i) for i in ids.split(1000)])
    f_test, _ = classifier_outputs(clf, test_x)
    f_rec, _ = classifier_outputs(clf, recon)
    usage = codebook_usage(torch.bincount(ids.flatten(), minlength=tok.config.n_embed))
    save_image_grid(torch.cat([test_x[:16], recon[:16]]), path.parent / "reconstructions.png", nrow=16, scale=2)
    return {"psnr_db": float(psnr(recon, test_x).mean()),
            "frechet_distance": frechet_distance_from_features(f_rec, f_test),
            "used_fraction": usage["used_fraction"], "perplexity": usage["perplexity"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/recipes")
    ap.add_argument("--recipes", nargs="+", default=["vqvae", "vqgan"], choices=sorted(RECIPES))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    test_x = data_lib.load_fashion_mnist("test")[0].float() / 255
    clf = load_or_train_classifier(ClassifierConfig())
    for name in args.recipes:
        recipe = dict(RECIPES[name])
        if "disc_start" in recipe:
            recipe["disc_start"] = int(recipe["disc_start"] * args.steps)
        cfg = TrainConfig(objective="tokenizer", data="fashion-mnist", image_size=28, tokenizer=TOKENIZER,
                          steps=args.steps, batch_size=args.batch_size, lr=2e-3, warmup_steps=min(50, args.steps // 10),
                          weight_decay=0.0, out_dir=str(out / name), log_every=10, ckpt_every=10**9,
                          codebook_restart_every=50, seed=args.seed, progress=False, **recipe)
        t = time.perf_counter()
        train(cfg)
        seconds = time.perf_counter() - t
        results[name] = {"train_s": seconds, **measure(out / name / "tokenizer.safetensors", test_x, clf),
                         "recipe": recipe, "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
                         "threads": args.threads}
        print(name, json.dumps(results[name]), flush=True)
        out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
