"""Input checks shared by the reference, Triton and fake kernels; the C++ kernels mirror them.

Every message names the op, the argument, what was expected and what came (STYLE.md, gsplat habit).
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def check_same_device(op: str, names: tuple[str, ...], *tensors: torch.Tensor) -> None:
    devices = [t.device for t in tensors]
    if any(d != devices[0] for d in devices):
        got = ", ".join(f"{n} on {d}" for n, d in zip(names, devices))
        raise ValueError(f"{op}: {', '.join(names)} must be on the same device, got {got}")


def check_vq_args(op: str, z: torch.Tensor, codebook: torch.Tensor) -> None:
    check_float(op, "z", z)
    check_float(op, "codebook", codebook)
    check_same_device(op, ("z", "codebook"), z, codebook)
    if codebook.dim() != 2:
        raise ValueError(f"{op}: codebook must be [K, D], got shape {list(codebook.shape)}")
    if codebook.shape[0] < 1:
        raise ValueError(f"{op}: codebook must hold at least one code (K >= 1), got shape {list(codebook.shape)}")
    if codebook.shape[1] < 1:
        raise ValueError(f"{op}: code dimension D must be >= 1, got codebook shape {list(codebook.shape)}")
    if z.dim() not in (2, 4):
        raise ValueError(f"{op}: z must be [N, D] or [B, D, H, W], got shape {list(z.shape)}")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"{op}: z's channel dim must equal codebook.size(1) = {codebook.shape[1]}, got z shape {list(z.shape)}"
        )
