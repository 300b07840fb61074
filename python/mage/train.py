"""One training loop for the tokenizer, MAGE, MAGE-C and the MAE baseline (docs/REFERENCE.md 4.4-4.10, 7).

    from mage.train import TrainConfig, train
    train(TrainConfig(objective="mage", data="fashion-mnist", steps=2000, out_dir="runs/mage"))

Multi-process with `torchrun --nproc_per_node N -m mage.cli train ...` (DDP; NCCL on GPU, gloo on CPU).
Every random choice of a step (mask ratio, mask noise, augmentation) is a function of (seed, step,
global sample position), so a run is reproducible, resumes exactly from a checkpoint, and gives the
same result on 1 or N processes up to float reduction order (dropout, which draws from torch's global
RNG, is the one exception across process counts; its state is checkpointed for resume).
"""

from __future__ import annotations

import dataclasses
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
from .checkpoint_io import load_checkpoint, load_training_state, save_checkpoint, save_training_state
from .losses import info_nce, masked_positions, masked_token_loss, patch_pixel_loss
from .mae import MAE, MAEConfig, mae_masked_count
from .model import CONSTRUCTORS, MAGE
from .report import JsonlLogger, plot_curves, read_jsonl, save_image_grid
from .schedule import build_adamw, cosine_lr, scaled_lr, set_lr
from .tokenizer import TokenizerConfig, VQGANTokenizer
from .tokenizer_io import load_tokenizer, save_tokenizer

OBJECTIVES = ("tokenizer", "mage", "mage-c", "mae")


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
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    clip_grad: float = 3.0
    amp: str = "none"  # none | bf16 | fp16
    # Masking (4.4): truncated normal ratio in [min, max], one per step for the whole global batch.
    mask_ratio_min: float = 0.5
    mask_ratio_max: float = 1.0
    mask_ratio_mu: float = 0.55
    mask_ratio_std: float = 0.25
    label_smoothing: float = 0.1
    # MAGE-C (section 7; the paper's weight 0.1; temperature 0.2 and the projector widths are assumed).
    contrastive_weight: float = 0.1
    contrastive_temperature: float = 0.2
    projector_hidden: int = 512
    projector_dim: int = 128
    mae_mask_ratio: float = 0.75
    codebook_restart_every: int = 100  # tokenizer: restart codes unused over this many steps (0: never)
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    sample_every: int = 0
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"TrainConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"TrainConfig.amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if self.model not in CONSTRUCTORS:
            raise ValueError(f"TrainConfig.model must be one of {sorted(CONSTRUCTORS)}, got {self.model!r}")
        self.betas = tuple(self.betas)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------ setup


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python` run is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank() if world > 1 else 0, world, device)


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A CPU generator determined by (seed, step, stream): the randomness of one training step."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 8191 + stream) % (2**62))


def make_tokenizer_config(cfg: TrainConfig) -> TokenizerConfig:
    fields = {"resolution": cfg.image_size, **cfg.tokenizer}
    return TokenizerConfig(**fields)


def build_model(cfg: TrainConfig) -> nn.Module:
    if cfg.objective == "tokenizer":
        return VQGANTokenizer(make_tokenizer_config(cfg))
    if cfg.objective == "mae":
        return MAE(MAEConfig(**{"image_size": cfg.image_size, **cfg.mae}))
    if cfg.tokenizer_checkpoint:
        tokenizer = load_tokenizer(cfg.tokenizer_checkpoint)
    else:
        warnings.warn(f"objective {cfg.objective!r} without tokenizer_checkpoint: the model's tokenizer is randomly "
                      "initialised (train one with objective='tokenizer' first)", UserWarning, stacklevel=3)
        tokenizer = VQGANTokenizer(make_tokenizer_config(cfg))
    model = CONSTRUCTORS[cfg.model](tokenizer=tokenizer.config, **cfg.model_overrides)
    model.vqgan.load_state_dict(tokenizer.state_dict())
    return model


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

    def __init__(self, cfg: TrainConfig, model: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.model = model
        if cfg.objective == "mage-c":
            self.projector = Projector(model.config.embed_dim, cfg.projector_hidden, cfg.projector_dim)

    def forward(self, batch: torch.Tensor, plan: dict) -> tuple[torch.Tensor, dict]:
        if self.cfg.objective == "tokenizer":
            return tokenizer_loss(self.model, batch)
        if self.cfg.objective == "mae":
            return mae_loss(self.model, batch, plan, self.cfg)
        return mage_loss(self, batch, plan)


# ------------------------------------------------------------------------------------------ objectives


def tokenizer_loss(tok: VQGANTokenizer, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Reconstruction (L1 + L2) plus the VQ losses of `vq_quantize` (docs/REFERENCE.md 3.3)."""
    recon, vq_loss, _, counts = tok(images, check_range=False)
    err = recon.float() - images.float()
    rec = err.abs().mean() + (err * err).mean()
    return rec + vq_loss, {"rec": rec.detach(), "vq": vq_loss.detach(), "counts": counts}


def plan_masks(cfg: TrainConfig, step: int, num_tokens: int, rows: torch.Tensor, device) -> dict:
    """The masking of one step (4.4): one ratio for the global batch, noise per global sample row."""
    g = step_generator(cfg.seed, step, stream=1)
    if cfg.objective == "mae":
        num_masked = num_dropped = mae_masked_count(num_tokens, cfg.mae_mask_ratio)
    else:
        num_masked, num_dropped = mage_kernels.sample_mask_counts(
            num_tokens, generator=g, mask_ratio_min=cfg.mask_ratio_min, mask_ratio_max=cfg.mask_ratio_max,
            mask_ratio_mu=cfg.mask_ratio_mu, mask_ratio_std=cfg.mask_ratio_std)
    views = 2 if cfg.objective == "mage-c" else 1
    noise = torch.rand(views, cfg.batch_size, num_tokens, generator=g)[:, rows]  # this rank's rows
    return {"num_masked": num_masked, "num_dropped": num_dropped, "noise": noise.to(device)}


def _masked_forward(model: MAGE, ids: torch.Tensor, noise: torch.Tensor, num_masked: int, num_dropped: int,
                    label_smoothing: float):
    masked, _, keep_idx = mage_kernels.mask_plan(noise, num_masked, num_dropped)
    x = model.forward_encoder(ids, masked, keep_idx)  # (B, 1+Lk, D)
    hidden = model.mlm_layer(model.forward_decoder(x, masked, keep_idx))[:, 1:]  # (B, L, D)
    weight, bias = model.head_weight()
    positions = masked_positions(masked, num_masked)
    loss = masked_token_loss(hidden, weight, bias, ids, positions, model.config.codebook_size, label_smoothing)
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


def load_images(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor] | data_lib.ImageFolder:
    if name == "fashion-mnist":
        return data_lib.load_fashion_mnist(split)
    if name == "digits":
        x, y = data_lib.load_digits()
        n = int(0.8 * x.shape[0])
        return (x[:n], y[:n]) if split == "train" else (x[n:], y[n:])
    return data_lib.ImageFolder(Path(name) / split if (Path(name) / split).is_dir() else name)


def input_shape(model: nn.Module) -> tuple[int, int]:
    """(channels, size) of the images a model takes: a loaded tokenizer checkpoint decides for MAGE."""
    c = model.config.tokenizer if isinstance(model, MAGE) else model.config
    return c.in_channels, (c.image_size if isinstance(model, MAE) else c.resolution)


def make_dataset(cfg: TrainConfig, channels: int, size: int, split: str = "train") -> torch.utils.data.Dataset:
    if cfg.token_cache:
        blob = load_checkpoint(cfg.token_cache)
        return data_lib.TokenCacheDataset(blob["ids"], blob["labels"], seed=cfg.seed,
                                          views=2 if cfg.objective == "mage-c" else 1)
    if cfg.objective == "mage-c":
        views = T.TwoViews(T.contrastive_transform(size))
    else:
        views = T.pretrain_transform(size)
    source = load_images(cfg.data, split)
    if isinstance(source, data_lib.ImageFolder):
        if channels != 3:
            raise ValueError(f"image folders are read as RGB; the model expects {channels} channel(s)")
        source.transform, source.seed = views, cfg.seed
        return source
    return data_lib.TensorImageDataset(*source, transform=views, channels=channels, seed=cfg.seed)


@torch.no_grad()
def build_token_cache(tokenizer: VQGANTokenizer, dataset, path: str, crops: int = 1, batch_size: int = 256) -> None:
    """Tokenize `crops` augmented crops of every image once and save {ids [N, crops, L], labels} to `path`
    (the online tokenizer is ~40% of MAGE's training compute, docs/REFERENCE.md 4.12)."""
    tokenizer.eval()
    device = tokenizer.codebook.device
    ids = data_lib.build_token_cache(lambda x: tokenizer.encode(x, check_range=False), dataset, crops, batch_size,
                                     device=device)
    save_checkpoint({"ids": ids, "labels": torch.as_tensor(dataset.labels)}, path, keep_previous=False)


class Batches:
    """Endless (epoch, batch) iteration over this rank's share, starting at any global step."""

    def __init__(self, dataset, cfg: TrainConfig, d: Dist):
        if cfg.batch_size % d.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {d.world}")
        self.dataset, self.cfg, self.d = dataset, cfg, d
        self.local = cfg.batch_size // d.world
        self.sampler = data_lib.EpochSampler(len(dataset), seed=cfg.seed, rank=d.rank, world_size=d.world,
                                             drop_last=True)
        self.steps_per_epoch = self.sampler.num_per_rank() // self.local
        if self.steps_per_epoch < 1:
            raise ValueError(f"the data set ({len(dataset)} items) is smaller than one global batch ({cfg.batch_size})")

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
) -> int:
    """Replace codes unused since the last restart by random encoder outputs of this step's global batch.

    Under DDP every rank gathers the encoder outputs in global-row order (rank r holds rows r, r + world,
    ...) and draws the same picks, so the codebook is the one a single process would get."""
    dead = (usage == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    z = tok.encoder(images).float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        z = torch.stack(parts, 1).flatten(0, 1)  # (local, world, ...) -> global rows j * world + r
    rows = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    pick = torch.randint(rows.shape[0], (dead.numel(),), generator=generator).to(rows.device)
    tok.codebook[dead] = rows[pick].to(tok.codebook.dtype)
    return int(dead.numel())


def _resume(path: Path, module: nn.Module, optimizer, scaler) -> dict:
    """Load the training state, turning a damaged file into an error that says how to continue."""
    from .checkpoint_io import CheckpointError, previous_path

    try:
        return load_training_state(path, module, optimizer, scaler)
    except CheckpointError as err:
        prev = previous_path(path)
        hint = (f"; the checkpoint before it is intact at {prev}: move it to {path} to resume from there"
                if prev.is_file() else "")
        raise CheckpointError(f"cannot resume: {err}{hint}") from None


def train(cfg: TrainConfig, governor=None) -> dict:
    """Run (or resume) training; returns the last logged metrics. Writes to cfg.out_dir:
    checkpoint.pt (resumable state), metrics.jsonl, curves.png, samples/ and the final weights
    (model.safetensors for MAGE, tokenizer.safetensors for the tokenizer, mae.pt for MAE).

    governor: a `mage.threads.ThreadGovernor` to re-choose the CPU thread count as the load changes."""
    d = init_distributed()
    out = Path(cfg.out_dir)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(d.device)
    module = TrainModule(cfg, model).to(d.device)
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, cfg.batch_size)
    optimizer = build_adamw(module, lr, cfg.weight_decay, cfg.betas)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.amp == "fp16")
    ckpt_path = out / "checkpoint.pt"
    # Codebook usage since the last dead-code restart (tokenizer): part of the state a resume needs.
    usage = torch.zeros(model.config.n_embed if cfg.objective == "tokenizer" else 1, dtype=torch.long, device=d.device)
    start = 0
    if cfg.resume and ckpt_path.exists():
        state = _resume(ckpt_path, module, optimizer, scaler)
        start = int(state["step"])
        usage.copy_(state["extra"].get("codebook_usage", usage))
    trained = nn.parallel.DistributedDataParallel(module) if d.world > 1 else module
    batches = Batches(make_dataset(cfg, *input_shape(model)), cfg, d)
    log_path = out / "metrics.jsonl"
    logger = JsonlLogger(log_path, resume_step=start if start else None) if d.main else None
    bar = None
    if d.main and cfg.progress:
        from tqdm import tqdm

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
            set_lr(optimizer, cosine_lr(step, cfg.steps, cfg.warmup_steps, lr, cfg.min_lr))
            batch = _to_ids(cfg, model, x, d.device)
            plan = plan_masks(cfg, step, getattr(model.config, "num_tokens", 0), rows, d.device)
            with _autocast(cfg, d.device):
                loss, logs = trained(batch, plan)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad:
                scaler.unscale_(optimizer)
                logs["grad_norm"] = nn.utils.clip_grad_norm_(module.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            seen += x.shape[0] * d.world
            if cfg.objective == "tokenizer":
                counts = logs.pop("counts")
                if d.world > 1:
                    dist.all_reduce(counts)
                usage += counts
                if cfg.codebook_restart_every and (step + 1) % cfg.codebook_restart_every == 0:
                    logs["restarted"] = restart_dead_codes(model, batch, usage, step_generator(cfg.seed, step, 2))
                    usage.zero_()
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
                    if bar is not None:
                        bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                        ips=f"{last['images_per_s']:.0f}")
            if bar is not None:
                bar.update(1)
            if cfg.sample_every and done % cfg.sample_every == 0 and d.main:
                save_samples(cfg, model, out / "samples" / f"step{done:07d}.png", batch)
                module.train()
                if cfg.objective in ("mage", "mage-c"):
                    model.vqgan.eval()
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                if d.main:
                    extra = {"config": cfg.to_dict(), "codebook_usage": usage.cpu()}
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
    if d.main:
        save_final(cfg, model, out)
        plot_curves(read_jsonl(log_path), out / "curves.png")
    return last


@torch.no_grad()
def save_samples(cfg: TrainConfig, model: nn.Module, path: Path, batch: torch.Tensor) -> None:
    """A PNG grid: generated images (MAGE), or inputs over reconstructions (tokenizer, MAE)."""
    from .sampler import generate

    model.eval()
    if cfg.objective in ("mage", "mage-c"):
        images = generate(model, 16, steps=8, generator=torch.Generator(model.device).manual_seed(cfg.seed))
    elif cfg.objective == "tokenizer":
        x = batch[:8]
        images = torch.cat([x, model.decode(model.encode(x, check_range=False))])
    else:
        return
    save_image_grid(images, path, nrow=8)


def save_final(cfg: TrainConfig, model: nn.Module, out: Path) -> None:
    if cfg.objective == "tokenizer":
        save_tokenizer(model, out / "tokenizer.safetensors")
    elif cfg.objective == "mae":
        torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, out / "mae.pt")
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

