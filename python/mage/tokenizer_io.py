"""Save and load a standalone VQGAN tokenizer: one safetensors file with its config as metadata, read with
the same checks as a MAGE model file (mage/checkpoint.py)."""

from __future__ import annotations

import json
import os

import torch

from ._checks import check_dtype
from .checkpoint import load_checked, read_our_file
from .checkpoint_io import TOKENIZER_FORMAT, save_safetensors
from .tokenizer import TokenizerConfig, VQGANTokenizer

FORMAT = TOKENIZER_FORMAT


def save_tokenizer(tokenizer: VQGANTokenizer, path: str | os.PathLike) -> None:
    """Weights and config in one safetensors file, written atomically."""
    save_safetensors(tokenizer.state_dict(), {"format": TOKENIZER_FORMAT, "config": json.dumps(tokenizer._config_dict())},
                     path)


def load_tokenizer(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   check_finite: bool = True) -> VQGANTokenizer:
    """Read a file written by `save_tokenizer` / `VQGANTokenizer.save`: the config is validated against the
    file before anything is built; the tensors go onto `device`, floating-point ones in `dtype` (float32 when
    None); NaN/inf weights are refused unless check_finite=False."""
    check_dtype("load_tokenizer", dtype)
    path = os.fspath(path)
    config, tensors = read_our_file(path, TOKENIZER_FORMAT, TokenizerConfig, device)
    with torch.device("meta"):
        tokenizer = VQGANTokenizer(config)
    load_checked(tokenizer, tensors, what=path, dtype=dtype, check_finite=check_finite)
    return tokenizer
