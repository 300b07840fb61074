"""Masked-token ops (docs/OPS.md ops 2-4): the mask plan, gather-drop and [C] padding of MAGE training.

MAGE masks a variable share of the L tokens, drops the lowest-noise half before the encoder and pads
the encoder output back to full length with the image's own class feature [C] before the decoder
(docs/REFERENCE.md 4.4, 4.5). The published code does this with sort, boolean indexing and `nonzero`
(host syncs, no fullgraph compile); these ops do it sync-free with static shapes.

Conventions: L token positions t in [0, L); sequence slot 0 is the class slot and token t sits at slot
t + 1. `keep_idx` holds token positions (not slots) in ascending order; a row that keeps fewer tokens
than keep_idx is wide (per-row counts) is padded at its end with -1 = "no token": `gather_keep` writes a
zero row there and `pad_with_cls` ignores it.

Kernels: csrc/masking_cpu.cpp, csrc/masking_cuda.cu, mage_kernels/triton/masking.py; reference:
mage_kernels/reference.py. Value checks on keep_idx (range, order) and on per-row counts run on CPU
tensors; CUDA and Triton kernels assume them (checking would cost a host sync) and never write out of
bounds: entries outside [0, L) are treated as -1.
"""

from __future__ import annotations

import math

import torch

from . import reference
from ._checks import (InputValueError, check_generator, check_int, check_pad_with_cls_backward_args, check_real,
                      check_tensor)
from ._registry import define, register_kernels

define(
    "mask_plan(Tensor noise, Tensor num_masked, Tensor num_dropped, SymInt num_kept)"
    " -> (Tensor masked, Tensor dropped, Tensor keep_idx)"
)
define("gather_keep(Tensor x, Tensor keep_idx) -> Tensor")
define("scatter_keep(Tensor y, Tensor keep_idx, SymInt L) -> Tensor")
define("pad_with_cls(Tensor y, Tensor keep_idx, Tensor masked, Tensor? pos_embed=None, Tensor? pad=None) -> Tensor")
define(
    "pad_with_cls_backward(Tensor grad_z, Tensor keep_idx, Tensor masked, bool mae, bool pos)"
    " -> (Tensor grad_y, Tensor pad_sum, Tensor grad_pos)"
)


for _op in ("mask_plan", "gather_keep", "scatter_keep", "pad_with_cls", "pad_with_cls_backward"):
    register_kernels(_op, reference=getattr(reference, _op), triton=f"mage_kernels.triton.masking:{_op}")


# ------------------------------------------------------------------------------------------- fakes


@torch.library.register_fake("mage::mask_plan")
def _(noise, num_masked, num_dropped, num_kept):
    reference.check_mask_plan_args("mask_plan", noise, num_masked, num_dropped, num_kept)
    B, L = noise.shape
    return (
        noise.new_empty((B, L), dtype=torch.bool),
        noise.new_empty((B, L), dtype=torch.bool),
        noise.new_empty((B, num_kept), dtype=torch.long),
    )


@torch.library.register_fake("mage::gather_keep")
def _(x, keep_idx):
    reference.check_gather_keep_args("gather_keep", x, keep_idx)
    return x.new_empty((x.shape[0], 1 + keep_idx.shape[1], x.shape[2]))


@torch.library.register_fake("mage::scatter_keep")
def _(y, keep_idx, L):
    reference.check_gather_keep_args("scatter_keep", y, keep_idx, L)
    return y.new_empty((y.shape[0], 1 + L, y.shape[2]))


@torch.library.register_fake("mage::pad_with_cls")
def _(y, keep_idx, masked, pos_embed=None, pad=None):
    reference.check_pad_with_cls_args("pad_with_cls", y, keep_idx, masked, pos_embed, pad)
    return y.new_empty((y.shape[0], 1 + masked.shape[1], y.shape[2]))


@torch.library.register_fake("mage::pad_with_cls_backward")
def _(grad_z, keep_idx, masked, mae, pos):
    check_pad_with_cls_backward_args("pad_with_cls_backward", grad_z, keep_idx, masked)
    B, C = grad_z.shape[0], grad_z.shape[2]
    acc = torch.float64 if grad_z.dtype == torch.float64 else torch.float32
    return (
        grad_z.new_empty((B, 1 + keep_idx.shape[1], C)),
        grad_z.new_empty((B if mae else 0, C), dtype=acc),
        grad_z.new_empty((grad_z.shape[1] if pos else 0, C)),
    )


# ---------------------------------------------------------------------------------------- autograd


def _keep_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.L = inputs[0].shape[1] - 1


def _gather_keep_backward(ctx, grad):
    (keep_idx,) = ctx.saved_tensors
    return torch.ops.mage.scatter_keep(grad, keep_idx, ctx.L), None


def _scatter_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _scatter_keep_backward(ctx, grad):
    (keep_idx,) = ctx.saved_tensors
    return torch.ops.mage.gather_keep(grad, keep_idx), None, None


torch.library.register_autograd("mage::gather_keep", _gather_keep_backward, setup_context=_keep_setup)
torch.library.register_autograd("mage::scatter_keep", _scatter_keep_backward, setup_context=_scatter_setup)


def _pad_setup(ctx, inputs, output):
    y, keep_idx, masked, pos_embed, pad = inputs
    ctx.save_for_backward(keep_idx, masked)
    ctx.mae = pad is not None
    ctx.has_pos = pos_embed is not None


def _pad_backward(ctx, grad_z):
    keep_idx, masked = ctx.saved_tensors
    want_pos = ctx.has_pos and ctx.needs_input_grad[3]
    grad_y, pad_sum, grad_pos = torch.ops.mage.pad_with_cls_backward(grad_z, keep_idx, masked, ctx.mae, want_pos)
    grad_pad = pad_sum.sum(0).to(grad_z.dtype) if ctx.mae and ctx.needs_input_grad[4] else None
    return grad_y if ctx.needs_input_grad[0] else None, None, None, grad_pos if want_pos else None, grad_pad


torch.library.register_autograd("mage::pad_with_cls", _pad_backward, setup_context=_pad_setup)


# -------------------------------------------------------------------------------------- public API


def _count_tensor(name: str, n, noise: torch.Tensor) -> torch.Tensor:
    if isinstance(n, torch.Tensor):
        return n
    n = check_int("mask_plan", name, n, 0, noise.shape[-1])  # an int: 3.7 tokens is an error, not 3
    return noise.new_full((), n, dtype=torch.long)  # a fill kernel: no host-to-device copy


def mask_plan(
    noise: torch.Tensor,
    num_masked: int | torch.Tensor,
    num_dropped: int | torch.Tensor,
    *,
    num_kept: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks and kept positions of MAGE training (docs/REFERENCE.md 4.4, steps 3-4), without a sort.

    Per row, tokens are ranked by (noise, position): the num_dropped lowest are dropped and the
    num_masked lowest masked (so dropped is a subset of masked when num_masked >= num_dropped). Ties
    go to the lower position; NaN ranks above every number, -0.0 equals 0.0 (as a stable `torch.sort`).

    Args:
        noise: (B, L) float; the caller draws it (e.g. `torch.rand(B, L, generator=g)`).
        num_masked, num_dropped: ints (one count for the batch, as the reference) or int64 tensors of
            shape (B,) on noise's device (per-row counts, no host sync), each in [0, L].
        num_kept: width of keep_idx. Default L - num_dropped for an int, L - min(num_dropped) for a
            tensor (which reads the tensor: a host sync on GPU; pass num_kept to avoid it). Every row
            must keep at most num_kept tokens (checked on CPU; on GPU the extra ones are cut).

    Returns:
        masked: bool (B, L). dropped: bool (B, L).
        keep_idx: int64 (B, num_kept), the positions not dropped in ascending order, then -1 padding.
    """
    check_tensor("mask_plan", "noise", noise)
    if noise.dim() != 2:
        raise InputValueError(f"mask_plan: noise must be [B, L], got shape {tuple(noise.shape)}")
    if num_kept is not None:
        check_int("mask_plan", "num_kept", num_kept)
    masked_t = _count_tensor("num_masked", num_masked, noise)
    dropped_t = _count_tensor("num_dropped", num_dropped, noise)
    if num_kept is None:
        L = noise.shape[-1]
        if isinstance(num_dropped, torch.Tensor):
            num_kept = L - int(num_dropped.min()) if num_dropped.numel() else L
        else:
            num_kept = L - int(num_dropped)
    return torch.ops.mage.mask_plan(noise, masked_t, dropped_t, num_kept)


def gather_keep(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """Drop tokens before the encoder (docs/REFERENCE.md 4.4 step 7): keep the class slot and the kept tokens.

    Args:
        x: (B, 1+L, C) embeddings, slot 0 = class; any strides (a non-unit channel stride costs a copy).
        keep_idx: int64 (B, Lk) token positions from `mask_plan` (ascending, then -1).

    Returns:
        y: (B, 1+Lk, C), y[:, 0] = x[:, 0] and y[:, 1+j] = x[:, 1+keep_idx[:, j]] (a zero row for -1).
        Backward scatters into a zero gradient.
    """
    check_tensor("gather_keep", "x", x)
    check_tensor("gather_keep", "keep_idx", keep_idx)
    return torch.ops.mage.gather_keep(x, keep_idx)


def pad_with_cls(
    y: torch.Tensor,
    keep_idx: torch.Tensor,
    masked: torch.Tensor,
    *,
    pos_embed: torch.Tensor | None = None,
    pad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pad the encoder output back to full length with [C] (docs/REFERENCE.md 4.5 steps 2-5), in one pass.

    Args:
        y: (B, 1+Lk, C) encoder output after the decoder projection; y[:, 0] is the class feature [C].
        keep_idx: int64 (B, Lk) from `mask_plan`. masked: bool (B, L) from `mask_plan`.
        pos_embed: optional (1+L, C) or (1, 1+L, C), added to every slot (the decoder's learned
            positional embedding); cast to y's dtype.
        pad: optional (C,) learned mask token: the MAE variant pads with it instead of [C].

    Returns:
        z: (B, 1+L, C): z[:, 0] = y[:, 0]; a kept, unmasked token gets its own row of y; every masked
        or dropped token gets [C] (or pad); plus pos_embed. Backward accumulates the padded positions'
        gradients into y[:, 0] (or into pad) and gathers the rest.
    """
    for name, t in (("y", y), ("keep_idx", keep_idx), ("masked", masked)) + (
        (("pos_embed", pos_embed),) if pos_embed is not None else ()) + ((("pad", pad),) if pad is not None else ()):
        check_tensor("pad_with_cls", name, t)
    if pos_embed is not None:
        if pos_embed.dim() == 3 and pos_embed.shape[0] == 1:
            pos_embed = pos_embed[0]
        pos_embed = pos_embed.to(y.dtype)
    if pad is not None:
        pad = pad.reshape(-1).to(y.dtype)
    return torch.ops.mage.pad_with_cls(y, keep_idx, masked, pos_embed, pad)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def sample_mask_counts(
    L: int,
    *,
    batch: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    mask_ratio_min: float = 0.5,
    mask_ratio_max: float = 1.0,
    mask_ratio_mu: float = 0.55,
    mask_ratio_std: float = 0.25,
) -> tuple[int | torch.Tensor, int]:
    """The reference masking policy (docs/REFERENCE.md 4.4 steps 2-3) as counts for `mask_plan`.

    The mask ratio r is drawn from a normal(mu, std) truncated to [min, max] (by inverse CDF, in float64),
    masked = ceil(L * r) and dropped = ceil(L * min). With batch=None one r is drawn for the whole batch,
    as the reference, and returned as an int (drawn on the generator's device, CPU by default). With
    batch=B one r per row is drawn on `device` (default: the generator's) and masked is an int64 (B,)
    tensor (no host sync). Returns (num_masked, num_dropped); num_dropped is always an int.
    """
    op = "sample_mask_counts"
    L = check_int(op, "L", L, 0)
    if batch is not None:
        batch = check_int(op, "batch", batch, 0)
    check_generator(op, "generator", generator)
    mask_ratio_min = check_real(op, "mask_ratio_min", mask_ratio_min, 0.0, 1.0)
    mask_ratio_max = check_real(op, "mask_ratio_max", mask_ratio_max, mask_ratio_min, 1.0)
    mask_ratio_mu = check_real(op, "mask_ratio_mu", mask_ratio_mu)
    mask_ratio_std = check_real(op, "mask_ratio_std", mask_ratio_std, 0.0, lo_open=True)
    if device is None:
        device = generator.device if generator is not None else "cpu"
    num_dropped = math.ceil(L * mask_ratio_min)
    u = torch.rand(() if batch is None else (batch,), generator=generator, device=device, dtype=torch.float64)
    lo, hi = (_normal_cdf((v - mask_ratio_mu) / mask_ratio_std) for v in (mask_ratio_min, mask_ratio_max))
    p = lo + u * (hi - lo)
    r = (mask_ratio_mu + mask_ratio_std * torch.special.ndtri(p)).clamp(mask_ratio_min, mask_ratio_max)
    num_masked = torch.ceil(L * r).long()
    return (int(num_masked) if batch is None else num_masked), num_dropped
