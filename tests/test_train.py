"""The training loop (python/mage/train.py) and its losses on tiny configs: every objective learns, resume is
exact, damaged checkpoints fail clearly, 2-process DDP equals 1 process, masks follow the reference (4.4), and
the losses read masked positions only (4.7)."""

import json
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

import mage_kernels
from mage import train as train_mod
from mage.checkpoint_io import CheckpointError, load_checkpoint, previous_path
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


def tiny(out_dir, objective: str, **overrides) -> TrainConfig:
    fields = dict(objective=objective, out_dir=str(out_dir), data="digits", image_size=8, tokenizer=TOKENIZER,
                  model_overrides=MODEL, mae=MAE, steps=24, batch_size=32, lr=3e-3, warmup_steps=2, log_every=1,
                  ckpt_every=10**6, progress=False, seed=0)
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


# ------------------------------------------------------------------------------------ resume


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("objective", ["mage", "tokenizer"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, objective):
    # Dropout on (global RNG, restored from the checkpoint); tokenizer restarts straddle the checkpoint, so
    # the codebook usage counted before it must come back too.
    over = dict(steps=8, ckpt_every=4, codebook_restart_every=3,
                model_overrides={**MODEL, "dropout": 0.1}, tokenizer={**TOKENIZER, "n_embed": 64})
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
    # Following the message's advice continues the run.
    os.replace(prev, ckpt)
    train(tiny(tmp_path, "mae", steps=6, ckpt_every=2, resume=True))
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
}


def _ddp_worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        for objective, over in DDP_CASES.items():
            train(tiny(os.path.join(root, f"{objective}-ddp"), objective, **over))
    finally:
        torch.distributed.destroy_process_group()


def _final_state(out_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(os.path.join(out_dir, "checkpoint.pt"))["model"]


def test_ddp_two_processes_match_one(tmp_path):
    for objective, over in DDP_CASES.items():
        train(tiny(tmp_path / f"{objective}-one", objective, **over))
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for objective in DDP_CASES:
        one, two = logged(tmp_path / f"{objective}-one"), logged(tmp_path / f"{objective}-ddp")
        assert list(one) == list(two) == [1, 2, 3, 4, 5]
        torch.testing.assert_close(torch.tensor(list(two.values())), torch.tensor(list(one.values())),
                                   rtol=1e-5, atol=1e-5)
        a, b = _final_state(tmp_path / f"{objective}-one"), _final_state(tmp_path / f"{objective}-ddp")
        assert a.keys() == b.keys()
        for k in a:
            if k.endswith("attn.qkv.bias"):
                # The key bias adds the same amount to every score of a query, which softmax ignores: its true
                # gradient is 0, and Adam scales the rounding noise there up to steps of size ~lr.
                a[k], b[k] = a[k].chunk(3)[::2], b[k].chunk(3)[::2]
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{objective} {k}: {m}")
    assert logged(tmp_path / "tokenizer-ddp", "restarted")[3] > 0


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


def test_a_rank_sees_its_rows_of_the_global_plan():
    cfg = TrainConfig(objective="mage-c", batch_size=6)
    whole = plan_masks(cfg, 3, 16, torch.arange(6), "cpu")
    for rank in range(2):
        part = plan_masks(cfg, 3, 16, torch.arange(3) * 2 + rank, "cpu")
        assert part["num_masked"] == whole["num_masked"]
        assert torch.equal(part["noise"], whole["noise"][:, rank::2])
    assert whole["noise"].shape == (2, 6, 16)


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
    # A run's config.json replays it; flags override it; --resume continues.
    assert main(["train", "--config", str(tmp_path / "config.json"), "--steps", "4", "--resume"]) == 0
    assert list(logged(tmp_path)) == [1, 2, 3, 4]
    with pytest.raises(SystemExit):
        main(["train", "--objective", "bert"])


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
