"""Save and load a standalone VQGAN tokenizer: one safetensors file with its config as metadata."""

from __future__ import annotations

import json
import os

import torch

from .tokenizer import TokenizerConfig, VQGANTokenizer

FORMAT = "mage-kernels/tokenizer-v1"


def save_tokenizer(tokenizer: VQGANTokenizer, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    config = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(tokenizer.config).items()}
    state = {k: v.detach().contiguous() for k, v in tokenizer.state_dict().items()}
    save_file(state, os.fspath(path), metadata={"format": FORMAT, "config": json.dumps(config)})


def load_tokenizer(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> VQGANTokenizer:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a mage-kernels tokenizer file (metadata format {meta.get('format')!r}, "
                         f"expected {FORMAT!r}); official VQGAN weights load with mage.load_official_tokenizer")
    tokenizer = VQGANTokenizer(TokenizerConfig(**json.loads(meta["config"])))
    tokenizer.load_state_dict(load_file(path, device=str(device)))
    return tokenizer.to(device)
