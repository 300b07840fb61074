"""mage-kernels: the fused ops of MAGE (Li et al., CVPR 2023) as drop-in torch ops in namespace `mage`.

Every op is callable as `torch.ops.mage.<name>` and, with argument checks and docs, as
`mage_kernels.<name>`. See docs/OPS.md for the op contracts and backend rules. On top of the ops:
`mage_kernels.maskgit_sample` (iterative decoding for any masked-token model) and
`mage_kernels.nn.VectorQuantize` (a drop-in vector-quantization layer).
"""

import torch  # noqa: F401  (libtorch must be loaded before our native library)

from . import nn, reference
from ._registry import CHOSEN, NATIVE_ERROR, NATIVE_PATH, REQUESTED, triton_usable
from .masking import gather_keep, mask_plan, pad_with_cls, sample_mask_counts
from .remask import (
    annealed_choice_temperature,
    cosine_mask_ratio,
    draw_seed,
    remask_count,
    remask_step,
    remask_step_from_hidden,
)
from .sampling import maskgit_sample, maskgit_step
from .vq import vq_nearest, vq_quantize

__version__ = "0.1.0"


def build_info() -> dict:
    """Which backends are present and which kernel each op runs on CPU and CUDA tensors."""
    return {
        "version": __version__,
        "torch": torch.__version__,
        "native": NATIVE_PATH,
        "native_error": NATIVE_ERROR,
        "native_cuda": any(c.get("cuda") == "cuda" for c in CHOSEN.values()),
        "triton": triton_usable("cuda"),
        "triton_interpret": triton_usable("cpu"),
        "cuda_available": torch.cuda.is_available(),
        "requested_backend": REQUESTED,
        "ops": {name: dict(choice) for name, choice in CHOSEN.items()},
    }


__all__ = [
    "annealed_choice_temperature",
    "build_info",
    "cosine_mask_ratio",
    "draw_seed",
    "gather_keep",
    "mask_plan",
    "maskgit_sample",
    "maskgit_step",
    "nn",
    "pad_with_cls",
    "reference",
    "remask_count",
    "remask_step",
    "remask_step_from_hidden",
    "sample_mask_counts",
    "vq_nearest",
    "vq_quantize",
]
