"""Bad input to every public function: a clear error of the right type whose message names the argument
(and shows what came), or the sensible behaviour where there is one. Regression tests of issue 11 items 3-5
and of its "errors a user cannot act on"; the model layer and the CLI have their own tables below."""

from __future__ import annotations

import math
import re

import pytest
import torch
from backends import backend_params, kernel

import mage_kernels as mk

NAN, INF = float("nan"), float("inf")


def raises_naming(err, arg: str, call) -> str:
    """Run `call`, expect `err`, and check that the message names `arg` as a word. Returns the message."""
    with pytest.raises(err) as info:
        call()
    message = str(info.value)
    assert re.search(rf"(?<![\w.]){re.escape(arg)}(?!\w)", message), f"{arg!r} not named in: {message}"
    return message


# ------------------------------------------------------------------------- issue 11 items 3-5


@pytest.mark.parametrize("kwargs,arg", [
    (dict(mask_ratio_mu=NAN), "mask_ratio_mu"), (dict(mask_ratio_mu=INF), "mask_ratio_mu"),
    (dict(mask_ratio_std=NAN), "mask_ratio_std"), (dict(mask_ratio_std=INF), "mask_ratio_std"),
    (dict(mask_ratio_std=0.0), "mask_ratio_std"), (dict(mask_ratio_min=NAN), "mask_ratio_min"),
    (dict(mask_ratio_max=NAN), "mask_ratio_max"), (dict(mask_ratio_min=0.8, mask_ratio_max=0.6), "mask_ratio_max"),
])
def test_sample_mask_counts_rejects_non_finite_ratios(kwargs, arg):
    # Issue 11 item 3: NaN/inf mu or std gave num_masked = -2^63.
    raises_naming(ValueError, arg, lambda: mk.sample_mask_counts(256, **kwargs))
    raises_naming(ValueError, arg, lambda: mk.sample_mask_counts(256, batch=4, **kwargs))


def test_sample_mask_counts_rejects_bad_sizes():
    # Issue 11 item 3: sample_mask_counts(-5) gave (-4, -2).
    raises_naming(ValueError, "L", lambda: mk.sample_mask_counts(-5))
    raises_naming(TypeError, "L", lambda: mk.sample_mask_counts(25.5))
    raises_naming(ValueError, "batch", lambda: mk.sample_mask_counts(16, batch=-1))
    raises_naming(TypeError, "generator", lambda: mk.sample_mask_counts(16, generator=0))
    masked, dropped = mk.sample_mask_counts(16, generator=torch.Generator().manual_seed(0))
    assert 8 <= masked <= 16 and dropped == 8
    masked, dropped = mk.sample_mask_counts(0)
    assert masked == 0 and dropped == 0


REMASK_OPS = ["remask_step", "remask_step_from_hidden"]


@pytest.mark.parametrize("op", REMASK_OPS)
@pytest.mark.parametrize("backend", backend_params())
def test_remask_rejects_mask_id_inside_the_sampled_vocabulary(backend, op):
    # Issue 11 item 4: a sampled token equal to mask_id became a mask again (4 masks left instead of 2).
    B, L, V = 1, 4, 8
    ids = torch.full((B, L), 5)
    k = torch.tensor([2])
    seed = torch.tensor([1, 2])
    kw = dict(mask_id=5, choice_temperature=1.0, vocab_size=V, temperature=1.0, reference_ties=False)
    fn = kernel(op, backend)
    if op == "remask_step":
        logits = torch.zeros(B, L, V)
        logits[..., 5] = 100.0  # every token samples id 5
        args = (logits, ids, k, seed)
    else:
        weight = torch.zeros(V, 3)
        weight[5] = 100.0
        args = (torch.ones(B, L, 3), weight, None, ids, k, seed)
    raises_naming(ValueError, "mask_id", lambda: fn(*args, **kw))
    # mask_id outside the sampled columns (the model's layout: codebook first, [MASK] after) is fine.
    sampled, new_ids = fn(*args, **dict(kw, vocab_size=5))
    assert int((new_ids == 5).sum()) == 2 and not bool((sampled == 5).any())


def test_remask_public_wrappers_reject_mask_id_inside_vocabulary():
    logits, ids, k = torch.zeros(1, 4, 8), torch.full((1, 4), 5), torch.tensor([2])
    raises_naming(ValueError, "mask_id", lambda: mk.remask_step(logits, ids, k, mask_id=5, choice_temperature=1.0))
    raises_naming(ValueError, "mask_id", lambda: mk.remask_step_from_hidden(
        torch.ones(1, 4, 3), torch.zeros(8, 3), None, ids, k, mask_id=5, choice_temperature=1.0))


@pytest.mark.parametrize("count", [3.7, 3.0, "3", None, True])
def test_mask_plan_requires_integer_counts(count):
    # Issue 11 item 5: mask_plan(noise, 3.7, 2) masked 3 tokens.
    noise = torch.rand(2, 8)
    raises_naming(TypeError, "num_masked", lambda: mk.mask_plan(noise, count, 2))
    raises_naming(TypeError, "num_dropped", lambda: mk.mask_plan(noise, 4, count))
    import numpy as np

    masked, _, _ = mk.mask_plan(noise, np.int64(3), 2)  # integer types other than int are fine
    assert masked.sum(1).tolist() == [3, 3]


# ------------------------------------------------------------------------- every public op function

Z, CB = torch.randn(6, 4), torch.randn(5, 4)
NOISE = torch.rand(2, 8)
MASKED, DROPPED, KEEP = mk.mask_plan(NOISE, 6, 4)
X = torch.randn(2, 9, 3)
Y = torch.randn(2, 5, 3)
LOGITS, IDS, K = torch.randn(2, 8, 16), torch.full((2, 8), 20), torch.tensor([3, 4])
HIDDEN, WEIGHT = torch.randn(2, 8, 3), torch.randn(16, 3)
REMASK_KW = dict(mask_id=20, choice_temperature=1.0)

# (function name, call, error type, argument the message must name)
OP_CASES = [
    ("vq_nearest", lambda: mk.vq_nearest([[1.0]], CB), TypeError, "z"),
    ("vq_nearest", lambda: mk.vq_nearest(Z, CB.numpy()), TypeError, "codebook"),
    ("vq_nearest", lambda: mk.vq_nearest(Z.int(), CB), TypeError, "z"),
    ("vq_nearest", lambda: mk.vq_nearest(Z, CB[:, :3]), ValueError, "codebook"),
    ("vq_nearest", lambda: mk.vq_nearest(Z, CB, exact="yes"), TypeError, "exact"),
    ("vq_nearest", lambda: mk.vq_nearest(Z, CB, check_finite=1), TypeError, "check_finite"),
    ("vq_nearest", lambda: mk.vq_nearest(torch.full((2, 4), NAN), CB), ValueError, "z"),
    ("vq_nearest", lambda: mk.vq_nearest(Z, torch.randn(5, 4, device="meta")), ValueError, "codebook"),
    ("vq_quantize", lambda: mk.vq_quantize(Z, CB, beta=NAN), ValueError, "beta"),
    ("vq_quantize", lambda: mk.vq_quantize(Z, CB, beta="0.25"), TypeError, "beta"),
    ("vq_quantize", lambda: mk.vq_quantize(None, CB), TypeError, "z"),
    ("mask_plan", lambda: mk.mask_plan(NOISE.tolist(), 6, 4), TypeError, "noise"),
    ("mask_plan", lambda: mk.mask_plan(NOISE, 9, 4), ValueError, "num_masked"),
    ("mask_plan", lambda: mk.mask_plan(NOISE, -1, 0), ValueError, "num_masked"),
    ("mask_plan", lambda: mk.mask_plan(NOISE, 6, 4, num_kept=2.5), TypeError, "num_kept"),
    ("mask_plan", lambda: mk.mask_plan(NOISE, 6, 4, num_kept=9), ValueError, "num_kept"),
    ("mask_plan", lambda: mk.mask_plan(NOISE, torch.tensor([6.0, 6.0]), 4), TypeError, "num_masked"),
    ("mask_plan", lambda: mk.mask_plan(NOISE, torch.tensor([6, 6, 6]), 4), ValueError, "num_masked"),
    ("gather_keep", lambda: mk.gather_keep(X, KEEP.tolist()), TypeError, "keep_idx"),
    ("gather_keep", lambda: mk.gather_keep(X.tolist(), KEEP), TypeError, "x"),
    ("gather_keep", lambda: mk.gather_keep(X, KEEP.int()), TypeError, "keep_idx"),
    ("gather_keep", lambda: mk.gather_keep(X, KEEP + 20), ValueError, "keep_idx"),
    ("pad_with_cls", lambda: mk.pad_with_cls(Y, KEEP, MASKED.int()), TypeError, "masked"),
    ("pad_with_cls", lambda: mk.pad_with_cls(Y, KEEP, MASKED, pos_embed=[0.0]), TypeError, "pos_embed"),
    ("pad_with_cls", lambda: mk.pad_with_cls(Y, KEEP, MASKED, pad=torch.zeros(4)), ValueError, "pad"),
    ("pad_with_cls", lambda: mk.pad_with_cls(Y[:, :3], KEEP, MASKED), ValueError, "y"),
    ("sample_mask_counts", lambda: mk.sample_mask_counts("256"), TypeError, "L"),
    ("sample_mask_counts", lambda: mk.sample_mask_counts(256, mask_ratio_min=-0.1), ValueError, "mask_ratio_min"),
    ("remask_step", lambda: mk.remask_step(LOGITS, IDS, K, mask_id=20, choice_temperature=NAN), ValueError,
     "choice_temperature"),
    ("remask_step", lambda: mk.remask_step(LOGITS, IDS, K, mask_id=20.0, choice_temperature=1.0), TypeError,
     "mask_id"),
    ("remask_step", lambda: mk.remask_step(LOGITS, IDS, K, **REMASK_KW, temperature=0.0), ValueError, "temperature"),
    ("remask_step", lambda: mk.remask_step(LOGITS, IDS, K, **REMASK_KW, generator=0), TypeError, "generator"),
    ("remask_step", lambda: mk.remask_step(LOGITS, IDS, [3, 4], **REMASK_KW), TypeError, "num_masked"),
    ("remask_step", lambda: mk.remask_step(LOGITS, IDS, K, **REMASK_KW, vocab_size=17), ValueError, "vocab_size"),
    ("remask_step", lambda: mk.remask_step(LOGITS, IDS, K, **REMASK_KW, vocab_size=8.5), TypeError, "vocab_size"),
    ("remask_step", lambda: mk.remask_step(LOGITS, IDS, K, **REMASK_KW, seed=[1, 2]), TypeError, "seed"),
    ("remask_step", lambda: mk.remask_step(LOGITS, IDS, K, **REMASK_KW, reference_ties=None), TypeError,
     "reference_ties"),
    ("remask_step", lambda: mk.remask_step(LOGITS, IDS, K + 5, **REMASK_KW), ValueError, "num_masked"),
    ("remask_step", lambda: mk.remask_step(LOGITS.double(), IDS, K, **REMASK_KW), TypeError, "logits"),
    ("remask_step_from_hidden", lambda: mk.remask_step_from_hidden(HIDDEN, WEIGHT, [0.0], IDS, K, **REMASK_KW),
     TypeError, "bias"),
    ("remask_step_from_hidden", lambda: mk.remask_step_from_hidden(HIDDEN, WEIGHT[:, :2], None, IDS, K,
                                                                  **REMASK_KW), ValueError, "weight"),
    ("remask_step_from_hidden", lambda: mk.remask_step_from_hidden(HIDDEN, WEIGHT, None, IDS, K, mask_id=20,
                                                                  choice_temperature=-1.0), ValueError,
     "choice_temperature"),
    ("draw_seed", lambda: mk.draw_seed("cpu", generator=1234), TypeError, "generator"),
    ("cosine_mask_ratio", lambda: mk.cosine_mask_ratio(0, 0), ValueError, "num_steps"),
    ("cosine_mask_ratio", lambda: mk.cosine_mask_ratio(5, 5), ValueError, "step"),
    ("cosine_mask_ratio", lambda: mk.cosine_mask_ratio(0.5, 5), TypeError, "step"),
    ("annealed_choice_temperature", lambda: mk.annealed_choice_temperature(0, 0, 4.5), ValueError, "num_steps"),
    ("annealed_choice_temperature", lambda: mk.annealed_choice_temperature(0, 8, NAN), ValueError,
     "choice_temperature"),
    ("remask_count", lambda: mk.remask_count(torch.tensor([5, 5, 1]), mask_id=5, mask_ratio=0.5), ValueError,
     "ids"),
    ("remask_count", lambda: mk.remask_count(torch.tensor([[5, 5, 1]]), mask_id=5, mask_ratio=NAN), ValueError,
     "mask_ratio"),
    ("remask_count", lambda: mk.remask_count(torch.tensor([[5, 5, 1]]), mask_id=5, mask_ratio=INF), ValueError,
     "mask_ratio"),
    ("remask_count", lambda: mk.remask_count(torch.tensor([[5.0, 1.0]]), mask_id=5, mask_ratio=0.5), TypeError,
     "ids"),
    ("remask_count", lambda: mk.remask_count(torch.tensor([[5, 1]]), mask_id=5, mask_ratio=0.5, num_initial=-2),
     ValueError, "num_initial"),
]


@pytest.mark.parametrize("name,call,err,arg", OP_CASES, ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(OP_CASES)])
def test_op_bad_input(name, call, err, arg):
    assert raises_naming(err, arg, call).startswith(f"{name}: ")  # says which function complains


def test_every_public_op_function_has_bad_input_cases():
    functions = {n for n in mk.__all__ if callable(getattr(mk, n)) and n not in ("build_info",)}
    covered = {c[0] for c in OP_CASES}
    assert functions <= covered, f"no bad-input case for {sorted(functions - covered)}"
