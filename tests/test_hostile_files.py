"""Damaged, poisoned or mismatched files met along the way: each is rebuilt, skipped or refused with a message
naming the file, never a crash deep inside (issue 11, "errors a user cannot act on", and the same class of bug
found elsewhere)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mage import fmnist_classifier as fc
from mage.checkpoint_io import CheckpointError, save_checkpoint
from mage.data import ImageFolder, check_token_cache, load_token_cache
from mage.report import read_jsonl


class Opaque:
    pass


@pytest.mark.parametrize("poison", ["pickled object", "not a dict", "no model", "nan weights"])
def test_poisoned_classifier_cache_is_rebuilt(tmp_path, monkeypatch, poison):
    config = fc.ClassifierConfig(epochs=1, train_size=100)
    path = tmp_path / f"fmnist_classifier_{config.key()}.ckpt"
    weights = fc.FashionClassifier(config.width, config.feature_dim).state_dict()
    content = {"pickled object": {"model": weights, "x": Opaque()}, "not a dict": [1, 2],
               "no model": {"weights": weights},
               "nan weights": {"model": {k: v * float("nan") if v.is_floating_point() else v
                                         for k, v in weights.items()}}}[poison]
    save_checkpoint(content, path, keep_previous=False)
    trained = []

    def train(cfg):
        trained.append(cfg)
        return fc.FashionClassifier(cfg.width, cfg.feature_dim).eval()

    monkeypatch.setattr(fc, "train_classifier", train)
    model = fc.load_or_train_classifier(config, tmp_path)
    assert trained and all(torch.isfinite(p).all() for p in model.parameters())
    assert fc.load_or_train_classifier(config, tmp_path) is not None and len(trained) == 1  # the rebuilt cache loads


def test_unreadable_image_in_a_folder_names_the_file(tmp_path):
    (tmp_path / "cls").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cls" / "good.png")
    (tmp_path / "cls" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    folder = ImageFolder(tmp_path)
    bad = [i for i, (p, _) in enumerate(folder.samples) if p.name == "broken.png"][0]
    with pytest.raises(ValueError, match="broken.png: cannot read it as an image"):
        folder[bad]


def test_jsonl_lines_that_are_not_records_are_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n[1, 2]\n\"text\"\n{torn\n" + json.dumps({"step": 2}) + "\n")
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]


def test_token_cache_of_another_tokenizer_is_refused(tmp_path):
    ids = torch.randint(0, 512, (4, 1, 16), dtype=torch.int16)
    save_checkpoint({"ids": ids, "labels": torch.zeros(4, dtype=torch.long)}, tmp_path / "c.ckpt")
    cached = load_token_cache(tmp_path / "c.ckpt").ids
    with pytest.raises(CheckpointError, match="built with another tokenizer"):
        check_token_cache(tmp_path / "c.ckpt", cached, 16, 256)
    with pytest.raises(CheckpointError, match="17"):
        check_token_cache(tmp_path / "c.ckpt", cached, 17, 1024)
    save_checkpoint({"ids": ids.float(), "labels": torch.zeros(4)}, tmp_path / "f.ckpt")
    with pytest.raises(CheckpointError, match="f.ckpt: token ids must be integers"):
        load_token_cache(tmp_path / "f.ckpt")


# ------------------------------------------------------------------ issue 11 item 10: tampered model files

def _tiny_model():
    import mage

    tok = mage.TokenizerConfig.tiny(resolution=16, n_embed=32)
    return mage.mage_vit_tiny(tokenizer=tok, depth=1, decoder_depth=1, embed_dim=32, num_heads=2,
                              decoder_embed_dim=32, decoder_num_heads=2)


def _tamper(path, out, *, tensors=None, config=None, raw_config=None):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    state = load_file(str(path))
    if tensors:
        state = tensors(state)
    if config:
        meta["config"] = json.dumps({**json.loads(meta["config"]), **config})
    if raw_config is not None:
        meta["config"] = raw_config
    save_file(state, str(out), metadata=meta)
    return out


TAMPERED = {
    # (change, what the error must name); None: the file loads, as float32
    "fp16 file": (dict(tensors=lambda s: {k: v.half() if v.is_floating_point() else v for k, v in s.items()}), None),
    "one fp64 weight": (dict(tensors=lambda s: {**s, "norm.weight": s["norm.weight"].double()}), None),
    "float position_ids": (dict(tensors=lambda s: {**s, "token_emb.position_ids": s["token_emb.position_ids"].float()}),
                           "token_emb.position_ids"),
    "nan weight": (dict(tensors=lambda s: {**s, "norm.weight": s["norm.weight"] * float("nan")}), "norm.weight"),
    "depth 0": (dict(config={"depth": 0}), "depth"),
    "depth 10**6": (dict(config={"depth": 10**6}), "depth"),
    "embed_dim '32'": (dict(config={"embed_dim": "32"}), "embed_dim"),
    "config not JSON": (dict(raw_config="{depth: 1"), "JSON"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_model_file(tmp_path, case):
    import time

    import mage

    change, named = TAMPERED[case]
    model = _tiny_model()
    model.save(tmp_path / "m.safetensors")
    path = _tamper(tmp_path / "m.safetensors", tmp_path / "t.safetensors", **change)
    start = time.perf_counter()
    if named is None:
        loaded = mage.load(path)
        assert all(p.dtype == torch.float32 for p in loaded.parameters())
        assert loaded.token_emb.position_ids.dtype == torch.int64
        return
    with pytest.raises(mage.CheckpointError) as info:
        mage.load(path)
    assert named in str(info.value) and "t.safetensors" in str(info.value), str(info.value)
    if case == "depth 10**6":  # refused before building anything: a million blocks take minutes
        assert time.perf_counter() - start < 60
