"""Image transforms on float tensors [C, H, W] in [0, 1], without torchvision.

Every random transform takes a `torch.Generator` (None: the global one), so a seeded generator gives the same
output on every run. Resampling is `F.interpolate` with antialiasing, close to the PIL resize the reference's
torchvision pipeline used (docs/REFERENCE.md 4.10, 6).

- Pre-training (4.10): `RandomResizedCrop(size, scale=(0.2, 1.0))` + `RandomHorizontalFlip()`.
- Linear-probe evaluation (6): resize the shorter side to size * 292/256, bicubic, then center crop.
- MAGE-C views (7): the reference has no MAGE-C code and the paper's augmentation list was not verified here
  (docs/REFERENCE.md 7 says "SimCLR-style: crop, colour jitter, grayscale, blur", believed, not checked). We
  assume SimCLR's ImageNet recipe (Chen et al. 2020, Appendix A): colour jitter with strength 1 (brightness,
  contrast, saturation 0.8, hue 0.2) with probability 0.8, grayscale with probability 0.2, Gaussian blur with
  sigma in [0.1, 2.0] and a kernel of 10% of the image side with probability 0.5; but MAGE's crop scale
  (0.2, 1.0) instead of SimCLR's (0.08, 1.0), because each view is also tokenised and reconstructed.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from ._checks import InputTypeError, InputValueError

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")
EVAL_CROP_FRACTION = 256 / 292  # docs/REFERENCE.md 6: Resize(292) + CenterCrop(256)


def _check_image(img: torch.Tensor) -> None:
    if img.dim() != 3:
        raise InputValueError(f"img must have shape [C, H, W], got {tuple(img.shape)}")
    if not img.is_floating_point():
        raise InputTypeError(f"img must be a float tensor in [0, 1], got {img.dtype}")


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (), generator=generator))


def resize(img: torch.Tensor, size: int | Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Resize [C, H, W]; an int resizes the shorter side to `size` keeping the aspect ratio (torchvision's rule)."""
    _check_image(img)
    h, w = img.shape[-2:]
    if isinstance(size, int):
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(size * long / short)
        out_hw = (size, new_long) if h <= w else (new_long, size)
    else:
        out_hw = _size2(size)
    if out_hw == (h, w):
        return img
    antialias = mode in ("bilinear", "bicubic")
    kwargs = {"align_corners": False, "antialias": True} if antialias else {}
    out = F.interpolate(img.unsqueeze(0), size=out_hw, mode=mode, **kwargs).squeeze(0)
    return out.clamp_(0, 1) if mode == "bicubic" else out  # bicubic overshoots at edges


def crop(img: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """Crop a window; parts outside the image are zero-padded (as torchvision's center crop of a small image)."""
    _check_image(img)
    h, w = img.shape[-2:]
    if top >= 0 and left >= 0 and top + height <= h and left + width <= w:
        return img[:, top : top + height, left : left + width]
    out = img.new_zeros(img.shape[0], height, width)
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + height, h), min(left + width, w)
    if t1 > t0 and l1 > l0:
        out[:, t0 - top : t1 - top, l0 - left : l1 - left] = img[:, t0:t1, l0:l1]
    return out


def center_crop(img: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    th, tw = _size2(size)
    h, w = img.shape[-2:]
    return crop(img, int(round((h - th) / 2)), int(round((w - tw) / 2)), th, tw)


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    tf_style: bool = False,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop with area fraction ~ U(scale) and log aspect ratio ~ U(log ratio).

    torchvision's rule: up to 10 tries for a crop that fits, else a center crop with the ratio clamped to
    `ratio`. `tf_style=True` is the single-draw TF/BYOL variant of MAE's `util/crop.py` that the reference's
    linear probe uses: one draw, the size clipped to the image.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(1 if tf_style else 10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_lo, log_hi, generator))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if tf_style:
            w, h = min(max(w, 1), width), min(max(h, 1), height)
        if 0 < w <= width and 0 < h <= height:
            top = _randint(height - h + 1, generator)
            left = _randint(width - w + 1, generator)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img: torch.Tensor,
    size: int | Sequence[int],
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    mode: str = "bilinear",
    tf_style: bool = False,
) -> torch.Tensor:
    """[C, H, W] -> [C, size, size]: a random crop (see `random_resized_crop_params`) resized to `size`."""
    _check_image(img)
    top, left, h, w = random_resized_crop_params(img.shape[-2], img.shape[-1], scale, ratio, generator, tf_style)
    return resize(crop(img, top, left, h, w), _size2(size), mode)


def horizontal_flip(img: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror left-right with probability p."""
    _check_image(img)
    return img.flip(-1) if float(torch.rand((), generator=generator)) < p else img


def resize_center_crop(
    img: torch.Tensor, size: int, crop_fraction: float = EVAL_CROP_FRACTION, mode: str = "bicubic"
) -> torch.Tensor:
    """Evaluation view: shorter side to round(size / crop_fraction), then a center [size, size] crop."""
    return center_crop(resize(img, int(round(size / crop_fraction)), mode), size)


def grayscale(img: torch.Tensor) -> torch.Tensor:
    """RGB -> luminance, repeated over the 3 channels (shape kept); a 1-channel image is returned as is."""
    _check_image(img)
    if img.shape[0] == 1:
        return img
    weights = img.new_tensor(_LUMA).view(3, 1, 1)
    return (img * weights).sum(0, keepdim=True).expand_as(img).contiguous()


def _blend(a: torch.Tensor, b: torch.Tensor, factor: float) -> torch.Tensor:
    return (factor * a + (1 - factor) * b).clamp_(0, 1)


def adjust_brightness(img: torch.Tensor, factor: float) -> torch.Tensor:
    return (img * factor).clamp_(0, 1)


def adjust_contrast(img: torch.Tensor, factor: float) -> torch.Tensor:
    return _blend(img, grayscale(img).mean(), factor)


def adjust_saturation(img: torch.Tensor, factor: float) -> torch.Tensor:
    return img if img.shape[0] == 1 else _blend(img, grayscale(img), factor)


def _rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(0)
    maxc, _ = img.max(0)
    minc, _ = img.min(0)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2 + rc - bc, 4 + gc - rc))
    h = torch.where(delta > 0, (h / 6) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(0)
    i = torch.floor(h * 6)
    f = h * 6 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # Sextant i of the hue circle picks which of (v, t, p, q) each of r, g, b takes.
    candidates = torch.stack([v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q]).view(3, 6, *h.shape)
    return candidates.gather(1, i.unsqueeze(0).unsqueeze(0).expand(3, 1, *h.shape)).squeeze(1)


def adjust_hue(img: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue by `shift` turns (in [-0.5, 0.5])."""
    if img.shape[0] == 1:
        return img
    hsv = _rgb_to_hsv(img)
    hsv[0] = (hsv[0] + shift) % 1.0
    return _hsv_to_rgb(hsv).clamp_(0, 1)


def color_jitter(
    img: torch.Tensor,
    brightness: float = 0.8,
    contrast: float = 0.8,
    saturation: float = 0.8,
    hue: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """torchvision's ColorJitter: factors ~ U[max(0, 1 - s), 1 + s] (hue shift ~ U[-hue, hue]), in random order."""
    _check_image(img)
    order = torch.randperm(4, generator=generator).tolist()
    factors = [
        _uniform(max(0.0, 1 - brightness), 1 + brightness, generator),
        _uniform(max(0.0, 1 - contrast), 1 + contrast, generator),
        _uniform(max(0.0, 1 - saturation), 1 + saturation, generator),
        _uniform(-hue, hue, generator),
    ]
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for k in order:
        img = ops[k](img, factors[k])
    return img


def gaussian_blur(img: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding; the kernel shrinks to fit images smaller than it."""
    _check_image(img)
    h, w = img.shape[-2:]
    kernel_size = min(kernel_size, 2 * min(h, w) - 1)  # reflect padding needs pad < side
    kernel_size -= 1 - kernel_size % 2  # odd
    if kernel_size < 3:
        return img
    x = torch.arange(kernel_size, dtype=img.dtype, device=img.device) - (kernel_size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    c = img.shape[0]
    pad = kernel_size // 2
    out = F.pad(img.unsqueeze(0), (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out.squeeze(0)


# ---- composable transforms: callables (img, generator) -> img, as the datasets in mage.data expect ----

TransformFn = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


class Compose:
    def __init__(self, transforms: Sequence[TransformFn]):
        self.transforms = list(transforms)

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            img = t(img, generator)
        return img


class RandomResizedCrop:
    def __init__(self, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), mode="bilinear", tf_style=False):
        self.size, self.scale, self.ratio, self.mode, self.tf_style = size, scale, ratio, mode, tf_style

    def __call__(self, img, generator=None):
        return random_resized_crop(img, self.size, self.scale, self.ratio, generator, self.mode, self.tf_style)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img, generator=None):
        return horizontal_flip(img, self.p, generator)


class ResizeCenterCrop:
    def __init__(self, size: int, crop_fraction: float = EVAL_CROP_FRACTION, mode: str = "bicubic"):
        self.size, self.crop_fraction, self.mode = size, crop_fraction, mode

    def __call__(self, img, generator=None):
        return resize_center_crop(img, self.size, self.crop_fraction, self.mode)


class RandomApply:
    """Apply `transform` with probability p (the coin is drawn from the same generator)."""

    def __init__(self, transform: TransformFn, p: float):
        self.transform, self.p = transform, p

    def __call__(self, img, generator=None):
        return self.transform(img, generator) if float(torch.rand((), generator=generator)) < self.p else img


class ColorJitter:
    def __init__(self, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2):
        self.args = (brightness, contrast, saturation, hue)

    def __call__(self, img, generator=None):
        return color_jitter(img, *self.args, generator=generator)


class Grayscale:
    def __call__(self, img, generator=None):
        return grayscale(img)


class GaussianBlur:
    """Blur with sigma ~ U(sigma_range) and a kernel of `kernel_fraction` of the shorter side (odd)."""

    def __init__(self, sigma_range=(0.1, 2.0), kernel_fraction: float = 0.1):
        self.sigma_range, self.kernel_fraction = sigma_range, kernel_fraction

    def __call__(self, img, generator=None):
        sigma = _uniform(*self.sigma_range, generator)
        k = max(3, int(self.kernel_fraction * min(img.shape[-2:])) | 1)
        return gaussian_blur(img, k, sigma)


class TwoViews:
    """Two independent draws of `transform` stacked as [2, C, H, W] (the MAGE-C positive pair)."""

    def __init__(self, transform: TransformFn):
        self.transform = transform

    def __call__(self, img, generator=None):
        return torch.stack([self.transform(img, generator), self.transform(img, generator)])


def pretrain_transform(size: int, scale: tuple[float, float] = (0.2, 1.0)) -> Compose:
    """MAGE pre-training augmentation (docs/REFERENCE.md 4.10): random resized crop + horizontal flip."""
    return Compose([RandomResizedCrop(size, scale), RandomHorizontalFlip()])


def probe_train_transform(size: int) -> Compose:
    """Linear-probe training augmentation (6): TF-style random resized crop (bicubic) + flip."""
    return Compose([RandomResizedCrop(size, (0.2, 1.0), mode="bicubic", tf_style=True), RandomHorizontalFlip()])


def eval_transform(size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> ResizeCenterCrop:
    """Evaluation view (6): Resize(size / crop_fraction, bicubic) + CenterCrop(size)."""
    return ResizeCenterCrop(size, crop_fraction)


def contrastive_transform(
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2),
    p_jitter: float = 0.8,
    p_grayscale: float = 0.2,
    p_blur: float = 0.5,
) -> Compose:
    """One MAGE-C view; the assumptions behind the defaults are in this module's docstring."""
    return Compose([
        RandomResizedCrop(size, scale),
        RandomHorizontalFlip(),
        RandomApply(ColorJitter(*jitter), p_jitter),
        RandomApply(Grayscale(), p_grayscale),
        RandomApply(GaussianBlur(), p_blur),
    ])
