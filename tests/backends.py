"""Every available kernel of an op, by backend name, for tests that hold each backend to the same contract.

`kernels(op)` maps "cpu" (the C++ library, when built), "triton" (under TRITON_INTERPRET=1 on CPU, or on
a GPU) and "reference" to callables with the schema's signature of `torch.ops.mage.<op>`. Tests that
need the public wrapper's checks too call `public(op, backend)`.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import mage_kernels as mk
from mage_kernels import reference

_TRITON_MODULE = {
    "vq_nearest": "vq", "vq_quantize": "vq",
    "mask_plan": "masking", "gather_keep": "masking", "scatter_keep": "masking", "pad_with_cls": "masking",
    "pad_with_cls_backward": "masking",
    "remask_step": "remask", "remask_step_from_hidden": "remask",
}
BACKENDS = ("cpu", "triton", "reference")

# Backends whose vq_nearest / vq_quantize kernel does not yet keep the exact=True contract for every finite
# input (issue 11 item 1: magnitudes whose squares overflow, distances that tie in fp64). Every strict xfail
# of that contract (test_vq_exact.py, test_fuzz.py) is keyed on this dict alone: when a backend's fix lands,
# delete its entry and nothing else.
VQ_EXACT_PENDING = {
    "cpu": "issue 11 item 1: exact vq for every finite input, C++ kernel (fix on branch cpuperf)",
}


def vq_exact_marks(backend: str) -> list:
    """The strict xfail of a backend listed in VQ_EXACT_PENDING, else nothing."""
    reason = VQ_EXACT_PENDING.get(backend)
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None and mk.build_info()["triton_interpret"]


def available(backend: str) -> bool:
    if backend == "cpu":
        return mk.build_info()["native"] is not None
    if backend == "triton":
        return _has_triton()
    return True


def kernel(op: str, backend: str):
    """The raw kernel of `op` on `backend` (skips the test when that backend is not available here)."""
    if not available(backend):
        pytest.skip(f"backend {backend} is not available here")
    if backend == "cpu":
        # The C++ kernel is what the dispatcher runs for CPU tensors when the library is built.
        assert mk.build_info()["ops"][op]["cpu"] == "cpu"
        return getattr(torch.ops.mage, op)
    if backend == "triton":
        module = importlib.import_module(f"mage_kernels.triton.{_TRITON_MODULE[op]}")
        return getattr(module, op)
    return getattr(reference, op)


def backend_params(xfail: dict[str, str] | None = None):
    """pytest params over BACKENDS; `xfail` maps a backend to the reason it is known to fail (strict, so
    the marker must go when the fix lands)."""
    xfail = xfail or {}
    return [
        pytest.param(b, marks=pytest.mark.xfail(strict=True, reason=xfail[b])) if b in xfail else b
        for b in BACKENDS
    ]
