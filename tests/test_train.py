"""The training loop (python/mage/train.py) and its losses on tiny configs: every objective learns, resume is
exact, damaged checkpoints fail clearly, 2-process DDP equals 1 process, masks follow the reference (4.4), and
the losses read masked positions only (4.7)."""

import dataclasses
import functools
import json
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

import mage_kernels
from mage import train as train_mod
from mage import InputError
from mage.checkpoint_io import CheckpointError, load_checkpoint, previous_path, save_checkpoint
from mage.losses import info_nce, masked_positions, masked_token_loss, patch_pixel_loss
from mage.model import mage_vit_tiny
from mage.train import TrainConfig, TrainModule, plan_masks, train

pytestmark = pytest.mark.filterwarnings("ignore:objective .* without tokenizer_checkpoint")

# 8x8 digits -> 4x4 tokens; a few thousand parameters each, so a step takes milliseconds.
TOKENIZER = dict(in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, embed_dim=8, n_embed=32, norm_groups=4)
MODEL = dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
             dropout=0.0)
MAE = dict(patch_size=2, in_channels=1, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
           decoder_num_heads=2)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are far too small to gain from a second thread, and on a shared, loaded machine every
    parallel region waits for a busy core: one thread is several times faster here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A VQGAN at that size: a 1-layer PatchGAN (2x2 patch logits on 8x8 images), its term from step 3 on, EMA.
VQGAN = dict(disc_weight=0.8, disc_start=3, disc_layers=1, disc_channels=8, ema_decay=0.9)


def tiny(out_dir, objective: str, **overrides) -> TrainConfig:
    fields = dict(objective=objective, out_dir=str(out_dir), data="digits", image_size=8, steps=24, batch_size=32,
                  lr=3e-3, warmup_steps=2, max_warmup_fraction=1.0, log_every=1, ckpt_every=10**6, progress=False,
                  seed=0)
    # Only the model settings the objective reads (the others would be errors: they would be ignored).
    models = dict(tokenizer=dict(tokenizer=TOKENIZER), mae=dict(mae=MAE))
    fields.update(models.get(objective, dict(tokenizer=TOKENIZER, model_overrides=MODEL)))
    return TrainConfig(**{**fields, **overrides})


def logged(out_dir, key: str = "loss") -> dict[int, float]:
    """{step: value} of the metrics.jsonl records that have `key`."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


# ------------------------------------------------------------------------------------ learning


@pytest.mark.parametrize("objective", ["tokenizer", "mage", "mage-c", "mae"])
def test_objective_decreases_its_loss(tmp_path, objective):
    train(tiny(tmp_path, objective))
    losses = list(logged(tmp_path).values())
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    early, late = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert late < 0.95 * early, (early, late)
    final = {"tokenizer": "tokenizer.safetensors", "mage": "model.safetensors", "mage-c": "model.safetensors",
             "mae": "mae.pt"}[objective]
    for name in (final, "checkpoint.pt", "curves.png", "config.json"):
        assert (tmp_path / name).is_file(), name


def test_mage_takes_channels_and_size_from_the_tokenizer_checkpoint(tmp_path):
    from mage.checkpoint import load
    from mage.tokenizer_io import load_tokenizer

    train(tiny(tmp_path / "tok", "tokenizer", steps=2))
    path = tmp_path / "tok" / "tokenizer.safetensors"
    # No tokenizer fields and the default image_size (32): the 1-channel 8x8 tokenizer decides.
    train(TrainConfig(objective="mage-c", data="digits", tokenizer_checkpoint=str(path), model_overrides=MODEL,
                      steps=2, batch_size=8, out_dir=str(tmp_path / "mage"), progress=False))
    model = load(tmp_path / "mage" / "model.safetensors")
    tok = load_tokenizer(path)
    assert model.config.tokenizer.resolution == 8 and model.config.tokenizer.in_channels == 1
    for k, v in tok.state_dict().items():
        assert torch.equal(model.vqgan.state_dict()[k], v), k


def test_tokenizer_settings_beside_a_tokenizer_checkpoint_must_be_the_files(tmp_path):
    # They were ignored without a word: the tokenizer (and the image size) come from the file.
    train(tiny(tmp_path / "tok", "tokenizer", steps=1))
    path = str(tmp_path / "tok" / "tokenizer.safetensors")
    run = dict(objective="mage", data="digits", tokenizer_checkpoint=path, model_overrides=MODEL, steps=1,
               batch_size=8, out_dir=str(tmp_path / "mage"), progress=False)
    with pytest.raises(ValueError, match=r"TrainConfig.tokenizer: the tokenizer comes from tokenizer_checkpoint "
                                         r".*: n_embed=64 \(the file's: 32\), stride=2 \(the file's: no such field\)"):
        train(TrainConfig(**run, tokenizer={**TOKENIZER, "n_embed": 64, "stride": 2}))
    with pytest.raises(ValueError, match=r"TrainConfig.image_size: .* 8x8; leave image_size unset or give 8, got 16"):
        train(TrainConfig(**run, image_size=16))
    assert not (tmp_path / "mage").exists()
    train(TrainConfig(**run, tokenizer=TOKENIZER, image_size=8))  # the file's own settings are fine


# ------------------------------------------------------------------------------------ resume


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("objective", ["mage", "tokenizer", "vqgan"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, objective):
    # Dropout on (global RNG, restored from the checkpoint); tokenizer restarts straddle the checkpoint, so
    # the codebook usage counted before it must come back too. VQGAN: the discriminator (its weights, Adam
    # state) and the EMA straddle it as well.
    over = dict(steps=8, ckpt_every=4, tokenizer={**TOKENIZER, "n_embed": 64})
    if objective == "mage":
        over["model_overrides"] = {**MODEL, "dropout": 0.1}
    else:  # the tokenizer's (MAGE would ignore it: an error)
        over["codebook_restart_every"] = 3
    if objective == "vqgan":
        objective, over = "tokenizer", {**over, **VQGAN}
    train(tiny(tmp_path / "full", objective, **over))
    full = logged(tmp_path / "full")

    real = train_mod.plan_masks

    def killed_at_step_6(cfg, step, *args):
        if step == 6:
            raise Interrupt
        return real(cfg, step, *args)

    monkeypatch.setattr(train_mod, "plan_masks", killed_at_step_6)
    with pytest.raises(Interrupt):
        train(tiny(tmp_path / "cut", objective, **over))
    assert list(logged(tmp_path / "cut")) == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 4

    monkeypatch.setattr(train_mod, "plan_masks", real)
    train(tiny(tmp_path / "cut", objective, resume=True, **over))
    resumed = logged(tmp_path / "cut")
    assert list(resumed) == list(range(1, 9))
    assert resumed == full  # bitwise: same losses before and after the checkpoint
    if objective == "tokenizer":
        assert logged(tmp_path / "cut", "restarted") == logged(tmp_path / "full", "restarted")
        assert logged(tmp_path / "full", "restarted")[6] > 0
    if "disc_weight" in over:
        assert logged(tmp_path / "cut", "disc") == logged(tmp_path / "full", "disc")
        assert list(logged(tmp_path / "full", "disc_weight")) == [4, 5, 6, 7, 8]
        a, b = (load_checkpoint(tmp_path / run / "checkpoint.pt")["extra"] for run in ("full", "cut"))
        for part in ("discriminator", "ema"):
            torch.testing.assert_close(b[part], a[part], rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_a_clear_error_and_prev_is_intact(tmp_path, damage):
    cfg = tiny(tmp_path, "mae", steps=4, ckpt_every=2)
    train(cfg)
    ckpt, prev = tmp_path / "checkpoint.pt", previous_path(tmp_path / "checkpoint.pt")
    prev_bytes = prev.read_bytes()
    data = bytearray(ckpt.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    word = "truncated" if damage == "truncate" else "corrupted"
    with pytest.raises(CheckpointError, match=f"{word}.*intact at .*checkpoint.pt.prev"):
        train(tiny(tmp_path, "mae", steps=6, ckpt_every=2, resume=True))
    assert prev.read_bytes() == prev_bytes
    assert load_checkpoint(prev)["step"] == 2
    # Following the message's advice continues the run (here also longer than planned, which must be asked for).
    os.replace(prev, ckpt)
    train(tiny(tmp_path, "mae", steps=6, ckpt_every=2, resume=True, resume_with_changes=True))
    assert list(logged(tmp_path)) == list(range(1, 7))


# ------------------------------------------------------------------------------------ DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_CASES = {
    # MAGE-C: masked-token CE plus InfoNCE whose negatives come from the other rank.
    "mage-c": dict(steps=5),
    # Tokenizer: codebook usage summed over ranks, a dead-code restart from the global batch at step 3.
    "tokenizer": dict(steps=5, codebook_restart_every=3, tokenizer={**TOKENIZER, "n_embed": 64}),
    # VQGAN with 2 micro-batches per step: the adaptive weight from the gradients of the global batch, the
    # discriminator's own DDP step, EMA.
    "vqgan": dict(steps=5, objective="tokenizer", accum_steps=2, tokenizer={**TOKENIZER, "n_embed": 64}, **VQGAN),
}


def assert_same_weights(a: dict, b: dict, what: str) -> None:
    """Two runs' weights agree up to float summation order."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.qkv.bias"):
            # The key bias adds the same amount to every score of a query, which softmax ignores: its true
            # gradient is 0, and Adam scales the rounding noise there up to steps of size ~lr.
            x, y = x.chunk(3)[::2], y.chunk(3)[::2]
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{what} {k}: {m}")


def _ddp_worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        for case, over in DDP_CASES.items():
            train(tiny(os.path.join(root, f"{case}-ddp"), **{"objective": case, **over}))
        # Evaluation statistics merged across the processes (mage eval under torchrun).
        from mage.metrics import FeatureStats, ScoreStats

        x = _stats_inputs()
        stats = FeatureStats().update(x[rank::world]).all_reduce()
        scores = ScoreStats(5, splits=2, total=10).update(x[rank * 5:(rank + 1) * 5].softmax(1), rank * 5).all_reduce()
        torch.save({"mu": stats.mu, "sigma": stats.sigma, "n": stats.n, "is": scores.compute()},
                   os.path.join(root, f"stats{rank}.pt"))
        train_mod.finish_distributed()  # without it, exiting right after the all_reduce aborted 1 run in 6
    finally:
        if torch.distributed.is_initialized():  # an error: no barrier, the other rank may never get there
            torch.distributed.destroy_process_group()


def _stats_inputs() -> torch.Tensor:
    return torch.randn(10, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _final_state(out_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(os.path.join(out_dir, "checkpoint.pt"))["model"]


def test_ddp_two_processes_match_one(tmp_path):
    for case, over in DDP_CASES.items():
        train(tiny(tmp_path / f"{case}-one", **{"objective": case, **over}))
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for case in DDP_CASES:
        keys = ("loss", "disc", "disc_weight") if case == "vqgan" else ("loss",)
        for key in keys:
            one, two = logged(tmp_path / f"{case}-one", key), logged(tmp_path / f"{case}-ddp", key)
            assert list(one) == list(two) and list(one)[-1] == 5
            torch.testing.assert_close(torch.tensor(list(two.values())), torch.tensor(list(one.values())),
                                       rtol=1e-5, atol=1e-5)
        a, b = _final_state(tmp_path / f"{case}-one"), _final_state(tmp_path / f"{case}-ddp")
        if case == "vqgan":
            extras = [load_checkpoint(tmp_path / f"{case}-{n}" / "checkpoint.pt")["extra"] for n in ("one", "ddp")]
            for part, key in (("discriminator", "model"), ("ema", "shadow")):
                a.update({f"{part}.{k}": v for k, v in extras[0][part][key].items()})
                b.update({f"{part}.{k}": v for k, v in extras[1][part][key].items()})
        assert_same_weights(a, b, case)
    assert logged(tmp_path / "tokenizer-ddp", "restarted")[3] > 0
    assert list(logged(tmp_path / "vqgan-ddp", "disc")) == [4, 5]
    from mage.metrics import ScoreStats, feature_statistics

    x = _stats_inputs()
    mu, sigma = feature_statistics(x)
    expected_is = ScoreStats(5, splits=2, total=10).update(x.softmax(1), 0).compute()
    for rank in range(2):
        got = torch.load(tmp_path / f"stats{rank}.pt")
        assert got["n"] == 10
        torch.testing.assert_close(got["mu"], mu)
        torch.testing.assert_close(got["sigma"], sigma)
        assert got["is"] == pytest.approx(expected_is, rel=1e-12)


# ------------------------------------------------------------------------------------ loop features


def _weights(out_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(os.path.join(out_dir, "checkpoint.pt"))["model"]


@pytest.mark.parametrize("case", ["mage", "mage-per-sample", "vqgan"])
def test_gradient_accumulation_is_the_large_batch_step(tmp_path, case):
    """4 micro-batches of 8 give the step of one batch of 32: same losses and weights up to summation order. For
    VQGAN the adaptive weight comes from the whole batch's gradients and the discriminator steps once; with a
    mask ratio per image each micro-batch takes its rows' counts."""
    objective, over = {"mage": ("mage", {}), "mage-per-sample": ("mage", dict(mask_ratio_per_sample=True)),
                       "vqgan": ("tokenizer", dict(VQGAN, disc_start=1))}[case]
    big = tiny(tmp_path / "big", objective, steps=4, **over)
    train(big)
    train(dataclasses.replace(big, out_dir=str(tmp_path / "acc"), accum_steps=4))
    keys = ("loss", "disc", "disc_weight") if case == "vqgan" else ("loss",)
    for key in keys:
        one, four = logged(tmp_path / "big", key), logged(tmp_path / "acc", key)
        assert list(one) == list(four) and one
        torch.testing.assert_close(torch.tensor(list(four.values())), torch.tensor(list(one.values())),
                                   rtol=1e-5, atol=1e-6)
    assert_same_weights(_weights(tmp_path / "big"), _weights(tmp_path / "acc"), case)
    with pytest.raises(ValueError, match="divisible by accum_steps 5"):
        train(dataclasses.replace(big, out_dir=str(tmp_path / "bad"), accum_steps=5))


def test_grad_checkpointing_gives_the_same_run(tmp_path):
    over = dict(steps=3, model_overrides={**MODEL, "dropout": 0.1})  # checkpointing replays dropout's RNG
    train(tiny(tmp_path / "plain", "mage", **over))
    train(tiny(tmp_path / "ckpt", "mage", grad_checkpointing=True, **over))
    assert logged(tmp_path / "ckpt") == logged(tmp_path / "plain")
    model = mage_vit_tiny(tokenizer={**TOKENIZER, "resolution": 8}, **MODEL)
    from mage.model import Block

    assert train_mod.enable_grad_checkpointing(model, Block) == MODEL["depth"] + MODEL["decoder_depth"]
    assert isinstance(model.blocks[0].forward, functools.partial)


def test_compiled_step_matches_eager(tmp_path):
    # aot_eager traces the whole objective (fullgraph: our ops never break the graph) and its backward
    # without generating code; inductor's C++ build takes minutes on a CPU. A fixed mask count (12 of 16) keeps
    # it to one trace; step 2's loss reads the weights the compiled backward updated.
    over = dict(steps=2, mask_ratio_min=0.70, mask_ratio_max=0.71)
    train(tiny(tmp_path / "eager", "mage", **over))
    train(tiny(tmp_path / "compiled", "mage", compile=True, compile_backend="aot_eager", **over))
    one, two = logged(tmp_path / "eager"), logged(tmp_path / "compiled")
    torch.testing.assert_close(torch.tensor(list(two.values())), torch.tensor(list(one.values())), rtol=1e-5, atol=1e-5)


def test_warmup_is_capped_to_a_fraction_of_the_run(tmp_path):
    assert TrainConfig(steps=20).warmup == 2 and TrainConfig(steps=10**6).warmup == 100
    assert TrainConfig(steps=20, max_warmup_fraction=1.0).warmup == 20
    train(tiny(tmp_path, "mae", steps=20, warmup_steps=100, max_warmup_fraction=0.1, lr=1e-3))
    lr = logged(tmp_path, "lr")
    assert lr[1] == 0.0 and lr[2] == 5e-4 and lr[3] == 1e-3  # the peak at step 3 of 20, then the cosine
    assert all(lr[i] > lr[i + 1] for i in range(3, 20))


def test_ema_weights_are_the_final_weights_and_sample_grids(tmp_path):
    from mage.checkpoint import load

    train(tiny(tmp_path, "mage", steps=3, ema_decay=0.5, sample_every=3))
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    final = load(tmp_path / "model.safetensors").state_dict()
    assert state["extra"]["ema"]["updates"] == 3
    for k, v in state["extra"]["ema"]["shadow"].items():
        assert torch.equal(final[k], v), k
    assert not torch.equal(final["blocks.0.mlp.fc1.weight"], state["model"]["model.blocks.0.mlp.fc1.weight"])
    assert (tmp_path / "samples" / "step0000003.png").is_file()


def test_tensorboard_logs_the_jsonl_scalars(tmp_path, monkeypatch):
    import sys
    import types

    scalars = []

    class FakeWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step, value))

        def flush(self):
            pass

        def close(self):
            scalars.append(("closed", None, None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    train(tiny(tmp_path, "mae", steps=2, tensorboard=True))
    losses = {step: value for tag, step, value in scalars if tag == "loss"}
    assert losses == logged(tmp_path) and ("lr", 2, logged(tmp_path, "lr")[2]) in scalars
    assert scalars[-1][0] == "closed"
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    with pytest.raises(ImportError, match="pip install tensorboard") as info:
        train(tiny(tmp_path / "none", "mae", steps=1, tensorboard=True))
    assert not (tmp_path / "none").exists()  # it failed before out_dir changed (it wrote config.json, a log)
    assert isinstance(info.value, InputError)  # the CLI prints it as one line, not a traceback


def test_train_on_a_flat_webp_folder(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    (tmp_path / "images").mkdir()
    for i in range(12):
        arr = torch.randint(0, 256, (10 + i, 9, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(arr, "RGB").save(tmp_path / "images" / f"{i:02d}.webp")
    train(tiny(tmp_path / "run", "tokenizer", data=str(tmp_path / "images"), tokenizer={**TOKENIZER, "in_channels": 3},
               steps=2, batch_size=4))
    assert list(logged(tmp_path / "run")) == [1, 2]


def test_cli_cache_then_train_from_the_cache(tmp_path, capsys, monkeypatch):
    from mage.cli import main

    train(tiny(tmp_path / "tok", "tokenizer", steps=1))
    tok = str(tmp_path / "tok" / "tokenizer.safetensors")
    assert main(["cache", "--tokenizer-checkpoint", tok, "--data", "digits", "--out", str(tmp_path / "ids.ckpt"),
                 "--crops", "2", "--batch-size", "512"]) == 0
    blob = load_checkpoint(tmp_path / "ids.ckpt")
    assert blob["ids"].shape == (1437, 2, 16) and blob["labels"].shape == (1437,)
    assert "1437 images x 2 crops" in capsys.readouterr().out
    train(tiny(tmp_path / "mage", "mage-c", steps=2, tokenizer_checkpoint=tok, token_cache=str(tmp_path / "ids.ckpt")))
    assert list(logged(tmp_path / "mage")) == [1, 2]
    # The crops' scale is the cache's (--crop-scale of mage cache; the training's has no effect with a cache).
    scales = []
    real = train_mod.build_token_cache

    def spy(tokenizer, dataset, *args, **kwargs):
        scales.append(dataset.transform.transforms[0].scale)
        return real(tokenizer, dataset, *args, **kwargs)

    monkeypatch.setattr(train_mod, "build_token_cache", spy)
    for extra, scale in (([], (0.2, 1.0)), (["--crop-scale", "0.5", "0.9"], (0.5, 0.9))):
        assert main(["cache", "--tokenizer-checkpoint", tok, "--data", "digits", "--out", str(tmp_path / "b.ckpt"),
                     "--batch-size", "512", *extra]) == 0
        assert scales.pop() == scale
    # An RGB image folder for the 1-channel tokenizer: the error names the flag, not TrainConfig's field alone.
    (tmp_path / "rgb" / "cls").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "rgb" / "cls" / "a.png")
    with pytest.raises(SystemExit):
        main(["cache", "--tokenizer-checkpoint", tok, "--data", str(tmp_path / "rgb"), "--out", str(tmp_path / "c")])
    assert f"error: --data: TrainConfig.data {tmp_path / 'rgb'}: image folders are read as RGB" in \
        capsys.readouterr().err


def test_a_token_cache_is_checked_against_the_data_and_tokenizer_given(tmp_path, capsys):
    # --data beside --token-cache was ignored: the run trained on the cache's images, whatever --data named. So was
    # a --tokenizer-checkpoint other than the one that made the ids, when it had the same sizes.
    from mage.cli import main

    train(tiny(tmp_path / "tok", "tokenizer", steps=1))
    train(tiny(tmp_path / "other", "tokenizer", steps=1, seed=1))  # the same sizes, other weights
    tok, other = (str(tmp_path / name / "tokenizer.safetensors") for name in ("tok", "other"))
    cache = str(tmp_path / "ids.ckpt")
    assert main(["cache", "--tokenizer-checkpoint", tok, "--data", "digits", "--out", cache, "--crops", "1",
                 "--batch-size", "512"]) == 0
    assert load_checkpoint(cache)["source"]["data"] == "digits"
    (tmp_path / "images" / "a").mkdir(parents=True)
    run = ["train", "--objective", "mage", "--token-cache", cache, "--steps", "1", "--batch-size", "8", "--no-progress",
           "--model-overrides", json.dumps(MODEL)]

    def error(*flags) -> str:
        with pytest.raises(SystemExit) as info:
            main([*run, *flags, "--out-dir", str(tmp_path / "refused")])
        err = capsys.readouterr().err
        assert info.value.code == 1 and len(err.splitlines()) == 1 and not (tmp_path / "refused").exists(), err
        return err

    assert (f"--data: TrainConfig.data {tmp_path / 'images'} is not the data set token_cache {cache} was built from "
            "(digits)") in error("--tokenizer-checkpoint", tok, "--data", str(tmp_path / "images"))
    assert (f"--token-cache: TrainConfig.token_cache {cache} was made by another tokenizer than the model's "
            f"(tokenizer_checkpoint {other})") in error("--tokenizer-checkpoint", other, "--data", "digits")
    assert (f"--data: TrainConfig.data fashion-mnist (the default) is not the data set token_cache {cache} was built "
            "from (digits)") in error("--tokenizer-checkpoint", tok)
    assert main([*run, "--tokenizer-checkpoint", tok, "--data", "digits", "--out-dir", str(tmp_path / "ok")]) == 0
    # A cache of an earlier release records nothing: it still trains, but not with a --data it cannot check.
    blob = load_checkpoint(cache)
    save_checkpoint({"ids": blob["ids"], "labels": blob["labels"]}, cache)
    assert "does not record the data set it was built from" in error("--tokenizer-checkpoint", tok, "--data", "digits")
    assert main([*run, "--tokenizer-checkpoint", other, "--out-dir", str(tmp_path / "old")]) == 0


# ------------------------------------------------------------------------------------ masking


def test_training_masks_follow_the_truncated_normal():
    """Ratio ~ N(0.55, 0.25) truncated to [0.5, 1]: mean 0.694, std 0.129 (docs/REFERENCE.md 4.4); one ratio
    per step for the global batch; dropped = ceil(0.5 L) always; steps and seeds give different masks."""
    cfg, L, steps = TrainConfig(batch_size=4), 256, 4000
    plans = [plan_masks(cfg, s, L, torch.arange(4), "cpu") for s in range(steps)]
    ratios = torch.tensor([p["num_masked"] / L for p in plans], dtype=torch.float64)
    assert all(p["num_dropped"] == 128 for p in plans)
    assert ratios.min() >= 0.5 and ratios.max() <= 1.0
    # ceil(L r) adds 0.5 / L on average.
    assert abs(ratios.mean().item() - 0.694 - 0.5 / L) < 5 * 0.129 / math.sqrt(steps)
    assert abs(ratios.std().item() - 0.129) < 0.01
    assert abs(ratios.median().item() - 0.676) < 0.01
    assert not torch.equal(plans[0]["noise"], plans[1]["noise"])
    other_seed = plan_masks(TrainConfig(batch_size=4, seed=1), 0, L, torch.arange(4), "cpu")
    assert not torch.equal(plans[0]["noise"], other_seed["noise"])


@pytest.mark.parametrize("per_sample", [False, True])
def test_a_rank_sees_its_rows_of_the_global_plan(per_sample):
    cfg = TrainConfig(objective="mage-c", batch_size=6, mask_ratio_per_sample=per_sample)
    whole = plan_masks(cfg, 3, 16, torch.arange(6), "cpu")
    for rank in range(2):
        part = plan_masks(cfg, 3, 16, torch.arange(3) * 2 + rank, "cpu")
        if per_sample:
            assert torch.equal(part["num_masked"], whole["num_masked"][rank::2])
        else:
            assert part["num_masked"] == whole["num_masked"]
        assert torch.equal(part["noise"], whole["noise"][:, rank::2])
    assert whole["noise"].shape == (2, 6, 16)
    if per_sample:  # one ratio per image, within [min, max]: counts in [8, 16], not all equal
        counts = torch.cat([plan_masks(cfg, s, 16, torch.arange(6), "cpu")["num_masked"] for s in range(4)])
        assert counts.shape == (24,) and 8 <= int(counts.min()) and int(counts.max()) <= 16
        assert len(counts.unique()) > 1


def test_mage_loss_with_a_mask_count_per_row_is_the_mean_of_the_rows_losses():
    module, ids, plan = _mage_step_inputs()
    counts = torch.tensor([9, 11, 16, 12])
    per_row = module(ids, {**plan, "num_masked": counts})[0]
    rows = [module(ids[b : b + 1], {**plan, "noise": plan["noise"][:, b : b + 1], "num_masked": int(counts[b])})[0]
            for b in range(4)]
    torch.testing.assert_close(per_row, torch.stack(rows).mean())
    # Equal counts in every row give the reference's loss (a mean over all masked tokens).
    torch.testing.assert_close(module(ids, {**plan, "num_masked": torch.full((4,), 11)})[0], module(ids, plan)[0])


def test_masked_positions_are_the_masked_tokens_in_order():
    g = torch.Generator().manual_seed(0)
    masked, _, _ = mage_kernels.mask_plan(torch.rand(5, 37, generator=g), 20, 13)
    pos = masked_positions(masked, 20)
    expected = torch.stack([row.nonzero().flatten() for row in masked])
    assert torch.equal(pos, expected)


# ------------------------------------------------------------------------------------ losses


def _mage_step_inputs():
    torch.manual_seed(0)
    model = mage_vit_tiny(tokenizer={**TOKENIZER, "resolution": 8}, **MODEL)
    module = TrainModule(tiny(".", "mage"), model)
    ids = torch.randint(TOKENIZER["n_embed"], (4, 1, 16))
    plan = plan_masks(module.cfg, 0, 16, torch.arange(4), "cpu")
    plan["num_masked"], plan["num_dropped"] = 11, 8
    return module, ids, plan


def test_mage_loss_reads_masked_positions_only():
    module, ids, plan = _mage_step_inputs()
    masked, _, _ = mage_kernels.mask_plan(plan["noise"][0], 11, 8)
    base = module(ids, plan)[0]

    def perturbed(where):
        handle = module.model.mlm_layer.register_forward_hook(
            lambda m, inp, out: out + 5.0 * torch.cat([torch.zeros_like(where[:, :1]), where], 1)[..., None])
        try:
            return module(ids, plan)[0]
        finally:
            handle.remove()

    # The head output at visible tokens and at the class slot does not enter the loss ...
    assert torch.equal(perturbed(~masked), base)
    # ... while the masked ones (dropped or kept alike) do.
    assert not torch.allclose(perturbed(masked), base)
    # And the value is the label-smoothed CE over the codebook columns of the masked tokens (4.7).
    logits = module.model(ids[:, 0], masked, keep_idx=mage_kernels.mask_plan(plan["noise"][0], 11, 8)[2])[:, 1:]
    k = TOKENIZER["n_embed"]
    expected = F.cross_entropy(logits[masked][:, :k], ids[:, 0][masked], label_smoothing=0.1)
    torch.testing.assert_close(base, expected)


def test_masked_token_loss_ignores_targets_of_visible_tokens():
    torch.manual_seed(1)
    hidden, weight, bias = torch.randn(3, 9, 8), torch.randn(12, 8), torch.randn(12)
    targets = torch.randint(10, (3, 9))
    masked, _, _ = mage_kernels.mask_plan(torch.rand(3, 9), 5, 2)
    pos = masked_positions(masked, 5)
    loss = masked_token_loss(hidden, weight, bias, targets, pos, 10)
    other = torch.where(masked, targets, (targets + 3) % 10)
    assert torch.equal(masked_token_loss(hidden, weight, bias, other, pos, 10), loss)
    # Only the first `codebook_size` columns are classes: the extra rows of the weight never matter.
    w2 = weight.clone()
    w2[10:] = 100.0
    assert torch.equal(masked_token_loss(hidden, w2, bias, targets, pos, 10), loss)


def test_mae_loss_reads_masked_patches_only():
    torch.manual_seed(2)
    pred, target = torch.randn(2, 16, 4), torch.randn(2, 16, 4)
    masked, _, _ = mage_kernels.mask_plan(torch.rand(2, 16), 12, 12)
    pos = masked_positions(masked, 12)
    loss = patch_pixel_loss(pred, target, pos, norm_pix=True)
    assert torch.equal(patch_pixel_loss(torch.where(masked[..., None], pred, 7.0), target, pos), loss)
    t = target[masked]
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(loss, F.mse_loss(pred[masked], t))


def test_info_nce_matches_nt_xent_written_out():
    torch.manual_seed(3)
    a, b, tau = torch.randn(5, 7), torch.randn(5, 7), 0.2
    z = F.normalize(torch.cat([a, b]), dim=1)
    n, terms = 5, []
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        sims = torch.stack([z[i] @ z[j] / tau for j in range(2 * n) if j != i])
        pos = z[i] @ z[partner] / tau
        terms.append(torch.logsumexp(sims, 0) - pos)
    torch.testing.assert_close(info_nce(a, b, tau), torch.stack(terms).mean())


# ------------------------------------------------------------------------------------ command line


def _cli_flags(out_dir, steps: int) -> list[str]:
    return ["train", "--objective", "mage", "--data", "digits", "--image-size", "8", "--tokenizer",
            json.dumps(TOKENIZER), "--model-overrides", json.dumps(MODEL), "--steps", str(steps), "--batch-size",
            "16", "--lr", "1e-3", "--warmup-steps", "1", "--log-every", "1", "--ckpt-every", "2", "--no-progress",
            "--out-dir", str(out_dir)]


def test_cli_train_flags_reach_the_config(tmp_path, capsys):
    from mage.cli import main

    assert main(_cli_flags(tmp_path, 2) + ["--betas", "0.9", "0.99", "--amp", "bf16"]) == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["tokenizer"] == {**TOKENIZER, "ch_mult": [1, 2]} and cfg["model_overrides"] == MODEL
    assert cfg["betas"] == [0.9, 0.99] and cfg["amp"] == "bf16" and cfg["progress"] is False
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    # A run's config.json replays it; flags override it; --resume continues (a longer run changes the LR
    # schedule, so it must be asked for).
    with pytest.raises(SystemExit):
        main(["train", "--config", str(tmp_path / "config.json"), "--steps", "4", "--resume"])
    err = capsys.readouterr().err
    assert "steps: 2 -> 4" in err and err.startswith("mage train: error: cannot resume from")  # was led by a flag:
    # "--resume-with-changes: cannot resume ...", after the first field the message mentioned
    assert main(["train", "--config", str(tmp_path / "config.json"), "--steps", "4", "--resume",
                 "--resume-with-changes"]) == 0
    assert list(logged(tmp_path)) == [1, 2, 3, 4]
    with pytest.raises(SystemExit):
        main(["train", "--objective", "bert"])


def test_a_run_that_fails_on_its_settings_leaves_the_run_folder_as_it_was(tmp_path, capsys):
    # config.json was written before the model was built, so a resume whose settings failed (a bad
    # --model-overrides, a data set smaller than the batch) replaced the good run's config.json.
    from mage.cli import main

    cfg = tiny(tmp_path, "mage", steps=2)
    train(cfg)
    files = {name: (tmp_path / name).read_bytes() for name in ("config.json", "metrics.jsonl", "checkpoint.pt")}
    changed = dict(resume=True, resume_with_changes=True)
    with pytest.raises(ValueError, match="TrainConfig.batch_size 4096 is larger than the data set"):
        train(dataclasses.replace(cfg, batch_size=4096, **changed))
    with pytest.raises(SystemExit):
        main(["train", "--config", str(tmp_path / "config.json"), "--resume", "--resume-with-changes",
              "--model-overrides", json.dumps({**MODEL, "depth": 0})])
    assert "--model-overrides: TrainConfig.model_overrides: MAGEConfig: depth" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_bytes() for name in files} == files


def test_a_bug_while_building_the_model_is_not_reported_as_bad_settings(tmp_path, monkeypatch):
    # Every TypeError / ValueError raised while the model was built came out as "TrainConfig.model_overrides:
    # ...", a user error. Configs are now checked first; what the model's code raises keeps its own message.
    def broken(self, *args, **kwargs):
        raise TypeError("a bug in Block.__init__")

    cfg = tiny(tmp_path, "mage", steps=1)
    monkeypatch.setattr(train_mod.Block, "__init__", broken)
    with pytest.raises(TypeError) as info:
        train(cfg)
    assert str(info.value) == "a bug in Block.__init__"
    assert not (tmp_path / "config.json").exists()


def test_cli_keeps_the_traceback_of_a_bug(tmp_path, monkeypatch):
    # The CLI printed every TypeError / ValueError / OSError as "mage train: error: <message>", a user error,
    # bugs included. Only our checks' InputError (and OSError) are; anything else propagates.
    from mage.cli import main

    def broken(self, *args, **kwargs):
        raise TypeError("a bug in Block.__init__")

    monkeypatch.setattr(train_mod.Block, "__init__", broken)
    with pytest.raises(TypeError, match="a bug in Block.__init__"):
        main(_cli_flags(tmp_path, 1))


def test_every_cli_flag_reaches_mage_under_torchrun():
    """torchrun's parser reads the whole command line, `-m mage.cli <command> ...` included, and stops on a flag
    of ours that abbreviates two of its own (--num: --numa-binding / --numa_binding). Every flag of every command
    must pass through it, or have an alias for the same setting that does (--num-images)."""
    import argparse
    import contextlib
    import io

    from torch.distributed.run import get_args_parser

    from mage.cli import build_parser

    def passes(command: str, flag: str) -> bool:
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                args = get_args_parser().parse_args(["-m", "mage.cli", command, flag, "1"])
            except SystemExit:
                return False
        return args.training_script_args == [command, flag, "1"]

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    blocked = []
    for command, parser in commands.items():
        for action in parser._actions:
            flags = [f for f in action.option_strings if f not in ("-h", "--help")]
            if flags and not any(passes(command, f) for f in flags):
                blocked.append(f"{command} {'/'.join(flags)}")
    assert not blocked
    assert not passes("eval", "--num") and passes("eval", "--num-images")  # the case that made the alias


def test_cli_train_under_torchrun(tmp_path):
    import subprocess
    import sys

    import mage

    # The launched processes import mage and mage_kernels from where this process found them.
    roots = [os.path.dirname(os.path.dirname(m.__file__)) for m in (mage, mage_kernels)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(roots + [os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "mage.cli"] + _cli_flags(tmp_path / "two", 2)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    from mage.cli import main

    assert main(_cli_flags(tmp_path / "one", 2)) == 0
    one, two = logged(tmp_path / "one"), logged(tmp_path / "two")
    assert list(two) == [1, 2]
    torch.testing.assert_close(torch.tensor(list(two.values())), torch.tensor(list(one.values())))


def test_crop_scale_reaches_the_augmentation():
    """TrainConfig.crop_scale is the random resized crop's area range of every objective that reads images."""
    for objective, views in (("tokenizer", lambda t: t), ("mae", lambda t: t), ("mage-c", lambda t: t.transform)):
        ds = train_mod.make_dataset(TrainConfig(objective=objective, data="digits", crop_scale=(0.8, 1.0)), 1, 8)
        assert views(ds.transform).transforms[0].scale == (0.8, 1.0), objective
    reference = train_mod.make_dataset(TrainConfig(objective="tokenizer", data="digits"), 1, 8)
    assert reference.transform.transforms[0].scale == (0.2, 1.0)  # the reference's (4.10)


# ------------------------------------------------------------------------------------ demo


def test_demo_quick_writes_its_report(tmp_path):
    """The CI-sized demo end to end (about 1-2 minutes on 2 cores): every file the report links exists."""
    import re

    from mage.demo import DemoConfig, run_demo, summary

    report = run_demo(DemoConfig.quick(str(tmp_path)))
    pictures = ("samples.png", "inpainting.png", "tokenizer_reconstructions.png", "shuffled_token_baseline.png",
                "test_images.png", "mage/curves.png", "tokenizer/curves.png", "inpaint_example.png", "inpaint_mask.png")
    for name in (*pictures, "report.json", "index.html"):
        assert (tmp_path / name).is_file(), name
    html = (tmp_path / "index.html").read_text()
    linked = set(re.findall(r'src="([^"]+)"', html))
    assert set(pictures) <= linked
    assert all((tmp_path / f).is_file() for f in linked)
    assert set(report["cpu_times_s"]) == set(report["times_s"]) and report["times_s"]["total_s"] > 0
    assert 0.5 < report["classifier"]["test_accuracy"] <= 1
    assert json.loads((tmp_path / "report.json").read_text())["linear_probe_top1"] == report["linear_probe_top1"]
    assert all(0.1 < v <= 1 for v in report["linear_probe_top1"].values())  # all beat chance (10 classes)
    gen = report["generation"]
    assert gen["tokenizer_reconstructions"]["frechet_distance"] < gen["shuffled_tokens"]["frechet_distance"]
    assert "linear probe" in summary(report)


def test_demo_probe_features_pool_the_encoder_tokens():
    from mage.demo import probe_features
    from mage.tokenizer import TokenizerConfig

    tok = TokenizerConfig(resolution=28, in_channels=1, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, embed_dim=8,
                          n_embed=16, norm_groups=4)
    model = mage_vit_tiny(tokenizer=tok, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                          decoder_num_heads=2).eval()
    ids = torch.randint(0, 16, (3, 49), generator=torch.Generator().manual_seed(0))
    f = probe_features(model, ids, grid=3)
    assert f["grid"].shape == (3, 9 * 32)
    torch.testing.assert_close(f["global_pool"], model.forward_features(ids))  # the paper's probe
    torch.testing.assert_close(probe_features(model, ids, grid=1)["grid"], f["global_pool"])
    # grid=7 on the 7x7 token grid: one cell per token, in row-major token order, channels first.
    with torch.no_grad():
        x = model.token_emb(torch.cat([ids.new_full((3, 1), model.config.cls_id), ids], dim=1))
        for blk in model.blocks:
            x = blk(x)
    torch.testing.assert_close(probe_features(model, ids, grid=7)["grid"], x[:, 1:].transpose(1, 2).flatten(1))


@pytest.mark.parametrize("damage", ["nan", "shape", "updates"])
def test_resume_refuses_a_damaged_ema_state(tmp_path, damage):
    # A NaN EMA average was loaded silently (and became the final weights); a [1] average was broadcast into
    # place by copy_; a missing 'updates' was a raw KeyError.
    train(tiny(tmp_path, "mae", steps=2, ckpt_every=2, ema_decay=0.5))
    path = tmp_path / "checkpoint.pt"
    state = load_checkpoint(path)
    ema = state["extra"]["ema"]
    key = next(iter(ema["shadow"]))
    if damage == "nan":
        ema["shadow"][key] = torch.full_like(ema["shadow"][key], math.nan)
    elif damage == "shape":
        ema["shadow"][key] = ema["shadow"][key].flatten()[:1].clone()
    else:
        del ema["updates"]
    save_checkpoint(state, path)
    with pytest.raises(CheckpointError, match=f"{path}: .*ema state"):
        train(tiny(tmp_path, "mae", steps=4, ckpt_every=2, ema_decay=0.5, resume=True, resume_with_changes=True))
