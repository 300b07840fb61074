"""Nearest-code quantization ops (docs/OPS.md op 1): schema, fake kernel, autograd and the public API.

The VQGAN tokenizer of MAGE (docs/REFERENCE.md 3.3) quantizes every encoder output vector to its
nearest codebook entry in squared L2 distance. Kernels: csrc/vq_cpu.cpp, csrc/vq_cuda.cu,
mage_kernels/triton/vq.py; reference: mage_kernels/reference.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from ._checks import InputValueError, check_bool, check_real, check_tensor, check_vq_args
from ._registry import define, register_kernels

define("vq_nearest(Tensor z, Tensor codebook, *, bool exact=True) -> (Tensor indices, Tensor sqdist)")
define("vq_quantize(Tensor z, Tensor codebook, float beta) -> (Tensor z_q, Tensor indices, Tensor loss, Tensor counts)")
for _op in ("vq_nearest", "vq_quantize"):
    register_kernels(_op, reference=getattr(reference, _op), triton=f"mage_kernels.triton.vq:{_op}")


def _index_shape(z: torch.Tensor) -> tuple:
    return (z.shape[0],) if z.dim() == 2 else (z.shape[0], z.shape[2] * z.shape[3])


@torch.library.register_fake("mage::vq_nearest")
def _(z, codebook, *, exact=True):
    check_vq_args("vq_nearest", z, codebook)
    shape = _index_shape(z)
    return z.new_empty(shape, dtype=torch.long), z.new_empty(shape, dtype=reference.sqdist_dtype(z))


@torch.library.register_fake("mage::vq_quantize")
def _(z, codebook, beta):
    check_vq_args("vq_quantize", z, codebook)
    return (
        torch.empty_like(z, memory_format=torch.contiguous_format),
        z.new_empty(_index_shape(z), dtype=torch.long),
        z.new_empty((), dtype=reference.sqdist_dtype(z)),
        z.new_empty((codebook.shape[0],), dtype=torch.long),
    )


def _residual(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """z - e[indices] as rows (N, D) or (B, H*W, D), in the wider of the two dtypes."""
    dtype = torch.promote_types(torch.promote_types(z.dtype, codebook.dtype), torch.float32)
    return reference.vq_rows(z).to(dtype) - F.embedding(indices.clamp_min(0), codebook.to(dtype))


def _scatter_to_codes(codebook: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    grad = torch.zeros(codebook.shape, dtype=rows.dtype, device=codebook.device)
    grad.index_add_(0, indices.reshape(-1).clamp_min(0), rows.reshape(-1, codebook.shape[1]))
    return grad.to(codebook.dtype)


def _nearest_setup(ctx, inputs, keyword_only_inputs, output):
    z, codebook = inputs[0], inputs[1]
    ctx.save_for_backward(z, codebook, output[0])


def _nearest_backward(ctx, grad_indices, grad_sqdist):
    # d sqdist / dz = 2 (z - e), d sqdist / de = -2 (z - e); indices are piecewise constant.
    z, codebook, indices = ctx.saved_tensors
    g = 2.0 * grad_sqdist[..., None] * _residual(z, codebook, indices)
    grad_z = reference.vq_rows_to_layout(g, z).to(z.dtype) if ctx.needs_input_grad[0] else None
    grad_cb = _scatter_to_codes(codebook, indices, -g) if ctx.needs_input_grad[1] else None
    return grad_z, grad_cb


torch.library.register_autograd("mage::vq_nearest", _nearest_backward, setup_context=_nearest_setup)


def _quantize_setup(ctx, inputs, output):
    z, codebook, beta = inputs
    ctx.beta = beta
    ctx.save_for_backward(z, codebook, output[1])


def _quantize_backward(ctx, grad_zq, grad_indices, grad_loss, grad_counts):
    # z_q = z + sg(e - z) (straight-through): its gradient passes to z unchanged and not to the codebook.
    # loss = mean((sg(e) - z)^2) + beta * mean((e - sg(z))^2): the first term pulls z, the second the code.
    z, codebook, indices = ctx.saved_tensors
    scale = 2.0 * grad_loss / z.numel()
    r = _residual(z, codebook, indices)
    grad_z = grad_cb = None
    if ctx.needs_input_grad[0]:
        grad_z = reference.vq_rows_to_layout(scale * r, z).to(z.dtype)
        if grad_zq is not None:
            grad_z = grad_z + grad_zq
    if ctx.needs_input_grad[1]:
        grad_cb = _scatter_to_codes(codebook, indices, -ctx.beta * scale * r)
    return grad_z, grad_cb, None


torch.library.register_autograd("mage::vq_quantize", _quantize_backward, setup_context=_quantize_setup)


def _raise_on_invalid(op: str, indices: torch.Tensor, check_finite: bool | None) -> None:
    """Index -1 marks a row with non-finite input (or a codebook without a finite code). Checking
    costs a host sync on GPU, so by default it is done on CPU tensors only."""
    if check_finite is None:
        check_finite = indices.device.type == "cpu" and not torch.compiler.is_compiling()
    if check_finite:
        bad = indices.reshape(-1) < 0
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            raise InputValueError(
                f"{op}: {int(bad.sum())} row(s) of z (first: flat row {first}) have non-finite values, or the "
                f"codebook has no finite code; no nearest code exists for them"
            )


def _check_wrapper_args(op: str, z, codebook, check_finite) -> None:
    check_tensor(op, "z", z)
    check_tensor(op, "codebook", codebook)
    if check_finite is not None:
        check_bool(op, "check_finite", check_finite)


def vq_nearest(
    z: torch.Tensor, codebook: torch.Tensor, *, exact: bool = True, check_finite: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook entry of every vector of z (docs/REFERENCE.md 3.3), without the [N, K] distances.

    Args:
        z: (N, D) vectors, or a channels-first map (B, D, H, W) read in place (no permute copy).
        codebook: (K, D). float32 / bfloat16 / float16 (float64 too); z and codebook may differ in dtype.
        exact: precision contract. True: the index is the argmin of the exact squared distances of the
            given values (ties to the lowest index, as `torch.argmin`), for finite inputs of any
            magnitude; kernels rank codes fast (fp32, int16 or bf16 products, on tensor cores on GPU)
            and compare the codes within the ranking's proven rounding bound in fp64 (exactly where
            fp64 cannot tell). False: no such comparison; a code within the ranking's rounding of the
            nearest may be picked, and sqdist may be the ranking's value (CPU: the fp64 distance).
        check_finite: raise ValueError for rows of z with non-finite values (index -1). Default: on CPU
            tensors only, where it costs no host sync.

    Returns:
        indices: int64 (N,) or (B, H*W), row-major over (H, W) like the reference tokenizer.
        sqdist: the minimum squared distance, float32 (float64 for float64 z); differentiable.
    """
    _check_wrapper_args("vq_nearest", z, codebook, check_finite)
    check_bool("vq_nearest", "exact", exact)
    indices, sqdist = torch.ops.mage.vq_nearest(z, codebook, exact=exact)
    _raise_on_invalid("vq_nearest", indices, check_finite)
    return indices, sqdist


def vq_quantize(
    z: torch.Tensor, codebook: torch.Tensor, *, beta: float = 0.25, check_finite: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize for training, in one pass (exact nearest code as `vq_nearest(exact=True)`).

    Returns:
        z_q: like z (same shape and dtype, contiguous): the nearest codes with a straight-through
            gradient to z.
        indices: int64 (N,) or (B, H*W).
        loss: the legacy taming VQ loss mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2) (beta
            multiplies the codebook term, docs/REFERENCE.md 3.3); float32 (float64 for float64 z).
        counts: int64 (K,) usage of each code in this batch (for dead-code restarts and perplexity).
    """
    _check_wrapper_args("vq_quantize", z, codebook, check_finite)
    beta = check_real("vq_quantize", "beta", beta, 0.0)
    z_q, indices, loss, counts = torch.ops.mage.vq_quantize(z, codebook, beta)
    _raise_on_invalid("vq_quantize", indices, check_finite)
    return z_q, indices, loss, counts
