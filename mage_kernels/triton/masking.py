"""Triton kernels of the masked-token ops (mage_kernels/masking.py; docs/OPS.md ops 2-4).

Launchers take the op's arguments and are registered as the ops' CUDA kernels; under TRITON_INTERPRET=1
they also run on CPU tensors (tests). Like the CUDA kernels they read no values on the host: keep_idx
entries outside [0, L) count as "no token" and the counts are clamped to [0, L].

- mask_plan: one program per row; the rank of each token is counted against the whole row in
  (BLOCK_T, BLOCK_S) tiles of (noise, position) comparisons (no sort), and the kept positions are
  compacted with a running prefix sum.
- gather / scatter / pad: one program per (output row, channel block); a (B, L) slot-source map
  (which kept row feeds each token, -1 = fill) is built first for the scatter and pad directions.
- pad backward: the same gather for the kept rows, one reduction program per (row, channel block) over
  the padded tokens and one per (slot, channel block) over the batch (pos_embed), in fp32 (fp64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .._checks import check_pad_with_cls_backward_args
from . import _launch

_FILL_ZERO, _FILL_CLS, _FILL_PAD = 0, 1, 2


def _block_c(C: int) -> int:
    return min(triton.next_power_of_2(max(C, 1)), 1024)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _round(v, DTYPE: tl.constexpr):
    """Round fp32/fp64 to DTYPE to nearest-even; bf16 by hand, since the interpreter truncates it."""
    if DTYPE == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DTYPE)


@triton.jit
def _mask_plan_kernel(
    noise,  # (B, L) float, any strides
    stride_b,
    stride_l,
    num_masked,  # int64, () or (B,)
    m_step,  # 0 for one count per batch, 1 per row
    num_dropped,
    d_step,
    masked,  # (B, L) bool, contiguous
    dropped,  # (B, L) bool, contiguous
    keep,  # (B, num_kept) int64, contiguous
    L,
    num_kept,
    ACC: tl.constexpr,  # compare in fp32 (fp64 for fp64): exact, and one code path for fp16 / bf16
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    M = tl.minimum(tl.maximum(tl.load(num_masked + b * m_step), 0), L)
    D = tl.minimum(tl.maximum(tl.load(num_dropped + b * d_step), 0), L)
    row = noise + b * stride_b
    n_kept = tl.full([], 0, tl.int64)
    for t0 in range(0, L, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_in = t < L
        xt = tl.load(row + t.to(tl.int64) * stride_l, mask=t_in, other=0.0).to(ACC)
        nan_t = xt != xt
        rank = tl.zeros([BLOCK_T], dtype=tl.int32)
        for s0 in range(0, L, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_in = s < L
            xs = tl.load(row + s.to(tl.int64) * stride_l, mask=s_in, other=0.0).to(ACC)
            nan_s = xs != xs
            # (noise, position) order: NaN above every number, equal values by position.
            less = (xs[None, :] < xt[:, None]) | (nan_t[:, None] & ~nan_s[None, :])
            equal = (xs[None, :] == xt[:, None]) | (nan_t[:, None] & nan_s[None, :])
            before = (less | (equal & (s[None, :] < t[:, None]))) & s_in[None, :]
            rank += tl.sum(before.to(tl.int32), axis=1)
        is_dropped = rank < D
        tl.store(masked + b * L + t, rank < M, mask=t_in)
        tl.store(dropped + b * L + t, is_dropped, mask=t_in)
        kept = (~is_dropped & t_in).to(tl.int64)
        slot = n_kept + tl.cumsum(kept, axis=0) - 1
        tl.store(keep + b * num_kept + slot, t.to(tl.int64), mask=(kept > 0) & (slot < num_kept))
        n_kept += tl.sum(kept, axis=0)
    for j0 in range(0, num_kept, BLOCK_T):
        j = j0 + tl.arange(0, BLOCK_T)
        tl.store(keep + b * num_kept + j, tl.full([BLOCK_T], -1, tl.int64), mask=(j >= n_kept) & (j < num_kept))


def mask_plan(noise, num_masked, num_dropped, num_kept):
    reference.check_mask_plan_args("mask_plan", noise, num_masked, num_dropped, num_kept)
    with _launch.on_device("mask_plan", noise=noise, num_masked=num_masked, num_dropped=num_dropped):
        return _mask_plan(noise, num_masked, num_dropped, num_kept)


def _mask_plan(noise, num_masked, num_dropped, num_kept):
    B, L = noise.shape
    masked = torch.empty((B, L), dtype=torch.bool, device=noise.device)
    dropped = torch.empty((B, L), dtype=torch.bool, device=noise.device)
    keep = torch.empty((B, num_kept), dtype=torch.long, device=noise.device)
    if B == 0:
        return masked, dropped, keep
    block = min(triton.next_power_of_2(max(L, 1)), 64)
    num_masked, num_dropped = num_masked.contiguous(), num_dropped.contiguous()
    _launch.launch(
        _mask_plan_kernel, (B,), noise, noise.stride(0), noise.stride(1),
        num_masked, int(num_masked.dim() > 0), num_dropped, int(num_dropped.dim() > 0),
        masked, dropped, keep, L, num_kept,
        ACC=_acc_dtype(noise.dtype), BLOCK_T=block, BLOCK_S=block,
    )
    return masked, dropped, keep


@triton.jit
def _slot_source_kernel(
    keep,  # (B, Lk) int64, contiguous
    masked,  # (B, L) bool, contiguous; read when USE_MASK
    src,  # (B, L) int64, prefilled with -1
    L,
    Lk,
    USE_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    t = tl.load(keep + b * Lk + j, mask=j < Lk, other=-1)
    use = (t >= 0) & (t < L)
    if USE_MASK:
        use = use & (tl.load(masked + b * L + t, mask=use, other=1) == 0)
    tl.store(src + b * L + t, j.to(tl.int64), mask=use)


def _slot_source(keep_idx, masked, L):
    B, Lk = keep_idx.shape
    src = torch.full((B, L), -1, dtype=torch.long, device=keep_idx.device)
    if B and Lk:
        block = min(triton.next_power_of_2(Lk), 1024)
        _launch.launch(
            _slot_source_kernel, (B, triton.cdiv(Lk, block)), keep_idx.contiguous(), masked.contiguous() if masked is not None else src, src, L, Lk,
            USE_MASK=masked is not None, BLOCK=block,
        )
    return src


@triton.jit
def _gather_rows_kernel(
    x,  # (B, 1+L, C) input rows
    sxb,
    sxs,
    sxc,
    keep,  # (B, Lk) int64 token positions, contiguous
    masked,  # (B, L) bool, contiguous; tokens masked here give zero rows when USE_MASK
    out,  # (B, 1+Lk, C) contiguous
    L,
    Lk,
    C,
    USE_MASK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    b = r // (1 + Lk)
    s = r % (1 + Lk)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    t = tl.load(keep + b * Lk + s - 1, mask=s > 0, other=-1)
    use = (t >= 0) & (t < L)
    if USE_MASK:
        use = use & (tl.load(masked + b * L + t, mask=use, other=1) == 0)
    from_slot = tl.where(s == 0, 0, tl.where(use, 1 + t, -1))
    v = tl.load(x + b * sxb + from_slot * sxs + c.to(tl.int64) * sxc, mask=c_in & (from_slot >= 0), other=0.0)
    tl.store(out + r * C + c, v, mask=c_in)


def _gather_rows(x, keep_idx, masked):
    B, _, C = x.shape
    Lk = keep_idx.shape[1]
    L = x.shape[1] - 1 if masked is None else masked.shape[1]
    out = torch.empty((B, 1 + Lk, C), dtype=x.dtype, device=x.device)
    if out.numel():
        block = _block_c(C)
        _launch.launch(
            _gather_rows_kernel, (B * (1 + Lk), triton.cdiv(C, block)), x, x.stride(0), x.stride(1), x.stride(2), keep_idx.contiguous(),
            masked.contiguous() if masked is not None else keep_idx, out, L, Lk, C,
            USE_MASK=masked is not None, BLOCK_C=block,
        )
    return out


@triton.jit
def _expand_rows_kernel(
    y,  # (B, 1+Lk, C) kept rows
    syb,
    sys,
    syc,
    src,  # (B, L) int64: the kept row j feeding token t, or -1 (fill)
    pad,  # (C,) contiguous, read when FILL == 2
    pos,  # (1+L, C) contiguous, read when HAS_POS
    out,  # (B, 1+L, C) contiguous
    L,
    C,
    FILL: tl.constexpr,  # 0: zeros, 1: the row's class slot y[b, 0], 2: pad
    HAS_POS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    b = r // (1 + L)
    s = r % (1 + L)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    j = tl.load(src + b * L + s - 1, mask=s > 0, other=-1)
    own = (s == 0) | (j >= 0)
    from_slot = tl.where(s == 0, 0, 1 + j)
    if FILL == 1:
        from_slot = tl.where(own, from_slot, 0)
        own = True
    v = tl.load(y + b * syb + from_slot * sys + c.to(tl.int64) * syc, mask=c_in & own, other=0.0)
    if FILL == 2:
        v = tl.where(own, v, tl.load(pad + c, mask=c_in, other=0.0))
    if HAS_POS:
        v = _round(v.to(ACC) + tl.load(pos + s * C + c, mask=c_in, other=0.0).to(ACC), out.dtype.element_ty)
    tl.store(out + r * C + c, v, mask=c_in)


def _expand_rows(y, src, L, fill, pad=None, pos=None):
    B, _, C = y.shape
    out = torch.empty((B, 1 + L, C), dtype=y.dtype, device=y.device)
    if out.numel():
        block = _block_c(C)
        _launch.launch(
            _expand_rows_kernel, (B * (1 + L), triton.cdiv(C, block)), y, y.stride(0), y.stride(1), y.stride(2), src,
            pad.contiguous() if pad is not None else y, pos.contiguous() if pos is not None else y, out, L, C,
            FILL=fill, HAS_POS=pos is not None, ACC=_acc_dtype(y.dtype), BLOCK_C=block,
        )
    return out


def gather_keep(x, keep_idx):
    reference.check_gather_keep_args("gather_keep", x, keep_idx)
    with _launch.on_device("gather_keep", x=x, keep_idx=keep_idx):
        return _gather_rows(x, keep_idx, None)


def scatter_keep(y, keep_idx, L):
    reference.check_gather_keep_args("scatter_keep", y, keep_idx, L)
    with _launch.on_device("scatter_keep", grad=y, keep_idx=keep_idx):
        return _expand_rows(y, _slot_source(keep_idx, None, L), L, _FILL_ZERO)


def pad_with_cls(y, keep_idx, masked, pos_embed=None, pad=None):
    reference.check_pad_with_cls_args("pad_with_cls", y, keep_idx, masked, pos_embed, pad)
    L = masked.shape[1]
    fill = _FILL_CLS if pad is None else _FILL_PAD
    with _launch.on_device("pad_with_cls", y=y, keep_idx=keep_idx, masked=masked, pos_embed=pos_embed, pad=pad):
        return _expand_rows(y, _slot_source(keep_idx, masked, L), L, fill, pad, pos_embed)


@triton.jit
def _pad_sum_kernel(
    gz,  # (B, 1+L, C) gradient of z
    sgb,
    sgs,
    sgc,
    src,  # (B, L) int64, -1 = padded token
    grad_y,  # (B, 1+Lk, C) contiguous: row 0 written when not MAE
    pad_sum,  # (B, C) accumulation dtype, written when MAE
    L,
    Lk,
    C,
    MAE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    acc = tl.zeros([BLOCK_C], dtype=ACC)
    for t0 in range(0, L, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        padded = tl.load(src + b * L + t, mask=t < L, other=0) < 0
        g = tl.load(gz + b * sgb + (1 + t[:, None].to(tl.int64)) * sgs + c[None, :].to(tl.int64) * sgc,
                    mask=padded[:, None] & c_in[None, :], other=0.0)
        acc += tl.sum(g.to(ACC), axis=0)
    if MAE:
        tl.store(pad_sum + b * C + c, acc, mask=c_in)
    else:
        g0 = tl.load(gz + b * sgb + c.to(tl.int64) * sgc, mask=c_in, other=0.0).to(ACC)
        tl.store(grad_y + b * (1 + Lk) * C + c, _round(g0 + acc, grad_y.dtype.element_ty), mask=c_in)


@triton.jit
def _pos_sum_kernel(
    gz,  # (B, 1+L, C) gradient of z
    sgb,
    sgs,
    sgc,
    grad_pos,  # (1+L, C) contiguous
    B,
    C,
    ACC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    acc = tl.zeros([BLOCK_C], dtype=ACC)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        g = tl.load(gz + b[:, None].to(tl.int64) * sgb + s * sgs + c[None, :].to(tl.int64) * sgc,
                    mask=(b < B)[:, None] & c_in[None, :], other=0.0)
        acc += tl.sum(g.to(ACC), axis=0)
    tl.store(grad_pos + s * C + c, _round(acc, grad_pos.dtype.element_ty), mask=c_in)


def pad_with_cls_backward(grad_z, keep_idx, masked, mae, pos):
    check_pad_with_cls_backward_args("pad_with_cls_backward", grad_z, keep_idx, masked)
    with _launch.on_device("pad_with_cls_backward", grad_z=grad_z, keep_idx=keep_idx, masked=masked):
        return _pad_with_cls_backward(grad_z, keep_idx, masked, mae, pos)


def _pad_with_cls_backward(grad_z, keep_idx, masked, mae, pos):
    B, L = masked.shape
    C = grad_z.shape[2]
    grad_y = _gather_rows(grad_z, keep_idx, masked)
    acc = torch.float64 if grad_z.dtype == torch.float64 else torch.float32
    pad_sum = torch.empty((B if mae else 0, C), dtype=acc, device=grad_z.device)
    grad_pos = torch.empty((1 + L if pos else 0, C), dtype=grad_z.dtype, device=grad_z.device)
    if C == 0:
        return grad_y, pad_sum, grad_pos
    block_c = min(_block_c(C), 128)
    strides = (grad_z.stride(0), grad_z.stride(1), grad_z.stride(2))
    if B:
        _launch.launch(
            _pad_sum_kernel, (B, triton.cdiv(C, block_c)), grad_z, *strides, _slot_source(keep_idx, masked, L),
            grad_y, pad_sum if mae else grad_y, L, keep_idx.shape[1], C,
            MAE=mae, ACC=_acc_dtype(grad_z.dtype), BLOCK_T=32, BLOCK_C=block_c,
        )
    if pos:
        _launch.launch(
            _pos_sum_kernel, (1 + L, triton.cdiv(C, block_c)), grad_z, *strides, grad_pos, B, C, ACC=_acc_dtype(grad_z.dtype), BLOCK_B=32, BLOCK_C=block_c,
        )
    return grad_y, pad_sum, grad_pos
