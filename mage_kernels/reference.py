"""Pure-PyTorch reference of every op: the test oracle, the benchmark baseline and the fallback kernel.

Written for clarity, not speed; each function states the op's contract exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ._checks import (
    check_gather_keep_args,
    check_mask_plan_args,
    check_pad_with_cls_backward_args,
    check_pad_with_cls_args,
    check_remask_args,
    check_remask_hidden,
    check_remask_logits,
    check_vq_args,
)
from ._checks import InputValueError

# --------------------------------------------------------------------------------------------------
# Nearest-code quantization (docs/OPS.md op 1, docs/REFERENCE.md 3.3)
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
    float64 z) of shape (N,) or (B, H*W). The index is the argmin of the exact squared distances of the
    given values, in real arithmetic, ties to the lowest index (`vq_exact_argmin`), for every finite
    input of every dtype, so `exact` changes nothing here. sqdist is that distance evaluated in fp64.
    Codes with non-finite entries are never chosen; a row of z with a non-finite value, or a codebook
    with no finite code, gives index -1 and NaN.
    """
    check_vq_args("vq_nearest", z, codebook)
    rows = vq_rows(z)
    lead = rows.shape[:-1]
    z64 = rows.reshape(-1, rows.shape[-1]).double()
    e64 = codebook.double()
    indices = vq_exact_argmin(z64, e64)
    sq = ((z64 - e64[indices.clamp_min(0)]) ** 2).sum(1)
    sq = torch.where(indices < 0, float("nan"), sq)
    return indices.reshape(lead), sq.to(sqdist_dtype(z)).reshape(lead)


_U64 = 2.0**-53  # unit round-off of fp64


def vq_exact_argmin(z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """argmin_k sum_d (z[n, d] - e[k, d])^2 in exact arithmetic, ties to the lowest k; -1 for rows with a
    non-finite value and when no code is finite. z (N, D) and e (K, D) float64 (every other float dtype
    converts to it exactly).

    Three stages, each exact about what it decides: (1) codes with non-finite entries, and repeats of an
    earlier identical code (they tie with it and lose), are dropped; (2) every value is scaled by one
    power of two so that no square, product or sum can overflow fp64, and the expanded form
    |e|^2 - 2 z.e ranks the codes with a proven rounding bound (Higham, "Accuracy and Stability", eq. 3.5,
    plus the absolute error of underflow); (3) a row with more than one code within that bound is decided
    in integer arithmetic on the exact values.
    """
    N, D = z.shape
    K = e.shape[0]
    indices = torch.full((N,), -1, dtype=torch.long, device=z.device)
    valid = torch.isfinite(e).all(1)
    finite = valid.nonzero().flatten()
    if finite.numel():
        # First occurrence of every distinct finite code; -0.0 equals 0.0, as it does in every distance.
        _, inverse = torch.unique(e[finite] + 0.0, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), K, dtype=torch.long, device=e.device)
        first.scatter_reduce_(0, inverse, finite, "amin")
        valid[finite[first[inverse] != finite]] = False
    row_ok = torch.isfinite(z).all(1)
    if N == 0 or not valid.any() or not row_ok.any():
        return indices
    zs, es = _scale_for_fp64(torch.where(row_ok[:, None], z, 0.0), torch.where(valid[:, None], e, 0.0), D)
    e2 = torch.where(valid, (es * es).sum(1), float("inf"))
    e_max = float(es.norm(dim=1).max())
    gamma = (D + 4) * _U64 / (1.0 - (D + 4) * _U64)
    # Underflow: each scaled value may have lost up to 2^-1075 and each product or square up to 2^-1075.
    tiny = 8.0 * (D + 2) * 2.0**-1074 * (1.0 + 2.0 * max(e_max, float(zs.abs().max())))
    chunk = max(1, (1 << 24) // K)
    exact_rows: list[tuple[int, list[int]]] = []
    for start in range(0, N, chunk):
        zc = zs[start : start + chunk]
        d = e2[None, :] - 2.0 * (zc @ es.T)  # |z|^2 is the same for every code of a row
        best = d.amin(1, keepdim=True)
        bound = 2.0 * (gamma * (e_max * e_max + 2.0 * zc.norm(dim=1, keepdim=True) * e_max) + tiny)
        indices[start : start + chunk] = d.argmin(1)  # decided where no other code is within the bound
        candidate = d <= best + 2.0 * bound  # every code that may be the exact minimum
        for r in (candidate.sum(1) > 1).nonzero().flatten().tolist():
            exact_rows.append((start + r, candidate[r].nonzero().flatten().tolist()))
    for r, codes in exact_rows:
        indices[r] = _exact_nearest(z[r].tolist(), e, codes)
    return torch.where(row_ok, indices, -1)


def _scale_for_fp64(z: torch.Tensor, e: torch.Tensor, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z and e times one power of two 2^s so that the largest magnitude is about 2^t with D (2 * 2^t)^2
    far below the fp64 maximum: nothing overflows, and values from fp32/bf16/fp16 never underflow."""
    biggest = max(float(z.abs().max()), float(e.abs().max()))
    if biggest == 0.0:
        return z, e
    target = (1016 - math.ceil(math.log2(D + 1))) // 2
    shift = target - math.frexp(biggest)[1]
    for part in (shift // 2, shift - shift // 2):  # two steps: 2^shift alone may not be representable
        z, e = z * 2.0**part, e * 2.0**part
    return z, e


def _exact_nearest(z: list[float], e: torch.Tensor, codes: list[int]) -> int:
    """The code of `codes` (ascending) nearest to z in exact integer arithmetic, ties to the first."""
    def fixed(v: float) -> int:  # v * 2^1074, an integer for every finite float64
        num, den = v.as_integer_ratio()
        return num << (1075 - den.bit_length())

    zi = [fixed(v) for v in z]
    best_code, best = -1, None
    for k in codes:
        dist = sum((a - fixed(b)) ** 2 for a, b in zip(zi, e[k].tolist()))
        if best is None or dist < best:
            best_code, best = k, dist
    return best_code


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
# Confidence re-masking (docs/OPS.md op 5, docs/REFERENCE.md 5 and 8)
#
# Randomness is counter-based so that every backend draws the same numbers without state or host syncs:
# 32-bit words from a hash of (seed, offset, row b, position l, vocab index v), written here with int64
# tensor ops (uint32 values, products split so nothing overflows) and mirrored bit for bit in
# csrc/remask_rng.h and mage_kernels/triton/remask.py.
# --------------------------------------------------------------------------------------------------

MASK32 = 0xFFFFFFFF
MIX_C1, MIX_C2 = 0x21F0AAAD, 0xD35A2D97  # lowbias32 finalizer constants (an avalanche-tested 32-bit hash)
GOLDEN = 0x9E3779B9
SEED_SALT, OFFSET_SALT, CHOICE_SALT = 0x243F6A88, 0x85A308D3, 0x6A09E667


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for uint32 values held in int64, in two 16-bit halves so no product overflows."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_C1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_C2)
    return x ^ (x >> 15)


def remask_token_keys(seed: torch.Tensor, B: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 32-bit stream keys (h, g) of every token (b, l), int64 [B, L], from seed = (seed, offset)."""
    s, o = seed[0], seed[1]
    k0 = mix32(mix32((s & MASK32) ^ SEED_SALT) ^ ((s >> 32) & MASK32))
    k1 = mix32(mix32((o & MASK32) ^ OFFSET_SALT) ^ ((o >> 32) & MASK32))
    b = torch.arange(B, device=seed.device, dtype=torch.int64)[:, None]
    l = torch.arange(L, device=seed.device, dtype=torch.int64)[None, :]
    h = mix32((mix32(k0 ^ b) + l) & MASK32)
    return h, mix32(k1 ^ h)


_LOG_POLY = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
             -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)


def log_pos(x: torch.Tensor) -> torch.Tensor:
    """Natural log of positive normal float32 values by the Cephes formula (~1 ulp, accurate near 1), the
    one every kernel uses for the noise, so the backends agree bit for bit rather than by libm."""
    bits = x.view(torch.int32)
    e = (bits >> 23) - 126
    m = ((bits & 0x7FFFFF) | 0x3F000000).view(torch.float32)
    small = m < 0.707106781186547524
    e = torch.where(small, e - 1, e)
    m = torch.where(small, m + m - 1.0, m - 1.0)
    z = m * m
    y = torch.full_like(m, _LOG_POLY[0])
    for c in _LOG_POLY[1:]:
        y = y * m + c
    y = y * m * z
    ef = e.to(torch.float32)
    y = y + ef * -2.12194440e-4 - 0.5 * z
    return m + y + ef * 0.693359375


def hash_to_exponential(x: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise from 32-bit hashes: E = -log(u) with u = (top 23 bits + 1/2) / 2^23, exact in float32
    and in [2^-24, 1 - 2^-24], so E is positive and finite."""
    u = ((x >> 9).to(torch.float32) + 0.5) * 2.0**-23
    return -log_pos(u)


def hash_to_gumbel(x: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from 32-bit hashes: -log(E) of `hash_to_exponential`."""
    return -log_pos(hash_to_exponential(x))


def remask_token_exponential(h: torch.Tensor, g: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Sampling noise of every (token, v): Exp(1), float32 [B, L, vocab_size]."""
    v = _mul32(torch.arange(vocab_size, device=h.device, dtype=torch.int64), GOLDEN)
    return hash_to_exponential(mix32(((h[..., None] + v) & MASK32) ^ g[..., None]))


def remask_choice_gumbel(g: torch.Tensor) -> torch.Tensor:
    """Confidence noise of every token: float32 [B, L]."""
    return hash_to_gumbel(mix32((g + CHOICE_SALT) & MASK32))


def _check_counts(op: str, num_masked: torch.Tensor, unknown: torch.Tensor) -> torch.Tensor:
    """num_masked must lie in [0, unknown tokens of its row]. Checked on CPU tensors (no device sync);
    clamped into range on other devices, where checking would cost a host sync."""
    if num_masked.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (num_masked < 0) | (num_masked > unknown)
        if bool(bad.any()):
            row = int(bad.int().argmax())
            raise InputValueError(
                f"{op}: num_masked must lie in [0, number of unknown tokens] per row; row {row} has "
                f"num_masked = {int(num_masked[row])} but {int(unknown[row])} unknown tokens"
            )
    return torch.minimum(num_masked.clamp_min(0), unknown)


def remask_select(confidence: torch.Tensor, k: torch.Tensor, reference_ties: bool) -> torch.Tensor:
    """Boolean [B, L]: the k[b] lowest confidences of each row, ties to the lower position (a stable
    ascending sort); with `reference_ties`, every position with confidence <= the k-th smallest (the
    published rule, docs/REFERENCE.md 5.2.10), nothing when k = 0."""
    L = confidence.shape[1]
    if L == 0:
        return torch.zeros_like(confidence, dtype=torch.bool)
    order = torch.sort(confidence, dim=1, stable=True).indices
    if reference_ties:
        cutoff = confidence.gather(1, order.gather(1, (k - 1).clamp_min(0)[:, None]))
        return (confidence <= cutoff) & (k[:, None] > 0)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=order.device).expand_as(order))
    return rank < k[:, None]


def remask_sample(
    logits: torch.Tensor, ids: torch.Tensor, seed: torch.Tensor, *, mask_id: int, vocab_size: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sampling and confidence without the choice noise: (sampled int64 [B, L], log p float32 [B, L]).

    Per unknown token, s = logits[:vocab_size] * float32(1 / temperature) with NaN read as -inf,
    m = max s, d = s - m (0 where s == m, so rows whose max is +-inf stay defined: +inf entries share the
    mass, an all -inf row is uniform), sampled = argmax(exp(d) / E) with E ~ Exp(1) per candidate (the
    Gumbel-max trick in its exponential-race form: the same argmax as d - log E = d + Gumbel, one log
    cheaper; ties to the lowest v), log p = d[sampled] - log(sum exp d). Known tokens keep their id; their log p is returned as +inf.
    """
    B, L = ids.shape
    s = logits[..., :vocab_size].float() * torch.tensor(1.0 / temperature, dtype=torch.float32)
    s = torch.where(torch.isnan(s), float("-inf"), s)
    m = s.amax(-1, keepdim=True)
    d = torch.where(s == m, 0.0, s - m)
    h, g = remask_token_keys(seed, B, L)
    e = torch.exp(d)
    sampled = (e / remask_token_exponential(h, g, vocab_size)).argmax(-1)
    logp = d.gather(-1, sampled[..., None]).squeeze(-1) - torch.log(e.sum(-1))
    unknown = ids == mask_id
    return torch.where(unknown, sampled, ids), torch.where(unknown, logp, float("inf"))


def remask_step(
    logits: torch.Tensor,
    ids: torch.Tensor,
    num_masked: torch.Tensor,
    seed: torch.Tensor,
    *,
    mask_id: int,
    choice_temperature: float,
    vocab_size: int,
    temperature: float,
    reference_ties: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of MAGE's iterative decoding (docs/REFERENCE.md 5.2.5-5.2.10): (sampled, new_ids).

    logits (B, L, V') float32/bfloat16/float16, any strides; ids (B, L) int64, `mask_id` marks unknown
    tokens; num_masked (B,) int64; seed (2,) int64 = (seed, offset). Every unknown token is sampled (see
    `remask_sample`); confidence = log p + float32(choice_temperature) * Gumbel, +inf for known tokens;
    exactly num_masked[b] unknown tokens per row are set back to mask_id (`remask_select`).
    """
    check_remask_logits("remask_step", logits, ids)
    check_remask_args("remask_step", logits.shape[2], ids, num_masked, seed, mask_id, vocab_size, temperature,
                      choice_temperature)
    unknown = ids == mask_id
    k = _check_counts("remask_step", num_masked, unknown.sum(1))
    sampled, logp = remask_sample(logits, ids, seed, mask_id=mask_id, vocab_size=vocab_size, temperature=temperature)
    h, g = remask_token_keys(seed, *ids.shape)
    tau = torch.tensor(choice_temperature, dtype=torch.float32)
    confidence = torch.where(unknown, logp + tau * remask_choice_gumbel(g), float("inf"))
    masked = remask_select(confidence, k, reference_ties) & unknown
    return sampled, torch.where(masked, mask_id, sampled)


def remask_head_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vocab_size: int
) -> torch.Tensor:
    """The prediction head's logits over the first vocab_size rows (docs/REFERENCE.md 4.6), float32 [B, L, vocab_size]."""
    logits = hidden.float() @ weight[:vocab_size].float().T
    return logits + bias[:vocab_size].float() if bias is not None else logits


def remask_step_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    num_masked: torch.Tensor,
    seed: torch.Tensor,
    *,
    mask_id: int,
    choice_temperature: float,
    vocab_size: int,
    temperature: float,
    reference_ties: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`remask_step` on logits = hidden @ weight[:vocab_size].T + bias[:vocab_size], computed in float32."""
    check_remask_hidden("remask_step_from_hidden", hidden, weight, bias, ids)
    check_remask_args("remask_step_from_hidden", weight.shape[0], ids, num_masked, seed, mask_id, vocab_size,
                      temperature, choice_temperature)
    return remask_step(
        remask_head_logits(hidden, weight, bias, vocab_size), ids, num_masked, seed, mask_id=mask_id,
        choice_temperature=choice_temperature, vocab_size=vocab_size, temperature=temperature,
        reference_ties=reference_ties,
    )


def remask_step_published(
    logits: torch.Tensor, ids: torch.Tensor, num_masked: torch.Tensor, *, mask_id: int, choice_temperature: float,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The published sampler's step, written as it does it (the `eager-ref` baseline, docs/REFERENCE.md 5):
    softmax, categorical sampling, Gumbel noise drawn by numpy on the host and copied over, a full sort and
    the "<= k-th value" cut-off. Its randomness is torch's and numpy's global RNGs, not the op's."""
    logits = logits[..., :vocab_size]
    unknown = ids == mask_id
    probs = torch.softmax(logits, dim=-1)
    sampled = torch.distributions.Categorical(logits=logits).sample()
    sampled = torch.where(unknown, sampled, ids)
    selected = torch.gather(probs, -1, torch.where(unknown, sampled, 0)[..., None]).squeeze(-1)
    selected = torch.where(unknown, selected, torch.tensor(math.inf, device=logits.device))
    noise = torch.tensor(np.random.gumbel(size=ids.shape), dtype=torch.float32).to(logits.device)
    confidence = torch.log(selected) + choice_temperature * noise
    sorted_confidence, _ = torch.sort(confidence, dim=-1)
    cutoff = sorted_confidence.gather(1, (num_masked - 1).clamp_min(0)[:, None])
    masking = confidence <= cutoff
    return sampled, torch.where(masking, mask_id, sampled)


# --------------------------------------------------------------------------------------------------
# Masked tokens: mask plan, gather-drop and [C] padding (docs/OPS.md ops 2-4, docs/REFERENCE.md 4.4-4.5)
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
    """y (B, 1+Lk, C) -> z (B, 1+L, C), docs/REFERENCE.md 4.5.

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
    check_pad_with_cls_backward_args("pad_with_cls_backward", grad_z, keep_idx, masked)
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
