"""Input checks shared by the reference, Triton and fake kernels; the C++ kernels mirror them.

Every message names the op, the argument, what was expected and what came.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class InputError(Exception):
    """An error in what the caller gave (an argument, a config field, a file, a flag), raised by our checks with a
    message naming it and saying what was expected. The `mage` command prints these as one line; any other
    exception is a bug and keeps its traceback. Raised as InputValueError or InputTypeError, so `except
    ValueError` / `except TypeError` catch them as before."""


class InputValueError(InputError, ValueError):
    pass


class InputTypeError(InputError, TypeError):
    pass


# ---------------------------------------------------------------------------- Python arguments


def _type_name(v) -> str:
    return type(v).__name__


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"{op}: {name} must be a torch.Tensor, got {_type_name(t)}")


def _range_text(lo, hi, lo_open: bool = False) -> str:
    if lo is not None and lo != -math.inf and hi is not None and hi != math.inf:
        return f"in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None and lo != -math.inf:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None and hi != math.inf:
        return f"<= {hi}"
    return ""


def check_int(op: str, name: str, v, lo: int | None = None, hi: int | None = None) -> int:
    """`v` must be an integer (not a bool, not a float such as 3.7 or 3.0) in [lo, hi]; returns it as int."""
    if isinstance(v, bool) or not isinstance(v, (numbers.Integral, torch.SymInt)):
        raise InputTypeError(f"{op}: {name} must be an int, got {_type_name(v)} {v!r}")
    if isinstance(v, numbers.Integral):
        v = int(v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise InputValueError(f"{op}: {name} must be {_range_text(lo, hi)}, got {v}")
    return v


def check_real(op: str, name: str, v, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False) -> float:
    """`v` must be a finite real number in [lo, hi] (or (lo, hi] with lo_open); returns it as float."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise InputTypeError(f"{op}: {name} must be a real number, got {_type_name(v)} {v!r}")
    v = float(v)
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        raise InputValueError(f"{op}: {name} must be a finite number {_range_text(lo, hi, lo_open)}, got {v}".replace(
            " , got", ", got"))
    return v


def check_steps(op: str, steps, num_tokens) -> int:
    """Decoding steps T for a grid of `num_tokens` positions: 1 <= T <= num_tokens (at least 1). Every step
    but the last commits at least one token, so steps beyond the token count would only rerun the model on
    the one token left masked (docs/REFERENCE.md 5.2.9)."""
    check_int(op, "steps", steps, 1)
    if isinstance(steps, numbers.Integral) and isinstance(num_tokens, numbers.Integral) and steps > max(num_tokens, 1):
        raise InputValueError(f"{op}: steps must be in [1, {max(num_tokens, 1)}] for {num_tokens} token positions "
                              f"(each step commits at least one token), got {steps}")
    return steps


def check_generator(op: str, name: str, g) -> None:
    if g is not None and not isinstance(g, torch.Generator):
        hint = " (seed a generator: torch.Generator().manual_seed(seed))" if isinstance(g, int) else ""
        raise InputTypeError(f"{op}: {name} must be a torch.Generator or None, got {_type_name(g)} {g!r}{hint}")


def check_bool(op: str, name: str, v) -> None:
    if not isinstance(v, bool):
        raise InputTypeError(f"{op}: {name} must be True or False, got {_type_name(v)} {v!r}")


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise InputTypeError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def check_same_device(op: str, names: tuple[str, ...], *tensors: torch.Tensor) -> None:
    devices = [t.device for t in tensors]
    if any(d != devices[0] for d in devices):
        got = ", ".join(f"{n} on {d}" for n, d in zip(names, devices))
        raise InputValueError(f"{op}: {', '.join(names)} must be on the same device, got {got}")


def check_vq_args(op: str, z: torch.Tensor, codebook: torch.Tensor) -> None:
    check_float(op, "z", z)
    check_float(op, "codebook", codebook)
    check_same_device(op, ("z", "codebook"), z, codebook)
    if codebook.dim() != 2:
        raise InputValueError(f"{op}: codebook must be [K, D], got shape {list(codebook.shape)}")
    if codebook.shape[0] < 1:
        raise InputValueError(f"{op}: codebook must hold at least one code (K >= 1), got shape {list(codebook.shape)}")
    if codebook.shape[1] < 1:
        raise InputValueError(f"{op}: code dimension D must be >= 1, got codebook shape {list(codebook.shape)}")
    if z.dim() not in (2, 4):
        raise InputValueError(f"{op}: z must be [N, D] or [B, D, H, W], got shape {list(z.shape)}")
    if z.shape[1] != codebook.shape[1]:
        raise InputValueError(
            f"{op}: z's channel dim must equal codebook.size(1) = {codebook.shape[1]}, got z shape {list(z.shape)}"
        )


REMASK_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_remask_args(
    op: str,
    vocab_rows: int,
    ids: torch.Tensor,
    num_masked: torch.Tensor,
    seed: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    temperature: float,
    choice_temperature: float,
) -> None:
    """Checks shared by `remask_step` and `remask_step_from_hidden` once the [B, L] token grid is known.
    `vocab_rows` is V' (logits' last dim, or the embedding's row count)."""
    if ids.dtype != torch.int64:
        raise InputTypeError(f"{op}: ids must be int64, got {ids.dtype}")
    check_same_device(op, ("ids", "num_masked", "seed"), ids, num_masked, seed)
    if num_masked.dtype != torch.int64:
        raise InputTypeError(f"{op}: num_masked must be int64, got {num_masked.dtype}")
    if seed.dtype != torch.int64:
        raise InputTypeError(f"{op}: seed must be int64, got {seed.dtype}")
    if ids.dim() != 2:
        raise InputValueError(f"{op}: ids must be [B, L], got shape {tuple(ids.shape)}")
    if num_masked.shape != (ids.shape[0],):
        raise InputValueError(f"{op}: num_masked must be [B] = [{ids.shape[0]}], got shape {tuple(num_masked.shape)}")
    if seed.shape != (2,):
        raise InputValueError(f"{op}: seed must be [2] (seed, offset), got shape {tuple(seed.shape)}")
    if not 1 <= vocab_size <= vocab_rows:
        raise InputValueError(f"{op}: vocab_size must be in [1, {vocab_rows}] (the logits' last dim), got {vocab_size}")
    check_sampled_vocab(op, mask_id, vocab_size)
    if vocab_size >= 2**31 - 64:
        raise InputValueError(f"{op}: vocab_size must be < 2^31 - 64, got {vocab_size}")
    if not (temperature > 0.0 and temperature < float("inf")):
        raise InputValueError(f"{op}: temperature must be finite and > 0, got {temperature}")
    if not (choice_temperature >= 0.0 and choice_temperature < float("inf")):
        raise InputValueError(f"{op}: choice_temperature must be finite and >= 0, got {choice_temperature}")


def check_remask_logits(op: str, logits: torch.Tensor, ids: torch.Tensor) -> None:
    if logits.dtype not in REMASK_LOGIT_DTYPES:
        raise InputTypeError(f"{op}: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() != 3:
        raise InputValueError(f"{op}: logits must be [B, L, V], got shape {tuple(logits.shape)}")
    check_same_device(op, ("logits", "ids"), logits, ids)
    if ids.dim() == 2 and logits.shape[:2] != ids.shape:
        raise InputValueError(
            f"{op}: logits [B, L, V] and ids [B, L] disagree: logits {tuple(logits.shape)}, ids {tuple(ids.shape)}"
        )


def check_remask_hidden(
    op: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor
) -> None:
    for name, t in (("hidden", hidden), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if t.dtype not in REMASK_LOGIT_DTYPES:
            raise InputTypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    check_same_device(op, ("hidden", "weight", "ids"), hidden, weight, ids)
    if bias is not None:
        check_same_device(op, ("weight", "bias"), weight, bias)
    if hidden.dim() != 3:
        raise InputValueError(f"{op}: hidden must be [B, L, C], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise InputValueError(
            f"{op}: weight must be [V, C] with C = hidden.size(2) = {hidden.shape[2]}, got shape {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise InputValueError(f"{op}: bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    if ids.dim() == 2 and hidden.shape[:2] != ids.shape:
        raise InputValueError(
            f"{op}: hidden [B, L, C] and ids [B, L] disagree: hidden {tuple(hidden.shape)}, ids {tuple(ids.shape)}"
        )


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _values_checkable(t: torch.Tensor) -> bool:
    """Value checks (ranges, order) read the data: free on CPU, a host sync on GPU, impossible on fake
    tensors. So they run on real CPU tensors only; GPU kernels document what they assume instead."""
    fake = isinstance(t, torch._subclasses.FakeTensor)
    return t.device.type == "cpu" and not fake and not torch.compiler.is_compiling()


def check_counts(op: str, name: str, counts: torch.Tensor, B: int, L: int, device: torch.device,
                 like: str = "noise") -> None:
    check_tensor(op, name, counts)
    if counts.dtype != torch.int64:
        raise InputTypeError(f"{op}: {name} must be int64, got {counts.dtype}")
    if counts.dim() > 1 or (counts.dim() == 1 and counts.shape[0] != B):
        raise InputValueError(f"{op}: {name} must be a scalar or [B] = [{B}], got shape {_shape(counts)}")
    if counts.device != device:
        raise InputValueError(f"{op}: {name} must be on the device of {like} ({device}), got {counts.device}")
    if _values_checkable(counts) and counts.numel() and bool(((counts < 0) | (counts > L)).any()):
        raise InputValueError(f"{op}: {name} must lie in [0, L] = [0, {L}], got values {counts.tolist()}")


def check_mask_plan_args(
    op: str, noise: torch.Tensor, num_masked: torch.Tensor, num_dropped: torch.Tensor, num_kept: int
) -> None:
    check_float(op, "noise", noise)
    if noise.dim() != 2:
        raise InputValueError(f"{op}: noise must be [B, L], got shape {_shape(noise)}")
    B, L = noise.shape
    check_counts(op, "num_masked", num_masked, B, L, noise.device)
    check_counts(op, "num_dropped", num_dropped, B, L, noise.device)
    if not 0 <= num_kept <= L:
        raise InputValueError(f"{op}: num_kept must lie in [0, L] = [0, {L}], got {num_kept}")
    if _values_checkable(num_dropped) and num_dropped.numel() and int(num_dropped.min()) < L - num_kept:
        raise InputValueError(
            f"{op}: keep_idx has num_kept = {num_kept} columns but a row keeps L - num_dropped = "
            f"{L - int(num_dropped.min())} tokens; pass num_kept >= L - min(num_dropped)"
        )


def check_keep_idx(op: str, keep_idx: torch.Tensor, B: int, L: int, device: torch.device) -> None:
    if keep_idx.dtype != torch.int64:
        raise InputTypeError(f"{op}: keep_idx must be int64, got {keep_idx.dtype}")
    if keep_idx.dim() != 2 or keep_idx.shape[0] != B:
        raise InputValueError(f"{op}: keep_idx must be [B, Lk] with B = {B}, got shape {_shape(keep_idx)}")
    if keep_idx.shape[1] > L:
        raise InputValueError(f"{op}: keep_idx must be [B, Lk] with Lk <= L = {L}, got shape {_shape(keep_idx)}")
    if keep_idx.device != device:
        raise InputValueError(f"{op}: keep_idx must be on {device}, got {keep_idx.device}")
    if not _values_checkable(keep_idx) or keep_idx.numel() == 0:
        return
    # Valid rows: positions in [0, L), strictly increasing, then only -1 (padding).
    bad_range = (keep_idx < -1) | (keep_idx >= L)
    if bool(bad_range.any()):
        b, j = (int(v) for v in bad_range.nonzero()[0])
        raise InputValueError(f"{op}: keep_idx must hold token positions in [0, L) = [0, {L}) or -1, "
                              f"got keep_idx[{b}, {j}] = {int(keep_idx[b, j])}")
    prev, nxt = keep_idx[:, :-1], keep_idx[:, 1:]
    bad_order = ((prev >= 0) & (nxt >= 0) & (nxt <= prev)) | ((prev < 0) & (nxt >= 0))
    if bool(bad_order.any()):
        b, j = (int(v) for v in bad_order.nonzero()[0])
        raise InputValueError(f"{op}: keep_idx rows must be strictly increasing positions followed only by -1, "
                              f"got keep_idx[{b}, {j}:{j + 2}] = {keep_idx[b, j:j + 2].tolist()}")


def check_gather_keep_args(op: str, x: torch.Tensor, keep_idx: torch.Tensor, L: int | None = None) -> None:
    name = "x" if L is None else "grad"
    check_float(op, name, x)
    if x.dim() != 3 or x.shape[1] < 1:
        raise InputValueError(f"{op}: {name} must be [B, 1+L, C], got shape {_shape(x)}")
    if L is None:
        L = x.shape[1] - 1
    elif x.shape[1] != 1 + keep_idx.shape[-1]:
        raise InputValueError(f"{op}: {name} must be [B, 1+Lk, C] with Lk = keep_idx.size(1) = {keep_idx.shape[-1]}, "
                              f"got shape {_shape(x)}")
    check_keep_idx(op, keep_idx, x.shape[0], L, x.device)


def check_pad_with_cls_args(
    op: str,
    y: torch.Tensor,
    keep_idx: torch.Tensor,
    masked: torch.Tensor,
    pos_embed: torch.Tensor | None,
    pad: torch.Tensor | None,
) -> None:
    check_float(op, "y", y)
    if y.dim() != 3:
        raise InputValueError(f"{op}: y must be [B, 1+Lk, C], got shape {_shape(y)}")
    B, C = y.shape[0], y.shape[2]
    if masked.dtype != torch.bool:
        raise InputTypeError(f"{op}: masked must be bool, got {masked.dtype}")
    if masked.dim() != 2 or masked.shape[0] != B:
        raise InputValueError(f"{op}: masked must be [B, L] with B = {B}, got shape {_shape(masked)}")
    if masked.device != y.device:
        raise InputValueError(f"{op}: masked must be on {y.device}, got {masked.device}")
    L = masked.shape[1]
    check_keep_idx(op, keep_idx, B, L, y.device)
    if y.shape[1] != 1 + keep_idx.shape[1]:
        raise InputValueError(f"{op}: y must be [B, 1+Lk, C] with Lk = keep_idx.size(1) = {keep_idx.shape[1]}, "
                              f"got shape {_shape(y)}")
    for name, t, shape in (("pos_embed", pos_embed, (L + 1, C)), ("pad", pad, (C,))):
        if t is None:
            continue
        if t.dtype != y.dtype:
            raise InputTypeError(f"{op}: {name} must have y's dtype {y.dtype}, got {t.dtype}")
        if _shape(t) != shape:
            raise InputValueError(f"{op}: {name} must be {list(shape)} (L = {L}, C = {C}), got shape {_shape(t)}")
        if t.device != y.device:
            raise InputValueError(f"{op}: {name} must be on {y.device}, got {t.device}")


def check_pad_with_cls_backward_args(op: str, grad_z: torch.Tensor, keep_idx: torch.Tensor, masked: torch.Tensor) -> None:
    check_float(op, "grad_z", grad_z)
    if grad_z.dim() != 3:
        raise InputValueError(f"{op}: grad_z must be [B, 1+L, C], got shape {_shape(grad_z)}")
    B = grad_z.shape[0]
    if masked.dtype != torch.bool:
        raise InputTypeError(f"{op}: masked must be bool, got {masked.dtype}")
    if masked.dim() != 2 or masked.shape[0] != B or grad_z.shape[1] != 1 + masked.shape[1]:
        raise InputValueError(f"{op}: masked must be [B, L] with grad_z [B, 1+L, C] = {_shape(grad_z)}, "
                              f"got shape {_shape(masked)}")
    if masked.device != grad_z.device:
        raise InputValueError(f"{op}: masked must be on {grad_z.device}, got {masked.device}")
    check_keep_idx(op, keep_idx, B, masked.shape[1], grad_z.device)


# ---------------------------------------------------------------------------- iterative decoding


def check_maskgit_args(op: str, logits_fn, hidden_fn, head_weight, head_bias, ids, steps, mask_id, choice_temperature,
                       temperature, generator, vocab_size, reference_ties) -> None:
    """The arguments `maskgit_sample` and `maskgit_step` share (Python-side only: no value is read)."""
    if (logits_fn is None) == (hidden_fn is None):
        raise InputValueError(f"{op}: pass either logits_fn (the model's logits) or hidden_fn with head_weight, "
                              f"got logits_fn={_type_name(logits_fn)}, hidden_fn={_type_name(hidden_fn)}")
    for name, fn in (("logits_fn", logits_fn), ("hidden_fn", hidden_fn)):
        if fn is not None and not callable(fn):
            raise InputTypeError(f"{op}: {name} must be callable (ids [B, L] -> tensor), got {_type_name(fn)}")
    if hidden_fn is not None:
        if head_weight is None:
            raise InputValueError(f"{op}: hidden_fn needs head_weight [V, C] (and head_bias [V] if the head has one)")
        check_tensor(op, "head_weight", head_weight)
        if head_weight.dim() != 2:
            raise InputValueError(f"{op}: head_weight must be [V, C], got shape {tuple(head_weight.shape)}")
        if head_bias is not None:
            check_tensor(op, "head_bias", head_bias)
    check_tensor(op, "ids", ids)
    if ids.dtype != torch.int64 or ids.dim() != 2:
        raise InputTypeError(f"{op}: ids must be an int64 tensor [B, L], got {ids.dtype} of shape {tuple(ids.shape)}")
    check_steps(op, steps, ids.shape[1])
    check_int(op, "mask_id", mask_id)
    check_real(op, "choice_temperature", choice_temperature, 0.0)
    check_real(op, "temperature", temperature, 0.0, lo_open=True)
    check_generator(op, "generator", generator)
    if vocab_size is not None:
        check_int(op, "vocab_size", vocab_size, 1)
    check_bool(op, "reference_ties", reference_ties)
    if hidden_fn is not None:
        check_sampled_vocab(op, mask_id, head_weight.shape[0] if vocab_size is None else vocab_size)


def check_sampled_vocab(op: str, mask_id: int, vocab_size: int) -> None:
    """A sampled token equal to mask_id would read as still masked (rows would end with extra masks), so
    mask_id must lie outside the ids the sampler draws from (the C++ and CUDA kernels say the same)."""
    if 0 <= mask_id < vocab_size:
        raise InputValueError(f"{op}: mask_id must not be a token that can be sampled, i.e. outside [0, vocab_size) = "
                              f"[0, {vocab_size}), got mask_id = {mask_id}, so the sampler could draw [MASK]; pass "
                              f"vocab_size <= mask_id (the number of token ids to sample from, e.g. the codebook size)")
