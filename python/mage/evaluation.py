"""Evaluation as the paper reports it (docs/EVALUATION.md): FID and Inception Score of generated images against
a data set's statistics, streamed in batches (MAGE's numbers use 50,000 images, section 5), and the linear
probe of a checkpoint's features (section 6). These are the functions behind `mage fid`, `mage eval` and
`mage probe`.

Image sources (`load_source`): a `.npz` of statistics (mu, sigma), a folder of images (searched recursively:
png, jpg, jpeg, webp; any size: each image is resized to 299x299 as the FID convention does), or a built-in
data set: `fashion-mnist` (train), `fashion-mnist:test`, `digits`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from . import data as data_lib
from ._checks import InputTypeError, InputValueError, check_config, check_int, check_model, check_steps
from .checkpoint_io import weights_fingerprint, write_atomic
from .metrics import FeatureStats, InceptionMetric

BUILTIN_SOURCES = ("fashion-mnist", "fashion-mnist:train", "fashion-mnist:test", "digits")


# ------------------------------------------------------------------------------------ image sources


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Every png/jpg/jpeg/webp file under `folder`, recursively, in sorted order."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in data_lib.IMAGE_EXTENSIONS)


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as uint8 [3, H, W] (grey, palette and RGBA converted to RGB)."""
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def write_png(image: torch.Tensor, path: Path) -> None:
    """uint8 [1 or 3, H, W] -> RGB PNG, written to a temporary name of its own and renamed: a killed run leaves
    whole files, and two processes writing one folder never write into each other's temp file. (No fsync: a
    sample folder is cheap to regenerate, and 50,000 syncs are not.)"""
    from PIL import Image

    from .checkpoint_io import create_temp

    arr = image.expand(3, -1, -1).permute(1, 2, 0).contiguous().cpu().numpy()
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(arr, "RGB").save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def builtin_images(name: str) -> torch.Tensor:
    """A built-in data set's images as uint8 [N, C, H, W]."""
    if name in ("fashion-mnist", "fashion-mnist:train", "fashion-mnist:test"):
        return data_lib.load_fashion_mnist("test" if name.endswith(":test") else "train")[0]
    if name == "digits":
        return (data_lib.load_digits()[0] * 255).round().to(torch.uint8)
    raise InputValueError(f"unknown built-in data set {name!r}; choose from {BUILTIN_SOURCES}")


def describe_source(source: str) -> str:
    if source.endswith(".npz"):
        return "npz"
    if os.path.isdir(source):
        return "folder"
    if source in BUILTIN_SOURCES:
        return "builtin"
    raise InputValueError(f"{source!r} is not a .npz of statistics, an existing image folder or a built-in data set "
                          f"({', '.join(BUILTIN_SOURCES)})")


def load_source(source: str, metric_factory, max_images: int | None = None, progress: bool = False,
                chunk: int = 256) -> tuple[FeatureStats, InceptionMetric | None]:
    """Statistics of a source (see the module docstring). For images also the metric (its IS when the network
    has a classifier); for a .npz only the statistics. `metric_factory(total)` makes an InceptionMetric."""
    if not isinstance(source, str):
        raise InputTypeError(f"load_source: source must be a str (a .npz, an image folder or one of "
                             f"{BUILTIN_SOURCES}), got {type(source).__name__}")
    if not callable(metric_factory):
        raise InputTypeError(f"load_source: metric_factory must be a callable total -> InceptionMetric, "
                             f"got {type(metric_factory).__name__}")
    if max_images is not None:
        check_int("load_source", "max_images", max_images, 1)  # a negative slice bound would drop the last images
    check_int("load_source", "chunk", chunk, 1)
    kind = describe_source(source)
    if kind == "npz":
        return FeatureStats.load(source), None
    if kind == "folder":
        files = image_files(source)[:max_images]
        if not files:
            raise InputValueError(f"no png/jpg/jpeg/webp images under {source}")
        total, get = len(files), lambda i, j: [read_image(f) for f in files[i:j]]
    else:
        images = builtin_images(source)[:max_images]
        total, get = images.shape[0], lambda i, j: images[i:j]
    metric = metric_factory(total)
    steps = range(0, total, chunk)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=os.path.basename(source.rstrip("/")) or source, unit="chunk")
    for i in steps:
        metric.update(get(i, i + chunk), start=i)
    return metric.features, metric


# ------------------------------------------------------------------------------------ mage eval


SAMPLING_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass
class EvalConfig:
    """What `mage eval` generates: `num` images in batches of `batch_size`, decoded in `steps` steps (at most the
    model's token count) at `choice_temperature`; `dtype` None (the model's) or an autocast dtype."""

    num: int = 50000
    batch_size: int = 64
    steps: int = 20
    choice_temperature: float = 6.0
    seed: int = 0
    dtype: torch.dtype | None = None
    images_dir: str | None = None  # PNGs of the samples; an interrupted run resumes from those written

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Every field's type and range (run again by generate_into: a dataclass field can change after init)."""
        check_config(self)
        if self.dtype not in SAMPLING_DTYPES:
            raise InputValueError(f"EvalConfig: dtype must be None, torch.float32, torch.bfloat16 or torch.float16, "
                                  f"got {self.dtype!r}")


def batch_seed(seed: int, index: int) -> int:
    """Batch `index` draws from its own seed, so any process can make any batch, in any order, after a resume."""
    return (seed * 1_000_003 + index) % (2**63)


IMAGES_DIR_RECORD = "mage-eval.json"  # in images_dir: the model and settings that made its PNGs
_SAMPLE_PNG = re.compile(r"[0-9]{6,}\.png")  # image i is f"{i:06d}.png" (mage eval and mage sample)


def sample_indices(folder: str | os.PathLike) -> list[int]:
    """The numbers of the sample PNGs (000123.png) directly in `folder`, sorted."""
    return sorted(int(p.name[:-4]) for p in Path(folder).iterdir() if _SAMPLE_PNG.fullmatch(p.name) and p.is_file())


def _check_images_dir(out: Path, model, cfg: EvalConfig) -> None:
    """PNGs in images_dir are read back only if this model made them with these settings: the run records both in
    IMAGES_DIR_RECORD before its first PNG, and a later run with others, or PNGs without a record, are refused (they
    would go into the statistics as this run's samples). A record beside no PNGs (a run stopped before its first) is
    replaced. Under torchrun every process checks and all write the same record."""
    made_by = {"model": weights_fingerprint(model), "seed": cfg.seed, "steps": cfg.steps,
               "choice_temperature": cfg.choice_temperature, "batch_size": cfg.batch_size, "dtype": str(cfg.dtype)}
    record = out / IMAGES_DIR_RECORD
    samples = bool(sample_indices(out))  # before the record is read: a PNG is written after its record
    if record.is_file():
        try:
            saved = json.loads(record.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            saved = {}
        saved = saved if isinstance(saved, dict) else {}
        differ = ["another model" if k == "model" else f"{k} {saved.get(k)!r} (now {v!r})"
                  for k, v in made_by.items() if saved.get(k) != v]
        if not differ:
            return
        if samples:
            raise InputValueError(f"images_dir {out} holds the samples of another run ({', '.join(differ)}), which "
                                  "this one would count as its own: give another folder (--images-dir), or delete "
                                  f"its PNGs and {IMAGES_DIR_RECORD} to start over")
    elif samples:
        raise InputValueError(f"images_dir {out} holds sample PNGs but no {IMAGES_DIR_RECORD} saying which model and "
                              "settings made them, so they cannot be counted as this run's: give an empty folder "
                              "(--images-dir), or delete them")
    write_atomic(record, json.dumps(made_by, indent=1) + "\n")


@torch.no_grad()
def generate_into(model, metric: InceptionMetric, cfg: EvalConfig, rank: int = 0, world: int = 1,
                  progress: bool = False) -> dict:
    """Generate this process's share of cfg.num images (batches rank, rank + world, ...) straight into `metric`,
    quantized to uint8 as the saved PNGs are. With images_dir, each batch whose PNGs all exist is read back instead
    of generated (so a resumed run reproduces the uninterrupted one exactly); new batches are written there.
    Returns {"generated", "reused", "sampling_s"} for this process."""
    from .model import MAGE
    from .sampler import generate

    check_model("generate_into", model, MAGE)
    if not isinstance(cfg, EvalConfig):
        raise InputTypeError(f"generate_into: cfg must be an EvalConfig, got {type(cfg).__name__}")
    cfg.check()
    check_steps("generate_into", cfg.steps, model.config.num_tokens)
    world = check_int("generate_into", "world", world, 1)
    check_int("generate_into", "rank", rank, 0, world - 1)
    if not isinstance(metric, InceptionMetric):
        raise InputTypeError(f"generate_into: metric must be a mage.metrics.InceptionMetric, got "
                             f"{type(metric).__name__}")
    out = Path(cfg.images_dir) if cfg.images_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _check_images_dir(out, model, cfg)
    batches = range(rank, math.ceil(cfg.num / cfg.batch_size), world)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="eval", unit="batch")
    generated = reused = 0
    sampling = 0.0
    for b in batches:
        start = b * cfg.batch_size
        count = min(cfg.batch_size, cfg.num - start)
        paths = [out / f"{start + i:06d}.png" for i in range(count)] if out is not None else []
        if paths and all(p.is_file() for p in paths):
            images = torch.stack([read_image(p) for p in paths])
            reused += count
        else:
            t = time.perf_counter()
            g = torch.Generator(model.device).manual_seed(batch_seed(cfg.seed, b))
            x = generate(model, count, steps=cfg.steps, choice_temperature=cfg.choice_temperature, generator=g,
                         batch_size=count, dtype=cfg.dtype)
            images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            sampling += time.perf_counter() - t
            generated += count
            for image, path in zip(images, paths):
                write_png(image, path)
        metric.update(images, start=start)
    return {"generated": generated, "reused": reused, "sampling_s": sampling}


# ------------------------------------------------------------------------------------ mage probe


def probe_images(source: str, split: str, size: int, channels: int,
                 limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | data_lib.ImageFolder:
    """A probe split at the tokenizer's size and channels: in-memory (fashion-mnist, digits: float images in
    [0, 1] and labels) or an image folder with the evaluation view (resize + centre crop, section 6)."""
    from . import transforms as T

    if not isinstance(source, str):
        raise InputTypeError(f"probe_images: source must be a str (fashion-mnist, digits or a folder), "
                             f"got {type(source).__name__}")
    if split not in ("train", "test"):  # digits took any other split for "test"
        raise InputValueError(f"probe_images: split must be 'train' or 'test', got {split!r}")
    check_int("probe_images", "size", size, 1)
    check_int("probe_images", "channels", channels, 1)
    if limit is not None:
        check_int("probe_images", "limit", limit, 1)  # a negative slice bound would drop the last images
    if source in data_lib.BUILTIN_DATA:
        x, y = data_lib.load_builtin(source, split)  # the split `mage train --data` uses
        x, y = x[:limit], y[:limit]
        x = data_lib.to_float_image(x, channels)
        if x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False).clamp(0, 1)
        return x, y
    root = Path(source)
    names = ("train",) if split == "train" else ("val", "test")
    folder = next((root / n for n in names if (root / n).is_dir()), None)
    if folder is None:
        raise InputValueError(f"a probe folder needs {root}/train/ and {root}/val/ (or test/), each "
                              f"root/<class>/<image>")
    if channels != 3:
        raise InputValueError(f"image folders are read as RGB; the model's tokenizer takes {channels} channel(s)")
    ds = data_lib.ImageFolder(folder, transform=T.eval_transform(size))
    if limit is not None and limit < len(ds):
        # Folders are sorted by class: a fixed random subset keeps every class.
        keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:limit].sort().values
        ds.samples = [ds.samples[i] for i in keep.tolist()]
    return ds
