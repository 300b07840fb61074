"""`mage demo`: the whole pipeline on Fashion-MNIST on a CPU, and a report of what it learned.

1. train a small VQGAN tokenizer (28x28 grey -> 7x7 tokens), 2. cache the training set's tokens,
3. pre-train a small MAGE on them, 4. sample images and inpaint test images, 5. measure: linear probe
of MAGE features vs raw pixels vs a randomly initialised encoder, and the Frechet distance (in the
feature space of our own Fashion-MNIST classifier) of samples vs the test set, against a
shuffled-token baseline and the tokenizer's own reconstructions. Everything lands in one folder.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as data_lib
from .report import save_image_grid
from .fmnist_classifier import ClassifierConfig, classifier_outputs, load_or_train_classifier
from .inpaint import inpaint
from .metrics import classifier_score, codebook_usage, frechet_distance_from_features, psnr
from .model import CONSTRUCTORS
from .probe import ProbeConfig, linear_probe
from .sampler import generate
from .tokenizer_io import load_tokenizer
from .train import TrainConfig, build_token_cache, train

TOKENIZER = dict(resolution=28, in_channels=1, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, embed_dim=32,
                 n_embed=256, norm_groups=8)
MODEL = dict(embed_dim=128, depth=6, num_heads=4, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
             dropout=0.0)


@dataclasses.dataclass
class DemoConfig:
    """Sizes of the demo. The defaults take about 15 minutes on 2 CPU cores (docs/TRAINING.md), `quick()`
    about 2; most of the time is MAGE pre-training (steps x batch) and the tokenizer (steps)."""

    out_dir: str = "report"
    tokenizer_steps: int = 1000
    tokenizer_batch_size: int = 64
    mage_steps: int = 1500
    batch_size: int = 64  # MAGE
    train_images: int = 30000  # images whose tokens (2 augmented crops each) MAGE pre-trains on
    test_images: int = 10000  # tokenizer PSNR; reference set of the Frechet distance; probe test images
    probe_train: int = 10000
    probe_test: int = 2000
    probe_epochs: int = 30
    num_samples: int = 1000  # for the Frechet distance (a grid of 64 is saved)
    sample_steps: int = 12
    classifier_train_images: int | None = None  # the Frechet-distance classifier's training set (None: 60000)
    classifier_epochs: int = 2
    seed: int = 0

    @classmethod
    def quick(cls, out_dir: str = "report") -> "DemoConfig":
        return cls(out_dir=out_dir, tokenizer_steps=80, mage_steps=150, batch_size=32, train_images=3000,
                   test_images=2000, probe_train=2000, probe_test=500, probe_epochs=10, num_samples=200,
                   sample_steps=8, classifier_train_images=20000, classifier_epochs=1)


def _save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    save_image_grid(images, path, nrow=nrow, scale=2)


@torch.no_grad()
def _features(fn, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([fn(x).float() for x in images.split(batch)])


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    times, report = {}, {"config": dataclasses.asdict(cfg)}
    t_all = time.perf_counter()

    # 1. Tokenizer.
    t = time.perf_counter()
    tok_cfg = TrainConfig(objective="tokenizer", data="fashion-mnist", image_size=28, tokenizer=TOKENIZER,
                          steps=cfg.tokenizer_steps, batch_size=cfg.tokenizer_batch_size, lr=2e-3,
                          warmup_steps=min(50, cfg.tokenizer_steps // 10),
                          weight_decay=0.0, out_dir=str(out / "tokenizer"), log_every=10, ckpt_every=10**9,
                          codebook_restart_every=50, seed=cfg.seed, overwrite=True)
    train(tok_cfg)
    tokenizer = load_tokenizer(out / "tokenizer" / "tokenizer.safetensors").eval()
    times["tokenizer_train_s"] = time.perf_counter() - t

    test_x, test_y = data_lib.load_fashion_mnist("test")
    test_x, test_y = test_x[: cfg.test_images].float() / 255, test_y[: cfg.test_images]
    train_x, train_y = data_lib.load_fashion_mnist("train")
    train_x = train_x.float() / 255
    with torch.no_grad():
        test_ids = torch.cat([tokenizer.encode(x) for x in test_x.split(1000)])
        recon = torch.cat([tokenizer.decode(i) for i in test_ids.split(1000)])
    counts = torch.bincount(test_ids.flatten(), minlength=tokenizer.config.n_embed)
    report["tokenizer"] = {"test_psnr_db": float(psnr(recon, test_x).mean()), **codebook_usage(counts)}
    _save_grid(torch.cat([test_x[:16], recon[:16]]), out / "tokenizer_reconstructions.png", nrow=16)

    # 2. Token cache of the (augmented) training images.
    t = time.perf_counter()
    ds = data_lib.TensorImageDataset(*data_lib.load_fashion_mnist("train"), seed=cfg.seed)
    ds.images, ds.labels = ds.images[: cfg.train_images], ds.labels[: cfg.train_images]
    from .transforms import pretrain_transform

    ds.transform = pretrain_transform(28)
    build_token_cache(tokenizer, ds, str(out / "tokens.ckpt"), crops=2)
    times["token_cache_s"] = time.perf_counter() - t

    # 3. MAGE pre-training on the cached tokens.
    t = time.perf_counter()
    mage_cfg = TrainConfig(objective="mage", data="fashion-mnist", image_size=28, model="mage_vit_tiny",
                           model_overrides=MODEL, tokenizer=TOKENIZER,
                           tokenizer_checkpoint=str(out / "tokenizer" / "tokenizer.safetensors"),
                           token_cache=str(out / "tokens.ckpt"), steps=cfg.mage_steps, batch_size=cfg.batch_size,
                           lr=1e-3, warmup_steps=max(cfg.mage_steps // 20, 1), out_dir=str(out / "mage"),
                           log_every=10, ckpt_every=10**9, seed=cfg.seed, overwrite=True)
    train(mage_cfg)
    from .checkpoint import load

    model = load(out / "mage" / "model.safetensors").eval()
    times["mage_train_s"] = time.perf_counter() - t

    # 4. Samples and inpainting.
    t = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed)
    samples = generate(model, cfg.num_samples, steps=cfg.sample_steps, generator=g, batch_size=200)
    times["sampling_s"] = time.perf_counter() - t
    report["sampling_images_per_s"] = cfg.num_samples / times["sampling_s"]
    _save_grid(samples[:64], out / "samples.png")
    hole = torch.zeros(8, 28, 28, dtype=torch.bool)
    hole[:, 8:20, 8:20] = True
    filled = inpaint(model, test_x[:8], hole, ring=0, steps=cfg.sample_steps, generator=g)
    holed = test_x[:8].clone()
    holed[:, :, 8:20, 8:20] = 0.5
    _save_grid(torch.cat([test_x[:8], holed, filled]), out / "inpainting.png")

    # 5a. Frechet distance and classifier score in our classifier's feature space.
    t = time.perf_counter()
    clf = load_or_train_classifier(ClassifierConfig(epochs=cfg.classifier_epochs,
                                                    train_size=cfg.classifier_train_images))
    ref = test_x[: max(cfg.num_samples, 1000)]
    f_test, _ = classifier_outputs(clf, ref)
    shuffled = test_ids[: cfg.num_samples].clone()
    perm = torch.stack([torch.randperm(shuffled.shape[1], generator=g) for _ in range(shuffled.shape[0])])
    shuffled = shuffled.gather(1, perm)  # right token statistics, no spatial structure
    with torch.no_grad():
        shuffled_images = tokenizer.decode(shuffled)
    fd = {}
    for name, images in (("samples", samples), ("shuffled_tokens", shuffled_images),
                         ("tokenizer_reconstructions", recon[: cfg.num_samples])):
        feats, probs = classifier_outputs(clf, images)
        fd[name] = {"frechet_distance": frechet_distance_from_features(feats, f_test),
                    "classifier_score": classifier_score(probs)[0]}
    report["generation"] = fd
    _save_grid(shuffled_images[:16], out / "shuffled_token_baseline.png")
    times["generation_metrics_s"] = time.perf_counter() - t

    # 5b. Linear probe: MAGE features vs raw pixels vs a randomly initialised MAGE encoder.
    t = time.perf_counter()
    ptrain_x, ptrain_y = train_x[-cfg.probe_train :], train_y[-cfg.probe_train :]  # images MAGE never saw
    ptest_x, ptest_y = test_x[: cfg.probe_test], test_y[: cfg.probe_test]
    with torch.no_grad():
        ptrain_ids = torch.cat([tokenizer.encode(x) for x in ptrain_x.split(1000)])
        ptest_ids = test_ids[: cfg.probe_test]
    random_model = CONSTRUCTORS["mage_vit_tiny"](tokenizer=tokenizer.config, **MODEL).eval()
    probe_cfg = ProbeConfig(epochs=cfg.probe_epochs, warmup_epochs=max(cfg.probe_epochs // 10, 1), optimizer="sgd",
                            base_lr=0.1, batch_size=256, seed=cfg.seed)
    probes = {}
    for name, fn, xs in (("mage", model.forward_features, (ptrain_ids, ptest_ids)),
                         ("random_init", random_model.forward_features, (ptrain_ids, ptest_ids)),
                         ("raw_pixels", lambda x: x.flatten(1), (ptrain_x, ptest_x))):
        ftr, fte = _features(fn, xs[0]), _features(fn, xs[1])
        probes[name] = linear_probe(ftr, ptrain_y, fte, ptest_y, probe_cfg, num_classes=10).top1
    report["linear_probe_top1"] = probes
    times["probe_s"] = time.perf_counter() - t

    times["total_s"] = time.perf_counter() - t_all
    report["times_s"] = times
    report["threads"] = torch.get_num_threads()
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def summary(report: dict) -> str:
    """The report's headline figures as a few lines of text (what `mage demo` prints)."""
    t, gen, probe = report["times_s"], report["generation"], report["linear_probe_top1"]
    lines = [
        f"tokenizer: test PSNR {report['tokenizer']['test_psnr_db']:.1f} dB, "
        f"{report['tokenizer']['used_fraction'] * 100:.0f}% of the codebook used",
        "linear probe top-1: " + ", ".join(f"{k} {v * 100:.1f}%" for k, v in probe.items()),
        "Frechet distance to the test set (lower is better): "
        + ", ".join(f"{k} {v['frechet_distance']:.2f}" for k, v in gen.items()),
        f"time: {t['total_s'] / 60:.1f} min (tokenizer {t['tokenizer_train_s']:.0f} s, MAGE {t['mage_train_s']:.0f} s)",
        f"report: {Path(report['config']['out_dir']) / 'report.json'}",
    ]
    return "\n".join(lines)
