"""A small Fashion-MNIST CNN whose features give an in-domain Frechet distance and classifier score.

The Inception network behind FID costs ~0.35 s per image on a CPU and was trained on photographs; for
Fashion-MNIST samples a classifier trained on Fashion-MNIST itself is both fast and in-domain.
It is trained once with a fixed seed (about a minute on 2 CPU cores for 2 epochs over the 60k train images,
~88% test accuracy) and cached under $MAGE_CACHE_DIR (default ~/.cache/mage) in a file named by a hash of its
config, so every run compares samples in the same feature space.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import InputValueError, all_finite, check_config
from .checkpoint_io import CheckpointError, load_checkpoint, save_checkpoint
from .metrics import classifier_score, frechet_distance_from_features

ARCH_VERSION = 1  # bump when FashionClassifier changes, so stale cache files are not reused


@dataclass(frozen=True)
class ClassifierConfig:
    epochs: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 16
    feature_dim: int = 128
    train_size: int | None = None  # first N train images; None: all 60000
    seed: int = 0

    def __post_init__(self):
        check_config(self)

    def key(self) -> str:
        """Hash of the config and architecture version: the cache file name."""
        text = json.dumps({"arch": ARCH_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class FashionClassifier(nn.Module):
    """[N, 1, 28, 28] -> logits [N, 10]; `features` is the penultimate (post-ReLU) layer [N, feature_dim]."""

    def __init__(self, width: int = 16, feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 7 * 7, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float images [N, 1 or 3, H, W] -> float [N, 1, 28, 28] (RGB averaged, resized)."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise InputValueError(f"images must have shape [N, 1 or 3, H, W], got {tuple(images.shape)}")
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prepare(images)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, w, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, 2w, 7, 7)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def default_cache_dir() -> Path:
    return Path(os.environ.get("MAGE_CACHE_DIR") or Path.home() / ".cache" / "mage")


def train_classifier(
    config: ClassifierConfig = ClassifierConfig(),
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> FashionClassifier:
    """Train with Adam from a fixed seed on Fashion-MNIST train (or the given images [N, 1, 28, 28] / labels).

    The global RNG state is left untouched.
    """
    if images is None or labels is None:
        from .data import load_fashion_mnist

        images, labels = load_fashion_mnist("train")
    if config.train_size is not None:
        images, labels = images[: config.train_size], labels[: config.train_size]
    x = FashionClassifier.prepare(images)
    y = labels.long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = FashionClassifier(config.width, config.feature_dim)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        generator = torch.Generator().manual_seed(config.seed)
        model.train()
        for _ in range(config.epochs):
            order = torch.randperm(x.shape[0], generator=generator)
            for idx in order.split(config.batch_size):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return model.eval()


def load_or_train_classifier(
    config: ClassifierConfig = ClassifierConfig(), cache_dir: str | os.PathLike | None = None
) -> FashionClassifier:
    """The cached classifier for `config`, training and caching it on first use (a bad cache file is retrained)."""
    path = Path(cache_dir or default_cache_dir()) / f"fmnist_classifier_{config.key()}.ckpt"
    model = FashionClassifier(config.width, config.feature_dim)
    if path.is_file():
        try:
            state = load_checkpoint(path)
            weights = state.get("model") if isinstance(state, dict) else None
            if isinstance(weights, dict) and all(isinstance(v, torch.Tensor) and all_finite(v) for v in weights.values()):
                model.load_state_dict(weights)
                return model.eval()
        except (CheckpointError, RuntimeError):
            pass  # a stale, damaged or poisoned cache is retrained below and overwritten
    model = train_classifier(config)
    path.parent.mkdir(parents=True, exist_ok=True)  # the cache folder is ours to make
    save_checkpoint({"model": model.state_dict(), "config": dataclasses.asdict(config)}, path, keep_previous=False)
    return model


@torch.no_grad()
def classifier_outputs(
    model: FashionClassifier, images: torch.Tensor, batch_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features [N, feature_dim] and softmax probabilities [N, 10] (float32, on CPU)."""
    model.eval()
    device = next(model.parameters()).device
    feats, probs = [], []
    for chunk in images.split(batch_size):
        f = model.features(chunk.to(device))
        feats.append(f.cpu())
        probs.append(model.head(f).softmax(-1).cpu())
    return torch.cat(feats), torch.cat(probs)


def classifier_accuracy(model: FashionClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    _, probs = classifier_outputs(model, images)
    return float((probs.argmax(1) == labels).float().mean())


def fmnist_frechet_distance(
    images1: torch.Tensor, images2: torch.Tensor, model: FashionClassifier | None = None
) -> float:
    """Frechet distance between two image sets in the classifier's feature space (lower: closer)."""
    model = model or load_or_train_classifier()
    return frechet_distance_from_features(classifier_outputs(model, images1)[0], classifier_outputs(model, images2)[0])


def fmnist_classifier_score(
    images: torch.Tensor, model: FashionClassifier | None = None, splits: int = 1
) -> tuple[float, float]:
    """The Inception Score formula on the classifier's softmax: 1 (uninformative) to 10 (confident and diverse)."""
    model = model or load_or_train_classifier()
    return classifier_score(classifier_outputs(model, images)[1], splits)
