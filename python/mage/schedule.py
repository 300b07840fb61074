"""Learning-rate schedule and optimizer parameter groups of the reference recipe (docs/REFERENCE.md 4.10, 6).

The schedule is a pure function of the iteration, so a checkpoint only needs the step counter to resume it.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """The reference's linear scaling rule: lr = blr * effective_batch / 256 (4.10)."""
    return base_lr * effective_batch / 256


def cosine_lr(step: float, total_steps: float, warmup_steps: float, lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then a half cosine down to `min_lr` at `total_steps`.

    `step` counts iterations (fractional epochs work too: the reference uses epoch + i / iters_per_epoch).
    Past `total_steps` the rate stays at `min_lr`.
    """
    if step < warmup_steps:
        return lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1e-12)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, times the group's optional `lr_scale` (layer decay in fine-tuning)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def param_groups_weight_decay(
    model: nn.Module, weight_decay: float, skip: Iterable[str] = ()
) -> list[dict]:
    """Two AdamW groups as timm's `add_weight_decay` (4.10): 1-D parameters (norms, biases, ...), names ending in
    `.bias` and names in `skip` get no decay; everything else, including 3-D position embeddings and embedding
    tables, gets `weight_decay`. Frozen parameters are left out."""
    skip = set(skip)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.95),
    skip: Iterable[str] = (),
) -> torch.optim.AdamW:
    """AdamW with the reference's betas (0.9, 0.95), weight decay 0.05 and exclusions (4.10)."""
    return torch.optim.AdamW(param_groups_weight_decay(model, weight_decay, skip), lr=lr, betas=betas)
