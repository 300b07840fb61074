"""Triton kernels of confidence re-masking (docs/OPS.md op 5; docs/REFERENCE.md 5).

`remask_step`: one program per token samples it (two passes over its candidate logits: the max, then
exp-sum and Gumbel-max in exponential-race form together; known tokens read nothing), then one program per row re-masks exactly
k tokens by ranking confidences (rank = number of unknown tokens less confident, ties by position).
`remask_step_from_hidden`: one program per block of tokens computes the head's logits tile by tile with
`tl.dot` and keeps an online log-sum-exp and Gumbel-max, so the (B, L, V) logits never reach memory.
The noise is the counter-based hash of csrc/remask_rng.h, bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .._checks import check_remask_args, check_remask_hidden, check_remask_logits
from . import _launch


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x21F0AAAD, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0xD35A2D97, tl.uint32)
    return x ^ (x >> 15)


@triton.jit
def _call_keys(seed_ptr):
    s = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
    o = tl.load(seed_ptr + 1).to(tl.uint64, bitcast=True)
    k0 = _mix32(_mix32(s.to(tl.uint32) ^ tl.full([], 0x243F6A88, tl.uint32)) ^ (s >> 32).to(tl.uint32))
    k1 = _mix32(_mix32(o.to(tl.uint32) ^ tl.full([], 0x85A308D3, tl.uint32)) ^ (o >> 32).to(tl.uint32))
    return k0, k1


@triton.jit
def _token_keys(k0, k1, b, l):
    h = _mix32(_mix32(k0 ^ b.to(tl.uint32)) + l.to(tl.uint32))
    return h, _mix32(k1 ^ h)


@triton.jit
def _log_pos(x):
    """log of a positive normal float32: the Cephes formula of csrc/remask_rng.h (log_pos), accurate near 1
    where an approximate hardware log would corrupt -log(u) for u close to 1."""
    bits = x.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 126
    m = ((bits & 0x7FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    small = m < 0.707106781186547524
    e = tl.where(small, e - 1, e)
    m = tl.where(small, m + m - 1.0, m - 1.0)
    z = m * m
    y = m * 7.0376836292e-2 - 1.1514610310e-1
    y = y * m + 1.1676998740e-1
    y = y * m - 1.2420140846e-1
    y = y * m + 1.4249322787e-1
    y = y * m - 1.6668057665e-1
    y = y * m + 2.0000714765e-1
    y = y * m - 2.4999993993e-1
    y = y * m + 3.3333331174e-1
    y = y * m * z
    ef = e.to(tl.float32)
    y = y + ef * -2.12194440e-4 - 0.5 * z
    return m + y + ef * 0.693359375


@triton.jit
def _exponential(w):
    u = ((w >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    return -_log_pos(u)


@triton.jit
def _gumbel(w):
    return -_log_pos(_exponential(w))


@triton.jit
def _token_word(h, g, v):
    return _mix32((h + v.to(tl.uint32) * tl.full([], 0x9E3779B9, tl.uint32)) ^ g)


@triton.jit
def _sample_kernel(
    logits_ptr,  # (B, L, V') any strides
    s0, s1, s2,
    ids_ptr,  # (B, L) int64 contiguous
    seed_ptr,  # (2,) int64
    sampled_ptr,  # (B, L) int64
    conf_ptr,  # (B, L) float32
    L, vocab, mask_id, inv_t, tau,
    BLOCK_V: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    b = t // L
    l = t % L
    tok = tl.load(ids_ptr + t)
    if tok != mask_id:
        tl.store(sampled_ptr + t, tok)
        tl.store(conf_ptr + t, float("inf"))
    else:
        row = logits_ptr + b * s0 + l * s1
        offs = tl.arange(0, BLOCK_V)
        m = tl.full([], float("-inf"), tl.float32)
        for v0 in range(0, vocab, BLOCK_V):
            v = v0 + offs
            s = tl.load(row + v.to(tl.int64) * s2, mask=v < vocab, other=float("-inf")).to(tl.float32) * inv_t
            s = tl.where(s != s, float("-inf"), s)
            m = tl.maximum(m, tl.max(s, 0))
        k0, k1 = _call_keys(seed_ptr)
        h, g = _token_keys(k0, k1, b, l)
        total = tl.zeros([], tl.float32)
        best = tl.full([], -1.0, tl.float32)  # keys exp(d) / E are >= 0
        best_v = tl.zeros([], tl.int32)
        best_d = tl.zeros([], tl.float32)
        for v0 in range(0, vocab, BLOCK_V):
            v = v0 + offs
            live = v < vocab
            s = tl.load(row + v.to(tl.int64) * s2, mask=live, other=float("-inf")).to(tl.float32) * inv_t
            s = tl.where(s != s, float("-inf"), s)
            d = tl.where(s == m, 0.0, s - m)
            e = tl.where(live, tl.exp(d), 0.0)
            total += tl.sum(e, 0)
            key = tl.where(live, e / _exponential(_token_word(h, g, v)), -1.0)
            cmax = tl.max(key, 0)
            cv = tl.min(tl.where(key == cmax, v, vocab), 0)
            cd = tl.max(tl.where(v == cv, d, float("-inf")), 0)
            better = cmax > best
            best = tl.where(better, cmax, best)
            best_v = tl.where(better, cv, best_v)
            best_d = tl.where(better, cd, best_d)
        logp = best_d - tl.log(total)
        tl.store(sampled_ptr + t, best_v.to(tl.int64))
        tl.store(conf_ptr + t, logp + tau * _gumbel(_mix32(g + tl.full([], 0x6A09E667, tl.uint32))))


@triton.jit
def _select_kernel(
    conf_ptr,  # (B, L) float32
    ids_ptr,  # (B, L) int64 contiguous
    sampled_ptr,  # (B, L) int64
    k_ptr,  # (B,) int64
    new_ptr,  # (B, L) int64
    L, mask_id,
    REFERENCE_TIES: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    base = b * L
    n_unknown = tl.zeros([], tl.int64)
    for j0 in range(0, L, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        n_unknown += tl.sum((tl.load(ids_ptr + base + j, mask=j < L, other=mask_id + 1) == mask_id).to(tl.int64), 0)
    k = tl.minimum(tl.maximum(tl.load(k_ptr + b), 0), n_unknown)  # clamped: no host sync to check
    # The cut-off of the published rule: the confidence ranked k-1 (ranks are a permutation).
    cutoff = tl.full([], float("-inf"), tl.float32)
    for i0 in range(0, L, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        ci = tl.load(conf_ptr + base + i, mask=i < L, other=float("inf"))
        ui = tl.load(ids_ptr + base + i, mask=i < L, other=mask_id + 1) == mask_id
        rank = tl.zeros([BLOCK_I], tl.int64)
        for j0 in range(0, L, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            cj = tl.load(conf_ptr + base + j, mask=j < L, other=float("inf"))
            uj = tl.load(ids_ptr + base + j, mask=j < L, other=mask_id + 1) == mask_id
            before = (cj[None, :] < ci[:, None]) | ((cj[None, :] == ci[:, None]) & (j[None, :] < i[:, None]))
            rank += tl.sum((before & uj[None, :]).to(tl.int64), 1)
        sel = ui & (rank < k)
        if REFERENCE_TIES:
            cutoff = tl.maximum(cutoff, tl.max(tl.where(ui & (rank == k - 1), ci, float("-inf")), 0))
        else:
            tok = tl.load(sampled_ptr + base + i, mask=i < L)
            tl.store(new_ptr + base + i, tl.where(sel, mask_id, tok), mask=i < L)
    if REFERENCE_TIES:
        for i0 in range(0, L, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            ci = tl.load(conf_ptr + base + i, mask=i < L, other=float("inf"))
            ui = tl.load(ids_ptr + base + i, mask=i < L, other=mask_id + 1) == mask_id
            tok = tl.load(sampled_ptr + base + i, mask=i < L)
            sel = ui & (ci <= cutoff) & (k > 0)
            tl.store(new_ptr + base + i, tl.where(sel, mask_id, tok), mask=i < L)


def _select_config(L: int) -> dict:
    block_i = 128 if _launch.INTERPRET else 64
    block_j = min(triton.next_power_of_2(L), 256 if _launch.INTERPRET else 64)
    return dict(BLOCK_I=min(block_i, triton.next_power_of_2(L)), BLOCK_J=block_j)


def _select(conf, ids, sampled, num_masked, mask_id, reference_ties):
    B, L = ids.shape
    new_ids = torch.empty_like(sampled)
    if B * L:
        _launch.launch(_select_kernel, (B,), conf, ids, sampled, num_masked, new_ids, L, mask_id,
                       REFERENCE_TIES=reference_ties, **_select_config(L))
    return new_ids


def _check_counts(op, ids, num_masked, mask_id):
    if num_masked.device.type == "cpu":
        reference._check_counts(op, num_masked, (ids == mask_id).sum(1))


def _sample_config(vocab_size: int) -> dict:
    block_v = min(triton.next_power_of_2(vocab_size), 4096 if _launch.INTERPRET else 1024)
    # enable_fp_fusion=False: bit-identical noise on every backend needs no FMA contraction.
    return dict(BLOCK_V=block_v, num_warps=4, enable_fp_fusion=False)


def remask_step(logits, ids, num_masked, seed, *, mask_id, choice_temperature, vocab_size, temperature,
                reference_ties):
    check_remask_logits("remask_step", logits, ids)
    check_remask_args("remask_step", logits.shape[2], ids, num_masked, seed, mask_id, vocab_size, temperature,
                      choice_temperature)
    _check_counts("remask_step", ids, num_masked, mask_id)
    with _launch.on_device("remask_step", logits=logits, ids=ids, num_masked=num_masked, seed=seed):
        ids_c = ids.contiguous()
        B, L = ids.shape
        sampled = torch.empty_like(ids_c)
        conf = torch.empty((B, L), dtype=torch.float32, device=ids.device)
        if B * L:
            _launch.launch(
                _sample_kernel, (B * L,), logits, *logits.stride(), ids_c, seed, sampled, conf, L, vocab_size,
                mask_id, float(torch.tensor(1.0 / temperature, dtype=torch.float32)), choice_temperature,
                **_sample_config(vocab_size),
            )
        return sampled, _select(conf, ids_c, sampled, num_masked, mask_id, reference_ties)


@triton.jit
def _fused_kernel(
    hidden_ptr,  # (B, L, C) any strides
    h0, h1, h2,
    w_ptr,  # (V', C) any strides
    w0, w1,
    bias_ptr,  # (V',) or a dummy
    ids_ptr,  # (B, L) int64 contiguous
    seed_ptr,  # (2,) int64
    sampled_ptr,  # (B, L) int64
    conf_ptr,  # (B, L) float32
    L, C, vocab, mask_id, inv_t, tau,
    tiles,  # programs per row: cdiv(L, BLOCK_M)
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Program (b, tile): writes the known tokens at positions tile*BLOCK_M.. of row b, and samples the
    row's unknown tokens ranked tile*BLOCK_M.. among its unknown tokens (in position order). Unknown tokens
    are thus packed into the first tiles of a row, and a program left with none skips the matmul and the
    noise (late decoding steps are mostly known tokens)."""
    pid = tl.program_id(0)
    b = (pid // tiles).to(tl.int64)
    tile = pid % tiles
    row_ids = ids_ptr + b * L
    slots = tl.arange(0, BLOCK_M)
    pos = tile * BLOCK_M + slots
    tok = tl.load(row_ids + pos, mask=pos < L, other=mask_id)
    known = (pos < L) & (tok != mask_id)
    tl.store(sampled_ptr + b * L + pos, tok, mask=known)
    tl.store(conf_ptr + b * L + pos, float("inf"), mask=known)

    # Positions of the unknown tokens ranked tile*BLOCK_M + slot, by a one-hot reduction per chunk of the row.
    lpos = tl.zeros([BLOCK_M], tl.int32)
    n = tl.zeros([], tl.int32)
    seen = tl.zeros([], tl.int32)
    for p0 in range(0, L, BLOCK_L):
        p = p0 + tl.arange(0, BLOCK_L)
        unk = (tl.load(row_ids + p, mask=p < L, other=mask_id + 1) == mask_id).to(tl.int32)
        slot = seen + tl.cumsum(unk, 0) - 1 - tile * BLOCK_M
        hit = (unk != 0) & (slot >= 0) & (slot < BLOCK_M)
        onehot = (slot[None, :] == slots[:, None]) & hit[None, :]
        lpos += tl.sum(tl.where(onehot, p[None, :], 0), 1)
        n += tl.sum(hit.to(tl.int32), 0)
        seen += tl.sum(unk, 0)
    if n > 0:
        active = slots < n
        l = lpos.to(tl.int64)
        k0, k1 = _call_keys(seed_ptr)
        h, g = _token_keys(k0, k1, b, l)
        # Online softmax statistics and a Gumbel-max argmax over classes: +inf logits (2) beat finite ones
        # (1), which beat -inf (0); within a class the largest key wins, ties to the lower id. Keys are
        # s + Gumbel for finite s and the Gumbel alone otherwise, so a row with +inf logits is sampled
        # uniformly among them and an all -inf row uniformly, as the logits kernels do.
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        best_cls = tl.full([BLOCK_M], -1, tl.int32)
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        best_s = tl.zeros([BLOCK_M], tl.float32)
        best_v = tl.zeros([BLOCK_M], tl.int32)
        rows = hidden_ptr + b * h0 + l * h1
        kk = tl.arange(0, BLOCK_K)
        for v0 in range(0, vocab, BLOCK_N):
            v = v0 + tl.arange(0, BLOCK_N)
            vmask = v < vocab
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for c0 in range(0, C, BLOCK_K):
                c = (c0 + kk).to(tl.int64)
                x = tl.load(rows[:, None] + c[None, :] * h2, mask=active[:, None] & (c[None, :] < C), other=0.0)
                w = tl.load(w_ptr + v[None, :].to(tl.int64) * w0 + c[:, None] * w1,
                            mask=vmask[None, :] & (c[:, None] < C), other=0.0)
                if UPCAST:
                    acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(x, w, acc)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + v, mask=vmask, other=0.0).to(tl.float32)[None, :]
            s = acc * inv_t
            s = tl.where((s != s) | ~vmask[None, :], float("-inf"), s)
            m_new = tl.maximum(m, tl.max(s, 1))
            # exp(s - m) with exp(0) where s == m: +inf entries under an +inf max, and -inf ones under a
            # -inf max, each count once (inf - inf would be NaN).
            total = total * tl.where(m == m_new, 1.0, tl.exp(m - m_new))
            e = tl.where(s == m_new[:, None], 1.0, tl.exp(s - m_new[:, None]))
            total += tl.sum(tl.where(vmask[None, :], e, 0.0), 1)
            m = m_new
            noise = _gumbel(_token_word(h[:, None], g[:, None], v[None, :]))
            cls = tl.where(s == float("inf"), 2, tl.where(s == float("-inf"), 0, 1))
            cls = tl.where(vmask[None, :], cls, -1)
            key = tl.where(cls == 1, s + noise, noise)
            ccls = tl.max(cls, 1)
            key = tl.where(cls == ccls[:, None], key, float("-inf"))
            cmax = tl.max(key, 1)
            cv = tl.min(tl.where((cls == ccls[:, None]) & (key == cmax[:, None]), v[None, :], vocab), 1)
            cs = tl.max(tl.where(v[None, :] == cv[:, None], s, float("-inf")), 1)
            better = (ccls > best_cls) | ((ccls == best_cls) & (cmax > best))
            best_cls = tl.where(better, ccls, best_cls)
            best = tl.where(better, cmax, best)
            best_v = tl.where(better, cv, best_v)
            best_s = tl.where(better, cs, best_s)
        logp = tl.where(best_s == m, 0.0, best_s - m) - tl.log(total)
        conf = logp + tau * _gumbel(_mix32(g + tl.full([], 0x6A09E667, tl.uint32)))
        tl.store(sampled_ptr + b * L + l, best_v.to(tl.int64), mask=active)
        tl.store(conf_ptr + b * L + l, conf, mask=active)


def _fused_config(hidden_dtype: torch.dtype, weight_dtype: torch.dtype, C: int, vocab_size: int, L: int) -> dict:
    """Tiles and precision of the fused head. bf16/fp16 hidden and weight of one dtype multiply on tensor
    cores (fp32 accumulation); anything involving fp32 is computed in fp32, exactly ("ieee") unless
    torch.backends.cuda.matmul.allow_tf32 allows TF32, as torch's own fp32 matmul does."""
    wide = torch.float32 in (hidden_dtype, weight_dtype) or hidden_dtype != weight_dtype
    upcast = wide or _launch.INTERPRET  # the interpreter computes bf16 tl.dot wrongly: upcast there
    tf32 = not _launch.INTERPRET and torch.backends.cuda.matmul.allow_tf32
    block_l = min(triton.next_power_of_2(max(L, 1)), 64)
    if _launch.INTERPRET:
        bm, bn = 32, triton.next_power_of_2(min(vocab_size, 1024))
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=max(16, triton.next_power_of_2(min(C, 256))), BLOCK_L=block_l,
                    UPCAST=upcast, PRECISION="ieee", num_stages=1)
    # 8 warps, tiles that fit in registers for every dtype pair (4 warps, or 128-wide fp32 tiles, spill).
    if upcast:
        # Exact fp32 products of a 16-bit hidden and an fp32 weight: ptxas stops at 128 registers and spills
        # with 64 codes per tile; 32 codes in two stages fit (128 registers, two blocks per SM).
        narrow = not tf32 and hidden_dtype != weight_dtype and hidden_dtype != torch.float32
        return dict(BLOCK_M=64, BLOCK_N=32 if narrow else 64, BLOCK_K=16, BLOCK_L=block_l, UPCAST=True,
                    PRECISION="tf32" if tf32 else "ieee", num_warps=8, num_stages=2 if narrow else 3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, BLOCK_L=block_l, UPCAST=False, PRECISION="ieee", num_warps=8,
                num_stages=3)


def remask_step_from_hidden(hidden, weight, bias, ids, num_masked, seed, *, mask_id, choice_temperature, vocab_size,
                            temperature, reference_ties):
    op = "remask_step_from_hidden"
    check_remask_hidden(op, hidden, weight, bias, ids)
    check_remask_args(op, weight.shape[0], ids, num_masked, seed, mask_id, vocab_size, temperature, choice_temperature)
    _check_counts(op, ids, num_masked, mask_id)
    with _launch.on_device(op, hidden=hidden, weight=weight, bias=bias, ids=ids, num_masked=num_masked, seed=seed):
        ids_c = ids.contiguous()
        B, L = ids.shape
        C = hidden.shape[2]
        sampled = torch.empty_like(ids_c)
        conf = torch.empty((B, L), dtype=torch.float32, device=ids.device)
        if B * L:
            cfg = _fused_config(hidden.dtype, weight.dtype, C, vocab_size, L)
            tiles = triton.cdiv(L, cfg["BLOCK_M"])
            _launch.launch(
                _fused_kernel, (B * tiles,), hidden, *hidden.stride(), weight, *weight.stride(),
                bias if bias is not None else weight, ids_c, seed, sampled, conf, L, C, vocab_size, mask_id,
                float(torch.tensor(1.0 / temperature, dtype=torch.float32)), choice_temperature,
                tiles, HAS_BIAS=bias is not None, enable_fp_fusion=False, **cfg,
            )
        return sampled, _select(conf, ids_c, sampled, num_masked, mask_id, reference_ties)
