"""Sampler (docs/REFERENCE.md 5), inpainting and the CLI, on a tiny random model."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import requires_cuda
from test_model import L_TINY, randomized, tiny_config

import mage
import mage_kernels
from mage import cli

# Section 5: tokens still masked after each step from all-[MASK] over 256 tokens ("then all committed").
SCHEDULE_20 = [255, 252, 248, 243, 236, 228, 218, 207, 194, 181, 166, 150, 133, 116, 97, 79, 59, 40, 20, 0]
SCHEDULE_12 = [253, 247, 236, 221, 203, 181, 155, 128, 97, 66, 33, 0]


@pytest.fixture(scope="module")
def model():
    return randomized(mage.MAGE(tiny_config()))


def test_schedule_matches_the_reference_table():
    assert mage.mask_schedule(256, 20) == SCHEDULE_20
    assert mage.mask_schedule(256, 12) == SCHEDULE_12


def _record(model, ids, steps, **kw):
    history = []
    with torch.no_grad():
        final = mage.decode_tokens(model, ids, steps=steps, on_step=lambda t, x: history.append(x.clone()), **kw)
    return final, history


@pytest.mark.parametrize("fused_head", [True, False])
def test_each_step_commits_the_scheduled_count_and_keeps_committed_tokens(model, fused_head):
    c = model.config
    ids = torch.full((3, L_TINY), c.mask_id)
    final, history = _record(model, ids, 8, generator=torch.Generator().manual_seed(0), fused_head=fused_head)
    schedule = mage.mask_schedule(L_TINY, 8)
    prev = ids
    for t, x in enumerate(history):
        assert (x == c.mask_id).sum(1).tolist() == [schedule[t]] * 3
        known = prev != c.mask_id
        assert torch.equal(x[known], prev[known])  # committed tokens never change
        prev = x
    assert not (final == c.mask_id).any() and int(final.max()) < c.codebook_size and int(final.min()) >= 0
    assert torch.equal(final, history[-1])


@pytest.mark.parametrize("fused_head", [True, False])
def test_temperature_divides_the_logits(fused_head):
    """temperature=T samples as a model whose logits are divided by T (exact for T = 0.5: a power of two)."""
    m = randomized(mage.MAGE(tiny_config(head="untied")))
    scaled = randomized(mage.MAGE(tiny_config(head="untied")))
    with torch.no_grad():
        scaled.mlm_layer.weight.mul_(2.0)
        scaled.mlm_layer.bias.mul_(2.0)
    ids = torch.full((3, L_TINY), m.config.mask_id)
    a, _ = _record(m, ids, 6, temperature=0.5, generator=torch.Generator().manual_seed(3), fused_head=fused_head)
    b, _ = _record(scaled, ids, 6, generator=torch.Generator().manual_seed(3), fused_head=fused_head)
    c, _ = _record(m, ids, 6, generator=torch.Generator().manual_seed(3), fused_head=fused_head)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_256_tokens_in_20_steps_follow_the_published_table():
    m = randomized(mage.MAGE(tiny_config(tokenizer=mage.TokenizerConfig.tiny(resolution=64))))  # 16x16 tokens
    ids = torch.full((2, 256), m.config.mask_id)
    final, history = _record(m, ids, 20, generator=torch.Generator().manual_seed(0))
    assert [(x == m.config.mask_id).sum(1).tolist() for x in history] == [[n, n] for n in SCHEDULE_20]
    assert not (final == m.config.mask_id).any()


def test_reference_ties_mode_runs_to_completion(model):
    ids = torch.full((2, L_TINY), model.config.mask_id)
    final, _ = _record(model, ids, 4, generator=torch.Generator().manual_seed(0), reference_ties=True)
    assert not (final == model.config.mask_id).any()


def test_generate_is_reproducible_per_seed(model):
    def run(seed, **kw):
        return mage.generate(model, 3, steps=4, batch_size=2, generator=torch.Generator().manual_seed(seed), **kw)

    a = run(0)
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, run(0))
    assert not torch.equal(a, run(1))
    low = run(0, dtype=torch.bfloat16)
    assert low.shape == a.shape and low.dtype == torch.float32 and torch.isfinite(low).all()
    assert model.training is False and mage.generate(model, 0).shape == (0, 3, 32, 32)


def test_choice_temperature_power_anneals_the_confidence_noise(model):
    """power 1 is the default (the papers' linear annealing); each step's noise is temperature * (1 - r) ** power."""
    seen = []
    original = mage_kernels.remask_step_from_hidden

    def spy(*args, **kw):
        seen.append(kw["choice_temperature"])
        return original(*args, **kw)

    def run(**kw):
        return mage.generate(model, 2, steps=4, generator=torch.Generator().manual_seed(0), **kw)

    assert torch.equal(run(), run(choice_temperature_power=1.0))
    import mage_kernels.sampling as sampling

    sampling.remask_step_from_hidden, saved = spy, sampling.remask_step_from_hidden
    try:
        run(choice_temperature=3.0, choice_temperature_power=2.0)
    finally:
        sampling.remask_step_from_hidden = saved
    assert seen == pytest.approx([3.0 * (1 - r / 4) ** 2 for r in (1, 2, 3, 4)])
    with pytest.raises(ValueError, match="power"):
        run(choice_temperature_power=0.0)


def test_generate_restores_training_mode(model):
    m = mage.MAGE(tiny_config())
    m.train()
    mage.generate(m, 1, steps=2)
    assert m.training


def test_token_mask_from_pixels_covers_touched_patches_and_ring():
    pm = torch.zeros(2, 32, 32, dtype=torch.bool)
    pm[0, 5, 9] = True  # one pixel: token (1, 2) of the 8x8 grid (4x4 patches)
    tokens = mage.token_mask_from_pixels(pm, 8)
    assert tokens.shape == (2, 64) and tokens[0].nonzero().flatten().tolist() == [1 * 8 + 2] and not tokens[1].any()
    ring = mage.token_mask_from_pixels(pm[:, None].float(), 8, ring=1)[0].view(8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[0:3, 1:4] = True
    assert torch.equal(ring, expected)
    with pytest.raises(ValueError, match="divisible"):
        mage.token_mask_from_pixels(torch.zeros(1, 30, 30), 8)
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        mage.token_mask_from_pixels(torch.zeros(32, 32), 8)


def test_inpaint_keeps_every_unmasked_token(model):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pm = torch.zeros(3, 32, 32)
    pm[0, 8:16, 8:20] = 1
    pm[1, :, :12] = 1  # a different hole size per row: each row follows its own schedule
    out, tokens, token_mask = mage.inpaint(model, images, pm, ring=1, steps=6,
                                           generator=torch.Generator().manual_seed(0), return_tokens=True)
    encoded = model.vqgan.encode(images)
    assert torch.equal(tokens[~token_mask], encoded[~token_mask])
    assert token_mask.sum(1).tolist()[2] == 0 and torch.equal(tokens[2], encoded[2])
    assert not (tokens == model.config.mask_id).any() and out.shape == images.shape
    pasted = mage.inpaint(model, images, pm, steps=2, paste=True)
    hole = pm[:, None].expand_as(images) != 0
    assert torch.equal(pasted[~hole], images[~hole])


def test_inpaint_per_row_counts(model):
    c = model.config
    ids = torch.randint(0, 64, (3, L_TINY))
    token_mask = torch.zeros(3, L_TINY, dtype=torch.bool)
    token_mask[0, :40] = True
    token_mask[1, 10:20] = True
    token_mask[2, 60:63] = True  # fewer tokens than steps: the last one stays masked until the last step
    _, history = _record(model, torch.where(token_mask, c.mask_id, ids), 5, generator=torch.Generator().manual_seed(3))
    assert mage.mask_schedule(3, 5) == [2, 1, 1, 1, 0]
    for row, n0 in enumerate((40, 10, 3)):
        assert [(x[row] == c.mask_id).sum().item() for x in history] == mage.mask_schedule(n0, 5)
        assert torch.equal(history[-1][row][~token_mask[row]], ids[row][~token_mask[row]])


def test_outpainting_is_inpainting_outside(model):
    images = torch.rand(1, 3, 32, 32)
    keep = torch.zeros(1, 32, 32, dtype=torch.bool)
    keep[:, 8:24, 8:24] = True
    _, tokens, token_mask = mage.inpaint(model, images, ~keep, ring=0, steps=3, return_tokens=True)
    assert token_mask.view(8, 8)[2:6, 2:6].logical_not().all() and token_mask.sum() == 64 - 16
    assert torch.equal(tokens[~token_mask], model.vqgan.encode(images)[~token_mask])


def test_bad_sampler_inputs_raise_clear_errors(model):
    images = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mage.inpaint(model, images * 255, torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="must match images"):
        mage.inpaint(model, images, torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="steps"):
        mage.generate(model, 1, steps=0)
    with pytest.raises(ValueError, match="choice_temperature"):
        mage.generate(model, 1, choice_temperature=-1.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        mage.generate(model, 1, temperature=0.0)
    with pytest.raises(TypeError, match="mage.MAGE"):
        mage.generate(torch.nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match="cuda_graph"):
        mage.generate(model, 1, cuda_graph=True)


def test_cli_sample_and_inpaint(model, tmp_path):
    from PIL import Image

    ckpt = tmp_path / "tiny.safetensors"
    model.save(ckpt)
    grid = tmp_path / "grid.png"
    assert cli.main(["sample", "--checkpoint", str(ckpt), "--num", "3", "--out", str(grid), "--steps", "2",
                     "--batch-size", "2", "--nrow", "2", "--device", "cpu"]) == 0
    assert Image.open(grid).size == (2 + 2 * 34, 2 + 2 * 34)
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == ["000000.png", "000001.png", "000002.png"]

    Image.fromarray(np.full((40, 48, 3), 128, dtype=np.uint8)).save(tmp_path / "x.png")
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[10:20, 10:20] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = tmp_path / "y.png"
    assert cli.main(["inpaint", "--checkpoint", str(ckpt), "--image", str(tmp_path / "x.png"), "--mask",
                     str(tmp_path / "m.png"), "--out", str(out), "--steps", "2", "--paste", "--device", "cpu"]) == 0
    assert Image.open(out).size == (32, 32)
    with pytest.raises(SystemExit):
        cli.main(["sample"])  # --checkpoint is required


def test_cli_sample_refuses_an_images_dir_it_would_leave_mixed(model, tmp_path, capsys):
    # A run with a smaller --num overwrote 000000.png.. and left the earlier run's higher-numbered PNGs beside
    # them: `mage fid` on the folder counted both runs' samples.
    ckpt, images = tmp_path / "tiny.safetensors", tmp_path / "samples"
    model.save(ckpt)

    def sample(num: int, seed: int = 0) -> int:
        return cli.main(["sample", "--checkpoint", str(ckpt), "--num", str(num), "--steps", "2", "--seed", str(seed),
                         "--out", str(tmp_path / "samples.png"), "--device", "cpu"])  # the default folder: samples/

    assert sample(4) == 0
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    with pytest.raises(SystemExit) as info:
        sample(2, seed=1)
    err = capsys.readouterr().err
    assert info.value.code == 1 and "Traceback" not in err
    assert (f"--images-dir {images} (the default, --out without its extension) holds 2 sample PNGs numbered 2 and "
            f"above (000002.png to 000003.png), which this run (--num 2) would not overwrite") in err, err
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before, "the refused run wrote or deleted files"
    assert sample(4, seed=1) == 0 and sample(5) == 0  # a run that overwrites every PNG there leaves no mix
    assert sorted(p.name for p in images.iterdir()) == [f"{i:06d}.png" for i in range(5)]

    (images / "mage-eval.json").write_text("{}")  # a mage eval folder: eval would read these PNGs back as its own
    with pytest.raises(SystemExit) as info:
        sample(5)
    err = capsys.readouterr().err
    assert info.value.code == 1 and "is a mage eval folder" in err and "--images-dir" in err, err


def test_cli_inpaint_on_a_grey_model(tmp_path):
    """A one-channel model (the demo's Fashion-MNIST one) reads the image as grey: the demo's own
    inpaint_example.png and inpaint_mask.png, as the report's command passes them."""
    from PIL import Image

    tok = dataclasses.replace(mage.TokenizerConfig.tiny(resolution=28), in_channels=1)
    ckpt = tmp_path / "grey.safetensors"
    randomized(mage.MAGE(tiny_config(tokenizer=tok))).save(ckpt)
    Image.fromarray(np.full((28, 28), 200, dtype=np.uint8)).save(tmp_path / "x.png")
    mask = np.zeros((28, 28), dtype=np.uint8)
    mask[8:20, 8:20] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = tmp_path / "y.png"
    assert cli.main(["inpaint", "--checkpoint", str(ckpt), "--image", str(tmp_path / "x.png"), "--mask",
                     str(tmp_path / "m.png"), "--out", str(out), "--steps", "2", "--ring", "0", "--device", "cpu"]) == 0
    assert Image.open(out).size == (28, 28)


def test_one_step_compiles_whole(model):
    """No host sync and static shapes: a decoding step is one graph (the premise of CUDA-graph capture)."""
    c = model.config
    ids = torch.full((2, L_TINY), c.mask_id)
    ids[:, :5] = 3
    n0 = (ids == c.mask_id).sum(1)
    seed = mage_kernels.draw_seed("cpu", torch.Generator().manual_seed(0))
    step = torch.compile(mage.sample_step, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        sampled, new_ids = step(model, ids, n0, 1, 8, seed=seed)
        eager = mage.sample_step(model, ids, n0, 1, 8, seed=seed)
    assert torch.equal(sampled, eager[0]) and torch.equal(new_ids, eager[1])
    assert torch.equal(sampled[:, :5], ids[:, :5])
    expected = mage.sampler.remask_counts(ids, n0, 1, 8, c.mask_id)
    assert torch.equal((new_ids == c.mask_id).sum(1), expected) and expected.min() > 0


@requires_cuda
def test_cuda_sampling_is_sync_free_and_graph_capturable(model):
    m = mage.MAGE(tiny_config()).cuda().eval()
    m.load_state_dict(model.state_dict())
    ids = torch.full((4, L_TINY), m.config.mask_id, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        mage.decode_tokens(m, ids, steps=3, generator=gen)  # warm-up (lazy init may sync)
        torch.cuda.set_sync_debug_mode("error")
        try:
            tokens = mage.decode_tokens(m, ids, steps=3, generator=gen)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert not (tokens == m.config.mask_id).any()
    for dtype in (None, torch.bfloat16):
        images = mage.generate(m, 6, steps=3, batch_size=4, generator=gen, dtype=dtype, cuda_graph=True)
        assert images.shape == (6, 3, 32, 32) and torch.isfinite(images).all()
    a = mage.generate(m, 4, steps=3, generator=torch.Generator(device="cuda").manual_seed(1))
    b = mage.generate(m, 4, steps=3, generator=torch.Generator(device="cuda").manual_seed(1))
    assert torch.equal(a, b)
