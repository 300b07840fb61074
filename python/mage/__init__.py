"""mage: the MAGE model layer built on mage_kernels (docs/REFERENCE.md sections 3-5).

    model = mage.load_official("mage-vitb-1600.pth")        # or mage.load("model.safetensors")
    model = mage.create_model("mage_vit_tiny")              # by name; mage.list_models()
    model.save_pretrained("folder"); model = mage.MAGE.from_pretrained("folder")
    images = mage.generate(model, 16, steps=20, choice_temperature=6.0)
    filled = mage.inpaint(model, images, hole_mask)

Training and evaluation (sections 4.4-4.10, 6, 7):

    mage.train.train(mage.TrainConfig(objective="tokenizer", ...))   # also "mage", "mage-c", "mae"
    mage.run_demo(mage.DemoConfig.quick("report"))                   # the `mage demo` pipeline
    mage.linear_probe(train_features, train_labels, test_features, test_labels)
"""

import mage_kernels  # noqa: F401  (registers the ops the model calls)

from ._checks import InputError
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
from .data import ImageFolder, TensorImageDataset, TokenCacheDataset, load_digits, load_fashion_mnist
from .demo import DemoConfig, run_demo
from .inpaint import inpaint, token_mask_from_pixels
from .mae import MAE, MAEConfig
from .metrics import classifier_score, codebook_usage, fid, frechet_distance, psnr, ssim
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
from .probe import ProbeConfig, ProbeResult, extract_features, linear_probe
from .registry import create_model, list_models
from .tokenizer import TokenizerConfig, VQGANTokenizer
from .tokenizer_io import load_tokenizer, save_tokenizer
# `train` stays the module (mage.train.train runs a config), so mage.train.<name> keeps resolving.
from .train import TrainConfig, build_token_cache

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "InputError",
    "DemoConfig",
    "ImageFolder",
    "LoadReport",
    "MAE",
    "MAEConfig",
    "MAGE",
    "MAGEConfig",
    "ProbeConfig",
    "ProbeResult",
    "TensorImageDataset",
    "TokenCacheDataset",
    "TokenizerConfig",
    "TrainConfig",
    "VQGANTokenizer",
    "build_token_cache",
    "classifier_score",
    "codebook_usage",
    "create_model",
    "decode_tokens",
    "extract_features",
    "fid",
    "frechet_distance",
    "generate",
    "infer_config",
    "inpaint",
    "linear_probe",
    "list_models",
    "load",
    "load_any",
    "load_digits",
    "load_fashion_mnist",
    "load_official",
    "load_official_tokenizer",
    "load_tokenizer",
    "mage_vit_base_patch16",
    "mage_vit_huge_patch16",
    "mage_vit_large_patch16",
    "mage_vit_small",
    "mage_vit_tiny",
    "mask_schedule",
    "psnr",
    "run_demo",
    "sample_step",
    "save",
    "save_tokenizer",
    "ssim",
    "token_mask_from_pixels",
]
