"""Input checks of the model layer, in one place (the ops' checks are in mage_kernels/_checks.py, whose
helpers these reuse): configs, images, token ids, pixel masks, generation arguments and models.

Every message names the argument, what was expected and what came. Checks that read tensor values (ranges,
NaN) run on real CPU tensors only where reading would cost a host sync elsewhere, and never on meta tensors.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from mage_kernels._checks import (InputError, InputTypeError, InputValueError, check_generator, check_int, check_real,
                                  check_steps, check_tensor)

__all__ = ["all_finite", "check_config", "check_dtype", "check_generation", "check_ids", "check_images", "check_model",
           "check_pixel_mask", "check_generator", "check_int", "check_real", "check_steps", "check_tensor",
           "nearest_multiples", "to_model_dtype", "InputError", "InputTypeError", "InputValueError"]

INF = math.inf
# Bounds of config fields: (low, high, low excluded). Model configs: every int not listed is >= 1. Run configs
# (TrainConfig, ProbeConfig, EvalConfig, ClassifierConfig): every int not listed is >= 0.
_MODEL_BOUNDS = {
    "dropout": (0.0, 1.0, False), "mlp_ratio": (0.0, INF, True), "norm_eps": (0.0, 1.0, True),
    "head_norm_eps": (0.0, 1.0, True), "embed_std": (0.0, INF, True),
}
_RUN_BOUNDS = {
    "steps": (1, None, False), "batch_size": (1, None, False), "log_every": (1, None, False),
    "ckpt_every": (1, None, False), "image_size": (1, None, False), "projector_hidden": (1, None, False),
    "projector_dim": (1, None, False), "epochs": (1, None, False),
    "blr": (0.0, INF, True), "lr": (0.0, INF, True), "base_lr": (0.0, INF, True), "min_lr": (0.0, INF, False),
    "weight_decay": (0.0, INF, False), "clip_grad": (0.0, INF, False), "momentum": (0.0, 1.0, False),
    "mask_ratio_min": (0.0, 1.0, False), "mask_ratio_max": (0.0, 1.0, False), "mask_ratio_mu": (-INF, INF, False),
    "mask_ratio_std": (0.0, INF, True), "label_smoothing": (0.0, 1.0, False), "mae_mask_ratio": (0.0, 1.0, True),
    "contrastive_weight": (0.0, INF, False), "contrastive_temperature": (0.0, INF, True),
    "betas": (0.0, 1.0, False), "crop_scale": (0.0, 1.0, False),
    "num": (1, None, False), "width": (1, None, False), "feature_dim": (1, None, False),
    "train_size": (1, None, False),
}
_RUN_CONFIGS = ("TrainConfig", "ProbeConfig", "EvalConfig", "ClassifierConfig")


def check_config(config) -> None:
    """Types and ranges of every field of a config dataclass (MAGEConfig, TokenizerConfig, MAEConfig,
    TrainConfig, ProbeConfig, EvalConfig, ClassifierConfig), from its annotations: ints are ints (not 3.0,
    not "32") within bounds, floats finite numbers within bounds, bools bools, strs strs, dicts dicts, tuples
    sequences of such numbers; `X | None` also takes None. Nested configs check themselves."""
    what = type(config).__name__
    run = what in _RUN_CONFIGS
    bounds = _RUN_BOUNDS if run else _MODEL_BOUNDS
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), str(f.type).replace(" ", "")
        if kind.endswith("|None"):
            if value is None:
                continue
            kind = kind[: -len("|None")]
        lo, hi, lo_open = bounds.get(f.name, (0 if run else 1, None, False))
        if kind == "int":
            check_int(what, f.name, value, lo, hi)
        elif kind == "float":
            lo, hi = (-INF if lo is None else lo), (INF if hi is None else hi)
            check_real(what, f.name, value, lo, hi, lo_open=lo_open)
        elif kind in ("bool", "str", "dict") and not isinstance(value, {"bool": bool, "str": str, "dict": dict}[kind]):
            raise InputTypeError(f"{what}: {f.name} must be a {kind}, got {type(value).__name__} {value!r}")
        elif kind.startswith("tuple"):
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) == 0:
                raise InputTypeError(f"{what}: {f.name} must be a non-empty sequence, got {value!r}")
            for v in value:
                if kind.startswith("tuple[int"):
                    check_int(what, f.name, v, lo, hi)
                else:
                    check_real(what, f.name, v, -INF if lo is None else lo, INF if hi is None else hi)


def nearest_multiples(value: int, factor: int) -> str:
    """The multiples of `factor` around `value`, for messages: "16" (below 16) or "32 or 48" (for 40)."""
    below = value // factor * factor
    return f"{below} or {below + factor}" if below > 0 else f"{below + factor}"


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in a float tensor. min/max propagate NaN, and one pass of aminmax is ~15x faster here
    than isfinite(t).all() (which writes a bool tensor first)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t.detach().reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_dtype(op: str, dtype, name: str = "dtype") -> None:
    """None or a floating-point torch.dtype (what the model's weights are cast to)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputTypeError(f"{op}: {name} must be None or a floating-point torch.dtype (torch.float32, "
                             f"torch.bfloat16, torch.float16, torch.float64), got {dtype!r}")


def to_model_dtype(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """Float input in the dtype of the module's weights (fp64 / fp16 / bf16 images into an fp32 model)."""
    dtype = next(module.parameters()).dtype
    return x if x.dtype == dtype else x.to(dtype)


def _values_readable(t: torch.Tensor) -> bool:
    return t.device.type != "meta" and not torch.compiler.is_compiling()


def check_images(images, cfg, name: str = "images", check_range: bool = True,
                 device: torch.device | None = None) -> None:
    """images: a float [B, C, H, W] batch at the tokenizer's channels and resolution, in [0, 1] (no NaN),
    on `device` when given. The range check reads the values (a host sync on GPU); training loops skip it."""
    check_tensor("images", name, images)
    if not images.is_floating_point():
        raise InputTypeError(f"{name} must be a float tensor in [0, 1], got {images.dtype} (convert uint8 with "
                             "x / 255)")
    r = cfg.resolution
    if images.dim() != 4 or images.shape[1] != cfg.in_channels or tuple(images.shape[2:]) != (r, r):
        raise InputValueError(f"{name} must be [B, {cfg.in_channels}, {r}, {r}], got shape {tuple(images.shape)}")
    if device is not None and images.device != device:
        raise InputValueError(f"{name} must be on the model's device {device}, got {images.device}")
    if check_range:
        check_unit_range(name, images)


def check_unit_range(name: str, images: torch.Tensor) -> None:
    """Float images hold values in [0, 1], no NaN (read on real tensors only: a host sync on GPU)."""
    if images.numel() == 0 or not images.is_floating_point() or not _values_readable(images):
        return
    outside = ~((images >= 0.0) & (images <= 1.0))  # NaN is outside too
    if bool(outside.any()):
        nan = int(torch.isnan(images).sum())
        finite = images[torch.isfinite(images)]
        span = f"min {float(finite.min()):.4g}, max {float(finite.max()):.4g}" if finite.numel() else "no finite value"
        raise InputValueError(
            f"{name} must hold values in [0, 1] (no mean/std normalisation, docs/REFERENCE.md 3.2), got "
            f"{span}" + (f" and {nan} NaN value(s)" if nan else "")
        )


def check_ids(config, ids, mask=None, name: str = "ids") -> None:
    """ids: int64 [B, L] token ids in [0, vocab_size); mask: None or bool [B, L] on the same device."""
    L, V = config.num_tokens, config.vocab_size
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long:
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise InputTypeError(f"MAGE: {name} must be an int64 tensor [B, {L}], got {got}")
    if ids.dim() != 2 or ids.shape[1] != L:
        g = config.tokenizer.grid
        raise InputValueError(f"MAGE: {name} must be [B, {L}] (one id per token of the {g}x{g} grid), "
                              f"got shape {tuple(ids.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise InputTypeError(f"MAGE: mask must be a bool tensor [B, L], got {got}")
        if mask.shape != ids.shape:
            raise InputValueError(f"MAGE: mask must have the shape of ids {tuple(ids.shape)}, got {tuple(mask.shape)}")
        if mask.device != ids.device:
            raise InputValueError(f"MAGE: mask is on {mask.device} but ids on {ids.device}")
    # Reading values costs a host sync on GPU, so the range is checked on CPU tensors only.
    if ids.device.type == "cpu" and ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= V:
            raise InputValueError(f"MAGE: {name} must lie in [0, {V}) (vocabulary of {V}), got min {lo}, max {hi}")


def check_pixel_mask(pixel_mask, images: torch.Tensor) -> None:
    """pixel_mask: a tensor [B, H, W] or [B, 1, H, W] matching images [B, C, H, W] in batch and size."""
    check_tensor("inpaint", "pixel_mask", pixel_mask)
    if pixel_mask.dim() not in (3, 4) or (pixel_mask.dim() == 4 and pixel_mask.shape[1] != 1):
        raise InputValueError(f"inpaint: pixel_mask must be [B, H, W] or [B, 1, H, W], got shape "
                              f"{tuple(pixel_mask.shape)}")
    if pixel_mask.shape[0] != images.shape[0] or pixel_mask.shape[-2:] != images.shape[-2:]:
        raise InputValueError(f"inpaint: pixel_mask {tuple(pixel_mask.shape)} must match images {tuple(images.shape)} "
                              "in batch and size")


def check_model(op: str, model, cls: type) -> None:
    """`model` is a `cls` instance with weights (not on the meta device)."""
    if not isinstance(model, cls):
        raise InputTypeError(f"{op}: model must be a {cls.__module__.split('.')[0]}.{cls.__name__}, "
                             f"got {type(model).__name__}")
    if model.device.type == "meta":
        raise InputValueError(f"{op}: model is on the meta device (built without weights): load its weights first, "
                              "e.g. with mage.load or mage.load_official")


def check_generation(op: str, *, steps, choice_temperature, generator, dtype, device: torch.device,
                     num_tokens: int) -> None:
    """The arguments every decoding entry point shares; steps at most the model's `num_tokens`."""
    check_int(op, "steps", steps, 1)
    check_real(op, "choice_temperature", choice_temperature, 0.0)
    check_generator(op, "generator", generator)
    if generator is not None and generator.device.type not in ("cpu", device.type):
        raise InputValueError(f"{op}: generator is on {generator.device}, the model on {device}: use a generator on "
                              f"the model's device or the CPU")
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise InputValueError(f"{op}: dtype must be None, torch.float32, torch.bfloat16 or torch.float16, "
                              f"got {dtype!r}")
    check_steps(op, steps, num_tokens)
