"""Nearest-code quantization in Triton (docs/OPS.md op 1), the same algorithm as csrc/vq_cuda.cu:

1. prepare (two kernels over the codebook): which codes are valid (every entry finite), the largest
   magnitude, and exact duplicates (a hash table; a later copy of a code can never win, since ties go to
   the lower index, so it is dropped from the search); then one power-of-two scale that brings the
   codebook near 1, the scaled fp32 copy and |e_k|^2 for the search, and the largest scaled code norm
   for the rounding bound. Scaling by a power of two is exact barring underflow, which the bound counts,
   so finite inputs of any magnitude (fp32 up to 3e38, fp64 beyond) rank correctly.
2. search: a tiled fp32 (tf32 for exact=False) matmul that keeps, per row, the best and second-best
   expanded distance |e|^2 - 2 z.e and the best index; the [N, K] matrix never exists.
3. finalize (tiles of rows): |z|^2 and the distance to the winner in fp64; a row whose two best are
   within the rounding bound (csrc/vq_bound.h), or whose scaled search overflowed, is appended to a list.
4. re-rank: the listed rows (rare) against every valid code in fp64, on values scaled by a power of two
   when their squares could overflow.
5. rows whose best codes fp64 cannot tell apart (rarer still) take the reference's exact decision; finding
   out whether there are any is the one host sync of a call (none while a CUDA graph is captured).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .._checks import check_vq_args
from . import _launch

FP32_ROUNDOFF = 2.0**-24
TF32_ROUNDOFF = 2.0**-11
# Codebooks whose largest magnitude lies in [2^-SCALE_EXP, 2^SCALE_EXP) are searched unscaled.
SCALE_EXP = tl.constexpr(32)


@triton.jit
def _probe(table_ptr, h, active, T, INSERT: tl.constexpr):
    """Slots of the hashes h (one per lane; lanes not active are ignored) in an open-addressing table of
    T int32 hashes, 0 = empty, by linear probing; inserts them when INSERT."""
    slot = h & (T - 1)
    todo = active
    while tl.max(todo.to(tl.int32), 0) > 0:
        if INSERT:
            # Lanes that are done compare against -1 at the table's spare slot T, which never holds -1.
            prev = tl.atomic_cas(table_ptr + tl.where(todo, slot, 2 * T), tl.where(todo, 0, -1), h)
            found = (prev == 0) | (prev == h)
        else:
            found = tl.load(table_ptr + slot, mask=todo, other=0) == h
        todo = todo & ~found
        slot = tl.where(todo, (slot + 1) & (T - 1), slot)
    return slot


@triton.jit
def _prepare_stats_kernel(
    cb_ptr,  # (K, D) strides (sk, sd), any float dtype
    sk, sd,
    table_ptr,  # (2 * T + 1,) int32, zeroed: code hashes, K - (lowest index) per slot, a spare
    valid_ptr,  # (K,) int8 out: every entry finite
    hash_ptr,  # (K,) int32 out
    amax_ptr,  # () int64, zeroed: fp64 bits of the largest |entry| over valid codes
    K, D, T,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    ks = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    k_ok = ks < K
    rows = cb_ptr + ks[:, None] * sk
    h = tl.zeros([BLOCK_C], tl.uint64)
    amax = tl.zeros([BLOCK_C], tl.float64)
    probe = tl.zeros([BLOCK_C], tl.float64)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        e = tl.load(rows + ds[None, :].to(tl.int64) * sd, mask=k_ok[:, None] & (ds < D)[None, :], other=0.0)
        e = e.to(tl.float64)
        probe += tl.sum(e * 0.0, 1)  # NaN if any entry is inf or NaN
        amax = tl.maximum(amax, tl.max(tl.abs(e), 1))
        bits = (e + 0.0).to(tl.uint64, bitcast=True)  # -0.0 hashes as 0.0: they are equal in every distance
        bits = (bits ^ (bits >> 29)) * (2 * ds[None, :].to(tl.uint64) + 0x5851F42D4C957F2D)
        h += tl.sum(bits ^ (bits >> 32), 1)
    h = ((h ^ (h >> 31)) & 0x7FFFFFFF).to(tl.int32) | 1  # 31 bits, never 0 (an empty slot)
    valid = k_ok & (probe == 0.0)
    tl.store(valid_ptr + ks, valid.to(tl.int8), mask=k_ok)
    tl.store(hash_ptr + ks, h, mask=k_ok)
    # Non-negative doubles order like their bit patterns.
    tl.atomic_max(amax_ptr, tl.max(tl.where(valid, amax, 0.0), 0).to(tl.int64, bitcast=True))
    slot = _probe(table_ptr, h, valid, T, INSERT=True)
    tl.atomic_max(table_ptr + T + slot, (K - ks).to(tl.int32), mask=valid)


@triton.jit
def _prepare_codes_kernel(
    cb_ptr,  # (K, D) strides (sk, sd)
    sk, sd,
    table_ptr,  # (2 * T + 1,) int32 from the stats kernel
    valid_ptr,  # (K,) int8 in; out: 1 for codes the search and re-rank use (valid, first copy)
    hash_ptr,  # (K,) int32
    amax_ptr,  # () int64 bits of the largest |entry|
    cb32_ptr,  # (K, D) fp32 out: scaled codes, 0 for unused
    e2_ptr,  # (K,) fp32 out: scaled |e|^2, +inf for unused codes
    cb64_ptr,  # (K, D) fp64 out: the codes as given, 0 for invalid
    scale_ptr,  # (4,) fp64 out: the scale, two fp32 factors whose product it is, its inverse
    max_norm_ptr,  # () int64, zeroed: fp64 bits of the largest scaled norm of a used code
    K, D, T,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # The scale 2^-e brings the largest magnitude m 2^e (m in [1, 2)) to [1, 2); none if it is moderate.
    amax_bits = tl.load(amax_ptr)
    e = ((amax_bits >> 52) & 0x7FF) - 1023
    e = tl.where((amax_bits == 0) | ((e >= -SCALE_EXP) & (e < SCALE_EXP)), 0, tl.minimum(e, 1022))
    scale = ((1023 - e) << 52).to(tl.float64, bitcast=True)
    if tl.program_id(0) == 0:
        # For fp32/bf16/fp16 codebooks e lies in [-149, 127]: both halves are normal fp32 powers of two.
        half = e // 2
        tl.store(scale_ptr, scale)
        tl.store(scale_ptr + 1, ((127 - half) << 23).to(tl.int32).to(tl.float32, bitcast=True).to(tl.float64))
        tl.store(scale_ptr + 2, ((127 - (e - half)) << 23).to(tl.int32).to(tl.float32, bitcast=True).to(tl.float64))
        tl.store(scale_ptr + 3, ((1023 + e) << 52).to(tl.float64, bitcast=True))
    ks = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    k_ok = ks < K
    rows = cb_ptr + ks[:, None] * sk
    valid = tl.load(valid_ptr + ks, mask=k_ok, other=0) != 0
    slot = _probe(table_ptr, tl.load(hash_ptr + ks, mask=k_ok, other=0), valid, T, INSERT=False)
    first = K - tl.load(table_ptr + T + slot, mask=valid, other=0).to(tl.int64)
    # A code whose hash an earlier code also has is a duplicate if every entry is equal.
    check = valid & (first < ks)
    first_rows = cb_ptr + tl.where(check, first, 0)[:, None] * sk
    differ = tl.zeros([BLOCK_C], tl.int32)
    e2 = tl.zeros([BLOCK_C], tl.float64)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        m = k_ok[:, None] & (ds < D)[None, :]
        v = tl.load(rows + ds[None, :].to(tl.int64) * sd, mask=m, other=0.0).to(tl.float64)
        w = tl.load(first_rows + ds[None, :].to(tl.int64) * sd, mask=m & check[:, None], other=0.0).to(tl.float64)
        differ += tl.sum((v != w).to(tl.int32), 1)
        v = tl.where(valid[:, None], v, 0.0)
        tl.store(cb64_ptr + ks[:, None] * D + ds[None, :], v, mask=m)
        vs = v * scale
        e2 += tl.sum(vs * vs, 1)
        tl.store(cb32_ptr + ks[:, None] * D + ds[None, :], vs.to(tl.float32), mask=m)
    use = valid & ~(check & (differ == 0))
    tl.store(valid_ptr + ks, use.to(tl.int8), mask=k_ok)
    tl.store(e2_ptr + ks, tl.where(use, e2.to(tl.float32), float("inf")), mask=k_ok)
    tl.atomic_max(max_norm_ptr, tl.max(tl.where(use, tl.sqrt(e2), 0.0), 0).to(tl.int64, bitcast=True))


@triton.jit
def _search_kernel(
    z_ptr,  # (B, R, D) any strides, any float dtype
    cb_ptr,  # (K, D) contiguous fp32, scaled
    e2_ptr,  # (K,) fp32 scaled |e_k|^2, +inf for codes the search skips
    scale_ptr,  # (4,) fp64: the scale, and two fp32 factors whose product it is
    index_ptr,  # (B * R,) int64 out: best code, -1 if no finite distance
    best_ptr,  # (B * R,) fp32 out: best expanded distance |e|^2 - 2 z.e (scaled)
    second_ptr,  # (B * R,) fp32 out: second best
    R, K, D, tiles,
    stride_zb, stride_zr, stride_zd,
    FP64_SCALE: tl.constexpr,  # scale z in fp64 (fp64 z or codebook), else by the two exact fp32 factors
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TF32: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // tiles).to(tl.int64)
    rows = (pid % tiles).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    scale = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1).to(tl.float32)
    s2 = tl.load(scale_ptr + 2).to(tl.float32)
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
            zt = tl.load(z_base + ds[None, :].to(tl.int64) * stride_zd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if FP64_SCALE:
                zt = (zt.to(tl.float64) * scale).to(tl.float32)
            else:
                zt = zt.to(tl.float32) * s1 * s2
            ct = tl.load(cb_ptr + ks[:, None] * D + ds[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            if TF32:
                acc += tl.dot(zt, tl.trans(ct), input_precision="tf32")
            else:
                acc += tl.dot(zt, tl.trans(ct), input_precision="ieee")
        e2 = tl.load(e2_ptr + ks, mask=k_ok, other=float("inf"))
        dist = e2[None, :] - 2.0 * acc
        dist = tl.where(dist == dist, dist, float("inf"))  # NaN (non-finite or overflowed z) never wins
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
    cb_ptr,  # (K, D) contiguous fp64, unscaled
    scale_ptr,  # (4,) fp64: the scale, ..., its inverse
    max_norm_ptr,  # () fp64: largest scaled norm of a used code
    index_ptr,  # (n,) int64 in/out
    best_ptr,  # (n,) fp32 in: best expanded distance (scaled)
    second_ptr,  # (n,) fp32 in
    sq_ptr,  # (n,) fp64 out: squared distance to the chosen code
    list_ptr,  # (n + 1,) int64: rows to re-rank, their count in the last slot
    n, R, K, D,
    stride_zb, stride_zr, stride_zd,
    unit_roundoff,
    EXACT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n
    zrows = z_ptr + (rows // R) * stride_zb + (rows % R) * stride_zr
    index = tl.load(index_ptr + rows, mask=row_ok, other=-1)
    safe = tl.maximum(tl.minimum(index, K - 1), 0)
    z2 = tl.zeros((BLOCK_R,), tl.float64)
    probe = tl.zeros((BLOCK_R,), tl.float64)
    sq = tl.zeros((BLOCK_R,), tl.float64)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        m = row_ok[:, None] & (ds < D)[None, :]
        zv = tl.load(zrows[:, None] + ds[None, :].to(tl.int64) * stride_zd, mask=m, other=0.0).to(tl.float64)
        z2 += tl.sum(zv * zv, 1)
        probe += tl.sum(zv * 0.0, 1)  # NaN if the row has an inf or NaN
        if EXACT:
            ev = tl.load(cb_ptr + safe[:, None] * D + ds[None, :], mask=m, other=0.0)
            sq += tl.sum((zv - ev) * (zv - ev), 1)
    finite = probe == 0.0
    best = tl.load(best_ptr + rows, mask=row_ok, other=0.0).to(tl.float64)
    scale = tl.load(scale_ptr)
    found = (index >= 0) & (best < float("inf"))
    if EXACT:
        # Same bound as csrc/vq_bound.h, in scaled units, plus the absolute error of fp32 underflow.
        nn = D + 5.0
        gamma = nn * unit_roundoff / (1.0 - nn * unit_roundoff)
        max_norm = tl.load(max_norm_ptr)
        zn = tl.sqrt(z2) * scale
        bound = 4.0 * gamma * (max_norm * max_norm + 2.0 * zn * max_norm)
        bound += 8.0 * (D + 2.0) * 2.0**-126 * (1.0 + zn + max_norm)
        gap = tl.load(second_ptr + rows, mask=row_ok, other=0.0).to(tl.float64) - best
        decided = found & (gap > bound)
    else:
        inv = tl.load(scale_ptr + 3)  # powers of two: multiplying by them is exact
        sq = tl.maximum(best * inv * inv + z2, 0.0)
        decided = found
    rerank = (row_ok & finite & ~decided).to(tl.int64)
    start = tl.atomic_add(list_ptr + n, tl.sum(rerank, 0))
    tl.store(list_ptr + start + tl.cumsum(rerank, 0) - 1, rows, mask=rerank != 0)
    tl.store(index_ptr + rows, tl.where(finite & decided, index, -1), mask=row_ok)
    tl.store(sq_ptr + rows, tl.where(finite & decided, sq, float("nan")), mask=row_ok)


@triton.jit
def _rerank_kernel(
    z_ptr,  # (B, R, D) any strides
    cb_ptr,  # (K, D) contiguous fp64, unscaled
    use_ptr,  # (K,) int8: 1 for codes to consider
    amax_ptr,  # () int64: fp64 bits of the codebook's largest |entry|
    list_ptr,  # (n + 1,) int64: rows, their count in the last slot
    index_ptr,  # (n,) int64 out
    sq_ptr,  # (n,) fp64 out
    n, R, K, D,
    stride_zb, stride_zr, stride_zd,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    count = tl.load(list_ptr + n)
    for i in range(tl.program_id(0), count, tl.num_programs(0)):
        row = tl.load(list_ptr + i)
        zrow = z_ptr + (row // R) * stride_zb + (row % R) * stride_zr
        # Squares overflow fp64 only beyond ~1e150: such rows are ranked on values scaled by a power of two
        # (exact barring underflow), so that their largest magnitude is below 2^500.
        big = tl.load(amax_ptr).to(tl.float64, bitcast=True)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            zv = tl.load(zrow + ds.to(tl.int64) * stride_zd, mask=ds < D, other=0.0).to(tl.float64)
            big = tl.maximum(big, tl.max(tl.abs(zv), 0))
        shift = tl.maximum((big.to(tl.int64, bitcast=True) >> 52) - 1023 - 500, 0)
        s = ((1023 - shift) << 52).to(tl.float64, bitcast=True)
        inv = ((1023 + shift) << 52).to(tl.float64, bitcast=True)
        best_k = tl.full((BLOCK_K,), float("inf"), tl.float64)
        second_k = tl.full((BLOCK_K,), float("inf"), tl.float64)
        best_i = tl.full((BLOCK_K,), K, tl.int64)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_ok = ks < K
            acc = tl.zeros((BLOCK_K,), tl.float64)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_ok = ds < D
                zv = tl.load(zrow + ds.to(tl.int64) * stride_zd, mask=d_ok, other=0.0).to(tl.float64)
                ct = tl.load(cb_ptr + ks[:, None] * D + ds[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
                diff = zv[None, :] * s - ct * s
                acc += tl.sum(diff * diff, axis=1)
            ok = k_ok & (tl.load(use_ptr + ks, mask=k_ok, other=0) != 0)
            acc = tl.where(ok, acc, float("inf"))
            better = acc < best_k  # per lane, indices grow with k0: strict keeps the lowest
            second_k = tl.where(better, best_k, tl.minimum(second_k, acc))
            best_i = tl.where(better & ok, ks, best_i)
            best_k = tl.where(better, acc, best_k)
        m = tl.min(best_k, axis=0)
        index = tl.min(tl.where(best_k == m, best_i, K), axis=0)
        second = tl.min(tl.where(best_i == index, second_k, best_k), axis=0)
        # Every term of sum (z - e)^2 is >= 0, so the computed sums are within gamma_{D+3} of the exact ones,
        # plus underflow of the scaled values and squares (absolute, per term); codes closer than that are
        # not told apart by fp64: the row is marked -2 - index for the exact decision (_decide_exactly).
        gamma = 1.01 * (D + 3.0) * 2.0**-53  # >= gamma_{D+3} for any D below 10^13; no fp64 division (a call)
        tiny = 8.0 * (D + 2.0) * 2.0**-1074 * (1.0 + 2.0 * big * s)
        tied = (second < float("inf")) & (second - m <= gamma * (m + second) + 2.0 * tiny)
        tl.store(index_ptr + row, tl.where(index < K, tl.where(tied, -2 - index, index), -1))
        tl.store(sq_ptr + row, tl.where(index < K, m * inv * inv, float("nan")))


def _prepare(codebook: torch.Tensor):
    K, D = codebook.shape
    dev = codebook.device
    T = triton.next_power_of_2(2 * K)
    table = torch.zeros(2 * T + 6, dtype=torch.int32, device=dev)  # + a spare slot, two int64 atomic maxima
    valid = torch.empty(K, dtype=torch.int8, device=dev)
    hashes = torch.empty(K, dtype=torch.int32, device=dev)
    cb32 = torch.empty((K, D), dtype=torch.float32, device=dev)
    e2 = torch.empty(K, dtype=torch.float32, device=dev)
    cb64 = torch.empty((K, D), dtype=torch.float64, device=dev)
    scale = torch.empty(4, dtype=torch.float64, device=dev)
    amax, max_norm = table[2 * T + 2:].view(torch.int64)
    block_c = 128 if _launch.INTERPRET else 16
    block_d = min(triton.next_power_of_2(D), 256 if _launch.INTERPRET else 64)
    grid = (triton.cdiv(K, block_c),)
    sk, sd = codebook.stride()
    _launch.launch(_prepare_stats_kernel, grid, codebook, sk, sd, table, valid, hashes, amax, K, D, T,
                   BLOCK_C=block_c, BLOCK_D=block_d)
    _launch.launch(_prepare_codes_kernel, grid, codebook, sk, sd, table, valid, hashes, amax, cb32, e2, cb64,
                   scale, max_norm, K, D, T, BLOCK_C=block_c, BLOCK_D=block_d)
    return cb32, e2, cb64, valid, scale, amax, max_norm.view(torch.float64)


def _search_config(D: int, exact: bool) -> dict:
    """Tiles of the search; the interpreter's cost grows with the number of programs, so it gets big ones.
    exact=False multiplies in TF32 on the GPU (its rounding is within that contract)."""
    if _launch.INTERPRET:
        return dict(BLOCK_R=64, BLOCK_K=128, BLOCK_D=max(16, min(128, triton.next_power_of_2(D))), TF32=False)
    if exact:  # fp32 FMA: 128 x 64 tiles 16 deep with 8 warps fit in registers for every input dtype
        return dict(BLOCK_R=128, BLOCK_K=64, BLOCK_D=16, TF32=False, num_warps=8)
    return dict(BLOCK_R=64, BLOCK_K=64, BLOCK_D=max(16, min(32, triton.next_power_of_2(D))), TF32=True, num_warps=8)


def _nearest(z: torch.Tensor, codebook: torch.Tensor, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
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
    cb32, e2, cb64, use, scale, amax, max_norm = _prepare(codebook)
    best = torch.empty(n, dtype=torch.float32, device=z.device)
    second = torch.empty_like(best)
    strides = (zv.stride(0), zv.stride(1), zv.stride(2))
    cfg = _search_config(D, exact)
    tiles = triton.cdiv(R, cfg["BLOCK_R"])
    fp64 = torch.float64 in (z.dtype, codebook.dtype)
    _launch.launch(_search_kernel, (B * tiles,), zv, cb32, e2, scale, index, best, second, R, K, D, tiles, *strides,
                   FP64_SCALE=fp64, **cfg)
    rerank = torch.zeros(n + 1, dtype=torch.long, device=z.device)
    block_r = 16
    _launch.launch(_finalize_kernel, (triton.cdiv(n, block_r),), zv, cb64, scale, max_norm, index, best, second, sq,
                   rerank, n, R, K, D, *strides, TF32_ROUNDOFF if cfg["TF32"] else FP32_ROUNDOFF, EXACT=exact,
                   BLOCK_R=block_r, BLOCK_D=min(128, max(16, triton.next_power_of_2(D))))
    _launch.launch(_rerank_kernel, (min(n, 8 if _launch.INTERPRET else 1024),), zv, cb64, use, amax, rerank, index, sq,
                   n, R, K, D, *strides, BLOCK_K=128 if _launch.INTERPRET else 32,
                   BLOCK_D=min(128 if _launch.INTERPRET else 32, triton.next_power_of_2(D)))
    _decide_exactly(zv, codebook, index, sq)
    return index.reshape(shape), sq.to(reference.sqdist_dtype(z)).reshape(shape)


def _decide_exactly(zv: torch.Tensor, codebook: torch.Tensor, index: torch.Tensor, sq: torch.Tensor) -> None:
    """Rows whose nearest codes fp64 cannot tell apart (equal distances, or within its rounding: below
    ~2^-53 of each other, or lost to underflow) come from the re-rank as -2 - k (k: the lowest index among
    them) and take the reference's exact decision instead. Such rows are rare (an exact tie between distinct
    codes, or magnitudes ~2^1000 apart within one row), but finding out whether there are any costs one host
    sync per call. While a CUDA graph is being captured there is no sync: such a row keeps k."""
    if zv.is_meta:  # no values (static checks)
        return
    tied_rows = index <= -2
    if zv.is_cuda and torch.cuda.is_current_stream_capturing():
        index.copy_(torch.where(tied_rows, -2 - index, index))
        return
    tied = tied_rows.nonzero().flatten()
    if tied.numel():
        R = zv.shape[1]
        exact_index, exact_sq = reference.vq_nearest(zv[tied // R, tied % R], codebook)
        index[tied] = exact_index
        sq[tied] = exact_sq.to(sq.dtype)

def vq_nearest(z: torch.Tensor, codebook: torch.Tensor, *, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    check_vq_args("vq_nearest", z, codebook)
    with _launch.on_device("vq_nearest", z=z, codebook=codebook):
        return _nearest(z, codebook, exact)


def vq_quantize(
    z: torch.Tensor, codebook: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_vq_args("vq_quantize", z, codebook)
    with _launch.on_device("vq_quantize", z=z, codebook=codebook):
        indices, sq = _nearest(z, codebook, exact=True)
        ok = indices >= 0
        code_rows = torch.where(ok[..., None], codebook.to(z.dtype)[indices.clamp_min(0)], float("nan"))
        z_q = reference.vq_rows_to_layout(code_rows, z).contiguous()
        loss = (1.0 + beta) * sq.double().sum() / max(z.numel(), 1)
        counts = torch.zeros(codebook.shape[0], dtype=torch.long, device=z.device)
        counts.index_add_(0, indices.reshape(-1).clamp_min(0), ok.reshape(-1).long())
        return z_q, indices, loss.to(reference.sqdist_dtype(z)), counts
