"""Nearest-code quantization in Triton (docs/OPS.md op 1): a tiled fp32 (or tf32) search that keeps the
two best expanded distances per row, then an fp64 re-rank of rows whose gap is within the rounding
bound (csrc/vq_bound.h), launched for every row but returning at once for unflagged ones: no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .._checks import check_vq_args

FP32_ROUNDOFF = 2.0**-24
TF32_ROUNDOFF = 2.0**-11


@triton.jit
def _search_kernel(
    z_ptr,  # (B, R, D) any strides, any float dtype
    cb_ptr,  # (K, D) contiguous fp32
    e2_ptr,  # (K,) fp32 |e_k|^2, +inf for codes with non-finite entries
    index_ptr,  # (B * R,) int64 out: best code, -1 if none is finite
    best_ptr,  # (B * R,) fp32 out: best expanded distance |e|^2 - 2 z.e
    second_ptr,  # (B * R,) fp32 out: second best
    R, K, D,
    stride_zb, stride_zr, stride_zd,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TF32: tl.constexpr,
):
    pid_r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    best = tl.full((BLOCK_R,), float("inf"), tl.float32)
    second = tl.full((BLOCK_R,), float("inf"), tl.float32)
    best_i = tl.full((BLOCK_R,), -1, tl.int64)
    z_base = z_ptr + b * stride_zb + rows[:, None] * stride_zr
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < K
        acc = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            zt = tl.load(z_base + ds[None, :] * stride_zd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            ct = tl.load(cb_ptr + ks[:, None] * D + ds[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            if TF32:
                acc += tl.dot(zt.to(tl.float32), tl.trans(ct), input_precision="tf32")
            else:
                acc += tl.dot(zt.to(tl.float32), tl.trans(ct), input_precision="ieee")
        e2 = tl.load(e2_ptr + ks, mask=k_ok, other=float("inf"))
        dist = e2[None, :] - 2.0 * acc
        dist = tl.where(dist == dist, dist, float("inf"))  # NaN (non-finite z) never wins
        tmin = tl.min(dist, axis=1)
        targ = tl.min(tl.where(dist == tmin[:, None], ks[None, :], K), axis=1)  # lowest index among ties
        tsec = tl.min(tl.where(ks[None, :] == targ[:, None], float("inf"), dist), axis=1)
        # Earlier tiles hold lower indices, so only a strictly smaller distance replaces the best.
        better = tmin < best
        second = tl.where(better, tl.minimum(best, tsec), tl.minimum(second, tmin))
        best_i = tl.where(better, targ, best_i)
        best = tl.where(better, tmin, best)
    out = b * R + rows
    tl.store(index_ptr + out, best_i, mask=row_ok)
    tl.store(best_ptr + out, best, mask=row_ok)
    tl.store(second_ptr + out, second, mask=row_ok)


@triton.jit
def _finalize_kernel(
    z_ptr,  # (B, R, D) any strides
    cb_ptr,  # (K, D) contiguous fp64
    valid_ptr,  # (K,) int8: 1 if the code is finite
    max_norm_ptr,  # () fp64: max |e_k| over finite codes
    index_ptr,  # (B * R,) int64 in/out
    best_ptr,  # (B * R,) fp32 in: best expanded distance
    second_ptr,  # (B * R,) fp32 in
    sq_ptr,  # (B * R,) fp64 out: squared distance to the chosen code
    R, K, D,
    stride_zb, stride_zr, stride_zd,
    unit_roundoff,
    EXACT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zrow = z_ptr + (row // R) * stride_zb + (row % R) * stride_zr
    z2 = tl.zeros((BLOCK_D,), tl.float64)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        zv = tl.load(zrow + ds * stride_zd, mask=ds < D, other=0.0).to(tl.float64)
        z2 += zv * zv
    z2s = tl.sum(z2, axis=0)
    index = tl.load(index_ptr + row)
    best = tl.load(best_ptr + row).to(tl.float64)
    if EXACT:
        # Same bound as csrc/vq_bound.h: below it the fp32 ranking may be wrong, so re-rank in fp64.
        n = D + 5.0
        gamma = n * unit_roundoff / (1.0 - n * unit_roundoff)
        max_norm = tl.load(max_norm_ptr)
        bound = 4.0 * gamma * (max_norm * max_norm + 2.0 * tl.sqrt(z2s) * max_norm)
        if tl.load(second_ptr + row).to(tl.float64) - best <= bound:
            best_k = tl.full((BLOCK_K,), float("inf"), tl.float64)
            best_i = tl.full((BLOCK_K,), K, tl.int64)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
                k_ok = ks < K
                acc = tl.zeros((BLOCK_K,), tl.float64)
                for d0 in range(0, D, BLOCK_D):
                    ds = d0 + tl.arange(0, BLOCK_D)
                    d_ok = ds < D
                    zv = tl.load(zrow + ds * stride_zd, mask=d_ok, other=0.0).to(tl.float64)
                    ct = tl.load(cb_ptr + ks[:, None] * D + ds[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
                    diff = zv[None, :] - ct
                    acc += tl.sum(diff * diff, axis=1)
                ok = k_ok & (tl.load(valid_ptr + ks, mask=k_ok, other=0) != 0)
                acc = tl.where(ok, acc, float("inf"))
                better = acc < best_k  # per lane, indices grow with k0: strict keeps the lowest
                best_i = tl.where(better, ks, best_i)
                best_k = tl.where(better, acc, best_k)
            m = tl.min(best_k, axis=0)
            index = tl.min(tl.where(best_k == m, best_i, K), axis=0)
        safe = tl.maximum(tl.minimum(index, K - 1), 0)
        acc = tl.zeros((BLOCK_D,), tl.float64)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            zv = tl.load(zrow + ds * stride_zd, mask=d_ok, other=0.0).to(tl.float64)
            ev = tl.load(cb_ptr + safe * D + ds, mask=d_ok, other=0.0)
            acc += (zv - ev) * (zv - ev)
        sq = tl.sum(acc, axis=0)
    else:
        sq = tl.maximum(best + z2s, 0.0)
    bad = (index < 0) | (index >= K) | (z2s != z2s) | (z2s == float("inf"))
    tl.store(index_ptr + row, tl.where(bad, -1, index))
    tl.store(sq_ptr + row, tl.where(bad, float("nan"), sq))


def _search(z: torch.Tensor, codebook: torch.Tensor, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows = reference.vq_rows(z)
    zv = rows if rows.dim() == 3 else rows.unsqueeze(0)  # (B, R, D)
    B, R, D = zv.shape
    K = codebook.shape[0]
    n = B * R
    shape = rows.shape[:-1]
    index = torch.empty(n, dtype=torch.long, device=z.device)
    sq = torch.empty(n, dtype=torch.float64, device=z.device)
    if n == 0:
        return index.reshape(shape), sq.to(reference.sqdist_dtype(z)).reshape(shape)
    cb64 = codebook.double()
    e2_64 = (cb64 * cb64).sum(1)
    valid = torch.isfinite(e2_64)
    cb64 = torch.where(valid[:, None], cb64, 0.0).contiguous()
    cb32 = cb64.float()
    e2 = torch.where(valid, e2_64, float("inf")).float()
    max_norm = torch.where(valid, e2_64, 0.0).max().sqrt()
    best = torch.empty(n, dtype=torch.float32, device=z.device)
    second = torch.empty_like(best)
    interpret = z.device.type == "cpu"
    # The interpreter's cost grows with the number of programs, so it gets big tiles.
    block_r, block_k = (64, 128) if interpret else (64, 64)
    block_d = max(16, min(128 if interpret else 32, triton.next_power_of_2(D)))
    tf32 = not exact and z.device.type == "cuda"
    _search_kernel[(triton.cdiv(R, block_r), B)](
        zv, cb32, e2, index, best, second, R, K, D, zv.stride(0), zv.stride(1), zv.stride(2),
        BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=block_d, TF32=tf32,
    )
    _finalize_kernel[(n,)](
        zv, cb64, valid.to(torch.int8), max_norm, index, best, second, sq, R, K, D,
        zv.stride(0), zv.stride(1), zv.stride(2), TF32_ROUNDOFF if tf32 else FP32_ROUNDOFF,
        EXACT=exact, BLOCK_K=128 if interpret else 32, BLOCK_D=min(128, max(16, triton.next_power_of_2(D))),
    )
    return index.reshape(shape), sq.to(reference.sqdist_dtype(z)).reshape(shape)


def vq_nearest(z: torch.Tensor, codebook: torch.Tensor, *, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    check_vq_args("vq_nearest", z, codebook)
    return _search(z, codebook, exact)


def vq_quantize(
    z: torch.Tensor, codebook: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_vq_args("vq_quantize", z, codebook)
    indices, sq = _search(z, codebook, exact=True)
    ok = indices >= 0
    code_rows = torch.where(ok[..., None], codebook.to(z.dtype)[indices.clamp_min(0)], float("nan"))
    z_q = reference.vq_rows_to_layout(code_rows, z).contiguous()
    loss = (1.0 + beta) * sq.double().sum() / max(z.numel(), 1)
    counts = torch.zeros(codebook.shape[0], dtype=torch.long, device=z.device)
    counts.index_add_(0, indices.reshape(-1).clamp_min(0), ok.reshape(-1).long())
    return z_q, indices, loss.to(reference.sqdist_dtype(z)), counts
