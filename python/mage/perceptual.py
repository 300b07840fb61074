"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), version
0.1 with VGG16: the perceptual term of VQGAN training (Esser et al. 2021, section 3.2).

    lpips = LPIPS.from_file("lpips_vgg16.safetensors")   # weights cannot be downloaded at run time
    d = lpips(x, y)                                        # [B] distances, x and y in [0, 1]

Computation: both images go from [0, 1] to [-1, 1], through LPIPS's fixed per-channel scaling, and through
VGG16's convolutions; at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 each feature vector is divided by its
L2 norm over channels, the squared differences are weighted per channel by the non-negative linear layer
`lin{k}`, averaged over positions and summed over the five layers. Grey images are repeated to RGB.

Weights file (`--perceptual-weights PATH`, a .safetensors or a torch .pth/.pt state dict) with these keys:

    features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}   VGG16's 13 convolutions (torchvision names)
    lin{0..4}.weight                                             [1, C, 1, 1], C = 64, 128, 256, 512, 512

Two public files hold them (neither can be fetched here): torchvision's ImageNet VGG16 `vgg16-397923af.pth`
(https://download.pytorch.org/models/vgg16-397923af.pth; `classifier.*` is ignored) and LPIPS v0.1's
`vgg.pth` (in the `lpips` wheel on PyPI at `lpips/weights/v0.1/vgg.pth`, keys `lin{k}.model.1.weight`).
`python -m mage.perceptual vgg16-397923af.pth vgg.pth lpips_vgg16.safetensors` merges them into one file;
`LPIPS.from_file` also reads a merged state dict directly, the `lpips` package's own module state dict
(`net.slice{n}.{i}.*`, `lin{k}.model.1.weight`) and taming-transformers checkpoints (`...perceptual_loss.*`).
"""

from __future__ import annotations

import os
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from ._checks import InputValueError

# VGG16's `features` up to relu5_3: output channels of each conv, "M" for a 2x2 max-pool.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in `features`
TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS v0.1's input scaling: (x - shift) / scale on [-1, 1] images.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
MIN_SIZE = 16  # four max-pools before relu5_3


class LPIPS(nn.Module):
    """LPIPS-VGG16 distance; all parameters are frozen. forward(x, y): [B, C, H, W] x2 in [0, 1] -> [B]."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        for k, c in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{k}", nn.Conv2d(c, 1, 1, bias=False))
        self.requires_grad_(False)
        self.eval()

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> LPIPS's input: [-1, 1], then (x - shift) / scale per channel."""
        shift = torch.tensor(_SHIFT, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        scale = torch.tensor(_SCALE, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return ((x * 2 - 1) - shift) / scale

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise InputValueError(f"x and y must have one shape [B, 1 or 3, H, W], got {tuple(x.shape)} and "
                                  f"{tuple(y.shape)}")
        if min(x.shape[-2:]) < MIN_SIZE:
            raise InputValueError(f"LPIPS-VGG16 needs images of at least {MIN_SIZE}x{MIN_SIZE}, got "
                                  f"{tuple(x.shape[-2:])}")
        both = self.scale_input(torch.cat([x, y]).expand(-1, 3, -1, -1))
        total = 0
        for k, f in enumerate(self._taps(both)):
            f = f.float()
            f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fx, fy = f.chunk(2)
            total = total + getattr(self, f"lin{k}")((fx - fy).pow(2)).mean((1, 2, 3))
        return total

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "LPIPS":
        """Load the weights file described in the module docstring (strictly: every key must be there)."""
        with torch.device("meta"):  # no random initialisation of 15M weights that are overwritten at once
            model = cls()
        state = canonical_state_dict(read_state_dict(path))
        expected = {k: v.shape for k, v in model.state_dict().items()}
        missing = sorted(set(expected) - set(state))
        if missing:
            raise InputValueError(f"{path}: not an LPIPS-VGG16 weights file, missing {len(missing)} keys "
                                  f"(e.g. {missing[:4]}); see `mage.perceptual` for the expected layout")
        wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(s)})" for k, s in expected.items()
                 if state[k].shape != s]
        if wrong:
            raise InputValueError(f"{path}: wrong shapes: {wrong[:4]}")
        model.load_state_dict({k: state[k].float() for k in expected}, assign=True)
        return model.requires_grad_(False).to(device)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a torch file holding a state dict (also under "state_dict" or "model"),
    loaded weights-only."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"perceptual weights file {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise InputValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return obj


def canonical_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the known layouts to ours: `features.{i}.*` and `lin{k}.weight`. Other keys are dropped."""
    out = {}
    for key, value in state.items():
        key = key.split("perceptual_loss.")[-1]  # taming: loss.perceptual_loss.net.slice1.0.weight
        key = re.sub(r"^net\.slice\d\.", "features.", key)  # the lpips package keeps torchvision's indices
        key = re.sub(r"^(lin\d)\.model\.1\.", r"\1.", key)  # Dropout at model.0, the 1x1 conv at model.1
        if re.match(r"^(features\.\d+\.(weight|bias)|lin\d\.weight)$", key):
            out[key] = value
    return out


def convert(vgg_path: str, lin_path: str, out_path: str) -> None:
    """Merge torchvision's VGG16 state dict and LPIPS's `vgg.pth` into one .safetensors in our layout (written
    atomically: an interrupted conversion leaves no half file)."""
    from .checkpoint_io import save_safetensors

    state = {**canonical_state_dict(read_state_dict(vgg_path)), **canonical_state_dict(read_state_dict(lin_path))}
    with torch.device("meta"):
        keys = list(LPIPS().state_dict())
    missing = sorted(set(keys) - set(state))
    if missing:
        raise InputValueError(f"{vgg_path} + {lin_path} lack {missing[:4]} ...: expected torchvision's vgg16 and "
                              f"LPIPS's vgg.pth")
    save_safetensors({k: state[k] for k in keys}, {}, out_path)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m mage.perceptual VGG16_PTH LPIPS_VGG_PTH OUT.safetensors")
    convert(*sys.argv[1:])
    print(f"wrote {sys.argv[3]}")
