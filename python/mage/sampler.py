"""Iterative decoding (docs/REFERENCE.md section 5): from all-[MASK] to an image in T steps.

Each step runs the whole model on the current ids (nothing dropped; [MASK] tokens enter the encoder and
become [C] in the decoder), samples every unknown token, keeps the most confident and re-masks the rest
following a cosine schedule; the confidence noise is annealed to zero. `mage_kernels.remask_step`
does the sampling and re-masking in one sync-free op, fused with the head's last matmul by default,
so a whole generation can be captured in a CUDA graph.

Differences from the published sampler, none of which changes unconditional results in distribution:
the random streams (the op's counter-based Gumbel noise instead of torch categorical + numpy); the
count per row (each row its own, as MaskGIT; the reference uses row 0's for the batch, which differs
only for inpainting); ties re-mask exactly the count (`reference_ties=True` restores the reference's
`<=` rule); the last step re-masks nothing instead of computing 1 and then decoding the sampled ids.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

import mage_kernels
from mage_kernels.sampling import schedule_counts

from ._checks import InputValueError, check_generation, check_int, check_model
from .model import MAGE


def mask_schedule(num_tokens: int, steps: int) -> list[int]:
    """Tokens still masked after each step when decoding `num_tokens` from all-[MASK] (host-side, for
    inspection): 256 tokens in 20 steps -> 255, 252, 248, ..., 40, 20, 0 (section 5.2)."""
    check_int("mask_schedule", "num_tokens", num_tokens, 0)
    check_int("mask_schedule", "steps", steps, 1)  # num_tokens may be an inpainted row's few: steps may exceed it
    out, unknown = [], num_tokens
    for t in range(steps):
        want = math.floor(num_tokens * mage_kernels.cosine_mask_ratio(t, steps))
        out.append(0 if t == steps - 1 else min(max(min(want, unknown - 1), 1), unknown))
        unknown = out[-1]
    return out


def remask_counts(ids: torch.Tensor, num_initial: torch.Tensor, step: int, steps: int, mask_id: int) -> torch.Tensor:
    """Per-row count to leave masked after `step` of the cosine schedule, on device (no host sync); see
    `mage_kernels.sampling.schedule_counts`. num_initial: int64 [B], the unknown tokens at the start."""
    return schedule_counts(ids, num_initial, step, steps, mask_id=mask_id)


def _model_fns(model: MAGE, fused_head: bool) -> dict:
    """The model as `maskgit_step` / `maskgit_sample` take it: the head's hidden states and the codebook
    rows of the tied output layer (fused), or the logits of the L token positions over the codebook."""
    c = model.config
    K, mask_id = c.codebook_size, c.mask_id
    if fused_head:
        weight, bias = model.head_weight()
        # (B, L, D) hidden states, fp32 under autocast (after the head's LayerNorm)
        return dict(logits_fn=None, hidden_fn=lambda x: model.head_hidden(x, mask=x == mask_id)[:, 1:],
                    head_weight=weight[:K], head_bias=bias[:K])
    return dict(logits_fn=lambda x: model(x, mask=x == mask_id)[:, 1:, :K])  # (B, L, K), a strided view


def sample_step(
    model: MAGE,
    ids: torch.Tensor,
    num_initial: torch.Tensor,
    step: int,
    steps: int,
    *,
    choice_temperature: float = 6.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    fused_head: bool = True,
    reference_ties: bool = False,
    seed: torch.Tensor | None = None,
    choice_temperature_power: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step (section 5.2.1-5.2.10) on ids [B, L]: returns (sampled, new_ids), both [B, L].

    Static shapes and no host sync, so it compiles with fullgraph=True and can be captured in a CUDA
    graph. The step's randomness comes from `seed` ((2,) int64, see `mage_kernels.draw_seed`) when given,
    else from `generator`; Dynamo cannot trace a torch.Generator, so compiled callers pass a seed.
    `temperature` divides the logits before sampling and confidence (1.0: the reference, which has none).
    """
    fns = _model_fns(model, fused_head)
    return mage_kernels.maskgit_step(fns.pop("logits_fn"), ids, num_initial, step, steps, mask_id=model.config.mask_id,
                                     choice_temperature=choice_temperature, temperature=temperature,
                                     generator=generator, reference_ties=reference_ties, seed=seed,
                                     choice_temperature_power=choice_temperature_power, **fns)


def decode_tokens(
    model: MAGE,
    ids: torch.Tensor,
    *,
    steps: int = 20,
    choice_temperature: float = 6.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    fused_head: bool = True,
    reference_ties: bool = False,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    choice_temperature_power: float = 1.0,
) -> torch.Tensor:
    """Fill every [MASK] of ids [B, L] (int64; other tokens are kept exactly) in `steps` steps, with
    `mage_kernels.maskgit_sample` on this model.

    Returns the final ids [B, L], all codebook indices. `on_step(t, ids)` sees the ids after step t
    (still-masked tokens hold config.mask_id). Call under autocast as wanted; no host sync.
    """
    check_model("decode_tokens", model, MAGE)
    model._check_inputs(ids, None)
    check_generation("decode_tokens", steps=steps, choice_temperature=choice_temperature, generator=generator,
                     dtype=None, device=model.device, num_tokens=model.config.num_tokens)
    fns = _model_fns(model, fused_head)
    return mage_kernels.maskgit_sample(fns.pop("logits_fn"), ids, steps=steps, mask_id=model.config.mask_id,
                                       choice_temperature=choice_temperature, temperature=temperature,
                                       generator=generator, reference_ties=reference_ties, on_step=on_step,
                                       choice_temperature_power=choice_temperature_power, **fns)


def _autocast(device: torch.device, dtype: torch.dtype | None, cache_enabled: bool = True):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    # Autocast's weight-cast cache must be off inside a CUDA graph capture (PyTorch's CUDA graphs notes).
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


class _GraphedBatch:
    """One batch of generation (decoding + VQGAN decode) captured once in a CUDA graph and replayed."""

    def __init__(self, fn: Callable[[], torch.Tensor], generator: torch.Generator | None):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: lazy init, kernel selection, Triton compilation
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        if generator is not None:
            if not hasattr(self.graph, "register_generator_state"):
                raise RuntimeError("cuda_graph with an explicit generator needs torch>=2.5; pass generator=None "
                                   "(the default CUDA generator, seeded by torch.manual_seed)")
            self.graph.register_generator_state(generator)
        with torch.cuda.graph(self.graph):
            self.out = fn()

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.out.clone()


@torch.no_grad()
def generate(
    model: MAGE,
    num_images: int,
    *,
    steps: int = 20,
    choice_temperature: float = 6.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int = 32,
    dtype: torch.dtype | None = None,
    cuda_graph: bool = False,
    fused_head: bool = True,
    reference_ties: bool = False,
    progress: bool = False,
    choice_temperature_power: float = 1.0,
) -> torch.Tensor:
    """Class-unconditional samples: images [num_images, 3, H, W] float32 in [0, 1], on the model's device.

    Args:
        steps, choice_temperature: the README's settings for the reported FIDs are 20 and 6.0.
        choice_temperature_power: the confidence noise is choice_temperature * (1 - r) ** power at the step
            that ends at r = (t+1)/T (1: the papers' linear annealing).
        temperature: divides the logits (1.0, the reference: no temperature; below 1 sharpens them).
        generator: torch.Generator on the model's device (or CPU); the same seed gives the same images.
        batch_size: images decoded together; the last batch is run at full size and cut.
        dtype: None / torch.float32 (the reference) or torch.bfloat16 / torch.float16 (autocast).
        cuda_graph: capture one batch (all steps and the VQGAN decode) as a CUDA graph, replayed per batch.
        fused_head: sample from the head's hidden states (`remask_step_from_hidden`), never writing logits.
    """
    check_model("generate", model, MAGE)
    device = model.device
    num_images = check_int("generate", "num_images", num_images, 0)
    batch_size = check_int("generate", "batch_size", batch_size, 1)
    check_generation("generate", steps=steps, choice_temperature=choice_temperature, generator=generator,
                     dtype=dtype, device=device, num_tokens=model.config.num_tokens)
    if cuda_graph and device.type != "cuda":
        raise InputValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
    if cuda_graph and generator is not None and generator.device.type != "cuda":
        # A CPU generator's draws would be baked into the graph: every replay would repeat them.
        raise InputValueError("cuda_graph=True needs generator=None or a CUDA torch.Generator")
    c = model.config
    batch_size = min(batch_size, max(num_images, 1))

    def one_batch() -> torch.Tensor:
        ids = torch.full((batch_size, c.num_tokens), c.mask_id, dtype=torch.long, device=device)
        with _autocast(device, dtype, cache_enabled=not cuda_graph):
            tokens = decode_tokens(model, ids, steps=steps, choice_temperature=choice_temperature,
                                   temperature=temperature, generator=generator, fused_head=fused_head,
                                   reference_ties=reference_ties, choice_temperature_power=choice_temperature_power)
            return model.vqgan.decode(tokens).float()

    was_training = model.training
    model.eval()
    try:
        run = _GraphedBatch(one_batch, generator) if cuda_graph and num_images else one_batch
        batches = range(0, num_images, batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="sampling", unit="batch")
        out = [run()[: num_images - start] for start in batches]
    finally:
        model.train(was_training)
    if not out:
        r = c.tokenizer.resolution
        return torch.empty(0, c.tokenizer.in_channels, r, r, device=device)
    return torch.cat(out)
