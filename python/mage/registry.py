"""Models by name: `mage.create_model("mage_vit_base_patch16", checkpoint_path=...)` and `mage.list_models()`."""

from __future__ import annotations

import fnmatch
import os

import torch

from .checkpoint import CheckpointError, cast_floating, load_checked, read_official_state
from .hub import WEIGHTS_NAME
from .model import CONSTRUCTORS, MAGE


def list_models(pattern: str = "*") -> list[str]:
    """Names `create_model` accepts, sorted; `pattern` filters them shell-style ("*large*")."""
    return sorted(n for n in CONSTRUCTORS if fnmatch.fnmatch(n, pattern))


def _read_state(path: str) -> tuple[str, dict]:
    """A state dict from any of our formats: a pretrained folder, our .safetensors file, an official .pth."""
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS_NAME)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return path, load_file(path)
    return read_official_state(path)


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
    if name not in CONSTRUCTORS:
        raise ValueError(f"unknown model {name!r}; mage.list_models() gives {list_models()}")
    build = CONSTRUCTORS[name]
    if checkpoint_path is None:
        return build(**overrides).to(device=device, dtype=dtype)
    what, state = _read_state(os.fspath(checkpoint_path))
    with torch.device("meta"):
        model = build(**overrides)
    try:
        load_checked(model, cast_floating(state, dtype), what=what)
    except CheckpointError as err:
        raise CheckpointError(f"{err}\n(built {name} with overrides {overrides or '{}'})") from None
    return model.to(device=device) if device is not None else model
