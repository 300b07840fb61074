"""The MAE baseline (He et al., 2022; docs/REFERENCE.md appendix): the same ViT encoder-decoder on pixel
patches, masked patches removed before the encoder and padded back with one shared learned mask token,
trained to reconstruct the pixels of the removed patches. It lets the paper's MAGE-vs-MAE comparison
run on the same data with the same kernels (`gather_keep`, `pad_with_cls(pad=...)`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

import mage_kernels

from ._checks import InputValueError, check_config, nearest_multiples
from .model import Block


@dataclasses.dataclass
class MAEConfig:
    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    decoder_embed_dim: int = 128
    decoder_depth: int = 4
    decoder_num_heads: int = 4
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    norm_pix_loss: bool = True

    def __post_init__(self):
        check_config(self)
        if self.image_size % self.patch_size:
            raise InputValueError(f"MAEConfig: image_size {self.image_size} must be a multiple of patch_size "
                                  f"{self.patch_size}, e.g. {nearest_multiples(self.image_size, self.patch_size)}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [1 + grid^2, dim] (MAE), slot 0 (class) all zeros."""
    if dim % 4:
        raise InputValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    hh, ww = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for c in (ww.reshape(-1), hh.reshape(-1)):
        angles = c[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1).float()  # (grid^2, dim)
    return torch.cat([torch.zeros(1, dim), table])


class MAE(nn.Module):
    def __init__(self, config: MAEConfig | None = None):
        super().__init__()
        self.config = c = config or MAEConfig()
        D, Dd = c.embed_dim, c.decoder_embed_dim
        self.patch_embed = nn.Conv2d(c.in_channels, D, c.patch_size, c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("pos_embed", sincos_pos_embed(D, c.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(D, c.num_heads, c.mlp_ratio, 0.0, c.norm_eps, False) for _ in range(c.depth))
        self.norm = nn.LayerNorm(D, eps=c.norm_eps)
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(Dd))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(Dd, c.grid), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, c.decoder_num_heads, c.mlp_ratio, 0.0, c.norm_eps, False) for _ in range(c.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(Dd, eps=c.norm_eps)
        self.decoder_pred = nn.Linear(Dd, c.patch_size**2 * c.in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, p*p*C], patches row-major, pixels (p, p, C) inside a patch."""
        p, g = self.config.patch_size, self.config.grid
        B, C = images.shape[:2]
        x = images.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, g * g, p * p * C)

    def forward_encoder(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, C, H, W] -> [B, 1+Lk, D]; keep_idx [B, Lk] the visible patches (None: all)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, L, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)  # (B, 1+L, D)
        if keep_idx is not None:
            x = mage_kernels.gather_keep(x, keep_idx)  # (B, 1+Lk, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor, masked: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """Pixel predictions [B, L, p*p*C] for every patch (the loss reads the masked ones).

        masked: bool [B, L] (every masked patch is removed, MAE has no masked-but-kept patches);
        keep_idx: int64 [B, Lk] the visible patches, ascending (`mage_kernels.mask_plan(noise, M, M)`).
        """
        y = self.decoder_embed(self.forward_encoder(images, keep_idx))  # (B, 1+Lk, Dd)
        z = mage_kernels.pad_with_cls(y, keep_idx, masked, pos_embed=self.decoder_pos_embed, pad=self.mask_token)
        for blk in self.decoder_blocks:
            z = blk(z)
        return self.decoder_pred(self.decoder_norm(z))[:, 1:]  # (B, L, p*p*C)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Representation [B, D]: mean of the patch outputs of the unmasked encoder (as MAGE's probe)."""
        return self.forward_encoder(images)[:, 1:].mean(dim=1)


def mae_masked_count(num_tokens: int, ratio: float = 0.75) -> int:
    """MAE's fixed mask ratio (75%) as a patch count."""
    return int(math.ceil(num_tokens * ratio))
