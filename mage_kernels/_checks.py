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


REMASK_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_remask_args(
    op: str,
    vocab_rows: int,
    ids: torch.Tensor,
    num_masked: torch.Tensor,
    seed: torch.Tensor,
    vocab_size: int,
    temperature: float,
    choice_temperature: float,
) -> None:
    """Checks shared by `remask_step` and `remask_step_from_hidden` once the [B, L] token grid is known.
    `vocab_rows` is V' (logits' last dim, or the embedding's row count)."""
    if ids.dtype != torch.int64:
        raise TypeError(f"{op}: ids must be int64, got {ids.dtype}")
    check_same_device(op, ("ids", "num_masked", "seed"), ids, num_masked, seed)
    if num_masked.dtype != torch.int64:
        raise TypeError(f"{op}: num_masked must be int64, got {num_masked.dtype}")
    if seed.dtype != torch.int64:
        raise TypeError(f"{op}: seed must be int64, got {seed.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{op}: ids must be [B, L], got shape {tuple(ids.shape)}")
    if num_masked.shape != (ids.shape[0],):
        raise ValueError(f"{op}: num_masked must be [B] = [{ids.shape[0]}], got shape {tuple(num_masked.shape)}")
    if seed.shape != (2,):
        raise ValueError(f"{op}: seed must be [2] (seed, offset), got shape {tuple(seed.shape)}")
    if not 1 <= vocab_size <= vocab_rows:
        raise ValueError(f"{op}: vocab_size must be in [1, {vocab_rows}] (the logits' last dim), got {vocab_size}")
    if vocab_size >= 2**31 - 64:
        raise ValueError(f"{op}: vocab_size must be < 2^31 - 64, got {vocab_size}")
    if not (temperature > 0.0 and temperature < float("inf")):
        raise ValueError(f"{op}: temperature must be finite and > 0, got {temperature}")
    if not (choice_temperature >= 0.0 and choice_temperature < float("inf")):
        raise ValueError(f"{op}: choice_temperature must be finite and >= 0, got {choice_temperature}")


def check_remask_logits(op: str, logits: torch.Tensor, ids: torch.Tensor) -> None:
    if logits.dtype not in REMASK_LOGIT_DTYPES:
        raise TypeError(f"{op}: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"{op}: logits must be [B, L, V], got shape {tuple(logits.shape)}")
    check_same_device(op, ("logits", "ids"), logits, ids)
    if ids.dim() == 2 and logits.shape[:2] != ids.shape:
        raise ValueError(
            f"{op}: logits [B, L, V] and ids [B, L] disagree: logits {tuple(logits.shape)}, ids {tuple(ids.shape)}"
        )


def check_remask_hidden(
    op: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor
) -> None:
    for name, t in (("hidden", hidden), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if t.dtype not in REMASK_LOGIT_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    check_same_device(op, ("hidden", "weight", "ids"), hidden, weight, ids)
    if bias is not None:
        check_same_device(op, ("weight", "bias"), weight, bias)
    if hidden.dim() != 3:
        raise ValueError(f"{op}: hidden must be [B, L, C], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"{op}: weight must be [V, C] with C = hidden.size(2) = {hidden.shape[2]}, got shape {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    if ids.dim() == 2 and hidden.shape[:2] != ids.shape:
        raise ValueError(
            f"{op}: hidden [B, L, C] and ids [B, L] disagree: hidden {tuple(hidden.shape)}, ids {tuple(ids.shape)}"
        )
