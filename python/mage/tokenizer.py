"""The VQGAN tokenizer of MAGE: MaskGIT's convolutional VQGAN (docs/REFERENCE.md section 3).

An image in [0, 1] goes through a conv encoder (residual blocks, 2x2 average-pool downsampling, no
attention) to a grid of D-dim vectors; each vector becomes the index of its nearest codebook entry
(`mage_kernels.vq_nearest`). The decoder maps looked-up codes back to pixels (nearest upsample + conv).
Module and parameter names follow the reference, so the official tokenizer weights load strictly.

Quirks kept on purpose (section 3.2): the 1x1 shortcut of a channel-changing residual block is applied
to the block's own output (weights [out, out, 1, 1]); no quant_conv / post_quant_conv; two residual
blocks per decoder level; GroupNorm(32, eps=1e-6); no tanh on the output.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

import mage_kernels

from ._checks import check_config, check_images, to_model_dtype  # noqa: F401  (check_images: public here too)
from .hub import HubMixin
from ._checks import InputTypeError, InputValueError, nearest_multiples


@dataclasses.dataclass
class TokenizerConfig:
    """VQGAN sizes. The defaults are the official f16 tokenizer (section 3.1): 256x256 -> 16x16 tokens."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    embed_dim: int = 256  # code dimension = encoder output channels (z_channels; no quant_conv)
    n_embed: int = 1024  # codebook size K
    norm_groups: int = 32
    dropout: float = 0.0

    def __post_init__(self):
        check_config(self)
        self.ch_mult = tuple(self.ch_mult)
        if self.resolution % self.downsample != 0:
            raise InputValueError(
                f"TokenizerConfig: resolution {self.resolution} must be a multiple of the downsampling factor "
                f"2^(len(ch_mult)-1) = {self.downsample} (ch_mult {self.ch_mult}), e.g. "
                f"{nearest_multiples(self.resolution, self.downsample)}"
            )
        for c in {self.ch * m for m in self.ch_mult}:
            if c % self.norm_groups != 0:
                raise InputValueError(
                    f"TokenizerConfig: channel count {c} is not divisible by norm_groups={self.norm_groups}"
                )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        """Tokens per side: the token grid is grid x grid, flattened row-major."""
        return self.resolution // self.downsample

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @classmethod
    def official(cls) -> "TokenizerConfig":
        """The released MaskGIT/MAGE tokenizer: 54,515,587 parameters, codebook 1024 x 256."""
        return cls()

    @classmethod
    def tiny(cls, resolution: int = 32, n_embed: int = 64) -> "TokenizerConfig":
        """A CPU-sized tokenizer (f4: 32x32 -> 8x8 tokens) for tests, demos and small data."""
        return cls(resolution=resolution, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, embed_dim=16,
                   n_embed=n_embed, norm_groups=8)


def _norm(cfg: TokenizerConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv, twice, plus a residual. With in != out the 1x1 `nin_shortcut` acts on the
    block's output h, not on x (MaskGIT's JAX ResBlock, section 3.2): returns h + shortcut(h)."""

    def __init__(self, cfg: TokenizerConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(cfg, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(cfg, out_channels)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(out_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            return h + self.nin_shortcut(h)
        return x + h


class _Level(nn.Module):
    """One resolution level: `block.{i}` residual blocks, and on the decoder an `upsample.conv`."""

    def __init__(self, cfg: TokenizerConfig, in_channels: int, out_channels: int, upsample: bool = False):
        super().__init__()
        chans = [in_channels] + [out_channels] * cfg.num_res_blocks
        self.block = nn.ModuleList(ResnetBlock(cfg, a, b) for a, b in zip(chans[:-1], chans[1:]))
        if upsample:
            self.upsample = nn.Module()
            self.upsample.conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)


class _Mid(nn.Module):
    def __init__(self, cfg: TokenizerConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    """[B, 3, H, W] in [0, 1] -> [B, embed_dim, H/f, W/f]; parameter-free 2x2 average-pool downsampling."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        chans = [cfg.ch * m for m in (1,) + cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList(_Level(cfg, chans[i], chans[i + 1]) for i in range(len(cfg.ch_mult)))
        self.mid = _Mid(cfg, chans[-1])
        self.norm_out = _norm(cfg, chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], cfg.embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i < len(self.down) - 1:
                h = F.avg_pool2d(h, 2)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """[B, embed_dim, h, w] codes -> [B, 3, h*f, w*f]; levels run top (`up.{n-1}`) to bottom (`up.0`)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        top = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.embed_dim, top, 3, padding=1)
        self.mid = _Mid(cfg, top)
        n = len(cfg.ch_mult)
        # Level L receives the channels of level L+1 (the top level receives `top`).
        ins = [cfg.ch * m for m in cfg.ch_mult[1:]] + [top]
        self.up = nn.ModuleList(_Level(cfg, ins[i], cfg.ch * cfg.ch_mult[i], upsample=i > 0) for i in range(n))
        self.norm_out = _norm(cfg, cfg.ch * cfg.ch_mult[0])
        self.conv_out = nn.Conv2d(cfg.ch * cfg.ch_mult[0], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h)
            if i > 0:
                h = level.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGANTokenizer(nn.Module, HubMixin):
    """The frozen image tokenizer: `encode(images) -> ids [B, h*w]`, `decode(ids) -> images`.

    `quantize.embedding.weight` [K, D] is the codebook. Token ids are row-major over the (h, w) grid
    (MAGE position p = h * grid + w, section 3.3). Files: `save(path)` / `mage.load_tokenizer(path)`,
    `save_pretrained(dir)` / `VQGANTokenizer.from_pretrained(dir)`, `mage.load_official_tokenizer`.
    """

    def __init__(self, config: TokenizerConfig | None = None):
        super().__init__()
        self.config = config or TokenizerConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(self.config.n_embed, self.config.embed_dim)

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantize.embedding.weight

    def save(self, path: str) -> None:
        """Write weights and config to one safetensors file (`mage.load_tokenizer(path)` reads it back)."""
        from .tokenizer_io import save_tokenizer

        save_tokenizer(self, path)

    def _config_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.config).items()}

    @classmethod
    def _config_from_dict(cls, d: dict) -> TokenizerConfig:
        return TokenizerConfig(**d)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, check_range: bool = True) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> ids [B, h*w] int64 (exact nearest code, ties to the lowest id).

        Runs without autograd: ids are not differentiable and the tokenizer is frozen in MAGE."""
        check_images(images, self.config, check_range=check_range, device=self.codebook.device)
        z = self.encoder(to_model_dtype(images, self))  # (B, D, h, w)
        ids, _ = mage_kernels.vq_nearest(z, self.codebook)
        return ids

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h*w] -> code vectors [B, D, h, w] (the reference's `get_codebook_entry`)."""
        g = self.config.grid
        if ids.dim() != 2 or ids.shape[1] != g * g:
            raise InputValueError(f"ids must be [B, {g * g}] (a {g}x{g} token grid), got shape {tuple(ids.shape)}")
        if ids.dtype != torch.long:
            raise InputTypeError(f"ids must be int64, got {ids.dtype}")
        if ids.device.type == "cpu" and ids.numel() > 0:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.config.n_embed:
                raise InputValueError(f"ids must be codebook indices in [0, {self.config.n_embed}), got min {lo}, max "
                                      f"{hi}")
        z = F.embedding(ids, self.codebook)  # (B, h*w, D)
        return z.transpose(1, 2).reshape(ids.shape[0], self.config.embed_dim, g, g)

    def decode(self, ids: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        """ids [B, h*w] -> images [B, 3, H, W], clamped to [0, 1] unless clamp=False."""
        x = self.decoder(self.codes(ids))
        return x.clamp(0.0, 1.0) if clamp else x

    def forward(self, images: torch.Tensor, *, beta: float = 0.25, check_range: bool = True):
        """Training pass: (reconstruction [B, 3, H, W] unclamped, vq loss, ids [B, h*w], code counts [K]).

        The quantizer is `mage_kernels.vq_quantize` (straight-through z_q, legacy taming loss: beta
        multiplies the codebook term, section 3.3).
        """
        check_images(images, self.config, check_range=check_range, device=self.codebook.device)
        z = self.encoder(to_model_dtype(images, self))
        z_q, ids, loss, counts = mage_kernels.vq_quantize(z, self.codebook, beta=beta)
        return self.decoder(z_q), loss, ids, counts
