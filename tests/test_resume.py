"""Resuming a run loses nothing and continues exactly (issue 11 items 6-9): a missing checkpoint.pt resumes
from .prev and says so; a damaged pair is refused without touching anything; changed settings that alter
the run's math are refused; temp files of a killed write are cleaned; a training process SIGKILLed in the
middle of writing its checkpoint resumes bit-exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import mage
import mage_kernels
from mage.checkpoint_io import CheckpointError, load_checkpoint, previous_path, save_checkpoint
from mage.train import TrainConfig, train

MAE = dict(patch_size=2, in_channels=1, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
           decoder_num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def run_config(out_dir, **overrides) -> TrainConfig:
    """A tiny MAE on 8x8 digits: milliseconds per step. Dropout-free MAE still draws masks and crops per step."""
    fields = dict(objective="mae", out_dir=str(out_dir), data="digits", image_size=8, mae=MAE, steps=6,
                  batch_size=16, lr=3e-3, warmup_steps=1, log_every=1, ckpt_every=2, progress=False, seed=0)
    return TrainConfig(**{**fields, **overrides})


def records(out_dir) -> dict[int, dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def losses(out_dir) -> dict[int, float]:
    return {step: r["loss"] for step, r in records(out_dir).items()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every run here: the float reduction order must be the same
    try:
        out = tmp_path_factory.mktemp("full")
        train(run_config(out))
    finally:
        torch.set_num_threads(threads)
    return losses(out)


def test_missing_checkpoint_resumes_from_prev_and_says_so(tmp_path, full_run):
    # Item 6: it restarted at step 0, truncated metrics.jsonl and overwrote the good .prev.
    train(run_config(tmp_path))
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.unlink()  # .prev holds step 4
    before = records(tmp_path)
    with pytest.warns(RuntimeWarning, match="checkpoint.pt is missing: resuming from .*checkpoint.pt.prev"):
        train(run_config(tmp_path, resume=True))
    after = records(tmp_path)
    assert [after[s] for s in range(1, 5)] == [before[s] for s in range(1, 5)]  # kept, not rewritten
    assert losses(tmp_path) == full_run
    assert load_checkpoint(previous_path(ckpt))["step"] == 4 and load_checkpoint(ckpt)["step"] == 6


def test_damaged_prev_without_checkpoint_is_refused_and_nothing_changes(tmp_path):
    train(run_config(tmp_path))
    ckpt, prev = tmp_path / "checkpoint.pt", previous_path(tmp_path / "checkpoint.pt")
    ckpt.unlink()
    prev.write_bytes(prev.read_bytes()[:100])
    snapshot = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match="checkpoint.pt is missing and the previous checkpoint is damaged"):
        train(run_config(tmp_path, resume=True))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == snapshot


def test_both_damaged_says_so_instead_of_calling_prev_intact(tmp_path):
    # Item 9: the error said ".prev is intact" without looking.
    train(run_config(tmp_path))
    for p in (tmp_path / "checkpoint.pt", previous_path(tmp_path / "checkpoint.pt")):
        data = bytearray(p.read_bytes())
        data[-10] ^= 0xFF
        p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        train(run_config(tmp_path, resume=True))
    message = str(info.value)
    assert "corrupted" in message and "previous checkpoint is damaged too" in message and "intact" not in message


def test_fresh_run_does_not_overwrite_an_earlier_runs_checkpoint(tmp_path):
    train(run_config(tmp_path))
    snapshot = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match="--resume .*--overwrite"):
        train(run_config(tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == snapshot
    train(run_config(tmp_path, overwrite=True, steps=2))
    assert list(losses(tmp_path)) == [1, 2]


def test_overwrite_leaves_nothing_of_the_earlier_run_beside_its_config(tmp_path, monkeypatch):
    # --overwrite replaced config.json and the log but kept the earlier run's checkpoint until the first new one:
    # a run that died before it left the old checkpoint beside the new config, and --resume continued it.
    import mage.train as train_module

    train(run_config(tmp_path, mae={**MAE, "embed_dim": 32}))
    assert {"checkpoint.pt", "checkpoint.pt.prev", "mae.pt", "curves.png"} <= {p.name for p in tmp_path.iterdir()}

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "backward_step", dies)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(tmp_path, overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "metrics.jsonl"]
    assert json.loads((tmp_path / "config.json").read_text())["mae"] == MAE
    monkeypatch.undo()
    with pytest.warns(RuntimeWarning, match="no checkpoint"):
        train(run_config(tmp_path, resume=True))  # the new run from step 0, not the earlier run's weights


def test_fresh_run_refuses_a_folder_with_an_earlier_runs_weights(tmp_path):
    # Without its checkpoint (deleted to save space), a finished run's weights were overwritten without a word.
    train(run_config(tmp_path, steps=2))
    for name in ("checkpoint.pt", "checkpoint.pt.prev"):
        (tmp_path / name).unlink(missing_ok=True)
    snapshot = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match=r"holds the weights of an earlier run \(mae.pt\) and no checkpoint "
                                              "to resume: .*--overwrite") as info:
        train(run_config(tmp_path, steps=2))
    assert "--resume" not in str(info.value)  # it said "continue it with --resume", which could not
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == snapshot


def test_resume_refuses_a_folder_with_only_an_earlier_runs_weights(tmp_path, full_run):
    # --resume warned "no checkpoint" and started at step 0, over the finished run's weights and log.
    train(run_config(tmp_path, steps=2))
    for name in ("checkpoint.pt", "checkpoint.pt.prev"):
        (tmp_path / name).unlink(missing_ok=True)
    snapshot = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match=r"cannot resume: .* holds the weights of an earlier run \(mae.pt\) but "
                                              r"no checkpoint to continue from .*--overwrite"):
        train(run_config(tmp_path, steps=2, resume=True))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == snapshot
    train(run_config(tmp_path, overwrite=True))  # what the message says: start afresh over the weights
    assert losses(tmp_path) == full_run


def test_resume_with_overwrite_is_refused_before_anything_changes(tmp_path, capsys):
    # --resume --overwrite resumed the run in --out-dir whenever it had a checkpoint: --overwrite was ignored.
    from mage.cli import main

    train(run_config(tmp_path, steps=2))
    snapshot = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(mage.InputError, match=r"resume \(--resume\) and overwrite \(--overwrite\), not both"):
        train(run_config(tmp_path, steps=4, resume=True, overwrite=True))
    # A sibling: --resume-with-changes without --resume was ignored (a fresh run, refused here for its folder).
    for flags, lead in ((["--resume", "--overwrite"], "--resume"), (["--resume-with-changes"],
                                                                     "--resume-with-changes")):
        with pytest.raises(SystemExit) as info:
            main(["train", "--config", str(tmp_path / "config.json"), "--steps", "4", *flags])
        err = capsys.readouterr().err
        assert info.value.code == 1 and len(err.splitlines()) == 1, err
        assert err.startswith(f"mage train: error: {lead}: ") and all(f in err for f in [*flags, "--resume"]), err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == snapshot


def test_cli_resume_into_a_folder_with_only_weights_says_what_is_there(tmp_path, capsys):
    from mage.cli import main

    train(TrainConfig(objective="tokenizer", out_dir=str(tmp_path), data="digits", image_size=8, steps=1,
                      batch_size=8, progress=False, tokenizer=dict(in_channels=1, ch=8, ch_mult=(1, 2),
                                                                    num_res_blocks=1, embed_dim=8, n_embed=16,
                                                                    norm_groups=4)))
    (tmp_path / "checkpoint.pt").unlink()
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", str(tmp_path / "config.json"), "--resume"])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "holds the weights of an earlier run (tokenizer.safetensors) but no checkpoint" in err
    assert "--overwrite" in err and "--tokenizer-checkpoint" in err  # what else the weights are good for


def test_replayed_config_neither_resumes_nor_overwrites_another_folder(tmp_path, capsys):
    # config.json held resume / overwrite: replaying an --overwrite run's file into another --out-dir deleted the
    # earlier run there without being asked.
    from mage.cli import main

    train(run_config(tmp_path / "a", overwrite=True))
    written = json.loads((tmp_path / "a" / "config.json").read_text())
    assert not {"resume", "resume_with_changes", "overwrite"} & set(written)
    train(run_config(tmp_path / "b", steps=2))
    snapshot = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir() if p.is_file()}
    old_style = tmp_path / "old.json"  # as a config.json of the previous release held them
    old_style.write_text(json.dumps({**written, "overwrite": True, "resume": True}))
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", str(old_style), "--out-dir", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "sets overwrite, which only the flag --overwrite asks for: ignored" in err
    assert "sets resume, which only the flag --resume asks for: ignored" in err and "holds the checkpoint" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir() if p.is_file()} == snapshot


@pytest.mark.parametrize("changed", [dict(batch_size=8), dict(blr=1e-3, lr=None), dict(mae_mask_ratio=0.5),
                                     dict(seed=1), dict(mae={**MAE, "embed_dim": 32})])
def test_resume_refuses_settings_that_change_the_math(tmp_path, changed):
    # Item 7: --resume with a changed --batch-size continued without a word.
    train(run_config(tmp_path, steps=4))
    name = next(iter(changed))
    with pytest.raises(CheckpointError, match=f"{name}: .* -> .*--resume-with-changes"):
        train(run_config(tmp_path, resume=True, steps=4, **changed))


def test_resume_allows_bookkeeping_changes_and_explicit_overrides(tmp_path, full_run):
    train(run_config(tmp_path, steps=4))
    train(run_config(tmp_path, resume=True, steps=4, log_every=2, ckpt_every=3, num_workers=0, progress=False))
    with pytest.warns(RuntimeWarning, match="changed settings: steps: 4 -> 6"):
        train(run_config(tmp_path, resume=True, resume_with_changes=True))
    assert list(losses(tmp_path)) == [1, 2, 3, 4, 5, 6]


def test_stale_temp_files_of_a_killed_write_are_removed(tmp_path):
    # Item 8: a kill during the write left .checkpoint.pt.*.tmp forever.
    train(run_config(tmp_path, steps=2))
    stale = [tmp_path / ".checkpoint.pt.k3x9.tmp", tmp_path / ".checkpoint.pt.prev.a1b2"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    keep = tmp_path / ".other.tmp"
    keep.write_bytes(b"not ours")
    train(run_config(tmp_path, steps=2, resume=True))
    assert not any(p.exists() for p in stale) and keep.exists()


def _corrupt_state(tmp_path, edit):
    train(run_config(tmp_path, steps=2))
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    save_checkpoint(edit(state), tmp_path / "checkpoint.pt", keep_previous=False)


class Opaque:
    pass


@pytest.mark.parametrize("edit,match", [
    (lambda s: {"weights": s["model"]}, "not a training state written by mage train"),
    (lambda s: {**s, "step": 2.5}, "step must be an int >= 0, got 2.5"),
    (lambda s: {**s, "model": {**s["model"], "model.norm.weight": s["model"]["model.norm.weight"] * float("nan")}},
     "model.norm.weight' has NaN or inf"),
    (lambda s: {**s, "extra": {**s["extra"], "note": Opaque()}}, "refusing to unpickle"),
])
def test_resume_from_a_file_of_the_wrong_content_is_a_clear_error(tmp_path, edit, match):
    _corrupt_state(tmp_path, edit)
    with pytest.raises(CheckpointError, match=match):
        train(run_config(tmp_path, steps=4, resume=True, resume_with_changes=True))


def test_token_cache_with_pickled_objects_is_refused(tmp_path):
    save_checkpoint({"ids": torch.zeros(4, 1, 16, dtype=torch.long), "labels": torch.zeros(4), "x": Opaque()},
                    tmp_path / "cache.pt")
    cfg = TrainConfig(objective="mage", token_cache=str(tmp_path / "cache.pt"), out_dir=str(tmp_path / "run"),
                      progress=False, steps=1, batch_size=2)
    with pytest.raises(CheckpointError, match="cache.pt: refusing to unpickle"):
        train(cfg)


# ------------------------------------------------------------------------- SIGKILL during the write

# Run in a subprocess: train, and SIGKILL this process at the given point of the 2nd checkpoint write (step 4).
KILLER = r"""
import json, os, signal, sys, types
import mage.checkpoint_io as cio
from mage.train import TrainConfig, train

point = sys.argv[1]
real = types.SimpleNamespace(**vars(os))  # checkpoint_io's view of os, with one call replaced
writes = {"n": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def fdopen(fd, mode, *args, **kwargs):
    f = os.fdopen(fd, mode, *args, **kwargs)
    if not os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".checkpoint.pt."):
        return f  # other atomic writes (the run's config.json) are not the checkpoint writes counted here
    writes["n"] += 1
    if point != "mid-payload" or writes["n"] < 2:
        return f
    class HalfWriter:
        def __enter__(self): return self
        def __exit__(self, *exc): f.close()
        def write(self, data):
            if len(data) > 1000:  # the payload: half of it reaches the disk, then the process dies
                f.write(bytes(data[: len(data) // 2])); f.flush(); os.fsync(f.fileno()); die()
            return f.write(data)
        def __getattr__(self, name): return getattr(f, name)
    return HalfWriter()

def replace(src, dst):
    is_prev = str(dst).endswith(".prev")
    if writes["n"] >= 2 and ((point == "before-rename" and not is_prev) or (point == "prev-staged" and is_prev)):
        die()
    return os.replace(src, dst)

real.fdopen, real.replace = fdopen, replace
cio.os = real
train(TrainConfig(**json.loads(sys.argv[2])))
"""


@pytest.mark.parametrize("point", ["mid-payload", pytest.param("prev-staged", marks=pytest.mark.slow),
                                   pytest.param("before-rename", marks=pytest.mark.slow)])
def test_sigkill_during_checkpoint_write_resumes_bit_exactly(tmp_path, full_run, point):
    cfg = run_config(tmp_path)
    roots = [os.path.dirname(os.path.dirname(m.__file__)) for m in (mage, mage_kernels)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(roots)}
    proc = subprocess.run([sys.executable, "-c", KILLER, point, json.dumps(cfg.to_dict())], env=env,
                          capture_output=True, timeout=600)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".checkpoint.pt.")]
    assert leftovers, "the kill should leave the write's temp file"
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2  # the step-4 write never landed
    assert list(losses(tmp_path)) == [1, 2, 3, 4]

    train(run_config(tmp_path, resume=True))
    assert losses(tmp_path) == full_run  # bitwise, every step
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 6


# ------------------------------------------------------------------------- one run per out_dir


def test_a_second_run_into_a_busy_out_dir_fails_at_once_and_changes_nothing(tmp_path):
    # Two runs could write into one out_dir, interleaving their checkpoints, weights and log.
    from mage.train import OutDirInUseError, out_dir_lock

    train(run_config(tmp_path, steps=2))
    snapshot = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with out_dir_lock(tmp_path):  # what another run holds while it runs
        for over in (dict(resume=True), dict(overwrite=True)):
            with pytest.raises(OutDirInUseError, match=f"TrainConfig.out_dir {tmp_path}: another training run is "
                                                       "writing into this folder"):
                train(run_config(tmp_path, steps=2, **over))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(snapshot)  # no lock file: the folder is locked
    train(run_config(tmp_path, steps=2, resume=True))  # released with the block; and by a run when it ends
    train(run_config(tmp_path, steps=2, resume=True))


def test_of_two_runs_starting_in_a_new_folder_the_second_fails(tmp_path, monkeypatch):
    # The folder does not exist while a run checks its settings: it locks the folder once it has made it.
    import contextlib

    import mage.train as train_module

    out, build = tmp_path / "new", train_module.build_model
    with contextlib.ExitStack() as other_run:
        def build_while_another_run_starts(cfg):
            model = build(cfg)
            out.mkdir()
            other_run.enter_context(train_module.out_dir_lock(out))
            return model

        monkeypatch.setattr(train_module, "build_model", build_while_another_run_starts)
        with pytest.raises(train_module.OutDirInUseError, match=f"{out}: another training run"):
            train(run_config(out))
    assert list(out.iterdir()) == []


def test_cli_lock_holds_against_a_running_process_and_dies_with_it(tmp_path, capsys):
    # A second `mage train` into the folder of a running one fails at once; after kill -9 of the first, --resume
    # works at once: the lock is the process's alone, not also its DataLoader worker's (which notices its
    # parent's death only seconds later).
    import signal
    import time

    from mage.checkpoint_io import resume_source
    from mage.cli import main
    from mage.train import out_dir_lock

    args = ["train", "--objective", "mae", "--data", "digits", "--image-size", "8", "--mae", json.dumps(MAE),
            "--batch-size", "16", "--lr", "3e-3", "--log-every", "5", "--ckpt-every", "5", "--no-progress",
            "--threads", "1", "--out-dir", str(tmp_path)]
    roots = [os.path.dirname(os.path.dirname(m.__file__)) for m in (mage, mage_kernels)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(roots)}
    proc = subprocess.Popen([sys.executable, "-m", "mage.cli", *args, "--steps", "1000000", "--num-workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "checkpoint.pt").exists():  # its first checkpoint: from now on there is one to resume
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.1)
        with pytest.raises(SystemExit) as info:
            main([*args, "--resume"])
        err = capsys.readouterr().err
        assert info.value.code == 1 and "Traceback" not in err, err
        assert f"--out-dir: TrainConfig.out_dir {tmp_path}: another training run is writing into this folder" in err
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with out_dir_lock(tmp_path):  # free at once
        pass
    step = load_checkpoint(resume_source(tmp_path / "checkpoint.pt")[0])["step"]
    assert main([*args, "--resume", "--resume-with-changes", "--steps", str(step + 2)]) == 0
    assert max(records(tmp_path)) == step + 2
