"""Confidence re-masking benchmarks (issue 4): one step of iterative decoding on the published shapes.

Providers: eager-ref (the published sampler: softmax + categorical + host numpy Gumbel + sort + "<="
cut-off), eager-best (a sync-free rewrite: Gumbel-max + logsumexp + sort rank, exactly k), compile (of
eager-best), mage (each backend). `remask_step_from_hidden` (mage) against the head matmul over all 2025 rows (as the model computes it)
or over the 1024 candidate rows only, followed by remask_step.
Logits are `logits[:, 1:]` of a (B, 1+L, 2025) tensor and the candidates its first 1024 columns, as the
model calls it; "unknown=all" is the first step, "unknown=half" a middle one (known tokens are skipped).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from common import Case

import mage_kernels as mk
from mage_kernels import reference

MASK, VOCAB, VROWS, L = 2024, 1024, 2025, 256


def eager_best(logits, ids, num_masked, mask_id: int, choice_temperature: float, vocab_size: int):
    """Sync-free eager step: Gumbel-max sampling, log p via logsumexp, exactly k by a stable sort's rank."""
    x = logits[..., :vocab_size].float()
    gumbel = -torch.empty_like(x).exponential_().log()
    sampled = (x + gumbel).argmax(-1)
    logp = x.gather(-1, sampled[..., None]).squeeze(-1) - torch.logsumexp(x, -1)
    unknown = ids == mask_id
    noise = -torch.empty_like(logp).exponential_().log()
    confidence = torch.where(unknown, logp + choice_temperature * noise, math.inf)
    order = torch.sort(confidence, dim=1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(ids.shape[1], device=ids.device).expand_as(order))
    sampled = torch.where(unknown, sampled, ids)
    return sampled, torch.where(rank < num_masked[:, None], mask_id, sampled)


def _step_inputs(B: int, known_frac: float, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, 1 + L, VROWS, generator=g) * 2).to(device=device, dtype=dtype)[:, 1:]
    ids = torch.where(torch.rand(B, L, generator=g) < known_frac, torch.randint(0, VOCAB, (B, L), generator=g), MASK)
    ids = ids.to(device)
    k = mk.remask_count(ids, mask_id=MASK, mask_ratio=0.5 * (1 - known_frac))
    return logits, ids, k


def cases(device: str, quick: bool = False) -> list[Case]:
    if quick:
        grid = [(2, 0.0)]
    elif device == "cpu":
        grid = [(8, 0.0), (32, 0.0), (32, 0.5)]
    else:
        grid = [(8, 0.0), (32, 0.0), (256, 0.0), (256, 0.5)]
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    backend = mk.build_info()["ops"]["remask_step"][device]
    out = []
    for B, known in grid:
        for dtype in dtypes:
            logits, ids, k = _step_inputs(B, known, device, dtype)
            shape = f"B={B},L={L},V={VOCAB}/{VROWS},unknown={'all' if known == 0 else 'half'}"
            dt = str(dtype).replace("torch.", "")
            unknown_tokens = B * L * (1 - known)
            nbytes = unknown_tokens * VOCAB * logits.element_size() + B * L * 8 * 3  # candidates + ids in/out
            args = (logits, ids, k)
            kw = dict(mask_id=MASK, choice_temperature=3.0, vocab_size=VOCAB)
            best = lambda a=args, kw=kw: eager_best(*a, **kw)  # noqa: E731
            compiled = torch.compile(eager_best, fullgraph=True)
            out += [
                Case("remask_step", "eager-ref", "torch", "no-grad", shape, dt,
                     lambda a=args, kw=kw: reference.remask_step_published(*a, **kw), nbytes),
                Case("remask_step", "eager-best", "torch", "no-grad", shape, dt, best, nbytes),
                Case("remask_step", "compile", "inductor", "no-grad", shape, dt,
                     lambda a=args, kw=kw: compiled(*a, **kw), nbytes),
                Case("remask_step", "mage", backend, "no-grad", shape, dt,
                     lambda a=args, kw=kw: mk.remask_step(*a, **kw), nbytes),
            ]
            if device == "cuda":
                from mage_kernels.triton import remask as tr

                seed = mk.draw_seed(device)
                tkw = dict(kw, temperature=1.0, reference_ties=False)
                out.append(Case("remask_step", "mage", "triton", "no-grad", shape, dt,
                                lambda a=args, s=seed, kw=tkw: tr.remask_step(*a, s, **kw), nbytes))
    out += _fused_cases(device, quick)
    return out


def _fused_cases(device: str, quick: bool) -> list[Case]:
    """The head's last matmul + the step, fused or not (MAGE-B: C = 768); the fused op computes logits for
    the unknown tokens only, so a middle step ("unknown=half") also halves its matmul."""
    B, C = (2, 64) if quick else ((8, 768) if device == "cpu" else (256, 768))
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    backend = mk.build_info()["ops"]["remask_step_from_hidden"][device]
    step_backend = "torch+" + mk.build_info()["ops"]["remask_step"][device]
    out = []
    for dtype in dtypes:
        for known in (0.0,) if quick else (0.0, 0.5):
            g = torch.Generator().manual_seed(1)
            hidden = torch.randn(B, 1 + L, C, generator=g).to(device=device, dtype=dtype)[:, 1:]
            weight = (torch.randn(VROWS, C, generator=g) * 0.05).to(device=device, dtype=dtype)
            bias = torch.randn(VROWS, generator=g).to(device=device, dtype=dtype)
            ids = torch.where(torch.rand(B, L, generator=g) < known, 0, MASK).to(device)
            k = mk.remask_count(ids, mask_id=MASK, mask_ratio=0.5 * (1 - known))
            shape = f"B={B},L={L},C={C},V={VOCAB}/{VROWS},unknown={'all' if known == 0 else 'half'}"
            dt = str(dtype).replace("torch.", "")
            nbytes = (B * L * C + VOCAB * C) * hidden.element_size()
            flops = 2.0 * B * L * C * VOCAB
            kw = dict(mask_id=MASK, choice_temperature=3.0, vocab_size=VOCAB)

            def fused(h=hidden, w=weight, b=bias, ids=ids, k=k, kw=kw):
                return mk.remask_step_from_hidden(h, w, b, ids, k, **kw)

            def unfused(h=hidden, w=weight, b=bias, ids=ids, k=k, kw=kw):  # the head as the model runs it
                return mk.remask_step(F.linear(h, w, b), ids, k, **kw)

            def unfused_sliced(h=hidden, w=weight[:VOCAB], b=bias[:VOCAB], ids=ids, k=k, kw=kw):  # candidates only
                return mk.remask_step(F.linear(h, w, b), ids, k, **kw)

            out += [
                Case("remask_from_hidden", "mage", backend, "no-grad", shape, dt, fused, nbytes, flops),
                Case("remask_from_hidden", "gemm+mage", step_backend, "no-grad", shape, dt, unfused, nbytes, flops),
                Case("remask_from_hidden", "gemm1024+mage", step_backend, "no-grad", shape, dt, unfused_sliced,
                     nbytes, flops),
            ]
    return out


def test_bench_remask_cpu(benchmark):
    torch.set_num_threads(2)
    logits, ids, k = _step_inputs(8, 0.0, "cpu", torch.float32)
    benchmark(lambda: mk.remask_step(logits, ids, k, mask_id=MASK, choice_temperature=3.0, vocab_size=VOCAB))


def test_bench_remask_eager_ref_cpu(benchmark):
    torch.set_num_threads(2)
    logits, ids, k = _step_inputs(8, 0.0, "cpu", torch.float32)
    benchmark(lambda: reference.remask_step_published(logits, ids, k, mask_id=MASK, choice_temperature=3.0,
                                                      vocab_size=VOCAB))
