"""mage: the MAGE model layer built on mage_kernels (MAGE_REFERENCE.md sections 3-5).

    model = mage.load_official("mage-vitb-1600.pth")        # or mage.load("model.safetensors")
    images = mage.generate(model, 16, steps=20, choice_temperature=6.0)
    filled = mage.inpaint(model, images, hole_mask)
"""

import mage_kernels  # noqa: F401  (registers the ops the model calls)

from .checkpoint import (
    CheckpointError,
    LoadReport,
    infer_config,
    load,
    load_any,
    load_official,
    load_official_tokenizer,
    save,
)
from .inpaint import inpaint, token_mask_from_pixels
from .model import (
    MAGE,
    MAGEConfig,
    mage_vit_base_patch16,
    mage_vit_huge_patch16,
    mage_vit_large_patch16,
    mage_vit_small,
    mage_vit_tiny,
)
from .sampler import decode_tokens, generate, mask_schedule, sample_step
from .tokenizer import TokenizerConfig, VQGANTokenizer

__version__ = "0.1.0"

__all__ = [
    "MAGE",
    "CheckpointError",
    "LoadReport",
    "MAGEConfig",
    "TokenizerConfig",
    "VQGANTokenizer",
    "decode_tokens",
    "generate",
    "infer_config",
    "inpaint",
    "load",
    "load_any",
    "load_official",
    "load_official_tokenizer",
    "mage_vit_base_patch16",
    "mage_vit_huge_patch16",
    "mage_vit_large_patch16",
    "mage_vit_small",
    "mage_vit_tiny",
    "mask_schedule",
    "sample_step",
    "save",
    "token_mask_from_pixels",
]
