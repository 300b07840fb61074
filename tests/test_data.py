"""Datasets, loaders and transforms: counts, shapes, ranges, clear errors, reproducibility."""

import math

import pytest
import torch

from mage import transforms as T
from mage.data import (
    DatasetNotFoundError,
    EpochSampler,
    ImageFolder,
    TensorImageDataset,
    fashion_mnist_root,
    load_digits,
    load_fashion_mnist,
    make_loader,
)

has_fmnist = (fashion_mnist_root() / "train-images-idx3-ubyte.gz").is_file()
requires_fmnist = pytest.mark.skipif(
    not has_fmnist, reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)"
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- datasets ----


@requires_fmnist
def test_fashion_mnist_counts_and_ranges():
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = load_fashion_mnist(split)
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.uint8
        assert y.shape == (n,) and y.dtype == torch.int64
        assert torch.bincount(y).tolist() == [n // 10] * 10  # balanced classes
    xf, _ = load_fashion_mnist("test", dtype=torch.float32)
    assert xf.dtype == torch.float32 and 0 <= xf.min() and xf.max() <= 1 and xf.max() > 0.99


def test_fashion_mnist_missing_says_what_to_install(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=tmp_path)


def test_digits():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert x.min() == 0 and x.max() == 1 and set(y.tolist()) == set(range(10))


def _write_folder(root, sizes):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for cls, files in sizes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name, (mode, w, h) in files.items():
            c = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
            arr = torch.randint(0, 256, (h, w, c), generator=g, dtype=torch.uint8).squeeze(-1).numpy()
            Image.fromarray(arr, mode).save(root / cls / name)


def test_image_folder_grey_and_rgba_become_rgb(tmp_path):
    _write_folder(tmp_path, {
        "cat": {"a.png": ("L", 20, 12), "b.jpg": ("RGB", 15, 15)},
        "dog": {"c.PNG": ("RGBA", 9, 30)},
    })
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path, transform=T.RandomResizedCrop(8))
    assert ds.classes == ["cat", "dog"] and len(ds) == 3
    labels = []
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        labels.append(y)
    assert labels == [0, 0, 1]
    grey, _ = ImageFolder(tmp_path)[0]
    assert grey.shape == (3, 12, 20) and torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    with pytest.raises(DatasetNotFoundError, match="no .jpg/.jpeg/.png/.webp images"):
        ImageFolder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no .jpg"):
        ImageFolder(tmp_path)
    _write_folder(tmp_path / "loose", {".": {"a.png": ("RGB", 4, 4)}})
    (tmp_path / "loose" / "class_a").mkdir()
    with pytest.raises(DatasetNotFoundError, match="both images .* and sub-folders"):
        ImageFolder(tmp_path / "loose")


def test_flat_image_folder_and_webp(tmp_path):
    """Unsupervised data: images directly in the folder (any of png/jpg/webp), all labelled 0."""
    _write_folder(tmp_path, {".": {"a.webp": ("RGB", 10, 8), "b.png": ("L", 6, 6), "c.WEBP": ("RGBA", 7, 9)}})
    ds = ImageFolder(tmp_path)
    assert len(ds) == 3 and ds.classes == [] and ds.labels.tolist() == [0, 0, 0]
    assert [p.name for p, _ in ds.samples] == ["a.webp", "b.png", "c.WEBP"]
    x, y = ds[0]
    assert x.shape == (3, 8, 10) and y == 0
    classed = tmp_path / "classed"
    _write_folder(classed, {"x": {"a.webp": ("RGB", 5, 5)}, "y": {"b.webp": ("RGB", 5, 5)}})
    assert ImageFolder(classed).labels.tolist() == [0, 1]


def test_tensor_dataset_channels_and_per_sample_determinism():
    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    ds = TensorImageDataset(images, torch.arange(6), T.pretrain_transform(8), channels=3, seed=5)
    x, y = ds[4]
    assert x.shape == (3, 8, 8) and y == 4
    assert torch.equal(ds[4][0], x)  # same (seed, epoch, index) -> same crop
    ds.set_epoch(1)
    assert not torch.equal(ds[4][0], x)
    with pytest.raises(ValueError, match=r"labels must have shape \[6\]"):
        TensorImageDataset(images, torch.arange(5))


def test_loader_is_reproducible_across_worker_counts():
    images = torch.rand(10, 1, 12, 12)
    ds = TensorImageDataset(images, torch.arange(10), T.pretrain_transform(6), seed=1)
    runs = []
    for workers in (0, 2):
        batches = list(make_loader(ds, batch_size=4, shuffle=True, num_workers=workers, seed=3))
        runs.append(batches)
    assert [b[1].tolist() for b in runs[0]] == [b[1].tolist() for b in runs[1]]
    for (xa, _), (xb, _) in zip(*runs):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)


def test_epoch_sampler_shards_and_resumes():
    full = list(EpochSampler(11, seed=2, world_size=1))
    assert sorted(full) == list(range(11))
    shards = [list(EpochSampler(11, seed=2, rank=r, world_size=3)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # padded by wrapping: 12 = 3 * 4
    assert set().union(*shards) == set(range(11))
    s = EpochSampler(11, seed=2, rank=1, world_size=3)
    s.set_epoch(0, start=3)
    assert list(s) == shards[1][3:] and len(s) == 1
    s.set_epoch(1)
    assert list(s) != shards[1]
    assert len(EpochSampler(11, world_size=3, drop_last=True)) == 3


# ---- transforms ----


@pytest.mark.parametrize("hw", [(1, 1), (7, 31), (64, 48), (28, 28)])
def test_random_resized_crop_params_in_bounds(hw):
    h, w = hw
    g = _gen(0)
    for tf_style in (False, True):
        for _ in range(50):
            top, left, ch, cw = T.random_resized_crop_params(h, w, generator=g, tf_style=tf_style)
            assert 0 <= top and 0 <= left and 0 < ch and 0 < cw and top + ch <= h and left + cw <= w


def test_random_resized_crop_area_and_ratio_statistics():
    g = _gen(1)
    areas, ratios = [], []
    # With scale <= 0.5 every first try fits, so area ~ U(0.2, 0.5) and log(ratio) ~ U(log 3/4, log 4/3).
    for _ in range(1000):
        _, _, h, w = T.random_resized_crop_params(256, 256, scale=(0.2, 0.5), generator=g)
        areas.append(h * w / 256**2)
        ratios.append(math.log(w / h))
    areas, ratios = torch.tensor(areas), torch.tensor(ratios)
    assert 0.19 <= areas.min() and areas.max() <= 0.51
    assert abs(areas.mean() - 0.35) < 0.01 and abs(ratios.mean()) < 0.02
    assert math.log(3 / 4) - 0.01 <= ratios.min() and ratios.max() <= math.log(4 / 3) + 0.01


def test_random_resized_crop_fallback_is_center_crop():
    # scale > 1 can never fit: after 10 tries the crop is the ratio-clamped center crop.
    assert T.random_resized_crop_params(10, 40, scale=(2.0, 3.0), generator=_gen(0)) == (0, 13, 10, 13)
    assert T.random_resized_crop_params(40, 10, scale=(2.0, 3.0), generator=_gen(0)) == (13, 0, 13, 10)
    assert T.random_resized_crop_params(20, 20, scale=(2.0, 3.0), generator=_gen(0)) == (0, 0, 20, 20)


def test_transforms_shapes_ranges_and_reproducibility():
    img = torch.rand(3, 37, 53)
    for name, t in [
        ("pretrain", T.pretrain_transform(16)),
        ("probe", T.probe_train_transform(16)),
        ("contrastive", T.contrastive_transform(16)),
        ("eval", T.eval_transform(16)),
    ]:
        a, b = t(img, _gen(7)), t(img, _gen(7))
        assert a.shape == (3, 16, 16), name
        assert 0 <= a.min() and a.max() <= 1, name
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    views = T.TwoViews(T.contrastive_transform(16))(img, _gen(3))
    assert views.shape == (2, 3, 16, 16) and not torch.equal(views[0], views[1])


def test_eval_transform_matches_reference_sizes():
    img = torch.rand(1, 300, 400)
    resized = T.resize(img, 292)
    assert resized.shape == (1, 292, 389)
    assert T.eval_transform(256)(img).shape == (1, 256, 256)
    out = T.center_crop(torch.ones(1, 4, 4), 6)  # smaller than the crop: zero-padded
    assert out.shape == (1, 6, 6) and out.sum() == 16


def test_flip_and_grey():
    img = torch.rand(3, 5, 7)
    flips = {bool(torch.equal(T.horizontal_flip(img, generator=_gen(s)), img.flip(-1))) for s in range(20)}
    assert flips == {True, False}
    assert torch.equal(T.horizontal_flip(img, p=0.0), img)
    g = T.grayscale(img)
    assert g.shape == img.shape
    torch.testing.assert_close(g[0], 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])
    jittered = T.color_jitter(torch.rand(1, 9, 9), generator=_gen(0))  # grey: brightness/contrast only
    assert jittered.shape == (1, 9, 9) and 0 <= jittered.min() and jittered.max() <= 1


def test_hue_round_trip_and_rotation():
    img = torch.rand(3, 6, 6)
    torch.testing.assert_close(T.adjust_hue(img, 0.0), img, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(T.adjust_hue(T.adjust_hue(img, 0.3), -0.3), img, rtol=1e-5, atol=1e-5)
    red = torch.zeros(3, 1, 1)
    red[0] = 1
    torch.testing.assert_close(T.adjust_hue(red, 1 / 3).flatten(), torch.tensor([0.0, 1.0, 0.0]))


def test_gaussian_blur_preserves_mean_of_constant_and_smooths():
    const = torch.full((3, 10, 10), 0.25)
    torch.testing.assert_close(T.gaussian_blur(const, 5, 1.0), const)
    img = torch.rand(1, 32, 32)
    assert T.gaussian_blur(img, 9, 2.0).std() < img.std()
    assert T.gaussian_blur(torch.rand(1, 2, 2), 23, 1.0).shape == (1, 2, 2)  # kernel shrinks to fit


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        T.horizontal_flip(torch.rand(2, 3, 4, 4))
    with pytest.raises(TypeError, match="float"):
        T.random_resized_crop(torch.zeros(3, 8, 8, dtype=torch.uint8), 4)


def test_transform_sampling_uses_only_the_given_generator():
    img = torch.rand(3, 12, 12, generator=_gen(1))
    state = torch.get_rng_state()
    T.contrastive_transform(8)(img, _gen(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert math.isclose(T.EVAL_CROP_FRACTION * 292, 256)


# ---- token cache ----


def _fake_encode(images: torch.Tensor) -> torch.Tensor:
    """A stand-in tokenizer: 4x4 average pooling quantised to 16 levels -> ids [B, h, w]."""
    pooled = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), 4).squeeze(1)
    return (pooled * 15.999).long()


def test_token_cache_views_and_dataset():
    from mage.data import TokenCacheDataset, build_token_cache

    images = torch.rand(7, 1, 20, 20, generator=_gen(0))
    ds = TensorImageDataset(images, torch.arange(7), T.pretrain_transform(16), seed=4)
    cache = build_token_cache(_fake_encode, ds, crops_per_image=3, batch_size=3)
    assert cache.shape == (7, 3, 16) and cache.dtype == torch.int16
    assert not torch.equal(cache[:, 0], cache[:, 1])  # different crops per view
    ds.set_epoch(2)
    torch.testing.assert_close(cache[:, 2].long(), _fake_encode(torch.stack([ds[i][0] for i in range(7)])).flatten(1))
    assert torch.equal(build_token_cache(_fake_encode, ds, crops_per_image=3, batch_size=5), cache)

    tokens = TokenCacheDataset(cache, torch.arange(7), seed=1)
    ids, label = tokens[3]
    assert ids.dtype == torch.int64 and ids.shape == (16,) and label == 3
    assert any(torch.equal(ids, cache[3, k].long()) for k in range(3))
    picks = set()
    for epoch in range(12):
        tokens.set_epoch(epoch)
        picks.add(next(k for k in range(3) if torch.equal(tokens[3][0], cache[3, k].long())))
    assert picks == {0, 1, 2}
    with pytest.raises(ValueError, match=r"\[N, K, L\]"):
        TokenCacheDataset(cache[:, 0], torch.arange(7))


def test_ddp_shards_see_the_single_process_batches():
    # With per-sample augmentation keyed by index, this makes 2 ranks x batch B equal 1 process x batch 2B.
    n, b = 23, 3
    single = list(EpochSampler(n, seed=5, drop_last=True))
    ranks = [list(EpochSampler(n, seed=5, rank=r, world_size=2, drop_last=True)) for r in range(2)]
    for step in range(len(ranks[0]) // b):
        union = sorted(ranks[0][step * b : (step + 1) * b] + ranks[1][step * b : (step + 1) * b])
        assert union == sorted(single[2 * b * step : 2 * b * (step + 1)])


def test_grey_expands_after_the_transform_with_the_same_result():
    # Every transform maps grey-as-RGB to grey-as-RGB, so the dataset may transform 1 channel and expand after.
    grey = torch.rand(1, 20, 20, generator=_gen(0))
    t = T.contrastive_transform(16, p_jitter=1.0, p_grayscale=1.0, p_blur=1.0)
    for seed in range(5):
        one = t(grey, _gen(seed)).expand(3, -1, -1)
        three = t(grey.expand(3, -1, -1).contiguous(), _gen(seed))
        torch.testing.assert_close(one, three, rtol=1e-5, atol=1e-5)
