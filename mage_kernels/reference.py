"""Pure-PyTorch reference of every op: the test oracle, the benchmark baseline and the fallback kernel.

Written for clarity, not speed; each function states the op's contract exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_gather_keep_args, check_mask_plan_args, check_pad_with_cls_args, check_vq_args

# --------------------------------------------------------------------------------------------------
# Nearest-code quantization (DESIGN.md op 1, MAGE_REFERENCE.md 3.3)
# --------------------------------------------------------------------------------------------------


def vq_rows(z: torch.Tensor) -> torch.Tensor:
    """z (N, D) -> itself; z (B, D, H, W) -> the (B, H*W, D) view whose rows are row-major over (h, w)."""
    return z if z.dim() == 2 else z.flatten(2).transpose(1, 2)


def vq_rows_to_layout(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of `vq_rows`: (N, D) or (B, H*W, D) back to the shape of `like`."""
    return rows if like.dim() == 2 else rows.transpose(1, 2).reshape(like.shape)


def sqdist_dtype(z: torch.Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def vq_nearest(z: torch.Tensor, codebook: torch.Tensor, *, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest code for every row of z, and the squared distance to it.

    z: (N, D) or (B, D, H, W); codebook: (K, D). Returns indices int64 and sqdist (float32, float64 for
    float64 z) of shape (N,) or (B, H*W). Distances are evaluated in fp64 (ties to the lowest index, as
    `torch.argmin`), so `exact` changes nothing here. Codes with non-finite entries are never chosen; a
    row of z with a non-finite value, or a codebook with no finite code, gives index -1 and NaN.
    """
    check_vq_args("vq_nearest", z, codebook)
    rows = vq_rows(z)
    lead = rows.shape[:-1]
    z64 = rows.reshape(-1, rows.shape[-1]).double()
    e64 = codebook.double()
    e2 = (e64 * e64).sum(1)
    e2 = torch.where(torch.isfinite(e2), e2, torch.full_like(e2, float("inf")))
    e64 = torch.where(torch.isfinite(e64), e64, torch.zeros_like(e64))
    indices = torch.empty(z64.shape[0], dtype=torch.long, device=z.device)
    chunk = max(1, (1 << 24) // codebook.shape[0])
    for start in range(0, z64.shape[0], chunk):
        zc = z64[start : start + chunk]
        d = e2[None, :] - 2.0 * (zc @ e64.T)  # |z|^2 is constant per row
        indices[start : start + chunk] = d.argmin(1)
    sq = ((z64 - e64[indices]) ** 2).sum(1)
    invalid = ~torch.isfinite(z64).all(1) | ~torch.isfinite(e2).any()
    indices = torch.where(invalid, -1, indices)
    sq = torch.where(invalid, float("nan"), sq)
    return indices.reshape(lead), sq.to(sqdist_dtype(z)).reshape(lead)


def vq_quantize(
    z: torch.Tensor, codebook: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training form of `vq_nearest`: (z_q, indices, loss, counts).

    z_q has z's shape and dtype (the chosen codes; NaN rows where the index is -1); loss is the legacy
    taming VectorQuantizer2 loss mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2), whose two means
    are equal in value; counts[k] is how many rows chose code k (int64, K).
    """
    check_vq_args("vq_quantize", z, codebook)
    indices, sq = vq_nearest(z, codebook)
    code_rows = F.embedding(indices.clamp_min(0), codebook).to(z.dtype)
    code_rows = torch.where((indices >= 0)[..., None], code_rows, float("nan"))
    z_q = vq_rows_to_layout(code_rows, z).contiguous()
    loss = (1.0 + beta) * sq.double().sum() / max(z.numel(), 1)
    valid = indices[indices >= 0]
    counts = torch.bincount(valid, minlength=codebook.shape[0])
    return z_q, indices, loss.to(sqdist_dtype(z)), counts


def vq_nearest_expanded(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The published tokenizer's quantizer (the `eager-ref` baseline): expanded distance + argmin, in z's dtype."""
    rows = vq_rows(z).reshape(-1, codebook.shape[1])
    d = (rows**2).sum(1, keepdim=True) + (codebook**2).sum(1) - 2 * torch.einsum("nd,kd->nk", rows, codebook)
    return d.argmin(1).reshape(vq_rows(z).shape[:-1])


# --------------------------------------------------------------------------------------------------
# Masked tokens: mask plan, gather-drop and [C] padding (DESIGN.md ops 2-4, MAGE_REFERENCE.md 4.4-4.5)
#
# Conventions: L token positions t in [0, L); sequence slot 0 is the class slot, token t sits at slot
# t + 1. keep_idx holds token positions (not slots) in ascending order; -1 pads rows that keep fewer
# tokens than the width of keep_idx.
# --------------------------------------------------------------------------------------------------


def noise_rank(noise: torch.Tensor) -> torch.Tensor:
    """Rank of every token in its row by (noise, position): ties go to the lower position; NaN ranks
    above everything (as `torch.sort`); -0.0 equals 0.0. int64 (B, L)."""
    order = torch.argsort(noise, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(noise.shape[1], device=noise.device).expand_as(order))
    return rank


def mask_plan(
    noise: torch.Tensor, num_masked: torch.Tensor, num_dropped: torch.Tensor, num_kept: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The num_masked lowest-noise tokens of a row are masked, the num_dropped lowest dropped.

    noise (B, L) float; num_masked, num_dropped int64 of shape () or (B,); num_kept >= L - num_dropped
    of every row. Returns masked, dropped bool (B, L) and keep_idx int64 (B, num_kept): the positions
    that are not dropped, ascending, then -1.
    """
    check_mask_plan_args("mask_plan", noise, num_masked, num_dropped, num_kept)
    B, L = noise.shape
    rank = noise_rank(noise)
    masked = rank < num_masked.reshape(-1, 1)
    dropped = rank < num_dropped.reshape(-1, 1)
    pos = torch.arange(L, device=noise.device).expand(B, L)
    # Stable sort by "dropped" moves the kept positions to the front in ascending order.
    kept_first = torch.sort(dropped.to(torch.uint8), dim=1, stable=True).indices
    n_kept = (~dropped).sum(1, keepdim=True)
    keep_idx = torch.where(pos < n_kept, kept_first, -1)[:, :num_kept]
    return masked, dropped, keep_idx


def _slot_source(keep_idx: torch.Tensor, L: int, use: torch.Tensor) -> torch.Tensor:
    """src (B, L): index j into the kept rows for token t when t = keep_idx[b, j] and use[b, j], else -1."""
    B, Lk = keep_idx.shape
    target = torch.where(use, keep_idx, L)  # unused entries go to a spare column, cut off below
    src = torch.full((B, L + 1), -1, dtype=torch.long, device=keep_idx.device)
    src.scatter_(1, target, torch.arange(Lk, device=keep_idx.device).expand(B, Lk))
    return src[:, :L]


def gather_keep(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """x (B, 1+L, C) -> (B, 1+Lk, C): the class slot, then token keep_idx[b, j] at slot 1+j (zeros for -1)."""
    check_gather_keep_args("gather_keep", x, keep_idx)
    return gather_slots(x, keep_idx)


def gather_slots(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, 1+L, C) -> (B, 1+J, C): slot 0, then token idx[b, j] (a zero row where idx < 0); unchecked."""
    gather_idx = (idx + 1).clamp_min(0)[..., None].expand(-1, -1, x.shape[2])
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    tokens = torch.where((idx >= 0)[..., None], x.gather(1, gather_idx), zero)
    return torch.cat([x[:, :1], tokens], 1)


def scatter_keep(y: torch.Tensor, keep_idx: torch.Tensor, L: int) -> torch.Tensor:
    """Adjoint of `gather_keep`: y (B, 1+Lk, C) -> (B, 1+L, C) with zeros at the tokens not kept."""
    check_gather_keep_args("scatter_keep", y, keep_idx, L)
    src = _slot_source(keep_idx, L, keep_idx >= 0)
    idx = (src + 1)[..., None].expand(-1, -1, y.shape[2])  # -1 reads slot 0, always present
    tokens = torch.where((src >= 0)[..., None], y.gather(1, idx), torch.zeros((), dtype=y.dtype, device=y.device))
    return torch.cat([y[:, :1], tokens], 1)


def pad_with_cls(
    y: torch.Tensor,
    keep_idx: torch.Tensor,
    masked: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
    pad: torch.Tensor | None = None,
) -> torch.Tensor:
    """y (B, 1+Lk, C) -> z (B, 1+L, C), MAGE_REFERENCE.md 4.5.

    z[:, 0] = y[:, 0]; a kept token that is not masked gets its own row of y; every other token gets
    the fill: the row's class feature y[:, 0] or, when given, the shared vector pad (C,). pos_embed
    (1+L, C) is added last, in y's dtype (pos_embed and pad must have y's dtype).
    """
    check_pad_with_cls_args("pad_with_cls", y, keep_idx, masked, pos_embed, pad)
    B, L = masked.shape
    valid = keep_idx >= 0
    own = valid & ~masked.gather(1, keep_idx.clamp_min(0))
    src = _slot_source(keep_idx, L, own)
    idx = (src + 1)[..., None].expand(-1, -1, y.shape[2])  # -1 reads slot 0, always present
    fill = y[:, :1] if pad is None else pad.reshape(1, 1, -1).expand(B, 1, -1)
    tokens = torch.where((src >= 0)[..., None], y.gather(1, idx), fill)
    z = torch.cat([y[:, :1], tokens], 1)
    return z if pos_embed is None else z + pos_embed.reshape(1, L + 1, -1)


def pad_with_cls_backward(
    grad_z: torch.Tensor, keep_idx: torch.Tensor, masked: torch.Tensor, mae: bool, pos: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of `pad_with_cls`: (grad_y, pad_sum, grad_pos), sums accumulated in fp32 (fp64 for fp64).

    grad_y (B, 1+Lk, C) in grad_z's dtype. pad_sum: the per-row sum of the padded tokens' gradients,
    (B, C) in the accumulation dtype when `mae`; otherwise (0, C) and that sum goes into grad_y[:, 0].
    grad_pos: grad_z summed over the batch, (1+L, C) in grad_z's dtype when `pos`, else (0, C).
    """
    L, C = masked.shape[1], grad_z.shape[2]
    acc = torch.float64 if grad_z.dtype == torch.float64 else torch.float32
    own = (keep_idx >= 0) & ~masked.gather(1, keep_idx.clamp_min(0))
    src = _slot_source(keep_idx, L, own)
    padded = (src < 0)[..., None]
    pad_sum = torch.where(padded, grad_z[:, 1:].to(acc), 0).sum(1)
    rows = gather_slots(grad_z, torch.where(own, keep_idx, -1))
    grad_pos = grad_z.to(acc).sum(0).to(grad_z.dtype) if pos else grad_z.new_empty((0, C))
    if mae:
        return rows, pad_sum, grad_pos
    rows[:, 0] = (grad_z[:, 0].to(acc) + pad_sum).to(grad_z.dtype)
    return rows, pad_sum.new_empty((0, C)), grad_pos


def published_mask_plan(noise: torch.Tensor, num_masked: int, num_dropped: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The published `forward_encoder` masks (the `eager-ref` baseline): sort, cut-off, `<=`. Float masks
    (B, 1+L) with the class column prepended as 0, as the reference passes them on."""
    sorted_noise = torch.sort(noise, dim=1).values
    drop = (noise <= sorted_noise[:, num_dropped - 1 : num_dropped]).float()
    mask = (noise <= sorted_noise[:, num_masked - 1 : num_masked]).float()
    zero = torch.zeros(noise.shape[0], 1, device=noise.device)
    return torch.cat([zero, mask], 1), torch.cat([zero, drop], 1)


def published_gather_keep(x: torch.Tensor, token_drop_mask: torch.Tensor) -> torch.Tensor:
    """The published drop (`eager-ref`): boolean index through nonzero (a host sync), then reshape."""
    return x[(1 - token_drop_mask).nonzero(as_tuple=True)].reshape(x.shape[0], -1, x.shape[2])


def published_pad_with_cls(
    y: torch.Tensor, token_drop_mask: torch.Tensor, token_all_mask: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """The published `forward_decoder` padding (`eager-ref`): repeat [C], nonzero scatter, where, add."""
    mask_tokens = y[:, 0:1].repeat(1, token_all_mask.shape[1], 1)
    x_after_pad = mask_tokens.clone()
    x_after_pad[(1 - token_drop_mask).nonzero(as_tuple=True)] = y.reshape(y.shape[0] * y.shape[1], y.shape[2])
    x_after_pad = torch.where(token_all_mask.unsqueeze(-1).bool(), mask_tokens, x_after_pad)
    return x_after_pad + pos_embed
