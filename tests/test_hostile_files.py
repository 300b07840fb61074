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
    cached, _ = load_token_cache(tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match="built with another tokenizer"):
        check_token_cache(tmp_path / "c.ckpt", cached, 16, 256)
    with pytest.raises(CheckpointError, match="17"):
        check_token_cache(tmp_path / "c.ckpt", cached, 17, 1024)
    save_checkpoint({"ids": ids.float(), "labels": torch.zeros(4)}, tmp_path / "f.ckpt")
    with pytest.raises(CheckpointError, match="f.ckpt: token ids must be integers"):
        load_token_cache(tmp_path / "f.ckpt")
