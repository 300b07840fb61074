"""Bad input to every public function: a clear error of the right type whose message names the argument
(and shows what came), or the sensible behaviour where there is one. Regression tests of issue 11 items 3-5
and of its "errors a user cannot act on"; the model layer and the CLI have their own tables below."""

from __future__ import annotations

import json
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
    assert re.search(rf"(?<!\w){re.escape(arg)}(?!\w)", message), f"{arg!r} not named in: {message}"
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
FN, SAMPLE_KW = (lambda ids: LOGITS), dict(mask_id=20, vocab_size=16)

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
    ("annealed_choice_temperature", lambda: mk.annealed_choice_temperature(0, 8, 3.0, power=0.0), ValueError,
     "power"),
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
    ("remask_count", lambda: mk.remask_count(torch.tensor([[5, 1]]), mask_id=5, mask_ratio=0.5,
                                             num_initial=torch.tensor([1.0])), TypeError, "num_initial"),
    ("remask_count", lambda: mk.remask_count(torch.tensor([[5, 1]]), mask_id=5, mask_ratio=0.5,
                                             num_initial=torch.tensor([1, 1])), ValueError, "num_initial"),
    ("maskgit_sample", lambda: mk.maskgit_sample(FN, IDS, steps=2, mask_id=20.0, vocab_size=16), TypeError,
     "mask_id"),
    ("maskgit_sample", lambda: mk.maskgit_sample("model", IDS, steps=2, **SAMPLE_KW), TypeError, "logits_fn"),
    ("maskgit_sample", lambda: mk.maskgit_sample(FN, IDS, steps=2.0, **SAMPLE_KW), TypeError, "steps"),
    ("maskgit_sample", lambda: mk.maskgit_sample(FN, IDS, steps=True, **SAMPLE_KW), TypeError, "steps"),
    ("maskgit_sample", lambda: mk.maskgit_sample(FN, IDS.tolist(), steps=2, **SAMPLE_KW), TypeError, "ids"),
    ("maskgit_sample", lambda: mk.maskgit_sample(FN, IDS, steps=2, **SAMPLE_KW, choice_temperature=NAN),
     ValueError, "choice_temperature"),
    ("maskgit_sample", lambda: mk.maskgit_sample(FN, IDS, steps=2, **SAMPLE_KW, temperature=0.0), ValueError,
     "temperature"),
    ("maskgit_sample", lambda: mk.maskgit_sample(FN, IDS, steps=2, **SAMPLE_KW, generator=0), TypeError, "generator"),
    ("maskgit_sample", lambda: mk.maskgit_sample(FN, IDS, steps=2, **SAMPLE_KW, on_step=1), TypeError, "on_step"),
    ("maskgit_sample", lambda: mk.maskgit_sample(FN, IDS, steps=2, **SAMPLE_KW, reference_ties=1), TypeError,
     "reference_ties"),
    ("maskgit_sample", lambda: mk.maskgit_sample(FN, IDS, steps=2, **SAMPLE_KW, schedule=lambda r: 2.0),
     ValueError, "schedule"),
    ("maskgit_sample", lambda: mk.maskgit_sample(FN, IDS, steps=2, mask_id=20, vocab_size=21), ValueError,
     "mask_id"),
    ("maskgit_sample", lambda: mk.maskgit_sample(None, IDS, steps=2, mask_id=20, hidden_fn=lambda x: HIDDEN,
                                                 head_weight=WEIGHT.tolist()), TypeError, "head_weight"),
    ("maskgit_step", lambda: mk.maskgit_step(FN, IDS, torch.tensor([8, 8]), 2, 2, **SAMPLE_KW), ValueError, "step"),
    ("maskgit_step", lambda: mk.maskgit_step(FN, IDS, [8, 8], 0, 2, **SAMPLE_KW), TypeError, "num_initial"),
    # More steps than token positions (each step commits at least one) only reran the model on the last token.
    ("maskgit_sample", lambda: mk.maskgit_sample(FN, IDS, steps=IDS.shape[1] + 1, **SAMPLE_KW), ValueError,
     "steps"),
    ("maskgit_step", lambda: mk.maskgit_step(FN, IDS, torch.tensor([8, 8]), 0, IDS.shape[1] + 1, **SAMPLE_KW),
     ValueError, "steps"),
    ("maskgit_step", lambda: mk.maskgit_step(FN, IDS, torch.tensor([8, 9]), 0, 2, **SAMPLE_KW), ValueError,
     "num_initial"),
]


@pytest.mark.parametrize("name,call,err,arg", OP_CASES, ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(OP_CASES)])
def test_op_bad_input(name, call, err, arg):
    assert raises_naming(err, arg, call).startswith(f"{name}: ")  # says which function complains


def test_every_public_op_function_has_bad_input_cases():
    functions = {n for n in mk.__all__ if callable(getattr(mk, n)) and n not in ("build_info",)}
    covered = {c[0] for c in OP_CASES}
    assert functions <= covered, f"no bad-input case for {sorted(functions - covered)}"


# ------------------------------------------------------------------------------------- model layer

import mage  # noqa: E402
from mage.evaluation import EvalConfig, generate_into, load_source, probe_images  # noqa: E402
from mage.fmnist_classifier import ClassifierConfig  # noqa: E402
from mage.tokenizer import TokenizerConfig  # noqa: E402

TOK = TokenizerConfig.tiny(resolution=16, n_embed=32)
SMALL = dict(tokenizer=TOK, depth=1, decoder_depth=1, embed_dim=32, num_heads=2, decoder_embed_dim=32,
             decoder_num_heads=2)
MODEL = mage.mage_vit_tiny(**SMALL).eval()
IMAGES = torch.rand(2, 3, 16, 16)
HOLE = torch.zeros(2, 16, 16, dtype=torch.bool)
MASK_ID = MODEL.config.mask_id
ALL_MASKED = torch.full((1, 16), MASK_ID)


def meta_model():
    with torch.device("meta"):
        return mage.mage_vit_tiny(**SMALL)


def changed(config, **fields):
    """`config` with fields set after it was made (and checked), as user code can do to a dataclass."""
    for name, value in fields.items():
        setattr(config, name, value)
    return config


# (function name, call, error type, argument the message must name)
MODEL_CASES = [
    ("generate", lambda: mage.generate(MODEL, 2.5, steps=2), TypeError, "num_images"),
    ("generate", lambda: mage.generate(MODEL, -1, steps=2), ValueError, "num_images"),
    ("generate", lambda: mage.generate(MODEL, 2, steps=2, generator=0), TypeError, "generator"),
    ("generate", lambda: mage.generate(MODEL, 2, steps=0), ValueError, "steps"),
    ("generate", lambda: mage.generate(MODEL, 2, steps=17), ValueError, "steps must be in [1, 16]"),
    ("generate", lambda: mage.generate(MODEL, 0, steps=17), ValueError, "steps must be in [1, 16]"),
    ("decode_tokens", lambda: mage.decode_tokens(MODEL, ALL_MASKED, steps=17), ValueError, "steps must be in [1, 16]"),
    ("inpaint", lambda: mage.inpaint(MODEL, IMAGES, HOLE, steps=17), ValueError, "steps must be in [1, 16]"),
    # A ring beyond the grid silently regenerated every token.
    ("inpaint", lambda: mage.inpaint(MODEL, IMAGES, HOLE, ring=4, steps=2), ValueError, "ring must be in [0, 3]"),
    ("token_mask_from_pixels", lambda: mage.token_mask_from_pixels(HOLE, 4, ring=4), ValueError,
     "ring must be in [0, 3]"),
    ("generate", lambda: mage.generate(MODEL, 2, steps=2, batch_size=0), ValueError, "batch_size"),
    ("generate", lambda: mage.generate(MODEL, 2, steps=2, choice_temperature=NAN), ValueError, "choice_temperature"),
    ("generate", lambda: mage.generate(MODEL, 2, steps=2, dtype=torch.int8), ValueError, "dtype"),
    ("generate", lambda: mage.generate(meta_model(), 2, steps=2), ValueError, "model"),
    ("generate", lambda: mage.generate(torch.nn.Linear(2, 2), 1), TypeError, "model"),
    ("decode_tokens", lambda: mage.decode_tokens(MODEL, ALL_MASKED[:, :5]), ValueError, "ids"),
    ("decode_tokens", lambda: mage.decode_tokens(MODEL, ALL_MASKED.float()), TypeError, "ids"),
    ("decode_tokens", lambda: mage.decode_tokens(MODEL, ALL_MASKED, steps=1.5), TypeError, "steps"),
    ("sample_step", lambda: mage.sample_step(MODEL, ALL_MASKED, torch.tensor([16]), 5, 4), ValueError, "step"),
    ("mask_schedule", lambda: mage.mask_schedule(256, 0), ValueError, "steps"),
    ("mask_schedule", lambda: mage.mask_schedule(25.6, 4), TypeError, "num_tokens"),
    ("inpaint", lambda: mage.inpaint(MODEL, IMAGES, [[0]]), TypeError, "pixel_mask"),
    ("inpaint", lambda: mage.inpaint(MODEL, IMAGES, HOLE[:1]), ValueError, "pixel_mask"),
    ("inpaint", lambda: mage.inpaint(MODEL, IMAGES * 255, HOLE), ValueError, "images"),
    ("inpaint", lambda: mage.inpaint(MODEL, IMAGES * NAN, HOLE), ValueError, "images"),
    ("inpaint", lambda: mage.inpaint(MODEL, IMAGES.to("meta"), HOLE), ValueError, "images"),
    ("inpaint", lambda: mage.inpaint(MODEL, IMAGES, HOLE, ring=-1), ValueError, "ring"),
    ("inpaint", lambda: mage.inpaint(MODEL, IMAGES, HOLE, steps=0), ValueError, "steps"),
    ("inpaint", lambda: mage.inpaint(MODEL, IMAGES, HOLE, generator="seed"), TypeError, "generator"),
    ("token_mask_from_pixels", lambda: mage.token_mask_from_pixels(HOLE, 0), ValueError, "grid"),
    ("token_mask_from_pixels", lambda: mage.token_mask_from_pixels(HOLE.tolist(), 4), TypeError, "pixel_mask"),
    ("token_mask_from_pixels", lambda: mage.token_mask_from_pixels(HOLE, 5), ValueError, "pixel_mask"),
    ("MAGE", lambda: MODEL(ALL_MASKED.tolist()), TypeError, "ids"),
    ("MAGE", lambda: MODEL(torch.full((1, 16), 99)), ValueError, "ids"),
    ("MAGE", lambda: MODEL(ALL_MASKED, mask=torch.zeros(1, 16)), TypeError, "mask"),
    ("VQGANTokenizer", lambda: MODEL.vqgan.encode(IMAGES[:, :1]), ValueError, "images"),
    ("VQGANTokenizer", lambda: MODEL.vqgan.encode(IMAGES.to(torch.uint8)), TypeError, "images"),
    ("VQGANTokenizer", lambda: MODEL.vqgan.decode(torch.zeros(1, 16)), TypeError, "ids"),
    ("VQGANTokenizer", lambda: MODEL.vqgan.decode(torch.full((1, 16), 32)), ValueError, "ids"),
    ("MAGEConfig", lambda: mage.MAGEConfig(depth=0), ValueError, "depth"),
    ("MAGEConfig", lambda: mage.MAGEConfig(embed_dim="32"), TypeError, "embed_dim"),
    ("MAGEConfig", lambda: mage.MAGEConfig(dropout=1.5), ValueError, "dropout"),
    ("MAGEConfig", lambda: mage.MAGEConfig(vocab="big"), ValueError, "vocab"),
    ("MAGEConfig", lambda: mage.MAGEConfig(tokenizer=3), TypeError, "tokenizer"),
    ("TokenizerConfig", lambda: TokenizerConfig(ch_mult=(1, 2.5)), TypeError, "ch_mult"),
    ("TokenizerConfig", lambda: TokenizerConfig(n_embed=0), ValueError, "n_embed"),
    ("TokenizerConfig", lambda: TokenizerConfig(resolution=100), ValueError, "resolution"),
    ("MAEConfig", lambda: mage.MAEConfig(patch_size=0), ValueError, "patch_size"),
    ("MAE", lambda: mage.MAE(mage.MAEConfig(image_size=30)), ValueError, "image_size"),
    ("TrainConfig", lambda: mage.TrainConfig(batch_size=0), ValueError, "batch_size"),
    ("TrainConfig", lambda: mage.TrainConfig(lr=NAN), ValueError, "lr"),
    ("TrainConfig", lambda: mage.TrainConfig(betas=(0.9, 1.5)), ValueError, "betas"),
    ("TrainConfig", lambda: mage.TrainConfig(crop_scale=(0.0, 1.0)), ValueError, "crop_scale"),
    ("TrainConfig", lambda: mage.TrainConfig(crop_scale=(0.9, 0.5)), ValueError, "crop_scale"),
    ("TrainConfig", lambda: mage.TrainConfig(crop_scale=(0.5,)), ValueError, "crop_scale"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="bert"), ValueError, "objective"),
    ("TrainConfig", lambda: mage.TrainConfig(data=3), TypeError, "data"),
    ("ProbeConfig", lambda: mage.ProbeConfig(epochs=0), ValueError, "epochs"),
    ("ProbeConfig", lambda: mage.ProbeConfig(base_lr=-1.0), ValueError, "base_lr"),
    ("ProbeConfig", lambda: mage.ProbeConfig(epochs=5, warmup_epochs=6), ValueError, "warmup_epochs 6 is more than"),
    ("mage_vit_tiny", lambda: mage.mage_vit_tiny(embed_dim=100), ValueError, "embed_dim"),
    ("mage_vit_small", lambda: mage.mage_vit_small(depth=-1), ValueError, "depth"),
    ("mage_vit_base_patch16", lambda: mage.mage_vit_base_patch16(mlp_ratio=0.0), ValueError, "mlp_ratio"),
    ("mage_vit_large_patch16", lambda: mage.mage_vit_large_patch16(num_heads=7), ValueError, "num_heads"),
    ("mage_vit_huge_patch16", lambda: mage.mage_vit_huge_patch16(norm_eps=0.0), ValueError, "norm_eps"),
    ("load", lambda: mage.load("/nonexistent/model.safetensors"), FileNotFoundError, "/nonexistent/model.safetensors"),
    ("load", lambda: mage.load(__file__), mage.CheckpointError, "test_bad_input.py"),
    ("load_any", lambda: mage.load_any(__file__), mage.CheckpointError, "test_bad_input.py"),
    ("load_tokenizer", lambda: mage.load_tokenizer(__file__), mage.CheckpointError, "test_bad_input.py"),
    ("load_official", lambda: mage.load_official({"model": {"x": torch.zeros(1)}}), mage.CheckpointError,
     "token_emb.word_embeddings.weight"),
    ("load_official_tokenizer", lambda: mage.load_official_tokenizer({"x": torch.zeros(1)}), mage.CheckpointError,
     "encoder.conv_in.weight"),
    ("infer_config", lambda: mage.infer_config({"token_emb.word_embeddings.weight": torch.zeros(3)}),
     mage.CheckpointError, "word_embeddings"),
    ("save", lambda: mage.save(MODEL, "/"), IsADirectoryError, "/"),
    ("save_tokenizer", lambda: mage.save_tokenizer(MODEL.vqgan, "/"), IsADirectoryError, "/"),
    ("build_token_cache", lambda: mage.build_token_cache(MODEL.vqgan, None, "/tmp/x.ckpt", crops=0), ValueError,
     "crops"),
    ("psnr", lambda: mage.psnr(IMAGES.tolist(), IMAGES), TypeError, "x"),
    ("psnr", lambda: mage.psnr(IMAGES, IMAGES, data_range=0.0), ValueError, "data_range"),
    ("ssim", lambda: mage.ssim(IMAGES, IMAGES, window_size=0), ValueError, "window_size"),
    ("fid", lambda: mage.fid(IMAGES.tolist(), IMAGES), TypeError, "images1"),
    ("fid", lambda: mage.fid(IMAGES * 2 - 1, IMAGES), ValueError, "images"),
    ("frechet_distance", lambda: mage.frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4)),
     ValueError, "mu2"),
    ("classifier_score", lambda: mage.classifier_score(torch.randn(10, 5)), ValueError, "probs"),
    ("classifier_score", lambda: mage.classifier_score(torch.ones(10, 1), splits=0), ValueError, "splits"),
    ("codebook_usage", lambda: mage.codebook_usage(torch.rand(5, 2)), ValueError, "counts"),
    ("codebook_usage", lambda: mage.codebook_usage(torch.tensor([3.0, -1.0])), ValueError, "counts"),
    ("linear_probe", lambda: mage.linear_probe(torch.randn(8, 4), torch.rand(8), torch.randn(4, 4),
                                               torch.zeros(4, dtype=torch.long)), ValueError, "train_labels"),
    ("linear_probe", lambda: mage.linear_probe(torch.full((8, 4), NAN), torch.zeros(8, dtype=torch.long),
                                               torch.randn(4, 4), torch.zeros(4, dtype=torch.long)), ValueError,
     "train_features"),
    ("extract_features", lambda: mage.extract_features(lambda x: x, (torch.zeros(2, 3), torch.zeros(2)),
                                                       batch_size=0), ValueError, "batch_size"),
    ("load_digits", lambda: mage.load_digits(torch.int64), TypeError, "dtype"),
    ("load_fashion_mnist", lambda: mage.load_fashion_mnist("val"), ValueError, "split"),
    ("ImageFolder", lambda: mage.ImageFolder("/nonexistent"), FileNotFoundError, "/nonexistent"),
    ("TensorImageDataset", lambda: mage.TensorImageDataset(torch.zeros(2, 8, 8), torch.zeros(2)), ValueError,
     "images"),
    ("TokenCacheDataset", lambda: mage.TokenCacheDataset(torch.zeros(2, 1, 4), torch.zeros(2)), TypeError, "ids"),
    ("list_models", lambda: mage.list_models(3), TypeError, "pattern"),
    ("create_model", lambda: mage.create_model("mage_vit_giant"), ValueError, "mage_vit_giant"),
    ("create_model", lambda: mage.create_model(None), ValueError, "name"),
    ("create_model", lambda: mage.create_model("mage_vit_tiny", depth=0), ValueError, "depth"),
    ("create_model", lambda: mage.create_model("mage_vit_tiny", dtype=torch.int8), TypeError, "dtype"),
    ("create_model", lambda: mage.create_model("mage_vit_tiny", checkpoint_path="/nonexistent/m.pth"),
     FileNotFoundError, "/nonexistent/m.pth"),
    ("create_model", lambda: mage.create_model("mage_vit_tiny", checkpoint_path=__file__), mage.CheckpointError,
     "test_bad_input.py"),
    ("MAGE.from_pretrained", lambda: mage.MAGE.from_pretrained("/nonexistent/folder"), FileNotFoundError,
     "/nonexistent/folder"),
    ("MAGE.from_pretrained", lambda: mage.MAGE.from_pretrained(__file__), FileNotFoundError, "mage.load"),
    ("load", lambda: mage.load(__file__, dtype="bf16"), TypeError, "dtype"),
    # Left at the last stop: EvalConfig checked nothing (batch_size=0 was a ZeroDivisionError in generate_into,
    # rank >= world generated nothing); linear_probe took any num_classes and config; ProbeConfig.optimizer was
    # checked only after feature extraction; ClassifierConfig checked nothing; nested TrainConfig dicts only when
    # the model was built (after config.json was written).
    ("EvalConfig", lambda: EvalConfig(batch_size=0), ValueError, "batch_size"),
    ("EvalConfig", lambda: EvalConfig(num=0), ValueError, "num"),
    ("EvalConfig", lambda: EvalConfig(steps=2.5), TypeError, "steps"),
    ("EvalConfig", lambda: EvalConfig(choice_temperature=NAN), ValueError, "choice_temperature"),
    ("EvalConfig", lambda: EvalConfig(dtype=torch.int8), ValueError, "dtype"),
    ("EvalConfig", lambda: EvalConfig(images_dir=3), TypeError, "images_dir"),
    ("generate_into", lambda: generate_into(MODEL, None, changed(EvalConfig(num=2, steps=2), batch_size=0)),
     ValueError, "batch_size"),
    ("generate_into", lambda: generate_into(MODEL, None, EvalConfig(num=2, steps=17)), ValueError,
     "steps must be in [1, 16]"),
    ("generate_into", lambda: generate_into(MODEL, None, {"num": 2}), TypeError, "cfg"),
    ("generate_into", lambda: generate_into(MODEL, None, EvalConfig(num=2, steps=2), rank=2, world=2), ValueError,
     "rank"),
    ("generate_into", lambda: generate_into(MODEL, None, EvalConfig(num=2, steps=2), world=0), ValueError, "world"),
    ("generate_into", lambda: generate_into(MODEL, None, EvalConfig(num=2, steps=2)), TypeError, "metric"),
    ("generate_into", lambda: generate_into(meta_model(), None, EvalConfig(num=2, steps=2)), ValueError, "model"),
    ("load_source", lambda: load_source(3, lambda n: None), TypeError, "source must be a str"),
    ("load_source", lambda: load_source("digits", None), TypeError, "metric_factory"),
    # digits took any split but "train" for its test split; size and channels failed inside torch.
    ("probe_images", lambda: probe_images("digits", "val", 8, 1), ValueError, "split must be 'train' or 'test'"),
    ("probe_images", lambda: probe_images("digits", "train", 0, 1), ValueError, "size must be >= 1"),
    ("probe_images", lambda: probe_images("digits", "train", 8, 0), ValueError, "channels must be >= 1"),
    ("ProbeConfig", lambda: mage.ProbeConfig(optimizer="adam"), ValueError, "optimizer"),
    ("linear_probe", lambda: mage.linear_probe(torch.randn(8, 4), torch.arange(8) % 4, torch.randn(4, 4),
                                               torch.arange(4), num_classes=2), ValueError, "num_classes"),
    ("linear_probe", lambda: mage.linear_probe(torch.randn(8, 4), torch.arange(8) % 4, torch.randn(4, 4),
                                               torch.arange(4), config={"epochs": 1}), TypeError, "config"),
    ("linear_probe", lambda: mage.linear_probe(torch.randn(1, 4), torch.zeros(1, dtype=torch.long),
                                               torch.randn(4, 4), torch.arange(4)), ValueError, "train_features"),
    ("linear_probe", lambda: mage.linear_probe(torch.randn(8, 4).tolist(), torch.arange(8), torch.randn(4, 4),
                                               torch.arange(4)), TypeError, "train_features"),
    ("ClassifierConfig", lambda: ClassifierConfig(batch_size=0), ValueError, "batch_size"),
    ("ClassifierConfig", lambda: ClassifierConfig(train_size=0), ValueError, "train_size"),
    ("ClassifierConfig", lambda: ClassifierConfig(lr=NAN), ValueError, "lr"),
    ("TrainConfig", lambda: mage.TrainConfig(model_overrides={"depth": 0}), ValueError, "model_overrides"),
    ("TrainConfig", lambda: mage.TrainConfig(model_overrides={"depth": 0}), ValueError, "depth"),
    ("TrainConfig", lambda: mage.TrainConfig(model_overrides={"stepz": 3}), ValueError, "stepz"),
    ("TrainConfig", lambda: mage.TrainConfig(model_overrides={"tokenizer": {}}), ValueError,
     "tokenizer cannot be set here"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="mae", mae={"patch_size": 0}), ValueError, "patch_size"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="tokenizer", tokenizer={"n_embed": 0}), ValueError, "n_embed"),
    ("TrainConfig", lambda: mage.TrainConfig(disc_weight=0.8), ValueError, "TrainConfig.disc_weight"),
    ("TrainConfig", lambda: mage.TrainConfig(perceptual_weights="lpips.pth"), ValueError,
     "TrainConfig.perceptual_weights"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="tokenizer", token_cache="ids.ckpt"), ValueError,
     "TrainConfig.token_cache"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="mae", tokenizer_checkpoint="tok.safetensors"), ValueError,
     "TrainConfig.tokenizer_checkpoint"),
    # Settings the run would have ignored without a word.
    ("TrainConfig", lambda: mage.TrainConfig(objective="tokenizer", model_overrides={"depth": 2}), ValueError,
     "TrainConfig.model_overrides belongs to objective 'mage' or 'mage-c'"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="mae", model="mage_vit_base_patch16"), ValueError,
     "TrainConfig.model belongs to objective"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="mae", tokenizer={"n_embed": 64}), ValueError,
     "TrainConfig.tokenizer belongs to objective"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="mage", mae={"depth": 2}), ValueError,
     "TrainConfig.mae belongs to objective 'mae'"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="tokenizer", disc_layers=2), ValueError,
     "TrainConfig.disc_layers sets up the discriminator, which trains only with disc_weight > 0"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="tokenizer", disc_betas=[0.5, 0.99]), ValueError,
     "TrainConfig.disc_betas"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="tokenizer", perceptual_weight=0.5), ValueError,
     "TrainConfig.perceptual_weight weighs the LPIPS term, which needs perceptual_weights"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="mage", contrastive_weight=0.5), ValueError,
     "TrainConfig.contrastive_weight belongs to objective 'mage-c': unset it for objective 'mage', got 0.5"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="mae", contrastive_temperature=0.1), ValueError,
     "TrainConfig.contrastive_temperature belongs to objective 'mage-c'"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="tokenizer", projector_hidden=64), ValueError,
     "TrainConfig.projector_hidden belongs to objective 'mage-c'"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="mage", projector_dim=64), ValueError,
     "TrainConfig.projector_dim belongs to objective 'mage-c'"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="mage-c", mae_mask_ratio=0.5), ValueError,
     "TrainConfig.mae_mask_ratio belongs to objective 'mae'"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="tokenizer", mask_ratio_min=0.6), ValueError,
     "TrainConfig.mask_ratio_min belongs to objective 'mage' or 'mage-c'"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="mae", mask_ratio_max=0.9), ValueError,
     "TrainConfig.mask_ratio_max belongs to objective 'mage' or 'mage-c'"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="mae", mask_ratio_mu=0.6), ValueError,
     "TrainConfig.mask_ratio_mu belongs to objective 'mage' or 'mage-c'"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="tokenizer", mask_ratio_std=0.2), ValueError,
     "TrainConfig.mask_ratio_std belongs to objective 'mage' or 'mage-c'"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="mae", mask_ratio_per_sample=True), ValueError,
     "TrainConfig.mask_ratio_per_sample belongs to objective 'mage' or 'mage-c'"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="tokenizer", label_smoothing=0.0), ValueError,
     "TrainConfig.label_smoothing belongs to objective 'mage' or 'mage-c'"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="mae", label_smoothing=0.2), ValueError,
     "TrainConfig.label_smoothing belongs to objective 'mage' or 'mage-c'"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="mage", codebook_restart_every=0), ValueError,
     "TrainConfig.codebook_restart_every belongs to objective 'tokenizer'"),
    ("TrainConfig", lambda: mage.TrainConfig(objective="mae", sample_every=5), ValueError,
     "TrainConfig.sample_every belongs to objective 'tokenizer' or 'mage' or 'mage-c'"),
    ("TrainConfig", lambda: mage.TrainConfig(token_cache="ids.ckpt", crop_scale=(0.5, 1.0)), ValueError,
     "TrainConfig.crop_scale crops the training images, which a token_cache replaces"),
    ("TrainConfig", lambda: mage.TrainConfig(compile_backend="aot_eager"), ValueError,
     "TrainConfig.compile_backend is torch.compile's backend, used only with compile=True (--compile)"),
    ("TrainConfig", lambda: mage.TrainConfig(blr=1e-3, lr=1e-3), ValueError,
     "TrainConfig.blr sets the learning rate only without lr"),
    # An IndexError in the optimizer's set-up (one beta), not a message.
    ("TrainConfig", lambda: mage.TrainConfig(betas=(0.9,)), ValueError, "TrainConfig.betas must be two numbers"),
    ("TrainConfig", lambda: mage.TrainConfig(disc_betas=(0.5, 0.9, 0.1)), ValueError,
     "TrainConfig.disc_betas must be two numbers"),
    # The discriminator never trained (steps are 0..steps-1) and nothing said so.
    ("TrainConfig", lambda: mage.TrainConfig(objective="tokenizer", disc_weight=0.8, steps=100, disc_start=100),
     ValueError, "TrainConfig.disc_start 100 is not below steps 100"),
]
# Names of mage.__all__ that take no user input worth a row (results, errors, the demo as a whole).
NOT_INPUT = {"CheckpointError", "InputError", "LoadReport", "ProbeResult", "DemoConfig", "run_demo"}


@pytest.mark.parametrize("name,call,err,arg", MODEL_CASES,
                         ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(MODEL_CASES)])
def test_model_layer_bad_input(name, call, err, arg):
    raises_naming(err, arg, call)
    # An InputError or OSError, which the CLI prints as one line (any other exception keeps its traceback there).
    raises_naming(OSError if issubclass(err, OSError) else mage.InputError, arg, call)


def test_settings_are_taken_where_they_are_read_and_defaults_everywhere():
    # The checks above refuse a setting only away from its default: a config.json replays (it holds every field).
    from mage.train import OBJECTIVES

    for objective in OBJECTIVES:
        cfg = mage.TrainConfig(objective=objective)
        assert mage.TrainConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg
    mage.TrainConfig(objective="mage-c", contrastive_weight=0.5, contrastive_temperature=0.1, projector_hidden=64,
                     projector_dim=32, mask_ratio_min=0.6, mask_ratio_max=0.9, mask_ratio_mu=0.6, mask_ratio_std=0.2,
                     mask_ratio_per_sample=True, label_smoothing=0.0, sample_every=5)
    mage.TrainConfig(objective="mae", mae_mask_ratio=0.5, crop_scale=(0.5, 1.0))
    mage.TrainConfig(objective="tokenizer", codebook_restart_every=0, sample_every=5)
    mage.TrainConfig(objective="mage", token_cache="ids.ckpt", crop_scale=(0.2, 1.0))  # the default, said again
    mage.TrainConfig(compile=True, compile_backend="aot_eager")
    mage.TrainConfig(blr=1e-3) and mage.TrainConfig(lr=1e-3)


def test_every_public_model_function_has_bad_input_cases():
    public = {n for n in mage.__all__ if callable(getattr(mage, n))} - NOT_INPUT
    covered = {c[0] for c in MODEL_CASES}
    assert public <= covered, f"no bad-input case for {sorted(public - covered)}"


def test_hostile_pretrained_folders(tmp_path):
    # A folder's config.json is validated like our files' metadata, before anything is built.
    MODEL.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for change, word in ((dict(depth=10**6), "depth"), (dict(embed_dim="32"), "embed_dim"), ([1, 2], "JSON object")):
        (tmp_path / "m" / "config.json").write_text(json.dumps(change if isinstance(change, list) else
                                                               {**config, **change}))
        raises_naming(mage.CheckpointError, word, lambda: mage.MAGE.from_pretrained(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{depth: 1")
    raises_naming(mage.CheckpointError, "config.json", lambda: mage.load(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "m" / "model.safetensors")
    state["norm.weight"] = state["norm.weight"] * NAN
    save_file(state, tmp_path / "m" / "model.safetensors")
    raises_naming(mage.CheckpointError, "norm.weight", lambda: mage.MAGE.from_pretrained(tmp_path / "m"))
    raises_naming(mage.CheckpointError, "norm.weight",
                  lambda: mage.create_model("mage_vit_tiny", checkpoint_path=tmp_path / "m", **SMALL))


def test_writers_refuse_a_missing_folder_and_create_none(tmp_path):
    # Every file writer made the missing folders of the path it was given (as root, save_image made
    # /nonexistent/dir): a typo became a tree of folders. Now the folder must exist; the message names it.
    from mage.checkpoint_io import save_checkpoint, write_atomic
    from mage.metrics import FeatureStats
    from mage.report import JsonlLogger, plot_curves, save_image, save_image_grid

    missing = tmp_path / "no" / "such"
    writers = {
        "save_image": lambda p: save_image(IMAGES[0], p),
        "save_image_grid": lambda p: save_image_grid(IMAGES, p),
        "plot_curves": lambda p: plot_curves([{"step": 1, "loss": 1.0}], p),
        "JsonlLogger": lambda p: JsonlLogger(p),
        "save": lambda p: mage.save(MODEL, p),
        "MAGE.save": lambda p: MODEL.save(p),
        "save_tokenizer": lambda p: mage.save_tokenizer(MODEL.vqgan, p),
        "build_token_cache": lambda p: mage.build_token_cache(MODEL.vqgan, None, p),  # checked before any work
        "FeatureStats.save": lambda p: FeatureStats().update(torch.randn(4, 3)).save(p),
        "save_checkpoint": lambda p: save_checkpoint({"x": 1}, p),
        "write_atomic": lambda p: write_atomic(p, "{}"),
    }
    for name, write in writers.items():
        message = raises_naming(FileNotFoundError, str(missing), lambda: write(missing / "out.png"))
        assert "does not exist" in message, (name, message)
        assert not (tmp_path / "no").exists(), f"{name} created the missing folder"
    (tmp_path / "file").write_text("")
    raises_naming(FileNotFoundError, str(tmp_path / "file"), lambda: save_image(IMAGES[0], tmp_path / "file" / "x.png"))
    # Folders a writer is asked to fill are made: a pretrained folder, as huggingface_hub does.
    MODEL.save_pretrained(tmp_path / "new" / "model")
    assert (tmp_path / "new" / "model" / "config.json").is_file()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_loaders_cast_to_the_asked_dtype_not_back_to_float32(tmp_path, dtype):
    # load_checked casts floating tensors to the model's dtype unless a dtype is asked for.
    MODEL.save(tmp_path / "m.safetensors")
    MODEL.save_pretrained(tmp_path / "f")
    for model in (mage.load(tmp_path / "m.safetensors", dtype=dtype), mage.load_any(tmp_path / "f", dtype=dtype),
                  mage.create_model("mage_vit_tiny", checkpoint_path=tmp_path / "f", dtype=dtype, **SMALL)):
        assert model.norm.weight.dtype == dtype and model.token_emb.position_ids.dtype == torch.int64


VQ = mk.nn.VectorQuantize
# (call, error type, argument the message must name)
NN_CASES = [
    (lambda: VQ(0, 8), ValueError, "dim"),
    (lambda: VQ(True, 8), TypeError, "dim"),
    (lambda: VQ(4, 8.0), TypeError, "codebook_size"),
    (lambda: VQ(4, 8, codebook_dim=0), ValueError, "codebook_dim"),
    (lambda: VQ(4, 8, decay=1.0), ValueError, "decay"),
    (lambda: VQ(4, 8, decay=NAN), ValueError, "decay"),
    (lambda: VQ(4, 8, decay="0.8"), TypeError, "decay"),
    (lambda: VQ(4, 8, commitment_weight=INF), ValueError, "commitment_weight"),
    (lambda: VQ(4, 8, eps=-1.0), ValueError, "eps"),
    (lambda: VQ(4, 8, kmeans_iters=0), ValueError, "kmeans_iters"),
    (lambda: VQ(4, 8, channel_last="yes"), TypeError, "channel_last"),
    (lambda: VQ(4, 8, sync_codebook=1), TypeError, "sync_codebook"),
    (lambda: VQ(4, 8)(torch.randn(2, 5, 3)), ValueError, "x"),
    (lambda: VQ(4, 8)(torch.randint(0, 3, (2, 5, 4))), TypeError, "x"),
    (lambda: VQ(4, 8)([[0.0] * 4]), TypeError, "x"),
    (lambda: VQ(4, 8).get_codes_from_indices(torch.tensor([8])), ValueError, "indices"),
    (lambda: VQ(4, 8).get_output_from_indices(torch.tensor([0.0])), TypeError, "indices"),
]


@pytest.mark.parametrize("call,err,arg", NN_CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(NN_CASES)])
def test_vector_quantize_bad_input(call, err, arg):
    assert raises_naming(err, arg, call).startswith("VectorQuantize")


def test_sensible_behaviour_instead_of_errors():
    # Empty batches give empty results; fp64 / fp16 / bf16 images are converted to the model's dtype.
    assert MODEL.vqgan.decode(torch.zeros(0, 16, dtype=torch.long)).shape == (0, 3, 16, 16)
    assert mage.inpaint(MODEL, IMAGES[:0], HOLE[:0], steps=2).shape == (0, 3, 16, 16)
    assert mage.generate(MODEL, 0, steps=2).shape == (0, 3, 16, 16)
    ids = MODEL.vqgan.encode(IMAGES)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        assert MODEL.vqgan.encode(IMAGES.to(dtype)).shape == ids.shape
    assert mage.inpaint(MODEL, IMAGES.double(), HOLE, steps=2).dtype == torch.float32


# --------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    MODEL.save(root / "model.safetensors")
    from PIL import Image

    Image.new("RGB", (20, 20)).save(root / "image.png")
    Image.new("L", (20, 20)).save(root / "mask.png")
    (root / "old_samples").mkdir()  # an earlier `mage sample --num 3`
    for i in range(3):
        Image.new("RGB", (16, 16)).save(root / "old_samples" / f"{i:06d}.png")
    hole = Image.new("L", (20, 20))
    hole.paste(255, (0, 0, 4, 4))  # the top-left corner
    hole.save(root / "hole.png")
    (root / "zero_batch.json").write_text('{"batch_size": 0}')
    (root / "notes.txt").write_text("not an image")
    (root / "bad.json").write_text("{steps: 3")
    (root / "list.json").write_text("[1, 2]")
    (root / "unknown.json").write_text('{"stepz": 3}')
    (root / "one_beta.json").write_text('{"betas": [0.9]}')
    import io

    import numpy as np

    good = io.BytesIO()
    np.savez(good, mu=np.zeros(3), sigma=np.eye(3), num_samples=10)
    (root / "truncated.npz").write_bytes(good.getvalue()[:100])
    (root / "empty.npz").write_bytes(b"")
    np.savez(root / "nan.npz", mu=np.full(3, np.nan), sigma=np.eye(3), num_samples=10)
    np.savez(root / "one.npz", mu=np.zeros(3), sigma=np.eye(3), num_samples=1)
    return root


# `mage train` flags of a run that builds in milliseconds (8x8 digits, a tiny tokenizer and MAGE).
TINY_TOKENIZER = ("--data digits --image-size 8 --no-progress --tokenizer '{{\"in_channels\": 1, \"ch\": 8, "
                  "\"ch_mult\": [1, 2], \"num_res_blocks\": 1, \"embed_dim\": 8, \"n_embed\": 32, \"norm_groups\": 4}}'")
TINY_RUN = (TINY_TOKENIZER + " --model-overrides '{{\"embed_dim\": 32, \"depth\": 1, \"num_heads\": 2, "
            "\"decoder_embed_dim\": 32, \"decoder_depth\": 1, \"decoder_num_heads\": 2}}'")
# (command line with {root} for the fixture folder, exit status, what stderr must name)
CLI_CASES = [
    ("sample --checkpoint {root}/missing.safetensors", 1, "missing.safetensors"),
    ("sample --checkpoint {root}/notes.txt", 1, "notes.txt"),
    ("sample --checkpoint {root}/model.safetensors --num -1", 1, "--num must be >= 1"),
    ("sample --checkpoint {root}/model.safetensors --num 2.5", 2, "--num"),
    ("sample --checkpoint {root}/model.safetensors --steps 0", 1, "--steps"),
    ("sample --checkpoint {root}/model.safetensors --temperature nan", 1, "--temperature"),
    ("sample --checkpoint {root}/model.safetensors --batch-size 0", 1, "--batch-size"),
    ("sample --checkpoint {root}/model.safetensors --dtype fp8", 2, "--dtype"),
    ("sample --checkpoint {root}/model.safetensors --cuda-graph --device cpu", 1, "--cuda-graph"),
    ("sample --checkpoint {root}/model.safetensors --device cpu --num 1 --steps 1 --out {root}", 1, "directory"),
    ("inpaint --checkpoint {root}/model.safetensors --image {root}/missing.png --mask {root}/mask.png --out x.png",
     1, "--image"),
    ("inpaint --checkpoint {root}/model.safetensors --image {root}/notes.txt --mask {root}/mask.png --out x.png",
     1, "--image"),
    ("inpaint --checkpoint {root}/model.safetensors --image {root}/image.png --mask {root}/notes.txt --out x.png",
     1, "--mask"),
    ("inpaint --checkpoint {root}/model.safetensors --image {root}/image.png --mask {root}/mask.png --out x.png "
     "--ring -1 --device cpu", 1, "--ring"),
    ("inpaint --checkpoint {root}/model.safetensors --image {root}/image.png --mask {root}/mask.png", 2, "--out"),
    ("train --batch-size 0 --out-dir {root}/run", 1, "--batch-size"),
    ("train --steps -5 --out-dir {root}/run", 1, "--steps"),
    ("train --lr nan --out-dir {root}/run", 1, "--lr"),
    ("train --model-overrides '{{\"depth\": 0}}' --data digits --out-dir {root}/run", 1,
     "--model-overrides: TrainConfig.model_overrides: MAGEConfig: depth"),
    ("train --model-overrides '{{depth: 0}}' --out-dir {root}/run", 2, "--model-overrides"),
    ("train --config {root}/missing.json", 1, "missing.json"),
    ("train --config {root}/bad.json", 1, "bad.json"),
    ("train --config {root}/list.json", 1, "list.json"),
    ("train --config {root}/unknown.json", 1, "stepz"),
    ("train --objective bert", 2, "--objective"),
    ("train --data /nonexistent/images --objective tokenizer --out-dir {root}/run", 1, "/nonexistent/images"),
    ("train --tokenizer-checkpoint {root}/notes.txt --data digits --out-dir {root}/run", 1, "notes.txt"),
    ("demo --threads zero", 2, "--threads"),
    ("probe --checkpoint {root}/missing.safetensors --data digits", 1, "missing.safetensors"),
    ("probe --checkpoint {root}/model.safetensors --data digits --optimizer adam", 2, "--optimizer"),
    ("probe --checkpoint {root}/model.safetensors --data {root}/nowhere", 1, "nowhere"),
    ("probe --checkpoint {root}/model.safetensors --data digits --epochs 0", 1, "--epochs"),
    ("eval --checkpoint {root}/notes.txt", 1, "notes.txt"),
    ("eval --checkpoint {root}/model.safetensors --num 0", 1, "--num"),
    ("cache --tokenizer-checkpoint {root}/missing.safetensors --data digits --out c.pt", 1, "missing.safetensors"),
    ("cache --tokenizer-checkpoint {root}/notes.txt --data digits --out c.pt --crops 0", 1, "--crops"),
    ("fid {root}/missing digits", 1, "missing"),
    ("fid digits", 1, "second source"),
    ("fid digits digits --max-images 2 --weights {root}/missing.pth --device cpu", 1, "missing.pth"),
    # np.savez appended .npz to another name while the result named the path given.
    ("fid digits --save-stats {root}/stats", 1, "--save-stats"),
    # Damaged statistics files: raw BadZipFile / EOFError tracebacks, or a silent NaN / division by zero.
    ("fid {root}/truncated.npz digits", 1, "truncated.npz"),
    ("fid {root}/empty.npz digits", 1, "empty.npz"),
    ("fid {root}/nan.npz {root}/nan.npz", 1, "nan.npz: mu and sigma must be finite"),
    ("fid {root}/one.npz {root}/one.npz", 1, "num_samples"),
    # Ignored without a word when no source has images: the statistics' own counts and no Inception Score.
    ("fid {root}/one.npz {root}/one.npz --max-images 5", 1, "--max-images acts on the images of a folder"),
    ("fid {root}/one.npz {root}/one.npz --weights {root}/missing.pth", 1, "--weights acts on the images of a folder"),
    # Raw tracebacks (ZeroDivisionError, RuntimeError, AssertionError) or errors after the sampling, not naming the flag.
    ("sample --checkpoint {root}/model.safetensors --device cpu --num 1 --steps 1 --nrow 0", 1, "--nrow"),
    ("sample --checkpoint {root}/model.safetensors --device gpu --num 1 --steps 1", 1, "--device"),
    ("sample --checkpoint {root}/model.safetensors --device cuda:99 --num 1 --steps 1", 1, "--device"),
    ("sample --checkpoint {root}/model.safetensors --device cpu --num 1 --steps 1 --images-dir {root}/image.png", 1,
     "--images-dir"),
    ("inpaint --checkpoint {root}/model.safetensors --image {root}/image.png --mask {root}/mask.png --out x.png "
     "--device gpu", 1, "--device"),
    # A negative --max-images / --train-images sliced off the last images without a word.
    ("fid digits digits --max-images -5 --device cpu", 1, "--max-images"),
    ("fid digits digits --max-images 2 --inception-batch-size 0 --device cpu", 1, "--inception-batch-size"),
    ("eval --checkpoint {root}/model.safetensors --num 2 --inception-batch-size 0", 1, "--inception-batch-size"),
    ("probe --checkpoint {root}/model.safetensors --data digits --train-images -1", 1, "--train-images"),
    ("probe --checkpoint {root}/model.safetensors --data digits --device gpu", 1, "--device"),
    # Ran 100000 steps on 16 tokens (each step fills at least one), wrote an empty grid, named the library's
    # argument (choice_temperature, num_images) instead of the flag, or silently regenerated the whole image.
    ("sample --checkpoint {root}/model.safetensors --device cpu --num 1 --steps 100000", 1,
     "--steps must be in [1, 16]"),
    ("sample --checkpoint {root}/model.safetensors --device cpu --num 0", 1, "--num must be >= 1, got 0"),
    ("sample --checkpoint {root}/model.safetensors --device cpu --temperature -1", 1, "--temperature"),
    ("sample --checkpoint {root}/model.safetensors --device cpu --temperature-power 0", 1, "--temperature-power"),
    ("sample --checkpoint {root}/model.safetensors --device cpu --temperature-power inf", 1, "--temperature-power"),
    ("inpaint --checkpoint {root}/model.safetensors --image {root}/image.png --mask {root}/hole.png --out x.png "
     "--device cpu --steps 2 --ring 1000", 1, "--ring must be in [0, 3]"),
    ("inpaint --checkpoint {root}/model.safetensors --image {root}/image.png --mask {root}/hole.png --out x.png "
     "--device cpu --steps 17", 1, "--steps must be in [1, 16]"),
    ("inpaint --checkpoint {root}/model.safetensors --image {root}/image.png --mask {root}/hole.png --out x.png "
     "--device cpu --temperature nan", 1, "--temperature"),
    ("inpaint --checkpoint {root}/model.safetensors --image {root}/image.png --mask {root}/mask.png --out x.png "
     "--device cpu --steps 2", 1, "--mask"),  # all black: nothing to regenerate
    ("inpaint --checkpoint {root}/model.safetensors --image {root}/image.png --mask {root}/hole.png --out x.png "
     "--device cpu --steps 2 --ring 3", 1, "--ring 3"),  # the ring reaches every token of the 4x4 grid
    ("train --config {root}/zero_batch.json --out-dir {root}/run", 1, "--config"),
    ("train --tokenizer '{{\"n_embed\": 0}}' --objective tokenizer --out-dir {root}/run", 1, "--tokenizer"),
    ("eval --checkpoint {root}/model.safetensors --num 2 --steps 17", 1, "--steps must be in [1, 16]"),
    ("eval --checkpoint {root}/model.safetensors --num 2 --choice-temperature nan", 1, "--choice-temperature"),
    ("eval --checkpoint {root}/model.safetensors --num 2 --batch-size 0", 1, "--batch-size"),
    ("probe --checkpoint {root}/model.safetensors --data digits --blr 0", 1, "--blr"),
    # Left at the last stop: errors that named a TrainConfig field (or nothing) rather than the flag, checks that
    # came after minutes of work, and output files whose missing folder was created (each row its own folder).
    ("train --objective mage --disc-weight 0.8 --out-dir {root}/run", 1, "--disc-weight"),
    ("train --objective mae --perceptual-weights {root}/lpips.pth --out-dir {root}/run", 1, "--perceptual-weights"),
    ("train --model-overrides '{{\"stepz\": 3}}' --out-dir {root}/run", 1,
     "--model-overrides: TrainConfig.model_overrides: unknown MAGEConfig fields ['stepz']"),
    ("train " + TINY_RUN + " --batch-size 4096 --out-dir {root}/run", 1, "--batch-size"),
    ("train " + TINY_RUN + " --batch-size 32 --accum-steps 3 --out-dir {root}/run", 1, "--accum-steps"),
    ("train " + TINY_TOKENIZER + " --objective tokenizer --disc-weight 0.8 --disc-layers 2 --out-dir {root}/run", 1,
     "--disc-layers"),
    ("sample --checkpoint {root}/model.safetensors --device cpu --num 1 --steps 1 --out {root}/no_dir_1/x.png", 1,
     "--out {root}/no_dir_1/x.png: the folder {root}/no_dir_1 does not exist"),
    ("inpaint --checkpoint {root}/model.safetensors --image {root}/image.png --mask {root}/hole.png --steps 2 "
     "--device cpu --out {root}/no_dir_2/x.png", 1, "the folder {root}/no_dir_2 does not exist"),
    ("fid digits --max-images 2 --device cpu --save-stats {root}/no_dir_3/s.npz", 1, "--save-stats"),
    ("fid digits digits --max-images 2 --device cpu --out {root}/no_dir_4/r.json", 1, "--out"),
    ("eval --checkpoint {root}/model.safetensors --num 2 --steps 2 --device cpu --out {root}/no_dir_5/e.json", 1,
     "--out"),
    ("probe --checkpoint {root}/model.safetensors --data digits --epochs 1 --out {root}/no_dir_6/p.json", 1, "--out"),
    ("cache --tokenizer-checkpoint {root}/notes.txt --data digits --out {root}/no_dir_7/c.pt", 1, "--out"),
    ("cache --tokenizer-checkpoint {root}/notes.txt --data digits --out c.pt --batch-size 0", 1, "--batch-size"),
    ("cache --tokenizer-checkpoint {root}/notes.txt --data digits --out c.pt --seed -1", 1, "--seed"),
    ("eval --checkpoint {root}/model.safetensors --num 2 --steps 2 --seed -1", 1, "--seed"),
    ("probe --checkpoint {root}/model.safetensors --data digits --epochs 1 --seed -1", 1, "--seed"),
    # Cut to --epochs without a word (the default still is: 10 epochs of warm-up for a 5-epoch probe would not end).
    ("probe --checkpoint {root}/model.safetensors --data digits --epochs 5 --warmup-epochs 8", 1,
     "--warmup-epochs must be in [0, 5] (the probe trains 5 epochs), got 8"),
    # Settings the run would have ignored without a word, named by their flag; demo named TrainConfig's seed.
    ("train --objective tokenizer --disc-layers 2 --out-dir {root}/run", 1,
     "--disc-layers: TrainConfig.disc_layers sets up the discriminator, which trains only with disc_weight > 0 "
     "(--disc-weight"),
    ("train --objective tokenizer --perceptual-weight 0.5 --out-dir {root}/run", 1,
     "--perceptual-weight: TrainConfig.perceptual_weight weighs the LPIPS term, which needs perceptual_weights "
     "(--perceptual-weights"),
    ("train --objective mae --model-overrides '{{\"depth\": 2}}' --out-dir {root}/run", 1,
     "--model-overrides: TrainConfig.model_overrides belongs to objective 'mage' or 'mage-c'"),
    ("demo --seed -1 --out {root}/no_dir_8", 1, "--seed must be >= 0, got -1"),
    ("train --objective mage --contrastive-weight 0.5 --out-dir {root}/run", 1,
     "--contrastive-weight: TrainConfig.contrastive_weight belongs to objective 'mage-c'"),
    ("train --objective mae --contrastive-temperature 0.1 --out-dir {root}/run", 1, "--contrastive-temperature: "),
    ("train --objective tokenizer --projector-hidden 64 --out-dir {root}/run", 1, "--projector-hidden: "),
    ("train --objective mage --projector-dim 64 --out-dir {root}/run", 1, "--projector-dim: "),
    ("train --objective mage --mae-mask-ratio 0.5 --out-dir {root}/run", 1,
     "--mae-mask-ratio: TrainConfig.mae_mask_ratio belongs to objective 'mae'"),
    ("train --objective tokenizer --mask-ratio-min 0.6 --out-dir {root}/run", 1,
     "--mask-ratio-min: TrainConfig.mask_ratio_min belongs to objective 'mage' or 'mage-c'"),
    ("train --objective mae --mask-ratio-max 0.9 --out-dir {root}/run", 1, "--mask-ratio-max: "),
    ("train --objective mae --mask-ratio-mu 0.6 --out-dir {root}/run", 1, "--mask-ratio-mu: "),
    ("train --objective tokenizer --mask-ratio-std 0.2 --out-dir {root}/run", 1, "--mask-ratio-std: "),
    ("train --objective mae --mask-ratio-per-sample --out-dir {root}/run", 1, "--mask-ratio-per-sample: "),
    ("train --objective mae --label-smoothing 0 --out-dir {root}/run", 1,
     "--label-smoothing: TrainConfig.label_smoothing belongs to objective 'mage' or 'mage-c'"),
    ("train --objective mage-c --codebook-restart-every 0 --out-dir {root}/run", 1,
     "--codebook-restart-every: TrainConfig.codebook_restart_every belongs to objective 'tokenizer'"),
    ("train --objective mae --sample-every 5 --out-dir {root}/run", 1, "--sample-every: "),
    ("train --objective mage --token-cache {root}/ids.ckpt --crop-scale 0.5 1 --out-dir {root}/run", 1,
     "--crop-scale: TrainConfig.crop_scale crops the training images, which a token_cache replaces"),
    ("train --compile-backend aot_eager --out-dir {root}/run", 1,
     "--compile-backend: TrainConfig.compile_backend is torch.compile's backend, used only with compile=True"),
    ("train --blr 1e-3 --lr 1e-3 --out-dir {root}/run", 1, "--blr: TrainConfig.blr sets the learning rate only"),
    ("train --config {root}/one_beta.json --out-dir {root}/run", 1,
     "--config {root}/one_beta.json (betas): TrainConfig.betas must be two numbers"),
    ("cache --tokenizer-checkpoint {root}/notes.txt --data digits --out c.pt --crop-scale 0.5 2", 1, "--crop-scale"),
    # An --image-size the tokenizer cannot take was said to be --tokenizer's error, MAE's named no flag at all; and
    # a size set both ways silently took the --tokenizer / --mae one.
    ("train --objective mage --image-size 40 --out-dir {root}/run", 1,
     "--image-size: TrainConfig.image_size sets the tokenizer's resolution: resolution 40 must be a multiple of the "
     "downsampling factor 2^(len(ch_mult)-1) = 16 (ch_mult (1, 1, 2, 2, 4)), e.g. 32 or 48"),
    ("train --objective mae --image-size 10 --out-dir {root}/run", 1,
     "--image-size: TrainConfig.image_size sets the MAE's image_size: image_size 10 must be a multiple of patch_size "
     "4, e.g. 8 or 12"),
    ("train --objective tokenizer --image-size 64 --tokenizer '{{\"resolution\": 32}}' --steps 1 --batch-size 4 "
     "--data digits --no-progress --out-dir {root}/run", 1,
     "--image-size: TrainConfig.image_size 64 and the tokenizer's resolution 32 (TrainConfig.tokenizer) differ"),
    ("train --objective mae --image-size 16 --mae '{{\"image_size\": 32}}' --steps 1 --batch-size 4 --data digits "
     "--no-progress --out-dir {root}/run", 1,
     "--image-size: TrainConfig.image_size 16 and the MAE's image_size 32 (TrainConfig.mae) differ"),
    ("train --objective tokenizer --tokenizer '{{\"resolution\": 40}}' --out-dir {root}/run", 1,
     "--tokenizer: TrainConfig.tokenizer: TokenizerConfig: resolution 40 must be a multiple"),
    # The discriminator never trained and nothing said so.
    ("train " + TINY_TOKENIZER + " --objective tokenizer --disc-weight 0.8 --disc-layers 1 --disc-start 2 --steps 2 "
     "--batch-size 4 --out-dir {root}/run_disc", 1,
     "--disc-start: TrainConfig.disc_start 2 is not below steps 2 (--steps)"),
    # An earlier run's higher-numbered PNGs stayed beside this run's: `mage fid` on the folder mixed the two runs.
    ("sample --checkpoint {root}/model.safetensors --device cpu --num 2 --steps 1 --images-dir {root}/old_samples", 1,
     "--images-dir {root}/old_samples holds 1 sample PNG numbered 2 and above (000002.png)"),
]


@pytest.mark.parametrize("line,status,word", CLI_CASES, ids=[f"{c[0].split()[0]}-{i}" for i, c in enumerate(CLI_CASES)])
def test_cli_bad_input(cli_files, capsys, line, status, word, monkeypatch, tmp_path):
    import shlex

    from mage import cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(shlex.split(line.format(root=cli_files)))
    err = capsys.readouterr().err
    assert info.value.code == status, err
    assert word.format(root=cli_files) in err, err
    assert "Traceback" not in err
    if status == 1:  # our message (2: argparse's usage): no double space where two pieces of it were joined
        assert err.startswith(f"mage {line.split()[0]}: error: ") and "  " not in err.splitlines()[0], err
    for folder in re.findall(r"no_dir_\d+", line):
        assert not (cli_files / folder).exists(), "an output file's missing folder was created"


def test_cli_multi_line_error_indents_its_later_lines(tmp_path, capsys, monkeypatch):
    # A report (here: a checkpoint with a NaN weight) printed its later lines at column 0, under "mage sample: error:".
    from safetensors import safe_open

    from mage import cli
    from mage.checkpoint_io import save_safetensors

    state = {k: v.clone() for k, v in MODEL.state_dict().items()}
    state["blocks.0.attn.proj.bias"][0] = float("nan")
    MODEL.save(tmp_path / "model.safetensors")
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        metadata = f.metadata()
    save_safetensors(state, metadata, tmp_path / "nan.safetensors")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(["sample", "--checkpoint", "nan.safetensors", "--device", "cpu", "--num", "1", "--steps", "1"])
    lines = capsys.readouterr().err.splitlines()
    assert info.value.code == 1 and lines[0] == "mage sample: error: nan.safetensors does not match the model (MAGE):"
    assert lines[1:] == [f"  loaded {len(state)} tensors", "  1 key(s) with NaN or inf values:",
                         "    blocks.0.attn.proj.bias"]


def test_message_continuation_lines_line_up_and_join_with_one_space():
    # Renaming ValueError to InputValueError left the continuation lines of ~50 messages 5 columns to the left of
    # their first line. A string literal continued on the next line starts in the first one's column, and the two
    # do not both bring a space to the join.
    import io
    import pathlib
    import tokenize

    root = pathlib.Path(__file__).resolve().parent.parent
    bad = []
    for path in sorted([*root.glob("python/mage/*.py"), *root.glob("mage_kernels/*.py")]):
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
                  if t.type not in (tokenize.NL, tokenize.COMMENT)]
        for a, b in zip(tokens, tokens[1:]):
            if a.type == b.type == tokenize.STRING and b.start[0] > a.end[0]:
                where = f"{path.relative_to(root)}:{b.start[0]}"
                if b.start[1] != a.start[1]:
                    bad.append(f"{where}: continuation in column {b.start[1]}, the string starts in {a.start[1]}")
                if re.search(r"[ ][\"']$", a.string) and re.match(r"[a-z]*[\"'][ ]", b.string):
                    bad.append(f"{where}: a space on both sides of the join")
    assert not bad, "\n".join(bad)


def test_cli_error_in_a_dataloader_worker_is_one_line(tmp_path, capsys, monkeypatch):
    # An unreadable image read by a DataLoader worker came back as torch re-raises it: the worker's whole traceback
    # in the message, ending "mage_kernels._checks.InputValueError: ...".
    from PIL import Image

    from mage import cli

    (tmp_path / "images" / "a").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a" / f"{i}.png")
    (tmp_path / "images" / "a" / "bad.png").write_bytes(b"not a png")
    mae = {"patch_size": 2, "in_channels": 3, "embed_dim": 8, "depth": 1, "num_heads": 1, "decoder_embed_dim": 8,
           "decoder_depth": 1, "decoder_num_heads": 1}
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--objective", "mae", "--data", "images", "--image-size", "8", "--mae", json.dumps(mae),
                  "--batch-size", "5", "--steps", "1", "--num-workers", "1", "--no-progress", "--out-dir", "run"])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "Traceback" not in err and "_checks" not in err, err
    assert err == ("mage train: error: images/a/bad.png: cannot read it as an image (cannot identify image file "
                   "'images/a/bad.png'); remove or replace it (in DataLoader worker process 0)\n")


def test_cli_user_message_keeps_the_worker_errors_own_text():
    from mage.cli import _user_message

    text = ("Caught PermissionError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\n    open(p)\nPermissionError: [Errno 13] Permission denied: \'a.png\'\n')
    assert _user_message(PermissionError(text)) == ("[Errno 13] Permission denied: 'a.png' "
                                                    "(in DataLoader worker process 1)")
    assert _user_message(mage.InputError("--steps must be >= 1, got 0")) == "--steps must be >= 1, got 0"


def test_every_cli_command_has_bad_input_cases():
    from mage import cli

    commands = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert commands <= {c[0].split()[0] for c in CLI_CASES}


@pytest.mark.skipif(mk.build_info()["native"] is None, reason="needs the native library")
def test_cli_checks_the_cpu_isa_variable_first(monkeypatch, capsys):
    # The C++ kernels raise a plain ValueError at their first call, which the CLI no longer takes for a user
    # error: the CLI checks the variable before the command runs.
    from mage import cli

    monkeypatch.setenv("MAGE_CPU_ISA", "avx1024")
    with pytest.raises(SystemExit) as info:
        cli.main(["fid", "digits"])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "Traceback" not in err
    assert err == "mage fid: error: MAGE_CPU_ISA must be one of auto, scalar, avx2, avx512_bf16, got 'avx1024'\n"
