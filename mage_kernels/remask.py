"""Confidence re-masking for iterative decoding (docs/OPS.md op 5): schemas, fake kernels, the public API and
the schedule helpers of the paper's sampler (docs/REFERENCE.md 5).

One decoding step samples every unknown token, scores each sample by its log-probability plus annealed
Gumbel noise, keeps the most confident and re-masks exactly `num_masked[b]` of each row. The published
sampler does that in ~10 passes over the logits with host-side noise and host syncs; here it is one op
with no host sync, so a step compiles whole and can be captured in a CUDA graph. Kernels:
csrc/remask_cpu.cpp, csrc/remask_cuda.cu, mage_kernels/triton/remask.py; reference: mage_kernels/reference.py.

Randomness: the wrapper draws a (seed, offset) pair of int64 from the torch.Generator (on the device of the
logits, so no host sync, and graph-safe for CUDA generators); kernels turn it into noise with a
counter-based hash of (seed, offset, row, position, vocab index) and one shared log formula, so every
backend draws bit-identical noise and the same pair gives the same tokens on every backend; only exp
and division are each backend's own (hardware ones on GPUs), so a tie within an ulp can flip.
"""

from __future__ import annotations

import math

import torch

from . import reference
from ._checks import (
    check_bool,
    check_counts,
    check_generator,
    check_int,
    check_real,
    check_remask_args,
    check_remask_hidden,
    check_remask_logits,
    check_tensor,
)
from ._registry import define, register_kernels
from ._checks import InputTypeError, InputValueError

_COMMON = "Tensor seed, *, int mask_id, float choice_temperature, int vocab_size, float temperature, bool reference_ties"
define(f"remask_step(Tensor logits, Tensor ids, Tensor num_masked, {_COMMON}) -> (Tensor sampled, Tensor new_ids)")
define(
    "remask_step_from_hidden(Tensor hidden, Tensor weight, Tensor? bias, Tensor ids, Tensor num_masked, "
    f"{_COMMON}) -> (Tensor sampled, Tensor new_ids)"
)
for _op in ("remask_step", "remask_step_from_hidden"):
    register_kernels(_op, reference=getattr(reference, _op), triton=f"mage_kernels.triton.remask:{_op}")


@torch.library.register_fake("mage::remask_step")
def _(logits, ids, num_masked, seed, *, mask_id, choice_temperature, vocab_size, temperature, reference_ties):
    check_remask_logits("remask_step", logits, ids)
    check_remask_args("remask_step", logits.shape[2], ids, num_masked, seed, mask_id, vocab_size, temperature,
                      choice_temperature)
    return torch.empty_like(ids, memory_format=torch.contiguous_format), torch.empty_like(
        ids, memory_format=torch.contiguous_format
    )


@torch.library.register_fake("mage::remask_step_from_hidden")
def _(hidden, weight, bias, ids, num_masked, seed, *, mask_id, choice_temperature, vocab_size, temperature,
      reference_ties):
    check_remask_hidden("remask_step_from_hidden", hidden, weight, bias, ids)
    check_remask_args("remask_step_from_hidden", weight.shape[0], ids, num_masked, seed, mask_id, vocab_size,
                      temperature, choice_temperature)
    return torch.empty_like(ids, memory_format=torch.contiguous_format), torch.empty_like(
        ids, memory_format=torch.contiguous_format
    )


def draw_seed(device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh (seed, offset) pair, int64 (2,) on `device`, drawn from `generator` (default: the device's
    default generator). Drawn on the generator's device, so a CUDA generator costs no host sync and is
    CUDA-graph safe; a CPU generator with CUDA logits costs a small host-to-device copy."""
    check_generator("draw_seed", "generator", generator)
    gen_device = generator.device if generator is not None else torch.device(device)
    seed = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device=gen_device, generator=generator)
    return seed.to(device)


def _step_kwargs(op, mask_id, choice_temperature, generator, vocab_size, temperature, reference_ties, seed) -> dict:
    """The Python-side arguments shared by both re-masking steps, checked; the op checks the rest."""
    check_generator(op, "generator", generator)
    if seed is not None:
        check_tensor(op, "seed", seed)
    if vocab_size is not None:
        check_int(op, "vocab_size", vocab_size)
    check_bool(op, "reference_ties", reference_ties)
    return dict(mask_id=check_int(op, "mask_id", mask_id),
                choice_temperature=check_real(op, "choice_temperature", choice_temperature, 0.0),
                temperature=check_real(op, "temperature", temperature, 0.0, lo_open=True),
                reference_ties=reference_ties)


def remask_step(
    logits: torch.Tensor,
    ids: torch.Tensor,
    num_masked: torch.Tensor,
    *,
    mask_id: int,
    choice_temperature: float,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    reference_ties: bool = False,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of MAGE's iterative decoding (docs/REFERENCE.md 5.2.5-5.2.10), fused and sync-free.

    Args:
        logits: (B, L, V') float32 / bfloat16 / float16, any strides (e.g. `logits[:, 1:]` of the model's
            (B, 1+L, V') output, read in place). Only the first `vocab_size` columns are candidates.
        ids: (B, L) int64 current tokens; `mask_id` marks unknown ones. Known tokens are never changed.
        num_masked: (B,) int64 on the same device: how many unknown tokens of each row to re-mask, in
            [0, unknown tokens of the row] (see `remask_count`). Out of range raises ValueError on CPU; on
            other devices it is clamped into range (checking would cost a host sync).
        mask_id: the [MASK] id (2024 in the published layout).
        choice_temperature: scale of the confidence noise at this step, >= 0 (see
            `annealed_choice_temperature`).
        generator: source of the step's randomness (default: the default generator of logits' device).
        vocab_size: number of candidate columns (default V'); the published model samples from the first
            1024 of 2025.
        temperature: sampling temperature, > 0 (the published sampler uses 1).
        reference_ties: re-mask every unknown token whose confidence is <= the num_masked-th smallest (the
            published rule, which can re-mask more than num_masked on ties) instead of exactly num_masked.
        seed: optional (2,) int64 (seed, offset) on logits' device (see `draw_seed`), used instead of
            drawing one from `generator`: the same pair gives the same tokens on every backend. Under
            torch.compile(fullgraph=True) pass a seed or leave generator None (Dynamo cannot trace a
            torch.Generator).

    Every unknown token is sampled from softmax(logits / temperature) by the Gumbel-max trick; NaN logits
    count as -inf, a token whose logits are all -inf is sampled uniformly, and one with +inf logits
    uniformly among those. Its confidence is log p(sample) + choice_temperature * Gumbel noise, +inf for
    known tokens; the num_masked[b] least confident unknown tokens are re-masked, ties to the lower
    position first.

    Returns:
        sampled: (B, L) int64, every position's token (known ones unchanged): the image decoded after the
            last step comes from these (docs/REFERENCE.md 5.3).
        new_ids: (B, L) int64, `sampled` with the re-masked positions set back to mask_id.
    """
    op = "remask_step"
    for name, t in (("logits", logits), ("ids", ids), ("num_masked", num_masked)):
        check_tensor(op, name, t)
    kw = _step_kwargs(op, mask_id, choice_temperature, generator, vocab_size, temperature, reference_ties, seed)
    if seed is None:
        seed = draw_seed(logits.device, generator)
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    return torch.ops.mage.remask_step(logits, ids, num_masked, seed, vocab_size=vocab_size, **kw)


def remask_step_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    num_masked: torch.Tensor,
    *,
    mask_id: int,
    choice_temperature: float,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    reference_ties: bool = False,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`remask_step` with the prediction head's last matmul fused in (docs/REFERENCE.md 4.6): the logits
    hidden @ weight[:vocab_size].T + bias[:vocab_size] are computed tile by tile (fp32 accumulation) and
    never written to memory as a (B, L, V) tensor.

    Args:
        hidden: (B, L, C) the head's hidden states after its LayerNorm, any strides (e.g. `h[:, 1:]`).
        weight: (V', C) the tied token embedding. bias: (V',) or any shape with V' elements (the published
            (1, 1, V') bias), or None.
        ids, num_masked and the keywords: as `remask_step`.
    Returns (sampled, new_ids) as `remask_step`; the tokens equal `remask_step` on the explicit fp32
    logits up to the rounding of the matmul.
    """
    op = "remask_step_from_hidden"
    for name, t in (("hidden", hidden), ("weight", weight), ("ids", ids), ("num_masked", num_masked)):
        check_tensor(op, name, t)
    if bias is not None:
        check_tensor(op, "bias", bias)
        bias = bias.reshape(-1)
    kw = _step_kwargs(op, mask_id, choice_temperature, generator, vocab_size, temperature, reference_ties, seed)
    if seed is None:
        seed = draw_seed(hidden.device, generator)
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    return torch.ops.mage.remask_step_from_hidden(hidden, weight, bias, ids, num_masked, seed, vocab_size=vocab_size,
                                                  **kw)


# --------------------------------------------------------------------------------------------------
# Schedule of the published sampler (docs/REFERENCE.md 5.2.7-5.2.9)
# --------------------------------------------------------------------------------------------------


def _check_step(op: str, step: int, num_steps: int) -> None:
    check_int(op, "num_steps", num_steps, 1)
    check_int(op, "step", step, 0, num_steps - 1)


def cosine_mask_ratio(step: int, num_steps: int) -> float:
    """Fraction of the initially unknown tokens still masked after `step` (0-based) of `num_steps`:
    cos(pi/2 * (step+1)/num_steps), without clipping (it reaches 0 at the last step)."""
    _check_step("cosine_mask_ratio", step, num_steps)
    return math.cos(math.pi / 2.0 * (step + 1) / num_steps)


def annealed_choice_temperature(step: int, num_steps: int, choice_temperature: float, power: float = 1.0) -> float:
    """The confidence noise scale at `step`: choice_temperature * (1 - (step+1)/num_steps) ** power, 0 at the
    last step. power 1 is MaskGIT's and MAGE's linear annealing; a larger power lowers the noise sooner."""
    _check_step("annealed_choice_temperature", step, num_steps)
    choice_temperature = check_real("annealed_choice_temperature", "choice_temperature", choice_temperature, 0.0)
    power = check_real("annealed_choice_temperature", "power", power, 0.0, lo_open=True)
    return choice_temperature * (1.0 - (step + 1) / num_steps) ** power


def remask_count(
    ids: torch.Tensor, *, mask_id: int, mask_ratio: float, num_initial: int | torch.Tensor | None = None
) -> torch.Tensor:
    """How many tokens to keep masked after this step, per row and on device (no host sync): int64 (B,).

    floor(num_initial * mask_ratio) clamped to [1, unknown - 1] as published, so every step commits at
    least one token and leaves at least one for the next; a row with one unknown token re-masks it and a
    row with none re-masks none. num_initial: an int, or int64 (B,) per row (each row's unknown count
    at the start); default L (decoding from all-[MASK]). Unlike the published sampler, which uses row
    0's count for the whole batch, each row gets its own (as MaskGIT), which matters for inpainting.
    """
    op = "remask_count"
    check_tensor(op, "ids", ids)
    if ids.dtype != torch.int64:
        raise InputTypeError(f"{op}: ids must be int64, got {ids.dtype}")
    if ids.dim() != 2:
        raise InputValueError(f"{op}: ids must be [B, L], got shape {tuple(ids.shape)}")
    check_int(op, "mask_id", mask_id)
    mask_ratio = check_real(op, "mask_ratio", mask_ratio, 0.0, 1.0)
    if isinstance(num_initial, torch.Tensor):
        check_counts(op, "num_initial", num_initial, ids.shape[0], ids.shape[1], ids.device, like="ids")
    elif num_initial is None:
        num_initial = ids.shape[1]
    else:
        num_initial = check_int(op, "num_initial", num_initial, 0)
    unknown = (ids == mask_id).sum(1)
    if isinstance(num_initial, torch.Tensor):
        want = torch.floor(num_initial.double() * mask_ratio).long()
    else:
        want = torch.full_like(unknown, math.floor(num_initial * mask_ratio))
    return torch.minimum(torch.maximum(torch.minimum(want, unknown - 1), torch.ones_like(unknown)), unknown)
