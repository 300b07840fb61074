"""Pure-PyTorch reference of every op: the test oracle, the benchmark baseline and the fallback kernel.

Written for clarity, not speed; each function states the op's contract exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_vq_args

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
