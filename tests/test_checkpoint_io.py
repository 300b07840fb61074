"""Atomic checkpoints: round trip, truncation and corruption give clear errors, the previous file stays intact,
RNG states restore exactly."""

import os
import random

import numpy as np
import pytest
import torch

from conftest import requires_cuda
from mage.checkpoint_io import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    previous_path,
    restore_rng_state,
    save_checkpoint,
    weights_fingerprint,
)


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"step": step, "model": {"w": torch.randn(17, 5, generator=g), "b": torch.zeros(5)}, "name": "run"}


def _assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["name"] == b["name"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)


def test_round_trip_and_previous_kept(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    path.parent.mkdir()  # a writer makes no folder (test_bad_input.py)
    save_checkpoint(_state(1), path)
    assert not previous_path(path).exists()
    save_checkpoint(_state(2), path)
    _assert_same(load_checkpoint(path), _state(2))
    _assert_same(load_checkpoint(previous_path(path)), _state(1))
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt", "ckpt.pt.prev"]  # no temp files left


def test_truncated_file_gives_clear_error_and_previous_is_intact(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(_state(1), path)
    save_checkpoint(_state(2), path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match="truncated.*header promises") as info:
        load_checkpoint(path)
    assert "ckpt.pt.prev" in str(info.value)
    with pytest.warns(RuntimeWarning, match="truncated"):
        _assert_same(load_checkpoint(path, fallback_to_previous=True), _state(1))
    with open(path, "r+b") as f:
        f.truncate(20)
    with pytest.raises(CheckpointError, match="shorter than its header"):
        load_checkpoint(path)


def test_corrupted_byte_gives_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(_state(3), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted.*sha256"):
        load_checkpoint(path)
    path.write_bytes(bytes(data) + b"x")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)


def test_foreign_and_missing_files(tmp_path):
    plain = tmp_path / "official.pth"
    torch.save({"model": {}}, plain)
    with pytest.raises(CheckpointError, match="not a mage checkpoint.*torch.load"):
        load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


def test_failed_write_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(_state(1), path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_state(2), path)
    monkeypatch.undo()
    _assert_same(load_checkpoint(path), _state(1))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_rng_state_round_trip_through_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave a cached Gaussian in NumPy's state
    save_checkpoint({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.randn(3), torch.randn(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (random.random(), np.random.randn(3), torch.randn(3))
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=0)


@requires_cuda
def test_cuda_rng_state_round_trip(tmp_path):
    torch.cuda.manual_seed_all(4)
    save_checkpoint({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = torch.randn(5, device="cuda")
    torch.cuda.manual_seed_all(99)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    torch.testing.assert_close(torch.randn(5, device="cuda"), expected, rtol=0, atol=0)


def test_training_state_resume_reproduces_the_uninterrupted_run(tmp_path):
    from mage.checkpoint_io import load_training_state, save_training_state

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def train_step(model, opt):
        x = torch.randn(16, 6)  # draws from the global RNG, as do dropout masks
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    model, opt = make()
    straight = [train_step(model, opt) for _ in range(6)]

    model, opt = make()
    for step in range(3):
        train_step(model, opt)
    save_training_state(tmp_path / "run.ckpt", model, opt, step=3, extra={"epoch": 0, "position": 48})
    torch.manual_seed(1234)  # the interrupted process's later RNG use must not matter
    model, opt = make()
    state = load_training_state(tmp_path / "run.ckpt", model, opt)
    assert state["step"] == 3 and state["extra"] == {"epoch": 0, "position": 48}
    resumed = [train_step(model, opt) for _ in range(3)]
    assert resumed == straight[3:]


def test_save_after_a_kill_between_link_and_rename_leaves_no_stray_link(tmp_path):
    # A write killed after linking ckpt.pt as ckpt.pt.prev leaves both names on one file; rename() between
    # two links of one file does nothing, so the next save's staging link must be removed by hand.
    path = tmp_path / "ckpt.pt"
    save_checkpoint(_state(1), path)
    os.link(path, previous_path(path))
    save_checkpoint(_state(2), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "ckpt.pt.prev"]
    _assert_same(load_checkpoint(previous_path(path)), _state(1))


def test_atomic_writes_use_a_temp_file_of_their_own_with_normal_permissions(tmp_path):
    # Writers used one fixed temp name per target (.x.png.tmp, m.jsonl.tmp), so two writers of one folder wrote
    # into each other's file; mkstemp's temp files left every written file readable by its owner only (0600).
    from PIL import Image

    from mage.checkpoint_io import write_atomic
    from mage.evaluation import write_png
    from mage.report import JsonlLogger

    others = {name: tmp_path / name for name in (".000000.png.tmp", "m.jsonl.tmp")}
    for p in others.values():
        p.write_bytes(b"another writer's file")
    write_png(torch.zeros(1, 4, 4, dtype=torch.uint8), tmp_path / "000000.png")
    JsonlLogger(tmp_path / "m.jsonl").close()
    JsonlLogger(tmp_path / "m.jsonl", resume_step=3).close()
    assert all(p.read_bytes() == b"another writer's file" for p in others.values())
    assert Image.open(tmp_path / "000000.png").size == (4, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["000000.png", "m.jsonl", *others])
    if os.name == "posix":
        mask = os.umask(0o022)
        try:
            write_atomic(tmp_path / "r.json", "{}")
            save_checkpoint(_state(1), tmp_path / "c.pt")
            write_png(torch.zeros(3, 2, 2, dtype=torch.uint8), tmp_path / "000001.png")
        finally:
            os.umask(mask)
        for name in ("r.json", "c.pt", "000001.png"):
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_weights_fingerprint_tells_weights_apart_and_nothing_else():
    """The same weights give the same fingerprint in another module object or dtype that holds them exactly;
    one changed value, a renamed parameter, or the same values in another shape give another."""
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert weights_fingerprint(a) == weights_fingerprint(b) == weights_fingerprint(b.double())
    with torch.no_grad():
        b.weight[1, 2] += 1e-3
    assert weights_fingerprint(a) != weights_fingerprint(b)
    c = torch.nn.Linear(2, 3, bias=False)
    d = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        d.weight.copy_(c.weight.reshape(2, 3))  # the same values in the same order, shape [2, 3] for [3, 2]
    assert weights_fingerprint(c) != weights_fingerprint(d)
    e = torch.nn.Sequential(a)  # names "0.weight", "0.bias"
    assert weights_fingerprint(e) != weights_fingerprint(a)
