"""The adversarial part of VQGAN training (Esser et al. 2021, "Taming Transformers", section 3.2): a PatchGAN
discriminator, its losses and the adaptive weight of the generator's adversarial term.

    D = PatchDiscriminator(in_channels=3)                 # [B, C, H, W] in [0, 1] -> patch logits [B, 1, h, w]
    d_loss = discriminator_loss(D(x), D(x_rec.detach()))  # hinge (default) or "non-saturating"
    g_loss = generator_loss(D(x_rec))
    w = adaptive_weight(grad(rec_loss, last_layer), grad(g_loss, last_layer))   # ||g_rec|| / (||g_gan|| + 1e-4)

The network is the N-layer PatchGAN of pix2pix (Isola et al. 2017) as taming-transformers and MaskGIT's VQGAN
use it: a 4x4 stride-2 conv + LeakyReLU(0.2), N-1 more 4x4 stride-2 convs with a norm, one 4x4 stride-1 conv with
a norm, and a 4x4 stride-1 conv to one logit per patch (70x70 receptive field for N = 3). Layer indices match
taming's `NLayerDiscriminator` (`main.{i}`), so with norm="batch" its state dict loads.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from ._checks import InputValueError

DISC_LOSSES = ("hinge", "non-saturating")
DISC_NORMS = ("group", "batch")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    # GroupNorm normalises each image on its own, so the result does not depend on how the batch is split
    # over processes or accumulation steps (BatchNorm's statistics do).
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """[B, C, H, W] images in [0, 1] -> patch logits [B, 1, h, w] (30x30 for 256x256 and layers=3).

    Inputs are mapped to [-1, 1] first, the range taming's discriminator sees.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, norm: str = "group"):
        super().__init__()
        if norm not in DISC_NORMS:
            raise InputValueError(f"norm must be one of {DISC_NORMS}, got {norm!r}")
        if layers < 1 or channels < 1:
            raise InputValueError(f"need layers >= 1 and channels >= 1, got layers={layers}, channels={channels}")
        self.layers = layers
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1  # the last normalised conv keeps the resolution
            seq += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                    _norm(norm, channels * mult), nn.LeakyReLU(0.2, True)]
        seq.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """pix2pix / taming initialisation: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def output_size(self, size: int) -> int:
        """Patch logits per side for `size` input pixels per side (<= 0: the input is too small)."""
        for _ in range(self.layers):
            size = (size + 2 - 4) // 2 + 1
        return size - 2  # two 4x4 stride-1 convs with padding 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        if min(self.output_size(h), self.output_size(w)) < 1:
            raise InputValueError(f"images of {h}x{w} are too small for a {self.layers}-layer PatchGAN discriminator "
                                  "(it would output no patch); use fewer disc_layers")
        return self.main(images * 2 - 1)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters of `module` do not require grad inside the block: the generator's adversarial term flows
    through the discriminator into the reconstruction without touching the discriminator's gradients."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """hinge: (E relu(1 - D(x)) + E relu(1 + D(x_rec))) / 2 (taming's default);
    non-saturating: (E softplus(-D(x)) + E softplus(D(x_rec))) / 2, the binary cross-entropy of the logits."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    if kind == "non-saturating":
        return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
    raise InputValueError(f"disc_loss must be one of {DISC_LOSSES}, got {kind!r}")


def generator_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The generator's adversarial term: -E D(x_rec) with the hinge loss (taming), E softplus(-D(x_rec)) with
    the non-saturating one (Goodfellow et al. 2014)."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "non-saturating":
        return F.softplus(-logits_fake).mean()
    raise InputValueError(f"disc_loss must be one of {DISC_LOSSES}, got {kind!r}")


def adaptive_weight(rec_grad: torch.Tensor, gan_grad: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||grad L_rec|| / (||grad L_gan|| + 1e-4), clamped to [0, 1e4] (taming, eq. 7), from the gradients
    of both losses at the decoder's last layer. Returned detached; the caller multiplies by disc_weight."""
    weight = torch.linalg.vector_norm(rec_grad.float()) / (torch.linalg.vector_norm(gan_grad.float()) + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class DiscriminatorObjective(nn.Module):
    """What the discriminator's optimizer and DDP see: forward(real, fake) -> (loss, logs)."""

    def __init__(self, net: PatchDiscriminator, kind: str = "hinge"):
        super().__init__()
        if kind not in DISC_LOSSES:
            raise InputValueError(f"disc_loss must be one of {DISC_LOSSES}, got {kind!r}")
        self.net = net
        self.kind = kind

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits_real, logits_fake = self.net(real), self.net(fake)
        loss = discriminator_loss(logits_real, logits_fake, self.kind)
        return loss, {"disc": loss.detach(), "logits_real": logits_real.detach().float().mean(),
                      "logits_fake": logits_fake.detach().float().mean()}
