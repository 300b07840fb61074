"""Training losses of MAGE (docs/REFERENCE.md 4.7), MAGE-C (section 7) and the MAE baseline."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def masked_positions(masked: torch.Tensor, num_masked: int) -> torch.Tensor:
    """bool [B, L] with exactly `num_masked` True per row -> their positions [B, num_masked], ascending.

    A stable sort of the flags instead of `nonzero`, so there is no host sync."""
    return torch.sort((~masked).to(torch.uint8), dim=1, stable=True).indices[:, :num_masked]


def masked_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    targets: torch.Tensor,
    positions: torch.Tensor,
    codebook_size: int,
    label_smoothing: float = 0.1,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Label-smoothed cross entropy over masked tokens only (section 4.7, after the 2023-02-08 fix).

    hidden: [B, L, C] head hidden states (class slot removed); weight [V, C], bias [V]: the tied output
    layer; targets: int64 [B, L] token ids; positions: int64 [B, M] the masked positions. Only the first
    `codebook_size` logit columns are classes, and the logits are computed for the M masked rows only,
    so the full [B, L, V] logits never exist. Every masked token weighs 1 (dropped or kept alike).
    valid: optional bool [B, M], the positions that count, for rows masking different numbers of tokens;
    the loss is then the mean over rows of each row's mean over its valid positions, so every image weighs
    the same and equal slices of a batch (micro-batches, processes) average to the whole batch's loss.
    """
    c = hidden.shape[-1]
    h = hidden.gather(1, positions[..., None].expand(-1, -1, c))  # (B, M, C)
    logits = F.linear(h, weight[:codebook_size], bias[:codebook_size])  # (B, M, K)
    t = targets.gather(1, positions)  # (B, M)
    if valid is None:
        return F.cross_entropy(logits.flatten(0, 1).float(), t.flatten(), label_smoothing=label_smoothing)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), t.flatten(), label_smoothing=label_smoothing, reduction="none")
    w = valid.to(ce.dtype)
    return ((ce.view_as(w) * w).sum(1) / w.sum(1).clamp_min(1)).mean()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and keeps this rank's slice (works on gloo,
    which has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_across_ranks(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _GatherWithGrad.apply(x)
    return x


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over two views (MAGE-C, section 7): a, b [N, P] projections of the same N images.

    Every view's positive is its partner; the other 2N - 2 views of the (global, under DDP) batch are the
    negatives. Returns the mean over this rank's 2N anchors. Under DDP the gathered features route
    every rank's gradient back to its owner, so DDP's averaging yields the gradient of the global mean.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    n = a.shape[0]
    za = F.normalize(a.float(), dim=1)
    zb = F.normalize(b.float(), dim=1)
    all_a, all_b = gather_across_ranks(za), gather_across_ranks(zb)  # (world * N, P)
    candidates = torch.cat([all_a, all_b])  # (2 * world * N, P)
    total = all_a.shape[0]
    anchors = torch.cat([za, zb])  # (2N, P)
    logits = anchors @ candidates.T / temperature  # (2N, 2 * total)
    own = torch.arange(n, device=a.device) + rank * n
    self_idx = torch.cat([own, own + total])
    positive = torch.cat([own + total, own])
    logits = logits.scatter(1, self_idx[:, None], float("-inf"))  # a view is not its own negative
    return F.cross_entropy(logits, positive)


def patch_pixel_loss(
    pred: torch.Tensor, target: torch.Tensor, positions: torch.Tensor, norm_pix: bool = True
) -> torch.Tensor:
    """MAE loss: MSE on masked patches only; with `norm_pix`, each target patch is normalised by its
    own mean and std (MAE's better-representation variant). pred, target: [B, L, P]; positions [B, M]."""
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    p = pred.shape[-1]
    idx = positions[..., None].expand(-1, -1, p)
    return F.mse_loss(pred.gather(1, idx).float(), target.gather(1, idx).float())
