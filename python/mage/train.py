"""One training loop for the tokenizer, MAGE, MAGE-C and the MAE baseline (docs/REFERENCE.md 4.4-4.10, 7).

    from mage.train import TrainConfig, train
    train(TrainConfig(objective="mage", data="fashion-mnist", steps=2000, out_dir="runs/mage"))

Multi-process with `torchrun --nproc_per_node N -m mage.cli train ...` (DDP; NCCL on GPU, gloo on CPU).
Every random choice of a step (mask ratio, mask noise, augmentation) is a function of (seed, step,
global sample position), so a run is reproducible, resumes exactly from a checkpoint, and gives the
same result on 1 or N processes up to float reduction order (dropout, which draws from torch's global
RNG, is the one exception across process counts; its state is checkpointed for resume).

With `disc_weight > 0` the tokenizer trains as a VQGAN (Esser et al. 2021): a PatchGAN discriminator with its
own optimizer (`mage.discriminator`), the adaptively weighted adversarial term and, given VGG16/LPIPS weights,
a perceptual term (`mage.perceptual`). `ema_decay > 0` keeps an average of the weights (`mage.ema`) that the
final weights file, the sample grids and evaluation use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import mage_kernels

from . import data as data_lib
from . import transforms as T
from ._checks import InputError, InputValueError, all_finite, check_config, check_int
from .checkpoint_io import (
    CheckpointError,
    check_training_state,
    check_writable,
    clean_stale_files,
    config_changes,
    damaged_checkpoint_error,
    load_checkpoint,
    restore_training_state,
    resume_source,
    save_checkpoint,
    save_training_state,
    weights_fingerprint,
    write_atomic,
)
from .discriminator import DISC_LOSSES, DISC_NORMS, DiscriminatorObjective, PatchDiscriminator, adaptive_weight, \
    frozen, generator_loss
from .ema import EMA
from .losses import info_nce, masked_positions, masked_token_loss, patch_pixel_loss
from .mae import MAE, MAEConfig, mae_masked_count
from .model import CONSTRUCTORS, MAGE, SIZES, Block, MAGEConfig
from .report import JsonlLogger, plot_curves, read_jsonl, save_image_grid
from .schedule import build_adamw, cosine_lr, scaled_lr, set_lr
from .tokenizer import ResnetBlock, TokenizerConfig, VQGANTokenizer
from .tokenizer_io import load_tokenizer, save_tokenizer

OBJECTIVES = ("tokenizer", "mage", "mage-c", "mae")


# Fields that only some kinds of run read: set (away from their default) for another objective they would be
# ignored, or fail much later.
_MAGE = ("mage", "mage-c")
_OBJECTIVE_FIELDS = {"disc_weight": ("tokenizer",), "perceptual_weights": ("tokenizer",),
                     "codebook_restart_every": ("tokenizer",),
                     "tokenizer_checkpoint": _MAGE, "token_cache": _MAGE, "model": _MAGE, "model_overrides": _MAGE,
                     "tokenizer": ("tokenizer", *_MAGE), "mae": ("mae",), "mae_mask_ratio": ("mae",),
                     # MAGE's token masking and loss (MAE masks mae_mask_ratio of its patches; the tokenizer none)
                     **{name: _MAGE for name in ("mask_ratio_min", "mask_ratio_max", "mask_ratio_mu",
                                                 "mask_ratio_std", "mask_ratio_per_sample", "label_smoothing")},
                     **{name: ("mage-c",) for name in ("contrastive_weight", "contrastive_temperature",
                                                       "projector_hidden", "projector_dim")},
                     "sample_every": ("tokenizer", *_MAGE)}  # MAE writes no sample grid
# The discriminator's settings: read only when disc_weight > 0.
_DISC_FIELDS = ("disc_start", "disc_loss", "disc_lr", "disc_betas", "disc_layers", "disc_channels", "disc_norm")


@dataclasses.dataclass
class TrainConfig:
    objective: str = "mage"  # tokenizer | mage | mage-c | mae
    out_dir: str = "runs/mage"
    data: str = "fashion-mnist"  # fashion-mnist | digits | a folder root/<class>/*.png
    image_size: int = 32  # MAGE with a tokenizer_checkpoint: the checkpoint's resolution instead
    # Model: a MAGE constructor name (mage/mage-c) with overrides; MAE sizes come from `mae`.
    model: str = "mage_vit_tiny"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    tokenizer: dict = dataclasses.field(default_factory=dict)  # TokenizerConfig fields
    tokenizer_checkpoint: str | None = None  # a trained tokenizer (mage.train output) for mage/mage-c
    token_cache: str | None = None  # ids cached by build_token_cache: no online tokenizer
    mae: dict = dataclasses.field(default_factory=dict)  # MAEConfig fields
    # Optimisation (4.10): AdamW (0.9, 0.95), wd 0.05, lr = blr * batch / 256, warm-up + cosine, clip 3.
    steps: int = 1000
    batch_size: int = 64  # global batch, split over processes
    blr: float = 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    warmup_steps: int = 100
    max_warmup_fraction: float = 0.1  # warm-up lasts at most this fraction of `steps`
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    clip_grad: float = 3.0
    amp: str = "none"  # none | bf16 | fp16
    accum_steps: int = 1  # micro-batches per optimizer step (the reference's accum_iter); batch_size stays global
    grad_checkpointing: bool = False  # recompute block activations in backward (transformer / residual blocks)
    compile: bool = False  # torch.compile the training forward (and with it its backward)
    compile_backend: str = "inductor"  # torch.compile's backend; "aot_eager" traces without generating code
    # Masking (4.4): truncated normal ratio in [min, max], one per step for the whole global batch (or, a
    # deviation, one per image: less noisy steps; the dropped count stays the same, so does the step's cost).
    mask_ratio_min: float = 0.5
    mask_ratio_max: float = 1.0
    mask_ratio_mu: float = 0.55
    mask_ratio_std: float = 0.25
    mask_ratio_per_sample: bool = False  # one ratio per image instead of one per step (the reference's)
    label_smoothing: float = 0.1
    # RandomResizedCrop area range of the training images (4.10: 0.2-1; a token_cache has its own, see `mage cache`).
    crop_scale: tuple = (0.2, 1.0)
    # MAGE-C (section 7; the paper's weight 0.1; temperature 0.2 and the projector widths are assumed).
    contrastive_weight: float = 0.1
    contrastive_temperature: float = 0.2
    projector_hidden: int = 512
    projector_dim: int = 128
    mae_mask_ratio: float = 0.75
    codebook_restart_every: int = 100  # tokenizer: restart codes unused over this many steps (0: never)
    # VQGAN (tokenizer only; Esser et al. 2021 section 3.2): PatchGAN discriminator from step disc_start on,
    # its term weighted by disc_weight x the adaptive weight; perceptual LPIPS term when weights are given.
    disc_weight: float = 0.0  # 0: no discriminator (a VQ-VAE); taming uses 0.8
    disc_start: int = 0
    disc_loss: str = "hinge"  # hinge | non-saturating
    disc_lr: float | None = None  # default: the generator's lr
    disc_betas: tuple = (0.5, 0.9)
    disc_layers: int = 3
    disc_channels: int = 64
    disc_norm: str = "group"  # group | batch
    perceptual_weight: float = 1.0
    perceptual_weights: str | None = None  # LPIPS-VGG16 weights file (mage.perceptual); no perceptual term without
    ema_decay: float = 0.0  # 0: no EMA; e.g. 0.999
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    sample_every: int = 0
    resume: bool = False
    resume_with_changes: bool = False  # resume although settings that change the run's math differ
    overwrite: bool = False  # start afresh in an out_dir holding an earlier run (its checkpoint, weights, log: deleted)
    progress: bool = True
    tensorboard: bool = False  # also log to out_dir/tensorboard (needs the tensorboard package)

    def __post_init__(self):
        check_config(self)
        if self.objective not in OBJECTIVES:
            raise InputValueError(f"TrainConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise InputValueError(f"TrainConfig.amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if self.model not in CONSTRUCTORS:
            raise InputValueError(f"TrainConfig.model must be one of {sorted(CONSTRUCTORS)}, got {self.model!r}")
        if self.accum_steps < 1:
            raise InputValueError(f"TrainConfig.accum_steps must be >= 1, got {self.accum_steps}")
        if not 0.0 <= self.max_warmup_fraction <= 1.0:
            raise InputValueError(f"TrainConfig.max_warmup_fraction must be in [0, 1], got {self.max_warmup_fraction}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise InputValueError(f"TrainConfig.ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")
        if self.disc_loss not in DISC_LOSSES:
            raise InputValueError(f"TrainConfig.disc_loss must be one of {DISC_LOSSES}, got {self.disc_loss!r}")
        if self.disc_norm not in DISC_NORMS:
            raise InputValueError(f"TrainConfig.disc_norm must be one of {DISC_NORMS}, got {self.disc_norm!r}")
        if self.disc_weight < 0:
            raise InputValueError(f"TrainConfig.disc_weight must be >= 0, got {self.disc_weight}")
        if self.resume and self.overwrite:
            raise InputValueError("TrainConfig.resume continues the run in out_dir and overwrite deletes it to start "
                                  "afresh: give one of resume (--resume) and overwrite (--overwrite), not both")
        if self.resume_with_changes and not self.resume:
            raise InputValueError("TrainConfig.resume_with_changes lets a resume change settings, so it needs "
                                  "resume=True (--resume): add --resume or drop --resume-with-changes")
        self.betas = tuple(self.betas)
        self.disc_betas = tuple(self.disc_betas)
        for name in ("betas", "disc_betas"):
            if len(getattr(self, name)) != 2:
                raise InputValueError(f"TrainConfig.{name} must be two numbers (beta1, beta2), got "
                                      f"{getattr(self, name)}")
        self.crop_scale = tuple(self.crop_scale)
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1]:
            raise InputValueError(f"TrainConfig.crop_scale must be (low, high) with 0 < low <= high <= 1, "
                                  f"got {self.crop_scale}")
        self._check_unused()
        if self.disc_weight and self.disc_start >= self.steps:  # optimizer steps, 0..steps-1, with or without resume
            raise InputValueError(f"TrainConfig.disc_start {self.disc_start} is not below steps {self.steps} "
                                  f"(--steps): the discriminator trains from step disc_start on and the run's last "
                                  f"step is {self.steps - 1}, so it would never train: give a disc_start below steps "
                                  f"(--disc-start), or disc_weight 0 (--disc-weight) for no discriminator")
        self._check_nested()

    def _check_unused(self) -> None:
        """Settings this run would ignore are errors (each message names the field first: the CLI leads with its
        flag): fields of another objective, the discriminator's without disc_weight, crop_scale with a token_cache,
        compile_backend without compile, blr beside lr, perceptual_weight without perceptual_weights. Only values
        away from the default count: a replayed config.json holds every field."""
        default = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                   for f in dataclasses.fields(self)}
        changed = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != default[f.name]]
        for name in changed:
            objectives = _OBJECTIVE_FIELDS.get(name, (self.objective,))
            if self.objective not in objectives:
                raise InputValueError(f"TrainConfig.{name} belongs to objective {' or '.join(map(repr, objectives))}: "
                                      f"unset it for objective {self.objective!r}, got {getattr(self, name)!r}")
        for name in changed:
            if name in _DISC_FIELDS and not self.disc_weight:
                raise InputValueError(f"TrainConfig.{name} sets up the discriminator, which trains only with "
                                      f"disc_weight > 0 (--disc-weight; taming uses 0.8): set disc_weight or leave "
                                      f"{name} at its default {default[name]!r}, got {getattr(self, name)!r}")
        if "crop_scale" in changed and self.token_cache:
            raise InputValueError(f"TrainConfig.crop_scale crops the training images, which a token_cache replaces "
                                  f"(its ids are of crops made when it was built: `mage cache --crop-scale`): leave "
                                  f"crop_scale at its default {default['crop_scale']} or drop token_cache "
                                  f"(--token-cache), got {self.crop_scale}")
        if "compile_backend" in changed and not self.compile:
            raise InputValueError(f"TrainConfig.compile_backend is torch.compile's backend, used only with "
                                  f"compile=True (--compile): set compile or leave compile_backend at its default "
                                  f"{default['compile_backend']!r}, got {self.compile_backend!r}")
        if "blr" in changed and self.lr is not None:
            raise InputValueError(f"TrainConfig.blr sets the learning rate only without lr (lr = blr * batch_size / "
                                  f"256): give one of blr (--blr) and lr (--lr), got blr={self.blr} and lr={self.lr}")
        if "perceptual_weight" in changed and not self.perceptual_weights:
            raise InputValueError(f"TrainConfig.perceptual_weight weighs the LPIPS term, which needs "
                                  f"perceptual_weights (--perceptual-weights, an LPIPS-VGG16 weights file, see "
                                  f"mage.perceptual): give it or leave perceptual_weight at "
                                  f"{default['perceptual_weight']}, got {self.perceptual_weight}")

    def _check_nested(self) -> None:
        """The dict fields as the configs they become (MAGEConfig, TokenizerConfig, MAEConfig), so a bad override
        fails here, before anything is built or written; their errors name the field."""
        if self.objective == "mae":
            make_mae_config(self)
            return
        # MAGE with a tokenizer_checkpoint: the tokenizer's config comes from that file, read when the model is built.
        from_file = self.tokenizer_checkpoint and self.objective != "tokenizer"
        tokenizer = TokenizerConfig() if from_file else make_tokenizer_config(self)
        if self.objective in ("mage", "mage-c"):
            make_model_config(self, tokenizer)

    @property
    def warmup(self) -> int:
        """Warm-up steps: warmup_steps, at most max_warmup_fraction of the run (a 20-step run warms up for 2)."""
        return min(self.warmup_steps, int(self.max_warmup_fraction * self.steps))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# What to do with out_dir on this invocation, not settings of the run: never written to config.json, so that
# replaying it (`--config`) cannot resume or delete a run in another out_dir unasked.
INVOCATION_FIELDS = ("resume", "resume_with_changes", "overwrite")

# Fields that never change what a run computes: a resume may change them freely.
RUN_ONLY_FIELDS = frozenset({"out_dir", "resume", "resume_with_changes", "overwrite", "progress", "log_every",
                             "ckpt_every", "sample_every", "num_workers", "tensorboard",
                             "grad_checkpointing"})  # recomputation replays the RNG: the same numbers


# ------------------------------------------------------------------------------------------ setup


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


_started_group = False  # whether init_distributed started the default process group


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python` run is one process."""
    global _started_group
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _started_group = True
    return Dist(dist.get_rank() if world > 1 else 0, world, device)


def finish_distributed(own_group_only: bool = False) -> None:
    """End this process's part in a torchrun job that finished normally on every rank: a barrier, the default
    process group destroyed, then a short pause. Call it last in a script that runs collectives (`mage train` and
    `mage eval` do). `own_group_only`: only if `init_distributed` (`train`, `mage eval`) started the group, so that
    a group the caller started is left alone (what the `mage` command does).

    Why: a gloo worker thread frees a collective's tensors (and a barrier the collectives before it) a moment after
    the collective returns, and needs the GIL to do so. If the interpreter is shutting down by then, Python ends
    that thread inside torch and the process aborts (SIGABRT, "terminate called without an active exception")
    after all its work was done; once DDP has been used, torch keeps the group's threads to the end. No torch call
    waits for that moment, so the pause (GIL released) gives the workers 0.1 s, far more than they need. A rank
    that failed never gets here; torchrun then ends the others waiting in the barrier."""
    global _started_group
    if dist.is_available() and dist.is_initialized() and (_started_group or not own_group_only):
        dist.barrier()
        dist.destroy_process_group()
        _started_group = False
        time.sleep(0.1)


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A CPU generator determined by (seed, step, stream): the randomness of one training step."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 8191 + stream) % (2**62))


def _config_from(field: str, kind: type, values: dict, defaults: dict | None = None, fixed: dict | None = None):
    """kind(**defaults, **values, **fixed): a nested config built from the dict field `field` of TrainConfig (its
    `values`). Only the config, never a model, so every error it raises is about the user's values; they name the
    field. `fixed`: fields that come from elsewhere and that `values` may not set."""
    fixed = fixed or {}
    allowed = {f.name for f in dataclasses.fields(kind)} - set(fixed)
    unknown = sorted(str(k) for k in set(values) - allowed)
    if unknown:
        raise InputValueError(f"TrainConfig.{field}: unknown {kind.__name__} fields {unknown}" +
                              (f" ({', '.join(fixed)} cannot be set here)" if set(unknown) & set(fixed) else "") +
                              f"; the fields are {sorted(allowed)}")
    try:
        return kind(**{**(defaults or {}), **values, **fixed})
    except InputError as err:
        raise type(err)(f"TrainConfig.{field}: {err}") from None


def _sized_config(cfg: TrainConfig, field: str, kind: type, size: str, what: str):
    """kind from the dict field `field` (`what`: how messages call it), its `size` field being image_size unless the
    dict sets it. Set in both (image_size away from its default), they must agree; an image_size the config
    refuses is said to be image_size's error (the CLI names --image-size, not the dict's flag)."""
    values = getattr(cfg, field)
    if size in values:
        if cfg.image_size != TrainConfig.__dataclass_fields__["image_size"].default and values[size] != cfg.image_size:
            raise InputValueError(f"TrainConfig.image_size {cfg.image_size} and the {what}'s {size} {values[size]} "
                                  f"(TrainConfig.{field}) differ: give the size once, as image_size (--image-size) "
                                  f"or in {field} (--{field})")
        return _config_from(field, kind, values)
    try:
        return _config_from(field, kind, values, defaults={size: cfg.image_size})
    except InputError as err:
        detail = str(err).removeprefix(f"TrainConfig.{field}: {kind.__name__}: ")
        if not detail.startswith(f"{size} "):
            raise
        raise type(err)(f"TrainConfig.image_size sets the {what}'s {size}: {detail}") from None


def make_tokenizer_config(cfg: TrainConfig) -> TokenizerConfig:
    return _sized_config(cfg, "tokenizer", TokenizerConfig, "resolution", "tokenizer")


def make_mae_config(cfg: TrainConfig) -> MAEConfig:
    return _sized_config(cfg, "mae", MAEConfig, "image_size", "MAE")


def make_model_config(cfg: TrainConfig, tokenizer: TokenizerConfig) -> MAGEConfig:
    """cfg.model's MAGEConfig with cfg.model_overrides; its tokenizer is `tokenizer` (from TrainConfig.tokenizer or
    the tokenizer_checkpoint), which the overrides cannot replace."""
    return _config_from("model_overrides", MAGEConfig, cfg.model_overrides, defaults=SIZES[cfg.model],
                        fixed={"tokenizer": tokenizer})


def build_model(cfg: TrainConfig) -> nn.Module:
    """The objective's model. Configs are built (and their errors turned into errors about TrainConfig fields)
    before any module, so an error raised while building a module is a bug, not bad input, and keeps its
    traceback."""
    if cfg.objective == "tokenizer":
        return VQGANTokenizer(make_tokenizer_config(cfg))
    if cfg.objective == "mae":
        return MAE(make_mae_config(cfg))
    if cfg.tokenizer_checkpoint:
        tokenizer = load_tokenizer(cfg.tokenizer_checkpoint)
        _check_tokenizer_settings(cfg, tokenizer.config)
    else:
        warnings.warn(f"objective {cfg.objective!r} without tokenizer_checkpoint: the model's tokenizer is randomly "
                      "initialised (train one with objective='tokenizer' first)", UserWarning, stacklevel=4)
        tokenizer = VQGANTokenizer(make_tokenizer_config(cfg))
    model = MAGE(make_model_config(cfg, tokenizer.config))
    model.vqgan.load_state_dict(tokenizer.state_dict())
    return model


def _check_tokenizer_settings(cfg: TrainConfig, file: TokenizerConfig) -> None:
    """With a tokenizer_checkpoint the tokenizer and the image size are the file's: `tokenizer` and `image_size`
    given beside it must say the same (they cannot change it; anything else would be silently ignored)."""
    def plain(v):
        return list(v) if isinstance(v, (tuple, list)) else v

    missing, differ = object(), []
    for k, v in cfg.tokenizer.items():
        ours = getattr(file, k, missing)
        if plain(ours) != plain(v):
            differ.append(f"{k}={v!r} (the file's: {'no such field' if ours is missing else repr(ours)})")
    if differ:
        raise InputValueError(f"TrainConfig.tokenizer: the tokenizer comes from tokenizer_checkpoint "
                              f"{cfg.tokenizer_checkpoint}, and these settings differ from it: {', '.join(differ)}; "
                              "leave tokenizer unset (the file's settings are used)")
    default = TrainConfig.__dataclass_fields__["image_size"].default
    if cfg.image_size not in (default, file.resolution):
        raise InputValueError(f"TrainConfig.image_size: MAGE trains at the resolution of its tokenizer_checkpoint "
                              f"{cfg.tokenizer_checkpoint}, {file.resolution}x{file.resolution}; leave image_size unset "
                              f"or give {file.resolution}, got {cfg.image_size}")


class Projector(nn.Module):
    """MAGE-C's 2-layer MLP on the pooled encoder output (SimCLR-style; no BatchNorm, so results do not
    depend on how the batch is split over processes)."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class TrainModule(nn.Module):
    """What the optimizer and DDP see: the model and, for MAGE-C, the projector. Its forward is the
    objective's loss for one batch (so DDP hooks run)."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, perceptual: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = model
        if cfg.objective == "mage-c":
            self.projector = Projector(model.config.embed_dim, cfg.projector_hidden, cfg.projector_dim)
        # Frozen LPIPS network: assigned around nn.Module so that it stays out of the state dict (the checkpoint
        # would otherwise carry 58 MB of VGG16 the user already has) and out of DDP.
        object.__setattr__(self, "perceptual", perceptual)

    def forward(self, batch: torch.Tensor, plan: dict) -> tuple[torch.Tensor, dict]:
        if self.cfg.objective == "tokenizer":
            return tokenizer_loss(self.model, batch, self.perceptual, self.cfg.perceptual_weight)
        if self.cfg.objective == "mae":
            return mae_loss(self.model, batch, plan, self.cfg)
        return mage_loss(self, batch, plan)


# ------------------------------------------------------------------------------------------ objectives


def tokenizer_loss(tok: VQGANTokenizer, images: torch.Tensor, perceptual: nn.Module | None = None,
                   perceptual_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Reconstruction (L1 + L2, plus perceptual_weight x LPIPS when a perceptual network is given) plus the VQ
    losses of `vq_quantize` (docs/REFERENCE.md 3.3). The logs also carry, with their graphs, the reconstruction
    ("recon") and the reconstruction term ("nll", taming's name) that the adversarial step needs."""
    recon, vq_loss, _, counts = tok(images, check_range=False)
    err = recon.float() - images.float()
    rec = err.abs().mean() + (err * err).mean()
    logs = {"rec": rec.detach(), "vq": vq_loss.detach(), "counts": counts}
    if perceptual is not None:
        p = perceptual(images, recon).float().mean()
        logs["perceptual"] = p.detach()
        rec = rec + perceptual_weight * p
    return rec + vq_loss, {**logs, "recon": recon, "nll": rec}


def plan_masks(cfg: TrainConfig, step: int, num_tokens: int, rows: torch.Tensor, device) -> dict:
    """The masking of one step (4.4): one ratio for the global batch (or one per global sample row with
    mask_ratio_per_sample), noise per global sample row."""
    g = step_generator(cfg.seed, step, stream=1)
    if cfg.objective == "mae":
        num_masked = num_dropped = mae_masked_count(num_tokens, cfg.mae_mask_ratio)
    else:
        num_masked, num_dropped = mage_kernels.sample_mask_counts(
            num_tokens, batch=cfg.batch_size if cfg.mask_ratio_per_sample else None, generator=g,
            mask_ratio_min=cfg.mask_ratio_min, mask_ratio_max=cfg.mask_ratio_max,
            mask_ratio_mu=cfg.mask_ratio_mu, mask_ratio_std=cfg.mask_ratio_std)
        if cfg.mask_ratio_per_sample:
            num_masked = num_masked[rows].to(device)  # this rank's rows of the global batch's draw
    views = 2 if cfg.objective == "mage-c" else 1
    noise = torch.rand(views, cfg.batch_size, num_tokens, generator=g)[:, rows]  # this rank's rows
    return {"num_masked": num_masked, "num_dropped": num_dropped, "noise": noise.to(device)}


def _masked_forward(model: MAGE, ids: torch.Tensor, noise: torch.Tensor, num_masked: int | torch.Tensor,
                    num_dropped: int, label_smoothing: float):
    masked, _, keep_idx = mage_kernels.mask_plan(noise, num_masked, num_dropped)
    x = model.forward_encoder(ids, masked, keep_idx)  # (B, 1+Lk, D)
    hidden = model.mlm_layer(model.forward_decoder(x, masked, keep_idx))[:, 1:]  # (B, L, D)
    weight, bias = model.head_weight()
    valid = None
    if isinstance(num_masked, torch.Tensor):  # a count per row: every position, the first num_masked[b] count
        L = masked.shape[1]
        positions = masked_positions(masked, L)
        valid = torch.arange(L, device=masked.device) < num_masked[:, None]
    else:
        positions = masked_positions(masked, num_masked)
    loss = masked_token_loss(hidden, weight, bias, ids, positions, model.config.codebook_size, label_smoothing, valid)
    return loss, x


def mage_loss(module: TrainModule, ids: torch.Tensor, plan: dict) -> tuple[torch.Tensor, dict]:
    """MAGE: label-smoothed CE over masked tokens (4.7). MAGE-C adds lambda * InfoNCE between the
    pooled encoder outputs of two independently augmented, tokenized and masked views (section 7)."""
    model, cfg = module.model, module.cfg
    M, D, eps = plan["num_masked"], plan["num_dropped"], cfg.label_smoothing
    if cfg.objective == "mage":
        loss, _ = _masked_forward(model, ids[:, 0], plan["noise"][0], M, D, eps)
        return loss, {"mlm": loss.detach()}
    mlm_a, xa = _masked_forward(model, ids[:, 0], plan["noise"][0], M, D, eps)
    mlm_b, xb = _masked_forward(model, ids[:, 1], plan["noise"][1], M, D, eps)
    pa = module.projector(xa[:, 1:].mean(1).float())
    pb = module.projector(xb[:, 1:].mean(1).float())
    mlm = 0.5 * (mlm_a + mlm_b)
    con = info_nce(pa, pb, cfg.contrastive_temperature)
    return mlm + cfg.contrastive_weight * con, {"mlm": mlm.detach(), "contrastive": con.detach()}


def mae_loss(model: MAE, images: torch.Tensor, plan: dict, cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    M = plan["num_masked"]
    masked, _, keep_idx = mage_kernels.mask_plan(plan["noise"][0], M, M)
    pred = model(images, masked, keep_idx)
    loss = patch_pixel_loss(pred, model.patchify(images), masked_positions(masked, M), model.config.norm_pix_loss)
    return loss, {"pixel": loss.detach()}


# ------------------------------------------------------------------------------------------ data


def data_source(name: str) -> str:
    """What `data` names, comparable wherever it was given: a built-in data set's name or a folder's absolute path."""
    return name if name in data_lib.BUILTIN_DATA else str(Path(name).resolve())


def load_images(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor] | data_lib.ImageFolder:
    if name in data_lib.BUILTIN_DATA:
        return data_lib.load_builtin(name, split)
    return data_lib.ImageFolder(Path(name) / split if (Path(name) / split).is_dir() else name)


def input_shape(model: nn.Module) -> tuple[int, int]:
    """(channels, size) of the images a model takes: a loaded tokenizer checkpoint decides for MAGE."""
    c = model.config.tokenizer if isinstance(model, MAGE) else model.config
    return c.in_channels, (c.image_size if isinstance(model, MAE) else c.resolution)


def token_cache_dataset(cfg: TrainConfig, model: MAGE) -> data_lib.TokenCacheDataset:
    """The ids of cfg.token_cache as the run's data, checked against the run: the data set and the tokenizer it was
    built from (as far as it records them: `data` must be the cache's, and the model's tokenizer the one that made
    the ids; a cache that does not record its data refuses a `data` away from the default), the model's token count
    and codebook (docs/TRAINING.md)."""
    path = cfg.token_cache
    cache = data_lib.load_token_cache(path)
    built_from, default = cache.source.get("data"), TrainConfig.__dataclass_fields__["data"].default
    if built_from is not None and data_source(cfg.data) != built_from:
        raise InputValueError(f"TrainConfig.data {cfg.data}{' (the default)' if cfg.data == default else ''} is not "
                              f"the data set token_cache {path} was built from ({built_from}), and the run trains on "
                              f"the cache's ids: give its data set (--data {built_from}), or a cache of {cfg.data} "
                              f"(--token-cache; `mage cache --data {cfg.data}`)")
    if built_from is None and cfg.data != default:
        raise InputValueError(f"TrainConfig.data {cfg.data}: token_cache {path} does not record the data set it was "
                              "built from (an earlier release's, or built without data=), and the run trains on its "
                              f"ids whatever data says: leave data (--data) unset, or rebuild the cache with "
                              f"`mage cache --data {cfg.data}`")
    built_with = cache.source.get("tokenizer")
    if built_with is not None and built_with != weights_fingerprint(model.vqgan):
        given = (f"tokenizer_checkpoint {cfg.tokenizer_checkpoint}" if cfg.tokenizer_checkpoint else
                 "a randomly initialised one: no tokenizer_checkpoint")
        raise InputValueError(f"TrainConfig.token_cache {path} was made by another tokenizer than the model's "
                              f"({given}), so its ids are not the model's tokens: give the tokenizer the cache was "
                              "built with (--tokenizer-checkpoint), or rebuild the cache with this one (mage cache)")
    data_lib.check_token_cache(path, cache.ids, model.config.num_tokens, model.config.codebook_size)
    return data_lib.TokenCacheDataset(cache.ids, cache.labels, seed=cfg.seed,
                                      views=2 if cfg.objective == "mage-c" else 1)


def make_dataset(cfg: TrainConfig, channels: int, size: int, split: str = "train") -> torch.utils.data.Dataset:
    """The images of cfg.data with the objective's augmentation (a token_cache: `token_cache_dataset`)."""
    if cfg.objective == "mage-c":
        views = T.TwoViews(T.contrastive_transform(size, cfg.crop_scale))
    else:
        views = T.pretrain_transform(size, cfg.crop_scale)
    source = load_images(cfg.data, split)
    if isinstance(source, data_lib.ImageFolder):
        if channels != 3:
            raise InputValueError(f"TrainConfig.data {cfg.data}: image folders are read as RGB, but the model takes "
                                  f"{channels} channel(s) (set the tokenizer's in_channels to 3)")
        source.transform, source.seed = views, cfg.seed
        return source
    return data_lib.TensorImageDataset(*source, transform=views, channels=channels, seed=cfg.seed)


@torch.no_grad()
def build_token_cache(tokenizer: VQGANTokenizer, dataset, path: str, crops: int = 1, batch_size: int = 256,
                      data: str | None = None) -> None:
    """Tokenize `crops` augmented crops of every image once and save {ids [N, crops, L], labels, source} to `path`
    (the online tokenizer is ~40% of MAGE's training compute, docs/REFERENCE.md 4.12). `source` records the
    tokenizer and `data`, the name of the data set `dataset` holds (as TrainConfig.data: "digits", a folder...;
    None: not recorded), so that a run can check its own against them."""
    check_int("build_token_cache", "crops", crops, 1)
    check_int("build_token_cache", "batch_size", batch_size, 1)
    check_writable(path, "build_token_cache: path")  # before the minutes of tokenizing, not after
    tokenizer.eval()
    device = tokenizer.codebook.device
    ids = data_lib.build_token_cache(lambda x: tokenizer.encode(x, check_range=False), dataset, crops, batch_size,
                                     device=device)
    source = {"data": data_source(data) if data is not None else None, "tokenizer": weights_fingerprint(tokenizer)}
    save_checkpoint({"ids": ids, "labels": torch.as_tensor(dataset.labels), "source": source}, path,
                    keep_previous=False)


class Batches:
    """Endless (epoch, batch) iteration over this rank's share, starting at any global step."""

    def __init__(self, dataset, cfg: TrainConfig, d: Dist):
        if cfg.batch_size % d.world:
            raise InputValueError(f"TrainConfig.batch_size {cfg.batch_size} must be divisible by the number of "
                                  f"processes {d.world}")
        self.dataset, self.cfg, self.d = dataset, cfg, d
        self.local = cfg.batch_size // d.world
        if self.local % cfg.accum_steps:
            raise InputValueError(f"TrainConfig.accum_steps: each process's batch ({self.local} = batch_size / "
                                  f"processes) must be divisible by accum_steps {cfg.accum_steps}")
        self.sampler = data_lib.EpochSampler(len(dataset), seed=cfg.seed, rank=d.rank, world_size=d.world,
                                             drop_last=True)
        self.steps_per_epoch = self.sampler.num_per_rank() // self.local
        if self.steps_per_epoch < 1:
            raise InputValueError(f"TrainConfig.batch_size {cfg.batch_size} is larger than the data set "
                                  f"({len(dataset)} items): one global batch must fit in it")

    def from_step(self, step: int):
        while True:
            epoch, within = divmod(step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch, within * self.local)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            loader = data_lib.make_loader(self.dataset, self.local, sampler=self.sampler, drop_last=True,
                                          num_workers=self.cfg.num_workers, seed=self.cfg.seed + epoch)
            for x, _ in loader:
                # Global sample rows of this step's batch (rank r holds rows r, r + world, ...), so masks
                # are the same whatever the number of processes.
                rows = torch.arange(self.local) * self.d.world + self.d.rank
                yield step, x, rows
                step += 1
                if step % self.steps_per_epoch == 0:
                    break


# ------------------------------------------------------------------------------------------ loop


def _autocast(cfg: TrainConfig, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _to_ids(cfg: TrainConfig, model: nn.Module, batch: torch.Tensor, device) -> torch.Tensor:
    """The objective's input: images for tokenizer/MAE; token ids [B, views, L] for MAGE/MAGE-C."""
    batch = batch.to(device, non_blocking=True)
    if cfg.objective in ("tokenizer", "mae"):
        return batch
    if cfg.token_cache:
        return batch if batch.dim() == 3 else batch[:, None]  # (B, views, L)
    if batch.dim() == 4:
        batch = batch[:, None]  # (B, 1, C, H, W)
    B, V = batch.shape[:2]
    with torch.no_grad(), _autocast(cfg, device):  # the frozen tokenizer runs under autocast (3.3)
        ids = model.vqgan.encode(batch.flatten(0, 1), check_range=False)
    return ids.view(B, V, -1)


@torch.no_grad()
def restart_dead_codes(
    tok: VQGANTokenizer, images: torch.Tensor, usage: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Replace codes unused since the last restart by random encoder outputs of this step's global batch;
    returns the indices of the restarted codes.

    Under DDP every rank gathers the encoder outputs in global-row order (rank r holds rows r, r + world,
    ...) and draws the same picks, so the codebook is the one a single process would get."""
    dead = (usage == 0).nonzero().flatten()
    if dead.numel() == 0:
        return dead
    z = tok.encoder(images).float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        z = torch.stack(parts, 1).flatten(0, 1)  # (local, world, ...) -> global rows j * world + r
    rows = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    pick = torch.randint(rows.shape[0], (dead.numel(),), generator=generator).to(rows.device)
    tok.codebook[dead] = rows[pick].to(tok.codebook.dtype)
    return dead


# ------------------------------------------------------------------------------------------ steps


def micro_batches(batch: torch.Tensor, plan: dict, n: int) -> list[tuple[torch.Tensor, dict]]:
    """`n` equal slices of this process's batch and of its mask plan (gradient accumulation)."""
    counts = plan["num_masked"]
    counts = counts.chunk(n) if isinstance(counts, torch.Tensor) else [counts] * n  # a count per row, or one
    return [(b, {**plan, "noise": noise, "num_masked": m})
            for b, noise, m in zip(batch.chunk(n), plan["noise"].chunk(n, dim=1), counts)]


def _sync_if(trained: nn.Module, last: bool):
    """Under DDP, gradients are reduced in the backward of the last micro-batch only."""
    no_sync = getattr(trained, "no_sync", None)
    return contextlib.nullcontext() if last or no_sync is None else no_sync()


_GRAPH_KEYS = ("recon", "nll")  # tensors with graphs in the tokenizer's logs, not metrics


def _add_logs(total: dict, logs: dict, n: int) -> None:
    """Accumulate the mean over n micro-batches of each logged value; code counts are summed."""
    for k, v in logs.items():
        if k in _GRAPH_KEYS:
            continue
        v = v.detach() if k == "counts" else v.detach().float() / n
        total[k] = total[k] + v if k in total else v


def backward_step(cfg: TrainConfig, trained: nn.Module, scaler, batch: torch.Tensor, plan: dict, device) -> dict:
    """The objective's forward and backward over `accum_steps` micro-batches. Each loss is a mean over its equal
    micro-batch, so the accumulated gradient of loss / n is the gradient of the whole batch's mean: the large
    batch's step (InfoNCE of MAGE-C is the exception: its negatives are the micro-batch's, as with the
    reference's accum_iter). Returns the logs, "loss" included, averaged over the micro-batches."""
    n, logs = cfg.accum_steps, {}
    for i, (mb, mplan) in enumerate(micro_batches(batch, plan, n)):
        with _sync_if(trained, i == n - 1):
            with _autocast(cfg, device):
                loss, out = trained(mb, mplan)
            scaler.scale(loss / n).backward()
        _add_logs(logs, {**out, "loss": loss}, n)
    return logs


@dataclasses.dataclass
class Adversary:
    """The discriminator side of VQGAN training: its loss module, the module DDP wraps (`trained`), its own Adam
    optimizer and GradScaler. Its learning rate decays with the generator's, by a half cosine from disc_start."""

    objective: DiscriminatorObjective
    trained: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lr: float
    start: int
    steps: int

    def lr_at(self, step: int) -> float:
        return cosine_lr(step - self.start, self.steps - self.start, 0, self.lr)

    def state_dict(self) -> dict:
        return {"model": self.objective.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.objective.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


def build_adversary(cfg: TrainConfig, tok: VQGANTokenizer, lr: float, d: Dist) -> Adversary | None:
    if cfg.objective != "tokenizer" or cfg.disc_weight <= 0:
        return None
    net = PatchDiscriminator(tok.config.in_channels, cfg.disc_channels, cfg.disc_layers, cfg.disc_norm)
    size = tok.config.resolution
    if net.output_size(size) < 1:
        raise InputValueError(f"TrainConfig.disc_layers={cfg.disc_layers} is too deep for {size}x{size} images (the "
                              "discriminator would output no patch); use fewer disc_layers")
    objective = DiscriminatorObjective(net, cfg.disc_loss).to(d.device)
    trained: nn.Module = objective
    if d.world > 1:
        if cfg.disc_norm == "batch" and d.device.type == "cuda":
            objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
        trained = nn.parallel.DistributedDataParallel(objective)
    disc_lr = cfg.disc_lr if cfg.disc_lr is not None else lr
    optimizer = torch.optim.Adam(objective.parameters(), lr=disc_lr, betas=cfg.disc_betas)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.amp == "fp16")
    return Adversary(objective, trained, optimizer, scaler, disc_lr, cfg.disc_start, cfg.steps)


def adversarial_step(cfg: TrainConfig, module: TrainModule, trained: nn.Module, scaler, adv: Adversary,
                     batch: torch.Tensor, plan: dict, step: int, d: Dist) -> dict:
    """One VQGAN step (Esser et al. 2021, eqs. 5-7). The generator's loss is L_rec + L_vq + lambda L_gan with
    lambda = disc_weight ||grad L_rec|| / (||grad L_gan|| + 1e-4) (clamped to [0, 1e4] before disc_weight) at the
    decoder's last layer. The gradients behind lambda are those of the whole global batch (all micro-batches, all
    processes), so accumulation and DDP give one process's large-batch step. Then the discriminator takes its own
    step on the real images and the detached reconstructions. Returns the logs, "loss" included."""
    n, net = cfg.accum_steps, adv.objective.net
    last = module.model.decoder.conv_out.weight
    parts = micro_batches(batch, plan, n)

    def generator_forward(fn, mb, mplan):
        with _autocast(cfg, d.device):
            loss, out = fn(mb, mplan)
            with frozen(net):  # L_gan reaches the generator through D, but leaves D's gradients alone
                gan = generator_loss(net(out["recon"]), cfg.disc_loss)
        return loss, out, gan

    # 1. lambda. With micro-batches the gradients come from a first pass whose graphs are freed as it goes (the
    # RNG is rewound so that the second pass draws the same dropout masks); one batch keeps its graph instead.
    grads = torch.zeros(2, *last.shape, device=last.device)
    kept = None
    rewind = torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []) if n > 1 \
        else contextlib.nullcontext()
    with rewind:
        for mb, mplan in parts:
            loss, out, gan = generator_forward(trained if n == 1 else module, mb, mplan)
            g_rec, g_gan = torch.autograd.grad(out["nll"], last, retain_graph=True)[0], \
                torch.autograd.grad(gan, last, retain_graph=n == 1)[0]
            grads += torch.stack([g_rec, g_gan]).float() / n
            if n == 1:
                kept = loss, out, gan
    if d.world > 1:
        dist.all_reduce(grads)
        grads /= d.world
    weight = cfg.disc_weight * adaptive_weight(grads[0], grads[1])

    # 2. The generator's gradients.
    logs, fakes = {}, []
    for i, (mb, mplan) in enumerate(parts):
        with _sync_if(trained, i == n - 1):
            loss, out, gan = kept if kept is not None else generator_forward(trained, mb, mplan)
            total = loss + weight * gan
            scaler.scale(total / n).backward()
        fakes.append(out["recon"].detach())
        _add_logs(logs, {**out, "loss": total, "gan": gan}, n)

    # 3. The discriminator's step (taming's second optimizer).
    set_lr(adv.optimizer, adv.lr_at(step))
    adv.optimizer.zero_grad(set_to_none=True)
    for i, ((mb, _), fake) in enumerate(zip(parts, fakes)):
        with _sync_if(adv.trained, i == n - 1):
            with _autocast(cfg, d.device):
                d_loss, d_out = adv.trained(mb, fake)
            adv.scaler.scale(d_loss / n).backward()
        _add_logs(logs, d_out, n)
    adv.scaler.step(adv.optimizer)
    adv.scaler.update()
    logs["disc_weight"] = weight
    return logs


def enable_grad_checkpointing(model: nn.Module, block_type: type) -> int:
    """Recompute the activations of every `block_type` block in backward instead of storing them (torch's
    non-reentrant checkpoint, which replays the RNG: dropout masks are unchanged). The blocks' parameters and
    state-dict names are untouched. Returns the number of blocks."""
    from torch.utils.checkpoint import checkpoint

    blocks = [m for m in model.modules() if isinstance(m, block_type)]
    for blk in blocks:
        blk.forward = functools.partial(checkpoint, blk.forward, use_reentrant=False)
    return len(blocks)


class MissingPackageError(InputError, ImportError):
    """An optional package a setting needs is not installed: an ImportError the `mage` command prints as one line."""


def _tensorboard_writer() -> type:
    """tensorboard's SummaryWriter class, imported before out_dir changes (a missing package fails first)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise MissingPackageError("TrainConfig.tensorboard needs the tensorboard package (pip install "
                                  "tensorboard); the JSONL log needs nothing") from err
    return SummaryWriter


def _averaged(ema: EMA | None, model: nn.Module):
    """The EMA weights in `model` for the block, when there is an EMA."""
    return ema.applied(model) if ema is not None else contextlib.nullcontext()


# What a run writes at the top of out_dir besides config.json. A fresh run refuses to start where RESULT_FILES of
# an earlier run exist, unless told to overwrite; then it removes all of them first, so that no file of the earlier
# run is left beside the new run's config.json (a crash before the first checkpoint would otherwise leave the old
# checkpoint there, and a resume would continue it).
RESULT_FILES = ("checkpoint.pt", "checkpoint.pt.prev", "model.safetensors", "tokenizer.safetensors", "mae.pt")
RUN_FILES = RESULT_FILES + ("metrics.jsonl", "curves.png")


def _resume_state(cfg: TrainConfig, ckpt_path: Path, main: bool) -> tuple[dict | None, Path | None]:
    """The training state a run continues from and its file ((None, None): a fresh start), after the checks
    that keep an earlier run's checkpoint, weights and log from being overwritten (docs/TRAINING.md)."""
    if not cfg.resume:
        _refuse_earlier_run(cfg, ckpt_path.parent)
        return None, None
    source, note = resume_source(ckpt_path)
    if source is None:
        weights = [name for name in RESULT_FILES if (ckpt_path.parent / name).exists()]
        if weights:  # starting at step 0 would overwrite them
            raise CheckpointError(
                f"cannot resume: {cfg.out_dir} holds the weights of an earlier run ({', '.join(weights)}) but no "
                f"checkpoint to continue from ({ckpt_path.name}); start afresh over them with --overwrite instead of "
                "--resume (TrainConfig.overwrite=True; deletes them and the log) or in another --out-dir" +
                _WEIGHTS_USE.get(weights[0], ""))
        if main:
            warnings.warn(f"--resume: no checkpoint in {cfg.out_dir}, starting at step 0", RuntimeWarning, stacklevel=4)
        return None, None
    if note and main:
        warnings.warn(note, RuntimeWarning, stacklevel=4)
    try:
        state = load_checkpoint(source)
    except CheckpointError as err:
        raise damaged_checkpoint_error(err, ckpt_path) from None
    check_training_state(state, source)
    saved = state.get("extra", {}).get("config")
    if isinstance(saved, dict):
        changes = config_changes(saved, cfg.to_dict(), RUN_ONLY_FIELDS, TrainConfig().to_dict())
        if changes and not cfg.resume_with_changes:
            raise CheckpointError(
                f"cannot resume from {source}: these settings differ from the run's and change what it computes: "
                f"{'; '.join(changes)}. Resume with the run's settings (e.g. --config "
                f"{Path(cfg.out_dir) / 'config.json'})"
                ", or pass --resume-with-changes (TrainConfig.resume_with_changes=True) to continue with the new ones")
        if changes and main:
            warnings.warn(f"resuming {source} with changed settings: {'; '.join(changes)}", RuntimeWarning,
                          stacklevel=4)
    return state, source


# What else a finished run's weights are good for, said when a run refuses to start over them.
_WEIGHTS_USE = {"tokenizer.safetensors": "; a MAGE run takes the tokenizer as --tokenizer-checkpoint "
                                         "(TrainConfig.tokenizer_checkpoint)",
                "model.safetensors": "; mage sample / mage eval take the model as --checkpoint"}


def _refuse_earlier_run(cfg: TrainConfig, out: Path) -> None:
    """A fresh run (not resume, not overwrite) refuses an out_dir holding an earlier run's checkpoint or weights."""
    existing = [name for name in RESULT_FILES if (out / name).exists()]
    if not existing or cfg.overwrite:
        return
    if existing[0].startswith("checkpoint"):
        raise CheckpointError(
            f"{cfg.out_dir} holds the checkpoint of an earlier run ({existing[0]}): continue it with --resume "
            "(TrainConfig.resume=True), or start afresh over it with --overwrite (TrainConfig.overwrite=True; "
            "deletes its checkpoint, weights and log) or in another --out-dir")
    raise CheckpointError(
        f"{cfg.out_dir} holds the weights of an earlier run ({', '.join(existing)}) and no checkpoint to resume: "
        "start afresh over them with --overwrite (TrainConfig.overwrite=True; deletes them and the log) or in "
        "another --out-dir" + _WEIGHTS_USE.get(existing[0], ""))


class OutDirInUseError(InputValueError):
    """Another training run holds the lock of the out_dir (see `out_dir_lock`)."""


_HELD_LOCKS: set[int] = set()  # descriptors of the out_dir locks this process holds


def _drop_locks_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies of the lock descriptors: the lock stays with the run's
    process alone (the parent's descriptor keeps it), so it ends with that process, even under kill -9, and not
    when its workers notice, seconds later."""
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_locks_in_child)


@contextlib.contextmanager
def out_dir_lock(out: str | os.PathLike):
    """Hold an exclusive lock on the folder `out` (flock on the folder itself, so no lock file is left) for the
    block: a second run into it fails at once with OutDirInUseError. It is an OS lock, released when the process
    ends however it ends (kill -9 included), so it never needs cleaning up. POSIX only; elsewhere no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutDirInUseError(f"TrainConfig.out_dir {out}: another training run is writing into this folder "
                                   "(it holds the folder's lock); wait for it to end, or give another out_dir "
                                   "(--out-dir)") from None
        _HELD_LOCKS.add(fd)
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)


def train(cfg: TrainConfig, governor=None) -> dict:
    """Run (or resume) training; returns the last logged metrics. Writes to cfg.out_dir:
    checkpoint.pt (resumable state), metrics.jsonl, curves.png, samples/ and the final weights
    (model.safetensors for MAGE, tokenizer.safetensors for the tokenizer, mae.pt for MAE; the EMA weights
    when ema_decay > 0).

    The main process holds `out_dir_lock(out_dir)` while the run reads and writes there: a second run into the
    same out_dir fails at once.

    governor: a `mage.threads.ThreadGovernor` to re-choose the CPU thread count as the load changes."""
    d = init_distributed()
    with contextlib.ExitStack() as held:
        return _train(cfg, governor, d, held)


def _train(cfg: TrainConfig, governor, d: Dist, held: contextlib.ExitStack) -> dict:
    out = Path(cfg.out_dir)
    ckpt_path = out / "checkpoint.pt"
    locked = d.main and out.is_dir()
    if locked:  # before its checkpoint is read: no other run writes there from now on
        held.enter_context(out_dir_lock(out))
    resumed, resumed_from = _resume_state(cfg, ckpt_path, d.main)  # before anything in out_dir changes
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(d.device)
    perceptual = None
    if cfg.perceptual_weights:
        from .perceptual import LPIPS

        perceptual = LPIPS.from_file(cfg.perceptual_weights, d.device)
    module = TrainModule(cfg, model, perceptual).to(d.device)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model, ResnetBlock if cfg.objective == "tokenizer" else Block)
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, cfg.batch_size)
    optimizer = build_adamw(module, lr, cfg.weight_decay, cfg.betas)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.amp == "fp16")
    adversary = build_adversary(cfg, model, lr, d)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    # Codebook usage since the last dead-code restart (tokenizer): part of the state a resume needs.
    usage = torch.zeros(model.config.n_embed if cfg.objective == "tokenizer" else 1, dtype=torch.long, device=d.device)
    start = 0
    if resumed is not None:
        restore_training_state(resumed, resumed_from, module, optimizer, scaler)
        start = resumed["step"]
        usage.copy_(resumed["extra"].get("codebook_usage", usage))
        _restore_extras(resumed["extra"], {"discriminator": adversary, "ema": ema}, resumed_from)
    trained = nn.parallel.DistributedDataParallel(module) if d.world > 1 else module
    if cfg.compile:
        # The whole objective (masking ops included) traces as one graph; DDP splits it at its buckets.
        trained = torch.compile(trained, fullgraph=d.world == 1, backend=cfg.compile_backend)
    batches = Batches(token_cache_dataset(cfg, model) if cfg.token_cache else make_dataset(cfg, *input_shape(model)),
                      cfg, d)
    writer = _tensorboard_writer() if cfg.tensorboard and d.main else None
    if d.main and cfg.progress:
        from tqdm import tqdm
    # Only now, with everything built and checked, does out_dir change: a run that fails on its settings leaves
    # an earlier run's config.json and log as they were.
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if not locked:  # a new folder: locked once made, then checked for what a run started meanwhile left there
            held.enter_context(out_dir_lock(out))
            _refuse_earlier_run(cfg, out)
        clean_stale_files(ckpt_path)  # temp files of a write that was killed
        if cfg.overwrite:  # a crash before this run's first checkpoint must not leave the earlier
            for name in RUN_FILES:  # run's checkpoint (or weights) beside this run's config
                (out / name).unlink(missing_ok=True)
        settings = {k: v for k, v in cfg.to_dict().items() if k not in INVOCATION_FIELDS}
        write_atomic(out / "config.json", json.dumps(settings, indent=1))
    log_path = out / "metrics.jsonl"
    logger = JsonlLogger(log_path, resume_step=start if start else None) if d.main else None
    board = writer(str(out / "tensorboard")) if writer is not None else None
    bar = None
    if d.main and cfg.progress:
        bar = tqdm(total=cfg.steps, initial=start, desc=cfg.objective, dynamic_ncols=True)
    last: dict = {}
    t0, seen = time.perf_counter(), 0
    module.train()
    if cfg.objective in ("mage", "mage-c"):
        model.vqgan.eval()
    try:
        for step, x, rows in (batches.from_step(start) if start < cfg.steps else ()):
            if governor is not None:
                governor.update()
            set_lr(optimizer, cosine_lr(step, cfg.steps, cfg.warmup, lr, cfg.min_lr))
            batch = _to_ids(cfg, model, x, d.device)
            plan = plan_masks(cfg, step, getattr(model.config, "num_tokens", 0), rows, d.device)
            optimizer.zero_grad(set_to_none=True)
            if adversary is not None and step >= cfg.disc_start:
                logs = adversarial_step(cfg, module, trained, scaler, adversary, batch, plan, step, d)
            else:
                logs = backward_step(cfg, trained, scaler, batch, plan, d.device)
            loss = logs.pop("loss")
            if cfg.clip_grad:
                scaler.unscale_(optimizer)
                logs["grad_norm"] = nn.utils.clip_grad_norm_(module.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            seen += x.shape[0] * d.world
            restarted = None
            if cfg.objective == "tokenizer":
                counts = logs.pop("counts")
                if d.world > 1:
                    dist.all_reduce(counts)
                usage += counts
                if cfg.codebook_restart_every and (step + 1) % cfg.codebook_restart_every == 0:
                    restarted = restart_dead_codes(model, batch, usage, step_generator(cfg.seed, step, 2))
                    logs["restarted"] = restarted.numel()
                    usage.zero_()
            if ema is not None:
                ema.update(model)
                if restarted is not None:
                    ema.reset_rows(model, "quantize.embedding.weight", restarted)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                values = {k: float(v) for k, v in logs.items()}
                values["loss"] = float(loss.detach())
                if d.world > 1:
                    packed = torch.tensor(list(values.values()), dtype=torch.float64, device=d.device)
                    dist.all_reduce(packed)
                    values = dict(zip(values, (packed / d.world).tolist()))
                elapsed = time.perf_counter() - t0
                last = {"step": done, **values, "lr": optimizer.param_groups[0]["lr"],
                        "images_per_s": seen / max(elapsed, 1e-9), "time": time.time()}
                if governor is not None:
                    last["threads"] = governor.threads
                t0, seen = time.perf_counter(), 0
                if logger is not None:
                    logger.log(last)
                    if board is not None:
                        for k, v in last.items():
                            if k not in ("step", "time"):
                                board.add_scalar(k, v, done)
                        board.flush()
                    if bar is not None:
                        bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                        ips=f"{last['images_per_s']:.0f}")
            if bar is not None:
                bar.update(1)
            if cfg.sample_every and done % cfg.sample_every == 0 and d.main:
                with _averaged(ema, model):
                    save_samples(cfg, model, out / "samples" / f"step{done:07d}.png", batch)
                module.train()
                if cfg.objective in ("mage", "mage-c"):
                    model.vqgan.eval()
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                if d.main:
                    extra = {"config": cfg.to_dict(), "codebook_usage": usage.cpu(),
                             "model_config": dataclasses.asdict(model.config)}  # lets `mage sample` read it
                    if adversary is not None:
                        extra["discriminator"] = adversary.state_dict()
                    if ema is not None:
                        extra["ema"] = ema.state_dict()
                    save_training_state(ckpt_path, module, optimizer, scaler, done, extra)
                if d.world > 1:
                    dist.barrier()
            if done >= cfg.steps:
                break
    finally:  # an interrupted run keeps a complete log up to its last record
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
        if board is not None:
            board.close()
    if d.main:
        with _averaged(ema, model):
            save_final(cfg, model, out)
        plot_curves(read_jsonl(log_path), out / "curves.png")
    return last


def _restore_extras(extra: dict, parts: dict, path: Path) -> None:
    """Load the discriminator and EMA states a resumed run needs from the checkpoint's extras."""
    for name, part in parts.items():
        if part is None:
            continue
        if name not in extra:
            raise CheckpointError(f"cannot resume: {path} has no {name} state (it was written by a run without "
                                  f"one); start a new run or resume with the settings it was written with")
        bad = _non_finite_entry(extra[name])
        if bad is not None:
            raise CheckpointError(f"{path}: the {name} state has NaN or inf values ({bad}): the run diverged "
                                  "before this checkpoint; resume from an earlier one")
        try:
            part.load_state_dict(extra[name])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: its {name} state cannot be restored ({type(err).__name__}: {err})") \
                from None


def _non_finite_entry(state, where: str = "") -> str | None:
    """The key path of the first floating tensor with NaN/inf values in nested dicts / lists, else None."""
    if isinstance(state, torch.Tensor):
        return None if all_finite(state) else where or "the tensor"
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite_entry(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


@torch.no_grad()
def save_samples(cfg: TrainConfig, model: nn.Module, path: Path, batch: torch.Tensor) -> None:
    """A PNG grid: generated images (MAGE), or inputs over reconstructions (tokenizer, MAE)."""
    from .sampler import generate

    model.eval()
    if cfg.objective in ("mage", "mage-c"):
        generator = torch.Generator(model.device).manual_seed(cfg.seed)
        images = generate(model, 16, steps=min(8, model.config.num_tokens), generator=generator)
    elif cfg.objective == "tokenizer":
        x = batch[:8]
        images = torch.cat([x, model.decode(model.encode(x, check_range=False))])
    else:
        return
    path.parent.mkdir(exist_ok=True)  # out_dir/samples/, the run's own folder
    save_image_grid(images, path, nrow=8)


def save_final(cfg: TrainConfig, model: nn.Module, out: Path) -> None:
    if cfg.objective == "tokenizer":
        save_tokenizer(model, out / "tokenizer.safetensors")
    elif cfg.objective == "mae":
        buffer = io.BytesIO()  # a plain torch.save file, written atomically
        torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, buffer)
        write_atomic(out / "mae.pt", buffer.getvalue())
    else:
        model.save(str(out / "model.safetensors"))


def config_from_args(values: dict) -> TrainConfig:
    """TrainConfig from CLI key/values; dict-valued fields accept JSON."""
    kwargs = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in values and values[f.name] is not None:
            v = values[f.name]
            if isinstance(v, str) and f.name in ("model_overrides", "tokenizer", "mae"):
                v = json.loads(v)
            kwargs[f.name] = v
    return TrainConfig(**kwargs)

