"""Every file our pipeline writes works with every CLI command that takes a file, or gets a clear one-line
error saying what the file is (issue 11 items 11-13): the demo's 1-channel models (its tokenizer and MAGE
sizes, trained for two steps), its training checkpoints and token cache, official-style .pth files, and
hostile images (extreme aspect ratios, huge dimensions)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

import mage
from mage import cli, demo
from mage.train import TrainConfig, build_token_cache, train

pytestmark = pytest.mark.filterwarnings("ignore:objective .* without tokenizer_checkpoint")


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    """The files `mage demo` writes, from its own model sizes (1-channel 28x28 tokenizer, small MAGE)."""
    from mage import data as data_lib
    from mage.tokenizer_io import load_tokenizer
    from mage.transforms import pretrain_transform

    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common = dict(data="digits", image_size=28, steps=2, batch_size=8, log_every=1, progress=False, seed=0)
        train(TrainConfig(objective="tokenizer", tokenizer=demo.TOKENIZER, out_dir=str(out / "tokenizer"), **common))
        tokenizer = load_tokenizer(out / "tokenizer" / "tokenizer.safetensors")
        x, y = data_lib.load_digits()
        ds = data_lib.TensorImageDataset(x[:16], y[:16], transform=pretrain_transform(28))
        build_token_cache(tokenizer, ds, str(out / "tokens.ckpt"), crops=2, data="digits")
        train(TrainConfig(objective="mage", model="mage_vit_tiny", model_overrides=demo.MODEL,
                          tokenizer_checkpoint=str(out / "tokenizer" / "tokenizer.safetensors"),
                          token_cache=str(out / "tokens.ckpt"), out_dir=str(out / "mage"), **common))
    finally:
        torch.set_num_threads(threads)
    # The released files' layout (legacy parameters, official vocabulary) at widths whose heads are published.
    tok = mage.TokenizerConfig(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, embed_dim=8, n_embed=16)
    official = mage.mage_vit_tiny(tokenizer=tok, depth=1, decoder_embed_dim=768, decoder_num_heads=16,
                                  decoder_depth=1, vocab="official", legacy_params=True)
    torch.save({"model": official.state_dict(), "args": argparse.Namespace(lr=1e-3)}, out / "official-style.pth")
    rgb = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(out / "photo.png")
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[10:20, 10:30] = 255
    Image.fromarray(mask).save(out / "mask.png")
    return out


def run(args, capsys) -> tuple[int, str]:
    """(exit status, stderr) of `mage <args>`."""
    try:
        status = cli.main([str(a) for a in args])
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


MODEL_FILES = {  # file -> None (a MAGE model: works) or what the error must say
    "mage/model.safetensors": None,
    "mage/checkpoint.pt": None,
    "official-style.pth": None,
    "tokenizer/tokenizer.safetensors": "is a VQGAN tokenizer",
    "tokenizer/checkpoint.pt": "training state of a tokenizer run, not a MAGE model",
    "tokens.ckpt": "is a token cache, not a MAGE model",
}


@pytest.mark.parametrize("name", sorted(MODEL_FILES))
def test_sample_takes_every_model_file_and_explains_the_others(demo_files, tmp_path, capsys, name):
    status, err = run(["sample", "--checkpoint", demo_files / name, "--num", 2, "--steps", 2, "--device", "cpu",
                       "--out", tmp_path / "grid.png"], capsys)
    if MODEL_FILES[name] is None:
        assert status == 0, err
        side = 16 if name.endswith(".pth") else 28
        assert Image.open(tmp_path / "grid.png").size == (2 + 2 * (side + 2), 2 + side + 2)
    else:
        assert status == 1 and MODEL_FILES[name] in err and err.startswith("mage sample: error:"), err


@pytest.mark.parametrize("name", ["mage/model.safetensors", "mage/checkpoint.pt"])
def test_inpaint_converts_rgb_files_for_a_one_channel_model(demo_files, tmp_path, capsys, name):
    # Item 12: inpaint read RGB always: "images must be [B, 1, 28, 28], got (1, 3, 28, 28)".
    out = tmp_path / "filled.png"
    status, err = run(["inpaint", "--checkpoint", demo_files / name, "--image", demo_files / "photo.png",
                       "--mask", demo_files / "mask.png", "--out", out, "--steps", 2, "--paste", "--device", "cpu"],
                      capsys)
    assert status == 0, err
    assert Image.open(out).size == (28, 28)


def test_train_takes_the_demo_tokenizer_and_cache_and_resumes(demo_files, tmp_path, capsys):
    common = ["--data", "digits", "--steps", 3, "--batch-size", 8, "--no-progress", "--out-dir", tmp_path / "run",
              "--model-overrides", json.dumps(demo.MODEL), "--ckpt-every", 2]
    tok = ["--tokenizer-checkpoint", demo_files / "tokenizer/tokenizer.safetensors"]
    assert run(["train", "--objective", "mage", *tok, "--token-cache", demo_files / "tokens.ckpt", *common],
               capsys)[0] == 0
    assert run(["train", "--objective", "mage", *tok, "--token-cache", demo_files / "tokens.ckpt", *common,
                "--resume"], capsys)[0] == 0
    status, err = run(["train", "--objective", "mage", "--tokenizer-checkpoint", demo_files / "mage/model.safetensors",
                       *common, "--overwrite"], capsys)
    assert status == 1 and "holds a MAGE model (mage.load), not a tokenizer" in err, err
    status, err = run(["train", "--objective", "mage", *tok, "--token-cache", demo_files / "mage/checkpoint.pt",
                       *common, "--overwrite"], capsys)
    assert status == 1 and "not a token cache" in err, err


def test_untrusted_pth_advice_is_in_cli_terms(demo_files, tmp_path, capsys):
    # Item 13: the CLI said "pass trusted=True" (a Python argument).
    state = torch.load(demo_files / "official-style.pth", weights_only=False)
    torch.save({**state, "extra": Opaque()}, tmp_path / "odd.pth")
    args = ["sample", "--checkpoint", tmp_path / "odd.pth", "--num", 1, "--steps", 1, "--device", "cpu",
            "--out", tmp_path / "g.png"]
    status, err = run(args, capsys)
    assert status == 1 and "--trust-checkpoint" in err and "trusted=True" not in err, err
    assert run(args + ["--trust-checkpoint"], capsys)[0] == 0


class Opaque:
    pass


@pytest.mark.parametrize("size,words", [((20000, 1), "aspect ratio above 8:1"), ((1, 300), "aspect ratio above"),
                                        ((9000, 9000), "more than 64M")])
def test_inpaint_refuses_images_whose_work_is_unbounded(demo_files, tmp_path, capsys, size, words):
    # Item 11: a 138-byte 20000x1 PNG used 5.6 GB (the shorter side was scaled up with no cap on the longer).
    Image.new("L", size).save(tmp_path / "odd.png")
    status, err = run(["inpaint", "--checkpoint", demo_files / "mage/model.safetensors", "--image",
                       tmp_path / "odd.png", "--mask", demo_files / "mask.png", "--out", tmp_path / "o.png",
                       "--steps", 1, "--device", "cpu"], capsys)
    assert status == 1 and words in err and "--image" in err, err


def test_load_image_crops_before_resizing():
    # The central square, resized: bounded work whatever the aspect ratio (here 8:1, the largest accepted).
    img = np.zeros((10, 80), dtype=np.uint8)
    img[:, 35:45] = 255  # the central square is white
    path = "/tmp/mage-test-wide.png"
    Image.fromarray(img).save(path)
    x = cli.load_image(path, 16, mode="L")
    assert x.shape == (1, 1, 16, 16) and float(x.min()) == 1.0
