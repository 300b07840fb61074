"""`mage demo`: the whole pipeline on Fashion-MNIST on a CPU, and a report of what it learned.

1. train a small VQGAN tokenizer (28x28 grey -> 7x7 tokens), 2. cache the training set's tokens,
3. pre-train a small MAGE on them, 4. sample images and inpaint test images, 5. measure: the Frechet
distance and classifier score (in the feature space of our own Fashion-MNIST classifier) of samples
against real test images, the tokenizer's reconstructions and a shuffled-token baseline; a linear probe
of MAGE features against raw pixels and a randomly initialised encoder. Everything lands in one folder,
with index.html to open first (docs/TRAINING.md describes the recipe and what changed from the paper).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import data as data_lib
from .checkpoint_io import write_atomic
from .demo_report import write_index
from .fmnist_classifier import ClassifierConfig, classifier_accuracy, classifier_outputs, load_or_train_classifier
from .inpaint import inpaint
from .metrics import classifier_score, codebook_usage, frechet_distance_from_features, psnr
from .model import CONSTRUCTORS
from .probe import ProbeConfig, linear_probe
from .report import save_image, save_image_grid
from .sampler import generate
from .tokenizer_io import load_tokenizer
from .train import TrainConfig, build_token_cache, train
from .transforms import Compose, RandomHorizontalFlip, RandomResizedCrop

TOKENIZER = dict(resolution=28, in_channels=1, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, embed_dim=32,
                 n_embed=32, norm_groups=8)
# A small model trained briefly: the documented deviations from the reference (docs/TRAINING.md) are the
# untied output layer and no dropout.
MODEL = dict(embed_dim=128, depth=6, num_heads=4, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
             dropout=0.0, head="untied")


@dataclasses.dataclass
class DemoConfig:
    """Sizes of the demo. The defaults take 11.5-17 minutes on 2 quiet CPU cores (docs/TRAINING.md), `quick()`
    1-2; most of the time is MAGE pre-training (steps x batch) and the tokenizer (steps)."""

    out_dir: str = "report"
    tokenizer: dict = dataclasses.field(default_factory=lambda: dict(TOKENIZER))
    tokenizer_steps: int = 500
    tokenizer_batch_size: int = 64
    # RandomResizedCrop scale of the tokenizer's training images: whole garments, as it encodes (the reference's
    # 0.2-1 needed 1000 steps for the same test PSNR, docs/TRAINING.md)
    tokenizer_crop_scale: tuple = (0.8, 1.0)
    model: dict = dataclasses.field(default_factory=lambda: dict(MODEL))
    objective: str = "mage"  # or "mage-c" (MAGE with the contrastive term, section 7)
    mage_steps: int = 1750
    batch_size: int = 64  # MAGE
    lr: float = 2e-3
    mask_ratio_per_sample: bool = True  # a mask ratio per image, not per step (docs/TRAINING.md)
    contrastive_weight: float = 0.1
    train_images: int = 30000  # images whose tokens MAGE pre-trains on (`crops` augmented views each)
    crops: int = 2
    crop_scale: tuple = (0.8, 1.0)  # RandomResizedCrop scale of the cached views
    test_images: int = 10000  # tokenizer PSNR; reference set of the Frechet distance; probe test images
    probe_train: int = 10000
    probe_test: int = 2000
    probe_epochs: int = 30
    num_samples: int = 1000  # for the Frechet distance (a grid of 64 is saved)
    sample_steps: int = 8  # measured at 49 tokens: 4, 6, 8, 12, 20 steps; 8 was best (docs/TRAINING.md)
    # Confidence noise 4.5 * (1 - r)^3 (MaskGIT's 4.5, annealed sooner than the papers' linear 4.5 * (1 - r)):
    # measured in docs/TRAINING.md
    choice_temperature: float = 4.5
    choice_temperature_power: float = 3.0
    temperature: float = 1.0
    classifier_train_images: int | None = None  # the Frechet-distance classifier's training set (None: 60000)
    classifier_epochs: int = 2
    seed: int = 0
    quick_run: bool = False  # the CI-sized run: the report says its numbers are not meant to be good

    @classmethod
    def quick(cls, out_dir: str = "report") -> "DemoConfig":
        return cls(out_dir=out_dir, tokenizer_steps=80, mage_steps=150, batch_size=32, train_images=3000,
                   test_images=2000, probe_train=2000, probe_test=500, probe_epochs=10, num_samples=200,
                   sample_steps=8, classifier_train_images=20000, classifier_epochs=1, quick_run=True)


def _save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    save_image_grid(images, path, nrow=nrow, scale=2)


# Batch of the demo's inference passes (probe features, sampling): 64-image batches of 50 tokens keep a
# block's activations in cache on a CPU; 500 took 25-45% longer (measured on 2 cores).
INFER_BATCH = 64


def _short_sequence_attention():
    """The demo's sequences are 50 tokens: on a CPU, PyTorch's plain (math) attention cost about 13% less
    CPU time per MAGE training step than its flash kernel, which is built for long sequences (measured on
    2 AVX2 cores). The result is the same attention up to float rounding."""
    return sdpa_kernel(SDPBackend.MATH) if not torch.cuda.is_available() else contextlib.nullcontext()


@torch.no_grad()
def probe_features(model, ids: torch.Tensor, grid: int = 3) -> dict[str, torch.Tensor]:
    """The encoder's last-block token outputs on the unmasked image (as `MAGE.forward_features`), pooled
    two ways: "global_pool", the mean over all tokens [B, D] (the paper's probe, section 6), and "grid",
    the means over grid x grid cells of the token grid [B, grid * grid * D]. The grid pool is the
    demo's headline probe, a deviation for this small, briefly trained model (docs/TRAINING.md): it keeps
    where a garment's parts are, which the global mean of 49 tokens of width 128 loses. 3x3 cells of a 7x7
    grid overlap by one token (adaptive average pooling)."""
    c = model.config
    x = model.token_emb(torch.cat([ids.new_full((ids.shape[0], 1), c.cls_id), ids], dim=1))
    for blk in model.blocks:
        x = blk(x)
    tokens = x[:, 1:].float()
    spatial = tokens.unflatten(1, (c.tokenizer.grid, c.tokenizer.grid)).permute(0, 3, 1, 2)  # (B, D, g, g)
    return {"grid": torch.nn.functional.adaptive_avg_pool2d(spatial, grid).flatten(1),
            "global_pool": tokens.mean(1)}


class _Stages:
    """Times each stage (wall seconds, and the process's CPU seconds, which other programs on a busy
    machine do not inflate much) and lets the thread governor re-decide between stages."""

    def __init__(self, governor):
        self.governor, self.times, self.cpu_times = governor, {}, {}

    def __call__(self, name: str):
        stages = self

        class _Stage:
            def __enter__(self):
                if stages.governor is not None:
                    stages.governor.update(force=True)
                self.t, self.c = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                stages.times[name] = time.perf_counter() - self.t
                stages.cpu_times[name] = time.process_time() - self.c

        return _Stage()


def run_demo(cfg: DemoConfig, governor=None) -> dict:
    """Run the demo into cfg.out_dir and return report.json's content.

    governor: a `mage.threads.ThreadGovernor` (`mage demo --threads auto`) re-choosing the CPU threads as
    the machine's load changes; None leaves torch's thread count alone."""
    with _short_sequence_attention():
        return _run_demo(cfg, governor)


def _run_demo(cfg: DemoConfig, governor) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    stage = _Stages(governor)
    report: dict = {"config": dataclasses.asdict(cfg), "quick": cfg.quick_run}
    t_all, c_all = time.perf_counter(), time.process_time()
    train_x, train_y = data_lib.load_fashion_mnist("train")
    test_x, test_y = data_lib.load_fashion_mnist("test")
    test_x, test_y = test_x[: cfg.test_images].float() / 255, test_y[: cfg.test_images]

    # 1. Tokenizer.
    with stage("tokenizer_train_s"):
        tok_cfg = TrainConfig(objective="tokenizer", data="fashion-mnist", image_size=28, tokenizer=cfg.tokenizer,
                              steps=cfg.tokenizer_steps, batch_size=cfg.tokenizer_batch_size, lr=2e-3,
                              warmup_steps=min(50, cfg.tokenizer_steps // 10), weight_decay=0.0,
                              crop_scale=tuple(cfg.tokenizer_crop_scale),
                              out_dir=str(out / "tokenizer"), log_every=10, ckpt_every=10**9,
                              codebook_restart_every=50, seed=cfg.seed, overwrite=True)
        train(tok_cfg, governor=governor)
    tokenizer = load_tokenizer(out / "tokenizer" / "tokenizer.safetensors").eval()
    with torch.no_grad():
        test_ids = torch.cat([tokenizer.encode(x) for x in test_x.split(1000)])
        recon = torch.cat([tokenizer.decode(i) for i in test_ids.split(1000)])
    counts = torch.bincount(test_ids.flatten(), minlength=tokenizer.config.n_embed)
    report["tokenizer"] = {"test_psnr_db": float(psnr(recon, test_x).mean()), **codebook_usage(counts)}
    _save_grid(test_x[:64], out / "test_images.png")
    _save_grid(recon[:64], out / "tokenizer_reconstructions.png")

    # 2. Token cache of augmented training images.
    with stage("token_cache_s"):
        ds = data_lib.TensorImageDataset(train_x[: cfg.train_images], train_y[: cfg.train_images], seed=cfg.seed)
        ds.transform = Compose([RandomResizedCrop(28, tuple(cfg.crop_scale)), RandomHorizontalFlip()])
        build_token_cache(tokenizer, ds, str(out / "tokens.ckpt"), crops=cfg.crops, data="fashion-mnist")

    # 3. MAGE pre-training on the cached tokens.
    with stage("mage_train_s"):
        mage_cfg = TrainConfig(objective=cfg.objective, data="fashion-mnist", image_size=28, model="mage_vit_tiny",
                               model_overrides=cfg.model, tokenizer=cfg.tokenizer,
                               tokenizer_checkpoint=str(out / "tokenizer" / "tokenizer.safetensors"),
                               token_cache=str(out / "tokens.ckpt"), steps=cfg.mage_steps, batch_size=cfg.batch_size,
                               lr=cfg.lr, warmup_steps=max(cfg.mage_steps // 20, 1),
                               mask_ratio_per_sample=cfg.mask_ratio_per_sample,
                               contrastive_weight=cfg.contrastive_weight, out_dir=str(out / "mage"), log_every=10,
                               ckpt_every=10**9, seed=cfg.seed, overwrite=True)
        train(mage_cfg, governor=governor)
    from .checkpoint import load

    model = load(out / "mage" / "model.safetensors").eval()
    c = model.config
    report["model"] = {"grid": c.tokenizer.grid, "codebook_size": c.codebook_size, "objective": cfg.objective,
                       "summary": f"{cfg.objective.upper()}, encoder {c.depth} blocks of width {c.embed_dim}, decoder "
                                  f"{c.decoder_depth} blocks; {cfg.mage_steps} steps of {cfg.batch_size} images"}

    # 4. Samples and inpainting.
    g = torch.Generator().manual_seed(cfg.seed)
    with stage("sampling_s"):
        samples = generate(model, cfg.num_samples, steps=cfg.sample_steps, choice_temperature=cfg.choice_temperature,
                           temperature=cfg.temperature, generator=g, batch_size=INFER_BATCH,
                           choice_temperature_power=cfg.choice_temperature_power)
    report["sampling_images_per_s"] = cfg.num_samples / stage.times["sampling_s"]
    _save_grid(samples[:64], out / "samples.png")
    hole = torch.zeros(8, 28, 28, dtype=torch.bool)
    hole[:, 8:20, 8:20] = True
    filled = inpaint(model, test_x[:8], hole, ring=0, steps=cfg.sample_steps,
                     choice_temperature=cfg.choice_temperature, temperature=cfg.temperature, generator=g,
                     choice_temperature_power=cfg.choice_temperature_power)
    holed = test_x[:8].clone()
    holed[:, :, 8:20, 8:20] = 0.5
    _save_grid(torch.cat([test_x[:8], holed, filled]), out / "inpainting.png")
    # One test image and its hole as PNG files, to try `mage inpaint` on the demo's own model.
    save_image(test_x[0], out / "inpaint_example.png")
    save_image(hole[0][None].float(), out / "inpaint_mask.png")
    report["inpaint_command"] = (f"mage inpaint --checkpoint {out / 'mage' / 'model.safetensors'} --image "
                                 f"{out / 'inpaint_example.png'} --mask {out / 'inpaint_mask.png'} --ring 0 "
                                 f"--steps {cfg.sample_steps} --temperature {cfg.choice_temperature} "
                                 f"--temperature-power {cfg.choice_temperature_power} "
                                 f"--out {out / 'inpainted.png'}")

    # 5a. Frechet distance and classifier score in our classifier's feature space.
    with stage("classifier_s"):
        clf = load_or_train_classifier(ClassifierConfig(epochs=cfg.classifier_epochs,
                                                        train_size=cfg.classifier_train_images))
    with stage("generation_metrics_s"):
        n = cfg.num_samples
        report["classifier"] = {"test_accuracy": classifier_accuracy(clf, test_x, test_y)}
        ref = test_x[:n]
        f_ref, _ = classifier_outputs(clf, ref)
        shuffled = test_ids[:n].clone()
        perm = torch.stack([torch.randperm(shuffled.shape[1], generator=g) for _ in range(shuffled.shape[0])])
        shuffled = shuffled.gather(1, perm)  # right token statistics, no spatial structure
        with torch.no_grad():
            shuffled_images = tokenizer.decode(shuffled)
        _save_grid(shuffled_images[:64], out / "shuffled_token_baseline.png")
        # Other real test images give the floor of the Frechet distance at this sample size.
        others = test_x[n : 2 * n] if test_x.shape[0] >= 2 * n else None
        gen = {}
        for name, images in (("test_images", others), ("tokenizer_reconstructions", recon[:n]),
                             ("samples", samples), ("shuffled_tokens", shuffled_images)):
            if images is None:
                continue
            feats, probs = classifier_outputs(clf, images)
            gen[name] = {"frechet_distance": frechet_distance_from_features(feats, f_ref),
                         "classifier_score": classifier_score(probs)[0]}
        report["generation"] = gen
        rec = gen["tokenizer_reconstructions"]
        report["samples_vs_reconstructions"] = {
            "frechet_distance_ratio": gen["samples"]["frechet_distance"] / max(rec["frechet_distance"], 1e-9),
            "classifier_score_ratio": gen["samples"]["classifier_score"] / max(rec["classifier_score"], 1e-9)}

    # 5b. Linear probe: MAGE features vs raw pixels vs a randomly initialised MAGE encoder.
    with stage("probe_s"):
        # The probe's training images are the last `probe_train` of the training set (MAGE pre-trained on
        # them without labels when train_images covers them, as the paper's probe uses ImageNet train).
        ptrain_x, ptrain_y = train_x[-cfg.probe_train :].float() / 255, train_y[-cfg.probe_train :]
        ptest_x, ptest_y = test_x[: cfg.probe_test], test_y[: cfg.probe_test]
        with torch.no_grad():
            ptrain_ids = torch.cat([tokenizer.encode(x) for x in ptrain_x.split(1000)])
            ptest_ids = test_ids[: cfg.probe_test]
        random_model = CONSTRUCTORS["mage_vit_tiny"](tokenizer=tokenizer.config, **cfg.model).eval()
        probe_cfg = ProbeConfig(epochs=cfg.probe_epochs, warmup_epochs=max(cfg.probe_epochs // 10, 1),
                                optimizer="sgd", base_lr=0.1, batch_size=256, seed=cfg.seed)
        key = cfg.objective.replace("-", "_")
        features = {}
        for name, m in ((key, model), ("random_init", random_model)):
            parts = [[probe_features(m, i) for i in ids.split(INFER_BATCH)] for ids in (ptrain_ids, ptest_ids)]
            for pool in ("grid", "global_pool"):
                suffix = "" if pool == "grid" else "_global_pool"
                features[name + suffix] = [torch.cat([p[pool] for p in part]) for part in parts]
        features["raw_pixels"] = [ptrain_x.flatten(1), ptest_x.flatten(1)]
        report["linear_probe_top1"] = {
            name: linear_probe(ftr, ptrain_y, fte, ptest_y, probe_cfg, num_classes=10).top1
            for name, (ftr, fte) in features.items()}
        report["probe_features"] = (
            "Encoder features of the unmasked image (last block's token outputs): "
            f"'{key}' and 'random_init' average them over a 3x3 grid of cells of the 7x7 token grid (this demo's "
            f"probe); '..._global_pool' averages all tokens (the paper's probe); 'raw_pixels' is the 784 pixel values.")

    stage.times["total_s"] = time.perf_counter() - t_all
    stage.cpu_times["total_s"] = time.process_time() - c_all
    report["times_s"] = stage.times
    report["cpu_times_s"] = stage.cpu_times
    report["threads"] = _threads_report(governor)
    write_atomic(out / "report.json", json.dumps(report, indent=1))
    write_index(report, out)
    return report


def _threads_report(governor) -> dict:
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if governor is None:
        return {"cpus": cpus, "policy": f"fixed: {torch.get_num_threads()}",
                "summary": f"{torch.get_num_threads()} (fixed)"}
    used = [t for _, t, _ in governor.history]
    summary = (f"auto: {min(used)}-{max(used)} of {cpus} cores, re-decided {len(used)} times from the load of "
               "other programs" if used else f"auto ({governor.threads})")
    return {"cpus": cpus, "policy": "auto", "history": governor.history, "summary": summary,
            "wait_policy": os.environ.get("OMP_WAIT_POLICY", "OpenMP default")}


def summary(report: dict) -> str:
    """The report's headline figures as a few lines of text (what `mage demo` prints)."""
    t, gen, probe = report["times_s"], report["generation"], report["linear_probe_top1"]
    ratio = report["samples_vs_reconstructions"]
    out = Path(report["config"]["out_dir"])
    lines = [
        f"tokenizer: test PSNR {report['tokenizer']['test_psnr_db']:.1f} dB, "
        f"{report['tokenizer']['used_fraction'] * 100:.0f}% of the codebook used",
        "linear probe top-1: " + ", ".join(f"{k} {v * 100:.1f}%" for k, v in probe.items()),
        "Frechet distance to the test set (lower is better): "
        + ", ".join(f"{k} {v['frechet_distance']:.1f}" for k, v in gen.items()),
        f"samples vs tokenizer reconstructions: Frechet distance {ratio['frechet_distance_ratio']:.2f}x, "
        f"classifier score {ratio['classifier_score_ratio'] * 100:.0f}%",
        f"time: {t['total_s'] / 60:.1f} min (tokenizer {t['tokenizer_train_s']:.0f} s, MAGE {t['mage_train_s']:.0f} "
        f"s); threads: {report['threads']['summary']}",
        f"report: {out / 'index.html'}",
        f"try: {report['inpaint_command']}",
    ]
    return "\n".join(lines)
