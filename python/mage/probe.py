"""Linear probe on frozen features, as the reference's `main_linprobe.py` (docs/REFERENCE.md 6).

head = BatchNorm1d(D, affine=False, eps=1e-6) -> Linear(D, K) with trunc-normal(std 0.01) weights and zero bias,
trained with LARS (lr = blr * batch / 256, blr 0.1, no weight decay) under a cosine schedule with warm-up.

Works with any feature extractor `images [B, ...] -> features [B, D]`. Features are computed once, from the
un-augmented images, and the head trains on them; the reference instead re-crops the images every epoch
(its probe's TF-style crop is `mage.transforms.probe_train_transform`), which costs a forward of the frozen
network per sample per epoch and matters little for a linear head on small data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import InputTypeError, InputValueError, all_finite, check_config, check_int, check_tensor
from .schedule import cosine_lr, scaled_lr, set_lr


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), in the form MAE/MAGE use.

    For each parameter with more than one dimension, the update g + wd * p is scaled by
    trust_coefficient * ||p|| / ||g + wd * p|| (left unscaled where either norm is 0); 1-D parameters (biases,
    norm weights) get neither weight decay nor scaling. Then buf = momentum * buf + update; p -= lr * buf.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.dim() > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = group["trust_coefficient"] * p_norm / u_norm
                    # torch.where keeps this free of host syncs.
                    update = update * torch.where((p_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


class LinearProbeHead(nn.Module):
    """[B, D] -> [B, K]: optional parameter-free LayerNorm (the frozen identity-affine `fc_norm` of the
    reference's global-pool path), BatchNorm1d without affine (eps 1e-6), then Linear."""

    def __init__(self, dim: int, num_classes: int, layer_norm: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.layer_norm = layer_norm
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features
        if self.layer_norm:
            x = F.layer_norm(x, x.shape[-1:], eps=1e-6)
        return self.linear(self.norm(x))


@dataclass(frozen=True)
class ProbeConfig:
    """Defaults are the reference's (6): LARS, blr 0.1, wd 0, 90 epochs with 10 of warm-up, cosine to 0.

    Small data: LARS changes each weight matrix by about lr * 0.001 * ||w|| per step, which works for the
    reference's ~28k steps at lr 1.6 (batch 4096) but barely moves the head in a few hundred steps at a small
    batch. There use `optimizer="sgd"` (blr 0.1 gives ~96% on raw digit pixels in 15 epochs), or LARS with a
    base_lr of 10-20.
    """

    epochs: int = 90
    warmup_epochs: int | None = None  # None: 10, or `epochs` when fewer (a warm-up longer than the run never ends)
    batch_size: int = 256
    base_lr: float = 0.1
    optimizer: str = "lars"  # or "sgd" (momentum 0.9)
    momentum: float = 0.9
    weight_decay: float = 0.0
    layer_norm: bool = False
    seed: int = 0

    def __post_init__(self):
        check_config(self)
        if self.optimizer not in ("lars", "sgd"):
            raise InputValueError(f"ProbeConfig: optimizer must be 'lars' or 'sgd', got {self.optimizer!r}")
        if self.warmup_epochs is None:
            object.__setattr__(self, "warmup_epochs", min(10, self.epochs))
        elif self.warmup_epochs > self.epochs:
            raise InputValueError(f"ProbeConfig: warmup_epochs {self.warmup_epochs} is more than epochs {self.epochs}: "
                                  "the learning rate would never reach its peak; give at most epochs, or leave it "
                                  "unset (10, or epochs when fewer)")


@dataclass
class ProbeResult:
    top1: float  # held-out accuracy, in [0, 1]
    top5: float
    train_top1: float
    head: LinearProbeHead
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch


def _topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(1)
    return float(hits.float().mean()) if labels.numel() else float("nan")


@torch.no_grad()
def _predict(head: nn.Module, features: torch.Tensor, batch_size: int) -> torch.Tensor:
    head.eval()
    if features.shape[0] == 0:
        return features.new_zeros(0, head.linear.out_features)
    return torch.cat([head(chunk) for chunk in features.split(batch_size)])


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    config: ProbeConfig = ProbeConfig(),
    num_classes: int | None = None,
) -> ProbeResult:
    """Train the probe head on train_features [N, D] / train_labels [N] and report accuracy on the test split.

    The schedule is per iteration: warm-up over `warmup_epochs`, cosine to 0 at the end (4.10, 6).
    """
    for name, t in (("train_features", train_features), ("train_labels", train_labels),
                    ("test_features", test_features), ("test_labels", test_labels)):
        check_tensor("linear_probe", name, t)
    if train_features.dim() != 2 or test_features.dim() != 2 or train_features.shape[1] != test_features.shape[1]:
        raise InputValueError(
            "linear_probe: train_features and test_features must be [N, D] with one D, got train_features "
            f"{tuple(train_features.shape)}, test_features {tuple(test_features.shape)}"
        )
    if train_features.shape[0] < 2:
        raise InputValueError(f"linear_probe: train_features must have at least 2 rows (the head's BatchNorm trains on "
                              f"batches of them), got {train_features.shape[0]}")
    if train_labels.shape != train_features.shape[:1] or test_labels.shape != test_features.shape[:1]:
        raise InputValueError(f"linear_probe: train_labels and test_labels must be [N], one per feature row, got "
                              f"train_labels {tuple(train_labels.shape)} for {train_features.shape[0]} rows, "
                              f"test_labels {tuple(test_labels.shape)} for {test_features.shape[0]} rows")
    for name, labels in (("train_labels", train_labels), ("test_labels", test_labels)):
        if labels.is_floating_point() or labels.dtype == torch.bool or (labels.numel() and int(labels.min()) < 0):
            raise InputValueError(f"linear_probe: {name} must be non-negative integer class ids, got {labels.dtype}"
                                  + (f" with min {labels.min().item()}" if labels.numel() else ""))
    for name, features in (("train_features", train_features), ("test_features", test_features)):
        if not all_finite(features):
            raise InputValueError(f"linear_probe: {name} has NaN or inf values")
    if not isinstance(config, ProbeConfig):
        raise InputTypeError(f"linear_probe: config must be a ProbeConfig, got {type(config).__name__}")
    device = train_features.device
    train_labels, test_labels = train_labels.long().to(device), test_labels.long().to(device)
    x_train, x_test = train_features.float(), test_features.float().to(device)
    seen = int(max(int(train_labels.max()) if train_labels.numel() else 0,
                   int(test_labels.max()) if test_labels.numel() else 0)) + 1
    if num_classes is None:
        num_classes = seen
    elif check_int("linear_probe", "num_classes", num_classes, 1) < seen:
        raise InputValueError(f"linear_probe: num_classes must be at least the largest label + 1 ({seen}), "
                              f"got {num_classes}")
    generator = torch.Generator().manual_seed(config.seed)
    head = LinearProbeHead(x_train.shape[1], num_classes, config.layer_norm, generator).to(device)
    lr = scaled_lr(config.base_lr, config.batch_size)
    if config.optimizer == "lars":
        opt = LARS(head.parameters(), lr=lr, weight_decay=config.weight_decay, momentum=config.momentum)
    else:
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)

    n = x_train.shape[0]
    steps_per_epoch = max(n // config.batch_size, 1)  # drop_last, as the reference's loader
    total, warmup = config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch
    losses = []
    step = 0
    for _ in range(config.epochs):
        head.train()
        order = torch.randperm(n, generator=generator).to(device)
        epoch_loss = torch.zeros((), device=device)
        for i in range(steps_per_epoch):
            idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            set_lr(opt, cosine_lr(step, total, warmup, lr))
            loss = F.cross_entropy(head(x_train[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_loss += loss.detach()
            step += 1
        losses.append(float(epoch_loss) / steps_per_epoch)

    train_logits = _predict(head, x_train, 4096)
    test_logits = _predict(head, x_test, 4096)
    return ProbeResult(
        top1=_topk_accuracy(test_logits, test_labels, 1),
        top5=_topk_accuracy(test_logits, test_labels, 5),
        train_top1=_topk_accuracy(train_logits, train_labels, 1),
        head=head,
        losses=losses,
    )


@torch.no_grad()
def extract_features(
    extractor: Callable[[torch.Tensor], torch.Tensor],
    data: tuple[torch.Tensor, torch.Tensor] | Iterable[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a frozen `extractor` (put modules in eval mode first) over (images, labels) tensors or an iterable of
    such batches (a DataLoader); returns float32 features [N, D] on CPU and labels [N]."""
    check_int("extract_features", "batch_size", batch_size, 1)
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        images, labels = data
        batches: Iterable = zip(images.split(batch_size), labels.split(batch_size))
    else:
        batches = data
    feats, labs = [], []
    for x, y in batches:
        if device is not None:
            x = x.to(device, non_blocking=True)
        f = extractor(x)
        if f.dim() != 2:
            raise InputValueError(f"the extractor must return features [B, D], got {tuple(f.shape)}")
        feats.append(f.float().cpu())
        labs.append(torch.as_tensor(y).cpu())
    return torch.cat(feats), torch.cat(labs)


def probe_extractor(
    extractor: Callable[[torch.Tensor], torch.Tensor],
    train_data,
    test_data,
    config: ProbeConfig = ProbeConfig(),
    num_classes: int | None = None,
    device: str | torch.device | None = None,
) -> ProbeResult:
    """extract_features on both splits, then linear_probe."""
    train_f, train_y = extract_features(extractor, train_data, config.batch_size, device)
    test_f, test_y = extract_features(extractor, test_data, config.batch_size, device)
    return linear_probe(train_f, train_y, test_f, test_y, config, num_classes)
