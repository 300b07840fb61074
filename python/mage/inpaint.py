"""Inpainting and outpainting with MAGE: regenerate the tokens under a hole, conditioned on the rest.

A pixel mask becomes a token mask: every token whose patch (the f x f pixels it stands for, f = 16 for
the official tokenizer) touches the hole, plus an optional ring of neighbouring tokens, since a
token's code also depends on pixels around its patch (the authors recommend such a margin).
Those tokens start as [MASK] and are filled by the same iterative decoding as generation; every other
token keeps the id the tokenizer gave it. Outpainting is the same call with the hole outside the region
to keep.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ._checks import (InputValueError, check_generation, check_images, check_int, check_model, check_pixel_mask,
                      check_tensor)
from .model import MAGE
from .sampler import decode_tokens


def token_mask_from_pixels(pixel_mask: torch.Tensor, grid: int, ring: int = 0) -> torch.Tensor:
    """pixel_mask [B, H, W] or [B, 1, H, W] (bool, or numbers: nonzero = hole) -> bool [B, grid*grid],
    row-major like the token ids: True for each token whose patch has a hole pixel, dilated by `ring`
    tokens (a (2 ring + 1)^2 square neighbourhood). ring is at most grid - 1, which already reaches every
    token from any hole."""
    check_tensor("token_mask_from_pixels", "pixel_mask", pixel_mask)
    check_int("token_mask_from_pixels", "grid", grid, 1)
    check_int("token_mask_from_pixels", "ring", ring, 0, grid - 1)
    m = pixel_mask
    if m.dim() == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.dim() != 3:
        raise InputValueError(f"pixel_mask must be [B, H, W] or [B, 1, H, W], got shape {tuple(pixel_mask.shape)}")
    H, W = m.shape[1:]
    if H != W or H % grid != 0:
        raise InputValueError(f"pixel_mask must be square with a side divisible by the token grid {grid}, got {H}x{W}")
    f = H // grid
    hole = (m != 0).float()[:, None]  # (B, 1, H, W)
    tokens = F.max_pool2d(hole, kernel_size=f, stride=f)  # (B, 1, grid, grid): any hole pixel in the patch
    if ring:
        tokens = F.max_pool2d(tokens, kernel_size=2 * ring + 1, stride=1, padding=ring)
    return tokens.flatten(1) > 0


@torch.no_grad()
def inpaint(
    model: MAGE,
    images: torch.Tensor,
    pixel_mask: torch.Tensor,
    *,
    ring: int = 1,
    steps: int = 20,
    choice_temperature: float = 6.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    paste: bool = False,
    return_tokens: bool = False,
    choice_temperature_power: float = 1.0,
):
    """Fill the hole of each image.

    Args:
        images: [B, C, H, W] in [0, 1] at the tokenizer's channels C and resolution, any float dtype
            (converted to the model's); B = 0 returns empty results.
        pixel_mask: [B, H, W] or [B, 1, H, W]; nonzero / True = regenerate (the hole). For outpainting
            pass the region outside what should be kept.
        ring: extra tokens around the hole to regenerate too, so the seam is re-synthesised; at most
            grid - 1 (that already reaches every token).
        paste: copy the original pixels back outside the pixel hole (the tokens outside are kept
            either way; their decoded pixels differ from the input only by the tokenizer's error).
        dtype: None (fp32, as the reference) or a low-precision autocast dtype.
        return_tokens: also return (tokens [B, L], token_mask [B, L]).
        choice_temperature_power: annealing of the confidence noise (see `mage.sampler.generate`).

    Returns:
        images [B, C, H, W] float32 in [0, 1] (and tokens, token_mask if asked). Tokens outside the
        token mask are exactly those of `model.vqgan.encode(images)`.
    """
    check_model("inpaint", model, MAGE)
    c = model.config
    check_images(images, c.tokenizer, device=model.device)
    check_pixel_mask(pixel_mask, images)
    check_int("inpaint", "ring", ring, 0, c.tokenizer.grid - 1)
    check_generation("inpaint", steps=steps, choice_temperature=choice_temperature, generator=generator,
                     dtype=dtype, device=model.device, num_tokens=c.num_tokens)
    if images.shape[0] == 0:  # nothing to fill
        empty = torch.empty(0, c.num_tokens, dtype=torch.long, device=images.device)
        out = images.float()
        return (out, empty, empty.bool()) if return_tokens else out
    pixel_mask = pixel_mask.to(images.device)
    token_mask = token_mask_from_pixels(pixel_mask, c.tokenizer.grid, ring)
    autocast = (torch.autocast(images.device.type, dtype=dtype) if dtype not in (None, torch.float32)
                else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    try:
        ids = model.vqgan.encode(images, check_range=False)  # fp32: the kept tokens are exactly `encode`'s
        ids = torch.where(token_mask, c.mask_id, ids)
        with autocast:
            tokens = decode_tokens(model, ids, steps=steps, choice_temperature=choice_temperature,
                                   temperature=temperature, generator=generator,
                                   choice_temperature_power=choice_temperature_power)
            out = model.vqgan.decode(tokens).float()
    finally:
        model.train(was_training)
    if paste:
        hole = (pixel_mask != 0).reshape(images.shape[0], 1, *images.shape[-2:])
        out = torch.where(hole, out, images.float())
    return (out, tokens, token_mask) if return_tokens else out
