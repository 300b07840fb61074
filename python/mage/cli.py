"""The `mage` command line: `mage sample` (unconditional images), `mage inpaint` (fill a masked region),
`mage train` (tokenizer / MAGE / MAGE-C / MAE pre-training, also under torchrun) and `mage demo` (the whole
pipeline on Fashion-MNIST with a report).

Subcommands are argparse subparsers. To add one, write `def add_NAME(subparsers)` that builds its
parser and sets `func=` (a function taking the parsed args and returning an exit code), and append it
to SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import torch

from .report import save_image, save_image_grid

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------ image files


def load_image(path: str, size: int, *, mode: str = "RGB", nearest: bool = False) -> torch.Tensor:
    """An image file -> float [1, C, size, size] in [0, 1]: shorter side resized to `size`, centre crop
    (the reference's evaluation preprocessing). mode "L" reads one grey channel; masks use `nearest`."""
    from PIL import Image

    img = Image.open(path).convert(mode)
    w, h = img.size
    scale = size / min(w, h)
    resample = Image.NEAREST if nearest else Image.BICUBIC
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float() / 255.0
    return x[None, None] if x.dim() == 2 else x.permute(2, 0, 1)[None]


# ------------------------------------------------------------------------------------ helpers


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_model(args) -> "torch.nn.Module":
    from .checkpoint import load_any

    model = load_any(args.checkpoint, trusted=args.trust_checkpoint)
    return model.to(_device(args.device)).eval()


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="official .pth (e.g. mage-vitb-1600.pth) or our .safetensors")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow arbitrary pickled objects in a .pth (only for files whose origin you trust)")
    p.add_argument("--steps", type=int, default=20, help="decoding steps (default 20, as the README)")
    p.add_argument("--temperature", type=float, default=6.0, help="choice (Gumbel) temperature (default 6.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="fp32 (the reference) or autocast bf16/fp16")


# ------------------------------------------------------------------------------------ mage sample


def add_sample(subparsers) -> None:
    p = subparsers.add_parser("sample", help="generate class-unconditional images",
                              description="Iterative decoding from all-[MASK] (docs/REFERENCE.md 5); writes a PNG "
                                          "grid and each image as its own PNG.")
    _add_common(p)
    p.add_argument("--num", type=int, default=64, help="number of images")
    p.add_argument("--out", default="samples.png", help="grid PNG")
    p.add_argument("--images-dir", default=None,
                   help="directory for the individual PNGs (default: <out without .png>/)")
    p.add_argument("--nrow", type=int, default=8, help="images per grid row")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cuda-graph", action="store_true", help="capture one batch as a CUDA graph and replay it")
    p.set_defaults(func=run_sample)


def run_sample(args) -> int:
    from .sampler import generate

    model = _load_model(args)
    images = generate(model, args.num, steps=args.steps, choice_temperature=args.temperature,
                      generator=_generator(args.seed, model.device), batch_size=args.batch_size,
                      dtype=DTYPES[args.dtype], cuda_graph=args.cuda_graph, progress=True)
    save_image_grid(images, args.out, nrow=args.nrow)
    images_dir = args.images_dir or os.path.splitext(args.out)[0]
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
    from .inpaint import inpaint

    model = _load_model(args)
    size = model.config.tokenizer.resolution
    grey = model.config.tokenizer.in_channels == 1  # e.g. the demo's Fashion-MNIST model
    image = load_image(args.image, size, mode="L" if grey else "RGB").to(model.device)
    mask = load_image(args.mask, size, mode="L", nearest=True).to(model.device) > 0.5
    if args.outpaint:
        mask = ~mask
    out = inpaint(model, image, mask, ring=args.ring, steps=args.steps, choice_temperature=args.temperature,
                  generator=_generator(args.seed, model.device), dtype=DTYPES[args.dtype], paste=args.paste)
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
_HELP = {
    "data": "fashion-mnist | digits | an image folder root/<class>/*.png (root/train/ is used when present)",
    "model_overrides": 'JSON of MAGEConfig fields, e.g. \'{"depth": 6, "dropout": 0.0}\'',
    "tokenizer": 'JSON of TokenizerConfig fields, e.g. \'{"in_channels": 1, "n_embed": 256}\'',
    "tokenizer_checkpoint": "tokenizer.safetensors written by `mage train --objective tokenizer`",
    "token_cache": "token ids cached with mage.train.build_token_cache (no online tokenizer)",
    "mae": "JSON of MAEConfig fields",
    "batch_size": "global batch, split over the torchrun processes",
    "lr": "absolute learning rate (default: blr * batch_size / 256)",
    "amp": "autocast dtype; fp16 adds a GradScaler",
    "resume": "continue from out_dir/checkpoint.pt when it exists",
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
            choices = {"objective": OBJECTIVES, "amp": ("none", "bf16", "fp16"), "model": sorted(CONSTRUCTORS)}
            shown = json.dumps(default) if f.name in _JSON_FIELDS else default
            p.add_argument(flag, type=_train_field_type(f, default), default=None, choices=choices.get(f.name),
                           help=f"{help_text} (default {shown})".strip())
    p.add_argument("--config", default=None, help="a JSON file of TrainConfig fields (flags override it), "
                                                  "e.g. the config.json a run writes")
    _add_threads(p)
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from .train import TrainConfig, train

    values = json.loads(open(args.config).read()) if args.config else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SystemExit(f"mage train: {args.config} has unknown fields {unknown}")
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    last = train(TrainConfig(**values), governor=_governor(args.threads))
    if last and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in last.items() if k != "time"}))
    return 0


# ------------------------------------------------------------------------------------ mage demo


def add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="tokenizer + small MAGE on Fashion-MNIST, then a report (about 15 min on 2 CPU cores)",
        description="Trains a VQGAN tokenizer and a small MAGE on Fashion-MNIST and writes a report folder: "
                    "samples, inpainting, curves, linear probe (MAGE vs raw pixels vs random init), Frechet "
                    "distance of samples vs a shuffled-token baseline, report.json.")
    p.add_argument("--quick", action="store_true", help="the CI-sized run (about 2 minutes on 2 CPU cores)")
    p.add_argument("--out", default="report", help="report folder (default ./report)")
    p.add_argument("--seed", type=int, default=0)
    _add_threads(p)
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from .demo import DemoConfig, run_demo as demo, summary

    cfg = DemoConfig.quick(args.out) if args.quick else DemoConfig(out_dir=args.out)
    cfg.seed = args.seed
    print(summary(demo(cfg, governor=_governor(args.threads))))
    return 0


SUBCOMMANDS = [add_sample, add_inpaint, add_train, add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mage", description="MAGE: masked generative encoder (mage-kernels)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command in ("demo", "train"):
        from .threads import ensure_passive_wait

        ensure_passive_wait()  # from the command line only: it re-executes the process
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
