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
import math
import os
import pickle
import random
import secrets
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._checks import InputValueError, all_finite

MAGIC = b"MAGECKPT"
FORMAT_VERSION = 1
# The `format` metadata of our safetensors files (a MAGE model; a standalone tokenizer).
MODEL_FORMAT = "mage-kernels/1"
TOKENIZER_FORMAT = "mage-kernels/tokenizer-v1"
_HEADER = struct.Struct("<8sQQ32s")


class CheckpointError(InputValueError):
    """A checkpoint or weights file that cannot be read (missing, truncated, corrupted, not in a format we
    read, unsafe to unpickle) or does not match the model; the message says which and what to do."""


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
    # rename() between two links of one file does nothing (POSIX): when a killed write had already linked
    # `path` as `.prev`, the staging link would stay behind.
    if os.path.lexists(staging):
        os.unlink(staging)


def check_writable(path: str | os.PathLike, name: str | None = None) -> None:
    """`path` can be written as a file: not a folder, in a folder that exists. Writers of a path the user gives
    do not create its folder (a typo would make a tree of folders); folders the library owns (a run's out_dir,
    a report folder) are made by their owners. `name`: what the message calls the path (an argument, a flag)."""
    path = Path(path)
    what = f"{name} {path}" if name else str(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} is a directory: give the path of a file to write")
    parent = path.parent
    if not parent.is_dir():
        state = "is a file" if parent.exists() else "does not exist"
        raise FileNotFoundError(f"{what}: the folder {parent} {state}: create it first, or write somewhere else")


def create_temp(path: str | os.PathLike) -> tuple[int, str]:
    """A new, empty temp file next to `path` and its open descriptor: `.<name>.<random>.tmp` (the pattern
    `clean_stale_files` removes), created exclusively, so writers of one folder never share one, with the
    permissions of any new file (mkstemp's would be 0600, and the renamed file would keep them)."""
    path = Path(path)
    while True:
        tmp = str(path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp"))
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:  # 2^-48 per try
            continue


def _atomic_write(path: Path, chunks: list, keep_previous: bool, write_file=None) -> Path:
    """Write `chunks` (bytes-like), or call `write_file(temp_path)`, into a temp file next to `path`, fsync it,
    keep the old file as `<path>.prev` if asked, and rename the temp file over `path`: a crash at any moment
    leaves the old file or the new one."""
    check_writable(path)
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, "r+b") as f:
            if write_file is not None:
                write_file(tmp)
            for chunk in chunks:
                f.write(chunk)
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


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, shapes and float32 values): the same for the same weights wherever
    they are, so that a file made with a model (a token cache, sample PNGs) can record which one it was."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy())
    return digest.hexdigest()


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """`data` (str as UTF-8) written to `path` atomically, as `save_checkpoint` without `.prev`: a crash or a
    full disk mid-write leaves the old file, never a truncated one."""
    return _atomic_write(Path(path), [data.encode() if isinstance(data, str) else data], False)


def save_checkpoint(obj: Any, path: str | os.PathLike, keep_previous: bool = True) -> Path:
    """Atomically write `obj` (anything `torch.save` takes) to `path`; the replaced file becomes `<path>.prev`.

    Returns the path written. Tensors should be on CPU or will be saved with their device as torch.save does.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getbuffer()
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
    return _atomic_write(Path(path), [header, payload], keep_previous)


def save_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | os.PathLike) -> Path:
    """A safetensors file written atomically (as `save_checkpoint`, without `.prev`): a crash mid-write leaves
    the old file, never half a model."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _atomic_write(Path(path), [], False, write_file=lambda tmp: save_file(state, tmp, metadata=metadata))


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
        path, payload = prev, _read_verified(prev)
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        # Files written by save_checkpoint hold tensors and plain containers only.
        raise CheckpointError(
            f"{path}: refusing to unpickle it: it holds objects other than tensors and plain containers "
            f"({str(err).splitlines()[0]}). Files written by mage never do, so it was not written by mage or "
            "was modified; do not load it unless you know where it came from"
        ) from None


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """None when `path` is a complete, uncorrupted checkpoint file; otherwise why not (reads the whole file)."""
    try:
        _read_verified(Path(path))
    except CheckpointError as err:
        return str(err)
    return None


def clean_stale_files(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that an interrupted `save_checkpoint(..., path)` leaves next to `path`
    (`.<name>.*.tmp`, `.<name>.prev.*`). Only call it while nothing writes `path` (when a run starts)."""
    path = Path(path)
    stale = [p for p in path.parent.glob(f".{path.name}.*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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
    restore_training_state(state, path, model, optimizer, scaler, restore_rng)
    return state


def check_training_state(state: Any, path: str | os.PathLike) -> None:
    """Raise CheckpointError unless `state` has the structure `save_training_state` writes, an integer step
    and finite weights (a run that diverged before its checkpoint fails here, not at its next step)."""
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        got = sorted(state)[:10] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a training state written by mage train (expected a dict with "
                              f"'model', 'step', 'rng', 'extra'; got {got})")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: its step must be an int >= 0, got {step!r}")
    if not isinstance(state.get("extra", {}), dict):
        raise CheckpointError(f"{path}: its 'extra' must be a dict, got {type(state['extra']).__name__}")
    for key, value in state["model"].items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: model entry {key!r} is a {type(value).__name__}, not a tensor")
        if not all_finite(value):
            raise CheckpointError(f"{path}: model weight {key!r} has NaN or inf values: the run diverged before "
                                  "this checkpoint; resume from an earlier one")


def restore_training_state(
    state: dict[str, Any],
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    restore_rng: bool = True,
) -> None:
    """Put a loaded training state (see `load_training_state`) into the model, optimizer and scaler."""
    check_training_state(state, path)
    try:
        unwrap_model(model).load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit this model: {err}") from None
    if optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"checkpoint {path} has no optimizer state")
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: its optimizer state does not fit this model's parameters: {err}") from None
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        if not isinstance(state.get("rng"), dict):
            raise CheckpointError(f"{path} has no RNG state ('rng'), which an exact resume needs")
        restore_rng_state(state["rng"])


# ---- resuming a run ----


def resume_source(path: str | os.PathLike) -> tuple[Path | None, str | None]:
    """The file a resume of `path` continues from, and a note for the user (or None).

    `path` when it exists (a damaged one fails at load, see `damaged_checkpoint_error`); `<path>.prev` when
    `path` is missing but the previous file is intact (checked), with a note saying so; (None, None) when
    neither exists. A damaged `.prev` without `path` raises CheckpointError: nothing is started over it."""
    path = Path(path)
    if path.exists():
        return path, None
    prev = previous_path(path)
    if not prev.exists():
        return None, None
    problem = verify_checkpoint(prev)
    if problem is not None:
        raise CheckpointError(f"cannot resume: {path} is missing and the previous checkpoint is damaged "
                              f"({problem}); nothing was changed in {path.parent}")
    return prev, f"{path} is missing: resuming from the previous checkpoint {prev}"


def damaged_checkpoint_error(err: CheckpointError, path: str | os.PathLike) -> CheckpointError:
    """A resume error for a damaged `path` that says, after checking, whether `<path>.prev` can be used."""
    prev = previous_path(path)
    if not prev.exists():
        hint = f"; there is no previous checkpoint ({prev})"
    elif (problem := verify_checkpoint(prev)) is None:
        hint = f"; the checkpoint before it is intact at {prev}: move it to {path} to resume from there"
    else:
        hint = f"; the previous checkpoint is damaged too ({problem})"
    return CheckpointError(f"cannot resume: {err}{hint}")


def config_changes(saved: dict, current: dict, ignore: set[str] = frozenset(), defaults: dict | None = None) -> list[str]:
    """The fields of `current` whose values differ from `saved` ("name: saved -> current"), skipping `ignore`.
    A field the saved config lacks (added in a later version) counts as its default from `defaults`."""
    defaults = defaults or {}
    changes = []
    for name, value in current.items():
        if name in ignore:
            continue
        old = saved.get(name, defaults.get(name, value))
        if _normalised(old) != _normalised(value):
            changes.append(f"{name}: {old!r} -> {value!r}")
    return changes


def _normalised(value: Any) -> Any:
    """Tuples and lists compare equal (a JSON round trip turns one into the other); NaN equals NaN."""
    if isinstance(value, (list, tuple)):
        return [_normalised(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value
