"""Datasets and loaders that work offline.

- Fashion-MNIST from Debian's `dataset-fashion-mnist` package: the embedded default (scripts/setup.sh installs it).
- scikit-learn's bundled 8x8 digits: smoke tests.
- ImageNet-style folders `root/<class>/*.{jpg,jpeg,png,webp}`, or flat folders of images without classes
  (unsupervised training): real users' data.

Images are float [C, H, W] tensors in [0, 1], the range the tokenizer expects (docs/REFERENCE.md 4.10: no
normalisation). Random transforms get a `torch.Generator` seeded from (seed, epoch, index), so a sample's
augmentation does not depend on the worker that loads it, the number of workers or the order of loading:
a resumed run sees exactly the crops the uninterrupted one would have.
"""

from __future__ import annotations

import gzip
import math
import os
import random
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from ._checks import InputTypeError, InputValueError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says what to install or where to put them."""


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """The Fashion-MNIST folder: `root`, else $MAGE_FASHION_MNIST_DIR, else the Debian package's path."""
    return Path(root or os.environ.get("MAGE_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)


def _read_idx(path: Path, offset: int, expected_magic: int) -> tuple[np.ndarray, tuple[int, ...]]:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise InputValueError(f"{path} is not the expected IDX file: magic {magic:#x}, expected {expected_magic:#x}")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    if data.size != math.prod(dims):
        raise InputValueError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data, dims


def load_fashion_mnist(
    split: str = "train",
    root: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST (Xiao et al. 2017) from the IDX `.gz` files.

    Returns images [N, 1, 28, 28] (uint8 in 0..255, or a float dtype in [0, 1]) and int64 labels [N];
    N is 60000 for "train" and 10000 for "test". Raises DatasetNotFoundError naming the package to install.
    """
    if split not in _FASHION_MNIST_FILES:
        raise InputValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = fashion_mnist_root(root)
    image_file, label_file, count = _FASHION_MNIST_FILES[split]
    missing = [name for name in (image_file, label_file) if not (folder / name).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST files {missing} not found in {folder}. Install them with "
            "`sudo apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu), or put the four IDX .gz files "
            "in a folder and set MAGE_FASHION_MNIST_DIR to it."
        )
    images, dims = _read_idx(folder / image_file, offset=16, expected_magic=0x00000803)
    labels, _ = _read_idx(folder / label_file, offset=8, expected_magic=0x00000801)
    if dims[0] != count or labels.size != count:
        raise InputValueError(f"Fashion-MNIST {split}: expected {count} images and labels, got {dims[0]} and "
                              f"{labels.size}")
    x = torch.from_numpy(images.copy()).view(count, 1, dims[1], dims[2])
    y = torch.from_numpy(labels.astype(np.int64))
    if dtype != torch.uint8:
        x = x.to(dtype) / 255
    return x, y


def load_digits(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits as images [1797, 1, 8, 8] in [0, 1] (raw values 0..16) and labels [1797]."""
    from sklearn.datasets import load_digits as _sk_load_digits

    if not dtype.is_floating_point:
        raise InputTypeError(f"load_digits: dtype must be a float dtype (images in [0, 1]), got {dtype}")
    bunch = _sk_load_digits()
    x = torch.from_numpy(bunch.images).to(dtype).div_(16).unsqueeze(1)
    return x, torch.from_numpy(bunch.target.astype(np.int64))


BUILTIN_DATA = ("fashion-mnist", "digits")  # `data` names a built-in data set or else a folder


def load_builtin(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Split "train" or "test" of a built-in data set (BUILTIN_DATA): Fashion-MNIST's own, or digits' first 80% of
    images and the rest (the split `mage train --data digits` and its probe use)."""
    if name == "fashion-mnist":
        return load_fashion_mnist(split)
    if name != "digits":
        raise InputValueError(f"load_builtin: name must be one of {BUILTIN_DATA}, got {name!r}")
    x, y = load_digits()
    n = int(0.8 * x.shape[0])
    return (x[:n], y[:n]) if split == "train" else (x[n:], y[n:])


def to_float_image(image: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """uint8 or float [C, H, W] (or [N, C, H, W]) -> float32 in [0, 1]; grey repeated to `channels` if given."""
    x = image.float().div_(255) if image.dtype == torch.uint8 else image.float()
    if channels is not None and x.shape[-3] != channels:
        if x.shape[-3] != 1:
            raise InputValueError(f"cannot turn a {x.shape[-3]}-channel image into {channels} channels (only grey "
                                  f"expands)")
        x = x.expand(*x.shape[:-3], channels, *x.shape[-2:]).contiguous()
    return x


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator determined by (seed, epoch, index) alone, so augmentation is independent of workers."""
    # Mixing with large odd constants keeps nearby (epoch, index) pairs from sharing a stream.
    mixed = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (2**63)
    return torch.Generator().manual_seed(mixed)


class _AugmentedDataset(Dataset):
    """Shared epoch/seed handling: `transform(image, generator)` runs with `sample_generator(seed, epoch, i)`."""

    def __init__(self, transform: Transform | None, channels: int | None, seed: int):
        self.transform = transform
        self.channels = channels
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Call at the start of each epoch (in the main process, before iterating) to change the crops."""
        self.epoch = epoch

    def _finish(self, image: torch.Tensor, index: int) -> torch.Tensor:
        x = to_float_image(image)
        if self.transform is not None:
            x = self.transform(x, sample_generator(self.seed, self.epoch, index))
        # Grey expands after the transform: the same result (every transform maps grey RGB to grey RGB), 3x cheaper.
        return to_float_image(x, self.channels)


class TensorImageDataset(_AugmentedDataset):
    """In-memory images [N, C, H, W] (uint8 or float in [0, 1]) with labels [N].

    Items are (float image [C', H', W'], label); `channels=3` turns grey into RGB for an RGB tokenizer.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Transform | None = None,
        channels: int | None = None,
        seed: int = 0,
    ):
        if images.dim() != 4:
            raise InputValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise InputValueError(f"labels must have shape [{images.shape[0]}], got {tuple(labels.shape)}")
        super().__init__(transform, channels, seed)
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._finish(self.images[index], index), int(self.labels[index])


def fashion_mnist_dataset(
    split: str = "train",
    transform: Transform | None = None,
    channels: int | None = None,
    root: str | os.PathLike | None = None,
    seed: int = 0,
) -> TensorImageDataset:
    """Fashion-MNIST as a TensorImageDataset (kept as uint8 in memory: 47 MB for the train split)."""
    images, labels = load_fashion_mnist(split, root)
    return TensorImageDataset(images, labels, transform, channels, seed)


def _load_image(path: Path) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            # Grey, palette, CMYK and RGBA all become 3-channel RGB, as the tokenizer expects.
            rgb = im.convert("RGB")
            array = np.asarray(rgb, dtype=np.uint8).copy()
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # a damaged or hostile file in the folder
        raise InputValueError(f"{path}: cannot read it as an image ({err}); remove or replace it") from None
    return torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W)


class ImageFolder(_AugmentedDataset):
    """ImageNet-style folders: `root/<class>/**/*.{jpg,jpeg,png,webp}`; classes in sorted order get labels 0..K-1.
    A flat folder (images directly in `root`, no sub-folders) is one unlabelled set: every label is 0 and
    `classes` is empty.

    Items are (float image [3, H, W] in [0, 1] after `transform`, label).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        seed: int = 0,
    ):
        super().__init__(transform, 3, seed)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"image folder {self.root} does not exist")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        exts = tuple(e.lower() for e in extensions)
        loose = sorted(p for p in self.root.iterdir() if p.suffix.lower() in exts and p.is_file())
        if loose and self.classes:
            raise DatasetNotFoundError(
                f"{self.root} has both images ({len(loose)}, e.g. {loose[0].name}) and sub-folders "
                f"({self.classes[:3]}): use root/<class>/<image> for labelled data or a flat folder of images")
        self.samples: list[tuple[Path, int]] = [(p, 0) for p in loose]
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (self.root / name).rglob("*") if p.suffix.lower() in exts and p.is_file())
            self.samples.extend((p, label) for p in files)
        if not self.samples:
            raise DatasetNotFoundError(f"no {'/'.join(exts)} images in {self.root} or {self.root}/<class>/")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        """int64 [N]: each image's class index (all 0 in a flat folder)."""
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self._finish(_load_image(path), index), label


class EpochSampler(Sampler[int]):
    """Per-epoch shuffled indices from (seed, epoch), sharded over `world_size` ranks, resumable mid-epoch.

    Rank r takes positions r, r + world_size, ... of the epoch's permutation (padded by wrapping so every rank
    gets the same count unless drop_last). `set_epoch(epoch, start)` skips the first `start` indices of this
    rank's share: the data position a checkpoint records as (epoch, samples consumed on this rank).
    """

    def __init__(
        self,
        length: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise InputValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    def num_per_rank(self) -> int:
        if self.drop_last:
            return self.length // self.world_size
        return -(-self.length // self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return max(self.num_per_rank() - self.start, 0)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch * 1_000_003)
            order = torch.randperm(self.length, generator=g)
        else:
            order = torch.arange(self.length)
        total = self.num_per_rank() * self.world_size
        if total > self.length:  # wrap around so all ranks take the same number of steps
            order = torch.cat([order, order[: total - self.length]])
        mine = order[:total][self.rank :: self.world_size]
        return iter(mine[self.start :].tolist())


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed Python's and NumPy's RNGs from the worker's torch seed.

    The loader derives each worker's torch seed from its `generator`, so a seeded loader gives every worker
    the same seeds in every run; anything a transform draws from `random` or `numpy` is then reproducible too.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    pin_memory: bool | None = None,
    sampler: Sampler | None = None,
    persistent_workers: bool = False,
) -> DataLoader:
    """A DataLoader with deterministic shuffling and worker seeding; pinned memory by default when CUDA is present.

    Pass an `EpochSampler` (for DDP or exact resume) as `sampler`; then `shuffle` is ignored. Workers are not
    persistent by default: each epoch's iterator starts them afresh with the dataset's current `epoch`, which a
    persistent worker would never see after `set_epoch`.
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=generator,
        persistent_workers=persistent_workers and num_workers > 0,
    )


# ---- token cache: tokenize once, train MAGE from ids ----


@torch.no_grad()
def build_token_cache(
    encode: Callable[[torch.Tensor], torch.Tensor],
    dataset: _AugmentedDataset,
    crops_per_image: int = 1,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Token ids of `crops_per_image` augmented views of every image: int16 (int32 past 32767 codes) [N, K, L].

    The online tokenizer is ~40% of MAGE training compute; with the ids cached, MAGE trains from
    `TokenCacheDataset`. View k of image i is the dataset's augmentation at epoch k, so the cache is reproducible
    from the dataset's seed. `encode`: images [B, C, H, W] -> ids [B, ...] (flattened to [B, L]). Flips must be
    in the dataset's transform: token grids cannot be flipped afterwards.
    """
    views = []
    for k in range(crops_per_image):
        dataset.set_epoch(k)
        loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers)
        ids = [encode(x if device is None else x.to(device, non_blocking=True)).flatten(1).cpu() for x, _ in loader]
        views.append(torch.cat(ids))
    dataset.set_epoch(0)
    cache = torch.stack(views, dim=1)  # (N, K, L)
    if cache.numel() and (int(cache.min()) < 0 or int(cache.max()) > torch.iinfo(torch.int32).max):
        raise InputValueError("encode returned ids outside [0, 2^31)")
    return cache.to(torch.int16 if cache.numel() == 0 or int(cache.max()) < 2**15 else torch.int32)


class TokenCache(NamedTuple):
    """A token cache as `load_token_cache` reads it."""

    ids: torch.Tensor  # integer [N, K, L]: K augmented views of each of N images
    labels: torch.Tensor  # [N]
    # What it was built from, as far as it records it: "data" (a built-in data set's name or a folder's absolute
    # path; None: not recorded) and "tokenizer" (mage.checkpoint_io.weights_fingerprint). Caches written before
    # they were recorded have neither.
    source: dict


def load_token_cache(path: str | os.PathLike) -> TokenCache:
    """The cache written by `mage.train.build_token_cache` at `path`, checked: a file of another kind, or of the
    wrong structure or dtypes, raises CheckpointError naming it."""
    from .checkpoint_io import CheckpointError, load_checkpoint

    blob = load_checkpoint(path)
    if not isinstance(blob, dict) or not isinstance(blob.get("ids"), torch.Tensor) or "labels" not in blob:
        got = sorted(blob)[:8] if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(f"{path} is not a token cache (written by build_token_cache: a dict with 'ids' and "
                              f"'labels'); it holds {got}")
    ids, labels = blob["ids"], torch.as_tensor(blob["labels"])
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise CheckpointError(f"{path}: token ids must be integers, got {ids.dtype}")
    if ids.dim() != 3 or labels.shape != ids.shape[:1]:
        raise CheckpointError(f"{path}: expected ids [N, K, L] and labels [N], got {tuple(ids.shape)} and "
                              f"{tuple(labels.shape)}")
    source = blob.get("source", {})
    if not isinstance(source, dict) or not all(isinstance(v, (str, type(None))) for v in source.values()):
        raise CheckpointError(f"{path}: 'source' must be a dict of strings (what the cache was built from), got "
                              f"{source!r}")
    return TokenCache(ids, labels, source)


def check_token_cache(path: str | os.PathLike, ids: torch.Tensor, num_tokens: int, codebook_size: int) -> None:
    """The cached ids fit the model: L tokens per view, every id a code of its tokenizer (ids of a cache built
    with another tokenizer would silently train on the wrong codes, or on [MASK] ids)."""
    from .checkpoint_io import CheckpointError

    if ids.shape[2] != num_tokens:
        raise CheckpointError(f"{path}: the cache has {ids.shape[2]} tokens per image, the model takes {num_tokens}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= codebook_size):
        raise CheckpointError(f"{path}: cached ids span [{int(ids.min())}, {int(ids.max())}], the model's codebook "
                              f"has {codebook_size} codes: the cache was built with another tokenizer")


class TokenCacheDataset(Dataset):
    """Items (ids int64 [L], label) from a cache [N, K, L]; the view k is drawn from (seed, epoch, index).

    views=2 gives two distinct views [2, L] per item (the MAGE-C positive pair; needs K >= 2)."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor, seed: int = 0, views: int = 1):
        if ids.dim() != 3:
            raise InputValueError(f"ids must have shape [N, K, L], got {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise InputTypeError(f"ids must be an integer tensor, got {ids.dtype}")
        if labels.shape != ids.shape[:1]:
            raise InputValueError(f"labels must have shape [{ids.shape[0]}], got {tuple(labels.shape)}")
        if views not in (1, 2) or views > ids.shape[1]:
            raise InputValueError(f"views must be 1, or 2 with at least 2 cached views per image; got views={views} "
                                  f"for a cache of {ids.shape[1]} view(s)")
        self.ids, self.labels, self.seed, self.epoch, self.views = ids, labels, seed, 0, views

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        g = sample_generator(self.seed, self.epoch, index)
        if self.views == 1:
            k = int(torch.randint(self.ids.shape[1], (), generator=g))
            return self.ids[index, k].long(), int(self.labels[index])
        pair = torch.randperm(self.ids.shape[1], generator=g)[:2]
        return self.ids[index, pair].long(), int(self.labels[index])
