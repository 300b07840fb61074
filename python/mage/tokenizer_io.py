"""Save and load a standalone VQGAN tokenizer: one safetensors file with its config as metadata."""

from __future__ import annotations

import json
import os

import torch

from .tokenizer import TokenizerConfig, VQGANTokenizer

FORMAT = "mage-kernels/tokenizer-v1"


def save_tokenizer(tokenizer: VQGANTokenizer, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    config = tokenizer._config_dict()
    state = {k: v.detach().contiguous() for k, v in tokenizer.state_dict().items()}
    save_file(state, os.fspath(path), metadata={"format": FORMAT, "config": json.dumps(config)})


def load_tokenizer(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> VQGANTokenizer:
    """Read a file written by `save_tokenizer` / `VQGANTokenizer.save` (strictly), onto `device`, with
    floating-point tensors cast to `dtype` when given."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .checkpoint import cast_floating, load_checked

    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a mage-kernels tokenizer file (metadata format {meta.get('format')!r}, "
                         f"expected {FORMAT!r}); official VQGAN weights load with mage.load_official_tokenizer")
    with torch.device("meta"):
        tokenizer = VQGANTokenizer(TokenizerConfig(**json.loads(meta["config"])))
    load_checked(tokenizer, cast_floating(load_file(path, device=str(device)), dtype), what=path)
    return tokenizer
