"""Iterative decoding for any masked-token model (MaskGIT, MUSE, MAGE, MAR-style token models), on the
fused re-masking op (docs/OPS.md op 5; the procedure of docs/REFERENCE.md 5.2).

The caller brings the model as a function: `logits_fn(ids) -> logits [B, L, V]` for the token grid, or
`hidden_fn(ids) -> hidden [B, L, C]` plus the output layer's weight [V, C] (and bias), in which case the
last matmul is fused into the sampling step and the [B, L, V] logits are never written. Everything else
(schedule, re-mask counts per row, annealed confidence noise, the op's counter-based randomness) is here.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch

from ._checks import (InputTypeError, InputValueError, check_counts, check_int, check_maskgit_args, check_real,
                      check_sampled_vocab)
from .remask import annealed_choice_temperature, cosine_mask_ratio, remask_count, remask_step, remask_step_from_hidden

Schedule = Union[str, Callable[[float], float]]

# Fraction of the initially unknown tokens still masked after a step, as a function of r = (t+1)/T
# (MaskGIT, Chang et al. 2022, sec. 3.3: "cosine" is its choice and MAGE's).
SCHEDULES: dict[str, Callable[[float], float]] = {
    "linear": lambda r: 1.0 - r,
    "square": lambda r: 1.0 - r**2,
    "cubic": lambda r: 1.0 - r**3,
    "sqrt": lambda r: 1.0 - math.sqrt(r),
}


def mask_ratio(schedule: Schedule, step: int, steps: int, *, op: str = "mask_ratio") -> float:
    """The schedule's mask ratio after `step` (0-based) of `steps`: "cosine" (cos(pi/2 r)), "linear",
    "square", "cubic", "sqrt", or a callable of r = (step + 1) / steps returning a ratio in [0, 1]."""
    if schedule == "cosine":
        return cosine_mask_ratio(step, steps)
    fn = SCHEDULES.get(schedule) if isinstance(schedule, str) else schedule
    if not callable(fn):
        raise InputValueError(f"{op}: schedule must be 'cosine', one of {sorted(SCHEDULES)} or a callable, got "
                              f"{schedule!r}")
    return check_real(op, "schedule(r)", fn((step + 1) / steps), 0.0, 1.0)


def schedule_counts(
    ids: torch.Tensor, num_initial: torch.Tensor, step: int, steps: int, *, mask_id: int, schedule: Schedule = "cosine"
) -> torch.Tensor:
    """Per-row count to leave masked after `step`, on device (no host sync): floor(n0 * mask_ratio) clamped
    to [1, unknown - 1] as published (each step commits at least one token and leaves one; a row with a
    single unknown token keeps it masked until the last step), at most the unknown count, and 0 at the
    last step, which commits everything (docs/REFERENCE.md 5.2.9, 5.3). num_initial: int64 [B]."""
    if step == steps - 1:
        return torch.zeros_like(num_initial)
    return remask_count(ids, mask_id=mask_id, mask_ratio=mask_ratio(schedule, step, steps), num_initial=num_initial)


def maskgit_step(
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    ids: torch.Tensor,
    num_initial: torch.Tensor,
    step: int,
    steps: int,
    *,
    mask_id: int,
    schedule: Schedule = "cosine",
    choice_temperature: float = 4.5,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    hidden_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    head_weight: torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
    reference_ties: bool = False,
    seed: torch.Tensor | None = None,
    choice_temperature_power: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of `maskgit_sample`: (sampled, new_ids), both [B, L]. No host sync and static
    shapes, so it compiles with fullgraph=True (pass `seed`, see `draw_seed`, instead of a generator)."""
    op = "maskgit_step"
    check_maskgit_args(op, logits_fn, hidden_fn, head_weight, head_bias, ids, steps, mask_id, choice_temperature,
                       temperature, generator, vocab_size, reference_ties)
    check_int(op, "step", step, 0, steps - 1)
    check_counts(op, "num_initial", num_initial, ids.shape[0], ids.shape[1], ids.device, like="ids")
    num_masked = schedule_counts(ids, num_initial, step, steps, mask_id=mask_id, schedule=schedule)
    kw = dict(mask_id=mask_id, choice_temperature=annealed_choice_temperature(step, steps, choice_temperature,
                                                                              choice_temperature_power),
              temperature=temperature, generator=generator, vocab_size=vocab_size, reference_ties=reference_ties,
              seed=seed)
    if hidden_fn is not None:
        hidden = hidden_fn(ids)
        # The product with the table runs in the autocast dtype, as F.linear would under autocast.
        device = ids.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        bias = None if head_bias is None else head_bias.to(dtype)
        return remask_step_from_hidden(hidden.to(dtype), head_weight.to(dtype), bias, ids, num_masked, **kw)
    return remask_step(logits_fn(ids), ids, num_masked, **kw)


def maskgit_sample(
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    ids: torch.Tensor,
    *,
    steps: int,
    mask_id: int,
    schedule: Schedule = "cosine",
    choice_temperature: float = 4.5,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    hidden_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    head_weight: torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
    reference_ties: bool = False,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    choice_temperature_power: float = 1.0,
) -> torch.Tensor:
    """Fill every `mask_id` of ids [B, L] by iterative decoding (MaskGIT, Chang et al. 2022, sec. 3.2;
    MAGE, Li et al. 2023, sec. 3): at each of `steps` steps, sample every unknown token, keep the most
    confident and re-mask the rest so that floor(n0 * mask_ratio) stay masked (n0 the row's unknown count
    at the start); the confidence is log p(sample) + Gumbel noise scaled by choice_temperature * (1 - r),
    annealed to 0. Known tokens are never changed. Returns the final ids [B, L] (no `mask_id` left).

    Args:
        logits_fn: the model, `logits_fn(ids [B, L]) -> logits [B, L, V]` for the L token positions (drop
            class or prefix slots, e.g. `lambda x: model(x)[:, 1:]`), any strides and float dtype. None
            when `hidden_fn` is given.
        ids: int64 [B, L]; `mask_id` marks the tokens to fill (all of them to generate, some to inpaint).
        steps: number of decoding steps T (MaskGIT 8-12, MAGE 20).
        mask_id: the [MASK] id your model reads.
        schedule: "cosine" (MaskGIT, MAGE), "linear", "square", "cubic", "sqrt" or a callable r -> ratio.
        choice_temperature: scale of the confidence noise (MaskGIT's default 4.5; MAGE's reported FIDs use 6.0).
        choice_temperature_power: the noise is annealed as choice_temperature * (1 - r) ** power (1: both
            papers' linear annealing; 2 lowers it sooner).
        temperature: the sampling temperature of the tokens (1: softmax of the raw logits, as both papers).
        generator: source of randomness (on ids' device or the CPU); the same seed gives the same tokens.
        vocab_size: sample only ids [0, vocab_size) (e.g. the codebook, when the logits also cover [MASK] or
            class ids). Default: all V columns; must exclude mask_id.
        hidden_fn, head_weight, head_bias: the fused path: `hidden_fn(ids) -> hidden [B, L, C]` (the output
            layer's input) and its weight [V, C] (+ bias [V]); logits = hidden @ weight.T + bias are computed
            tile by tile inside the step (`remask_step_from_hidden`) and never stored. Under autocast the
            product runs in the autocast dtype.
        reference_ties: re-mask every token whose confidence is <= the cut-off (MAGE's published rule,
            which may re-mask more on exact ties) instead of exactly the scheduled count.
        on_step: `on_step(t, ids)` sees the ids after step t (still-masked tokens hold mask_id).

    Runs under torch.no_grad(), with no host sync (a CUDA generator keeps the whole loop on the GPU).
    """
    op = "maskgit_sample"
    check_maskgit_args(op, logits_fn, hidden_fn, head_weight, head_bias, ids, steps, mask_id, choice_temperature,
                       temperature, generator, vocab_size, reference_ties)
    if on_step is not None and not callable(on_step):
        raise InputTypeError(f"{op}: on_step must be None or callable (step, ids), got {type(on_step).__name__}")
    for t in range(steps):
        mask_ratio(schedule, t, steps, op=op)  # a bad schedule fails before the model runs
    annealed_choice_temperature(0, steps, choice_temperature, choice_temperature_power)  # so does a bad power
    num_initial = (ids == mask_id).sum(1)
    kw = dict(mask_id=mask_id, schedule=schedule, choice_temperature=choice_temperature, temperature=temperature,
              generator=generator, vocab_size=vocab_size, hidden_fn=hidden_fn, head_weight=head_weight,
              head_bias=head_bias, reference_ties=reference_ties, choice_temperature_power=choice_temperature_power)
    sampled = ids
    with torch.no_grad():
        for t in range(steps):
            fn = logits_fn if t or logits_fn is None else _checked_logits_fn(logits_fn, mask_id, vocab_size)
            sampled, ids = maskgit_step(fn, ids, num_initial, t, steps, **kw)
            if on_step is not None:
                on_step(t, ids)
    return sampled


def _checked_logits_fn(logits_fn, mask_id: int, vocab_size: int | None):
    """logits_fn wrapped to check its first output: [B, L, V] for ids [B, L], candidates excluding mask_id."""

    def fn(ids: torch.Tensor) -> torch.Tensor:
        logits = logits_fn(ids)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise InputValueError(f"maskgit_sample: logits_fn(ids) must return logits [B, L, V] = [{ids.shape[0]}, "
                                  f"{ids.shape[1]}, V] for ids {tuple(ids.shape)} (slice off class slots), got {got}")
        check_sampled_vocab("maskgit_sample", mask_id, logits.shape[2] if vocab_size is None else vocab_size)
        return logits

    return fn
