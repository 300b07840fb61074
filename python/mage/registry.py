"""Models by name: `mage.create_model("mage_vit_base_patch16", checkpoint_path=...)` and `mage.list_models()`."""

from __future__ import annotations

import fnmatch
import os

import torch

from ._checks import InputTypeError, InputValueError, check_dtype
from .checkpoint import CheckpointError, load_checked, read_state_dict
from .model import CONSTRUCTORS, MAGE


def list_models(pattern: str = "*") -> list[str]:
    """Names `create_model` accepts, sorted; `pattern` filters them shell-style ("*large*")."""
    if not isinstance(pattern, str):
        raise InputTypeError(f"list_models: pattern must be a str such as '*large*', got {type(pattern).__name__}")
    return sorted(n for n in CONSTRUCTORS if fnmatch.fnmatch(n, pattern))


def create_model(
    name: str,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> MAGE:
    """Build the named model (`list_models()`), MAGEConfig fields in `overrides` replacing its defaults.

    With `checkpoint_path` (a pretrained folder, our .safetensors file or a released .pth) the weights
    are loaded strictly into that architecture, which is built on the meta device first (nothing is
    initialised twice); otherwise the model is freshly initialised (section 4.8). `device` / `dtype`
    place and cast the result.

        model = mage.create_model("mage_vit_base_patch16", checkpoint_path="mage-vitb-1600.pth")
        model = mage.create_model("mage_vit_tiny", tokenizer=mage.TokenizerConfig.tiny())
    """
    if not isinstance(name, str) or name not in CONSTRUCTORS:
        raise InputValueError(f"create_model: name must be one of mage.list_models() {list_models()}, got {name!r}")
    check_dtype("create_model", dtype)
    build = CONSTRUCTORS[name]
    if checkpoint_path is None:
        return build(**overrides).to(device=device, dtype=dtype)
    what, state = read_state_dict(checkpoint_path)
    with torch.device("meta"):
        model = build(**overrides)
    try:
        load_checked(model, state, what=what, dtype=dtype)
    except CheckpointError as err:
        raise CheckpointError(f"{err}\n(built {name} with overrides {overrides or '{}'})") from None
    return model.to(device=device) if device is not None else model
