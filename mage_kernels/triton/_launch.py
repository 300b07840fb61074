"""What every Triton launcher of this package shares: the device its kernels run on, and one place that
launches them, so the launch configurations the wrappers choose can also be compiled without running
(scripts/static_sm90.py sets `hook`)."""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch
from .._checks import InputValueError

# Read once, like triton.jit reads it when it decorates the kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# When set, called as hook(kernel, grid, args, kwargs) instead of launching (static checks).
hook: Callable | None = None


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), or the static-check hook."""
    if hook is not None:
        hook(kernel, grid, args, kwargs)
    else:
        kernel[grid](*args, **kwargs)


def on_device(op: str, **tensors: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """A context that makes the tensors' CUDA device current (Triton launches on the current device and
    its current stream), after checking that every given tensor is on one device."""
    given = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in given.values()}
    if len(devices) > 1:
        got = ", ".join(f"{name} on {t.device}" for name, t in given.items())
        raise InputValueError(f"{op}: {', '.join(given)} must be on the same device, got {got}")
    device = next(iter(devices)) if devices else None
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
