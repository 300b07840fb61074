"""Crash-safe checkpoint files and RNG state capture.

A checkpoint file is a 56-byte header followed by a `torch.save` payload:

    b"MAGECKPT" | format version (u64, little endian) | payload length (u64) | sha256 of the payload (32 bytes)

Writing goes to a temporary file in the same folder, which is flushed and fsynced and then renamed over the
target with `os.replace` (atomic on POSIX and Windows), so a crash at any moment leaves either the old file or
the new one, never a mix. Before the rename the old file is kept as `<name>.prev`. Loading checks the length
(truncation) and the hash (corruption) before unpickling anything and says which one failed.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAGIC = b"MAGECKPT"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sQQ32s")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupted or not in this format; the message says which."""


def previous_path(path: str | os.PathLike) -> Path:
    """Where `save_checkpoint` keeps the file it replaced."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened this way on Windows.
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _keep_previous(path: Path) -> None:
    """Make `<path>.prev` a copy of `path` without a moment where `path` is missing: hard link, else copy."""
    prev = previous_path(path)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.prev.", dir=path.parent)
    os.close(fd)
    os.unlink(staging)
    try:
        os.link(path, staging)
    except OSError:  # file systems without hard links
        import shutil

        shutil.copyfile(path, staging)
    os.replace(staging, prev)


def save_checkpoint(obj: Any, path: str | os.PathLike, keep_previous: bool = True) -> Path:
    """Atomically write `obj` (anything `torch.save` takes) to `path`; the replaced file becomes `<path>.prev`.

    Returns the path written. Tensors should be on CPU or will be saved with their device as torch.save does.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getbuffer()
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            _keep_previous(path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _read_verified(path: Path) -> bytes:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            if MAGIC.startswith(head[: len(MAGIC)]) or head.startswith(MAGIC):
                raise CheckpointError(f"checkpoint {path} is truncated: {len(head)} bytes, shorter than its header")
            raise CheckpointError(f"{path} is not a mage checkpoint (too short for the header)")
        magic, version, length, digest = _HEADER.unpack(head)
        if magic != MAGIC:
            raise CheckpointError(
                f"{path} is not a mage checkpoint (no {MAGIC!r} header); an official MAGE .pth or another "
                "torch.save file loads with torch.load"
            )
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has checkpoint format {version}; this version of mage reads up to {FORMAT_VERSION}"
            )
        payload = f.read(length + 1)
    if len(payload) < length:
        raise CheckpointError(
            f"checkpoint {path} is truncated: its header promises {length} payload bytes, the file has "
            f"{len(payload)} (the write was interrupted or the copy is incomplete)"
        )
    if len(payload) > length:
        raise CheckpointError(f"checkpoint {path} is corrupted: it has bytes after its {length}-byte payload")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupted: the sha256 of its payload does not match its header")
    return payload


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device | None = "cpu",
    weights_only: bool = True,
    fallback_to_previous: bool = False,
) -> Any:
    """Load a file written by `save_checkpoint` after verifying its length and sha256.

    Raises CheckpointError naming the problem. With `fallback_to_previous`, a bad file is reported as a
    warning and `<path>.prev` is loaded instead (still verified). `weights_only=True` restricts unpickling to
    tensors and plain containers, which is all this module's checkpoints contain.
    """
    path = Path(path)
    try:
        payload = _read_verified(path)
    except CheckpointError as err:
        prev = previous_path(path)
        if not fallback_to_previous or not prev.is_file():
            hint = f"; the previous checkpoint is {prev} (or pass fallback_to_previous=True)" if prev.is_file() else ""
            raise CheckpointError(f"{err}{hint}") from None
        warnings.warn(f"{err}; loading the previous checkpoint {prev}", RuntimeWarning, stacklevel=2)
        payload = _read_verified(prev)
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=weights_only)


# ---- RNG state ----


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (legacy global), torch CPU and (when available) every CUDA device's RNG state.

    Stored as tensors and plain Python values only, so the result loads with `weights_only=True`.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored when this machine has as many devices."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            warnings.warn(
                f"checkpoint has RNG states for {len(cuda)} CUDA devices, this machine has "
                f"{torch.cuda.device_count()}; CUDA RNG states not restored",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            torch.cuda.set_rng_state_all(cuda)


# ---- training state ----


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose state_dict has plain parameter names: strips DDP's `.module` and torch.compile's `_orig_mod`."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_training_state(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
    keep_previous: bool = True,
) -> Path:
    """Everything an exact resume needs, written atomically: model, optimizer and GradScaler states, the step
    counter (the LR schedule is a function of it), this process's RNG states, and `extra` (epoch, data position,
    config, metrics; tensors and plain Python values only, so the file loads with weights_only=True)."""
    state = {
        "model": unwrap_model(model).state_dict(),
        "step": step,
        "rng": capture_rng_state(),
        "extra": extra or {},
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return save_checkpoint(state, path, keep_previous)


def load_training_state(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    restore_rng: bool = True,
    fallback_to_previous: bool = False,
) -> dict[str, Any]:
    """Inverse of `save_training_state`: loads states into the given objects (the model strictly) and returns the
    checkpoint dict, whose "step" and "extra" tell the loop where to continue."""
    state = load_checkpoint(path, map_location="cpu", fallback_to_previous=fallback_to_previous)
    unwrap_model(model).load_state_dict(state["model"])
    if optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"checkpoint {path} has no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        restore_rng_state(state["rng"])
    return state
