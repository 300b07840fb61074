"""The `mage` op namespace: loading the native library and choosing a kernel per device.

Schemas are defined here in Python (once per op, in the op family's module); the C++ library only
registers implementations (`TORCH_LIBRARY_IMPL(mage, CPU/CUDA, ...)`), which the dispatcher accepts
before the schema exists. Backend choice (docs/OPS.md): CUDA kernel on CUDA tensors when built, else
Triton, else the pure-PyTorch reference; C++ on CPU. `MAGE_KERNELS_BACKEND=cuda|triton|cpu|reference`
forces one; it is read once, at import.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
import warnings
from typing import Callable

import torch
from ._checks import InputValueError

BACKENDS = ("cuda", "triton", "cpu", "reference")


def _requested_backend() -> str | None:
    name = os.environ.get("MAGE_KERNELS_BACKEND", "").strip().lower()
    if name and name not in BACKENDS:
        raise InputValueError(f"MAGE_KERNELS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name or None


REQUESTED = _requested_backend()


def _load_native() -> tuple[str | None, str | None]:
    if REQUESTED == "reference":
        return None, "disabled by MAGE_KERNELS_BACKEND=reference"
    # find_spec also resolves the library in scikit-build-core editable installs.
    spec = importlib.util.find_spec("mage_kernels._C")
    if spec is None or spec.origin is None:
        return None, _missing_library_advice()
    try:
        torch.ops.load_library(spec.origin)
    except OSError as err:  # e.g. built against another torch
        return None, f"{spec.origin} failed to load: {err}"
    return spec.origin, None


def _missing_library_advice() -> str:
    """Why _C.so is missing, in the case that matters most: Python imported the source tree (run from the
    repository root, or it is on PYTHONPATH) instead of the package that `pip install .` built and installed."""
    package = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(package)
    if not (os.path.isfile(os.path.join(root, "pyproject.toml")) and os.path.isdir(os.path.join(root, "csrc"))):
        return "mage_kernels/_C.so was not found; build with `pip install . --no-build-isolation`"
    installed = [os.path.join(entry, "mage_kernels") for entry in sys.path
                 if os.path.abspath(entry or os.curdir) != root
                 and glob.glob(os.path.join(entry or os.curdir, "mage_kernels", "_C*.so"))]
    found = f" (an installed build is at {installed[0]})" if installed else ""
    return (f"Python imported the source tree {package}, which holds no built library, because {root} is the "
            f"current directory or on PYTHONPATH{found}. Run from another directory to use the installed package, "
            "or install this tree in editable mode: pip install -e . --no-build-isolation")


NATIVE_PATH, NATIVE_ERROR = _load_native()
if NATIVE_ERROR is not None and REQUESTED != "reference":
    warnings.warn(
        f"mage_kernels: native kernels unavailable ({NATIVE_ERROR}); every op runs its pure-PyTorch reference.",
        RuntimeWarning,
        stacklevel=2,
    )

lib = torch.library.Library("mage", "DEF")
CHOSEN: dict[str, dict[str, str]] = {}  # op -> {"cpu": backend, "cuda": backend}


def triton_usable(device_type: str) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    if device_type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return True


def _lazy(path: str) -> Callable:
    """A kernel given as "module:function", imported on first call (Triton imports take ~1 s)."""
    module, name = path.split(":")
    fn = None

    def call(*args, **kwargs):
        nonlocal fn
        if fn is None:
            fn = getattr(importlib.import_module(module), name)
        return fn(*args, **kwargs)

    call.__name__ = name
    return call


def define(schema: str) -> str:
    """Define `mage::<schema>` and return the op's name."""
    lib.define(schema)
    return schema.split("(", 1)[0]


def _has_native(name: str, key: str) -> bool:
    return NATIVE_PATH is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"mage::{name}", key)


def register_kernels(name: str, *, reference: Callable, triton: str | None = None) -> None:
    """Give `mage::<name>` a kernel for CPU and CUDA tensors, following the backend rules above."""
    choice = {}
    # CPU tensors: C++ unless the reference (or, under TRITON_INTERPRET=1, Triton) is forced.
    if REQUESTED == "triton" and triton and triton_usable("cpu"):
        lib.impl(name, _lazy(triton), "CPU")
        choice["cpu"] = "triton"
    elif _has_native(name, "CPU"):
        choice["cpu"] = "cpu"
    else:
        lib.impl(name, reference, "CPU")
        choice["cpu"] = "reference"
    # CUDA tensors.
    if REQUESTED != "triton" and REQUESTED != "reference" and _has_native(name, "CUDA"):
        choice["cuda"] = "cuda"
    elif REQUESTED != "reference" and triton and triton_usable("cuda"):
        lib.impl(name, _lazy(triton), "CUDA")
        choice["cuda"] = "triton"
    else:
        lib.impl(name, reference, "CUDA")
        choice["cuda"] = "reference"
    if REQUESTED in ("cuda", "triton") and choice["cuda"] != REQUESTED:
        warnings.warn(f"mage::{name}: MAGE_KERNELS_BACKEND={REQUESTED} is not available, using {choice['cuda']}",
                      RuntimeWarning, stacklevel=2)
    CHOSEN[name] = choice
