"""Save and load a standalone VQGAN tokenizer: one safetensors file with its config as metadata, read with
the same checks as a MAGE model file (mage/checkpoint.py)."""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from .checkpoint import load_checked, read_our_file
from .checkpoint_io import TOKENIZER_FORMAT, save_safetensors
from .tokenizer import TokenizerConfig, VQGANTokenizer

FORMAT = TOKENIZER_FORMAT


def save_tokenizer(tokenizer: VQGANTokenizer, path: str | os.PathLike) -> None:
    """Weights and config in one safetensors file, written atomically."""
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(tokenizer.config).items()}
    save_safetensors(tokenizer.state_dict(), {"format": TOKENIZER_FORMAT, "config": json.dumps(config)}, path)


def load_tokenizer(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                   check_finite: bool = True) -> VQGANTokenizer:
    """Read a file written by `save_tokenizer`: the config is validated against the file before anything is
    built; float tensors take float32; NaN/inf weights are refused unless check_finite=False."""
    path = os.fspath(path)
    config, tensors = read_our_file(path, TOKENIZER_FORMAT, TokenizerConfig, device)
    with torch.device("meta"):
        tokenizer = VQGANTokenizer(config)
    load_checked(tokenizer, tensors, what=path, check_finite=check_finite)
    return tokenizer
