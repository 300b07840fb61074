"""Checkpoints: the released MAGE `.pth` files (docs/REFERENCE.md 4.11) and our own safetensors format.

Official files are read with `torch.load(weights_only=True)`: tensors and plain containers only (plus
`argparse.Namespace`, which training checkpoints carry under `args`), never arbitrary pickled objects.
Keys are checked strictly against the model with a readable report; MAGE-C files may carry extra
top-level modules (the contrastive projector), which are accepted, skipped and reported.

Our format is one `.safetensors` file whose metadata holds the model config as JSON.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pickle
import re
import warnings

import torch

from .model import MAGE, MAGEConfig
from .tokenizer import TokenizerConfig, VQGANTokenizer

FORMAT = "mage-kernels/1"

# Attention heads are not visible in a state dict; these are the published sizes (section 4.1) and those
# of our small constructors (mage_vit_tiny / mage_vit_small).
_ENCODER_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
_DECODER_HEADS = {192: 3, 384: 6, 768: 16, 1024: 16, 1280: 16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model; the message says why and what to do."""


@dataclasses.dataclass
class LoadReport:
    """What a strict load found. `missing`, `unexpected` and `mismatched` make the load fail; `extra`
    (unknown top-level modules, e.g. a MAGE-C projector) are skipped and only reported."""

    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)
    extra: list[str] = dataclasses.field(default_factory=list)
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors"]
        for title, keys in (("missing from the file", self.missing), ("unexpected in the file", self.unexpected),
                            ("extra modules skipped (e.g. MAGE-C projector)", self.extra)):
            if keys:
                lines.append(f"{len(keys)} key(s) {title}:")
                lines += [f"  {k}" for k in _group_keys(keys)]
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} key(s) with a different shape (file vs model):")
            lines += [f"  {k}: {list(a)} vs {list(b)}" for k, a, b in self.mismatched]
        return "\n".join(lines)


def _group_keys(keys: list[str], limit: int = 40) -> list[str]:
    """blocks.0.attn.qkv.weight ... blocks.11.attn.qkv.weight -> 'blocks.{0..11}.attn.qkv.weight (12)'."""
    groups: dict[str, list[int]] = collections.OrderedDict()
    for k in keys:
        m = re.search(r"\.(\d+)\.", k)
        pattern = k if m is None else k[: m.start()] + ".{}." + k[m.end():]
        groups.setdefault(pattern, []).append(int(m.group(1)) if m else -1)
    out = []
    for pattern, idx in groups.items():
        if len(idx) == 1:
            out.append(pattern.replace("{}", str(idx[0])))
        else:
            out.append(pattern.replace("{}", "{" + f"{min(idx)}..{max(idx)}" + "}") + f" ({len(idx)})")
    return out[:limit] + ([f"... and {len(out) - limit} more groups"] if len(out) > limit else [])


def check_state_dict(model: torch.nn.Module, state_dict: dict) -> LoadReport:
    """Compare keys and shapes of `state_dict` with `model` without loading anything."""
    own = model.state_dict()
    top = {k.split(".", 1)[0] for k in own}
    report = LoadReport()
    for k, v in state_dict.items():
        if k not in own:
            (report.unexpected if k.split(".", 1)[0] in top else report.extra).append(k)
        elif tuple(v.shape) != tuple(own[k].shape):
            report.mismatched.append((k, tuple(v.shape), tuple(own[k].shape)))
    report.missing = [k for k in own if k not in state_dict]
    report.loaded = len(own) - len(report.missing) - len(report.mismatched)
    return report


def cast_floating(state_dict: dict, dtype: torch.dtype | None) -> dict:
    """Floating-point tensors cast to dtype (integer buffers such as position_ids kept); None: unchanged."""
    if dtype is None:
        return state_dict
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def load_checked(model: torch.nn.Module, state_dict: dict, *, what: str = "checkpoint") -> LoadReport:
    """Strict load with a readable report: raises CheckpointError on missing, unexpected or mis-shaped
    keys; skips (and warns about) extra top-level modules. Tensors are assigned, not copied, so a model
    built on the meta device is materialised by the load."""
    report = check_state_dict(model, state_dict)
    if not report.ok:
        raise CheckpointError(
            f"{what} does not match the model ({type(model).__name__}):\n{report}\n"
            "If the file is a different size or vocabulary, build the matching model or pass config=..."
        )
    if report.extra:
        warnings.warn(f"{what}: skipped {len(report.extra)} key(s) of modules MAGE does not have:\n"
                      + "\n".join(f"  {k}" for k in _group_keys(report.extra)), stacklevel=3)
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in report.extra}, strict=True, assign=True)
    return report


# ------------------------------------------------------------------------------------ official files


def read_torch_file(path: str, *, map_location="cpu", trusted: bool = False) -> dict:
    """torch.load with weights_only=True (argparse.Namespace allowed). trusted=True unpickles
    anything: only for files whose origin you trust."""
    if trusted:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as err:  # "Weights only load failed ... Unsupported global"
        if "weights_only" not in str(err).lower().replace(" ", "_"):
            raise
        raise CheckpointError(
            f"{path}: refusing to unpickle objects other than tensors and plain containers ({err}).\n"
            "Either re-save the weights alone, e.g. torch.save({'model': torch.load(path, weights_only=False)"
            "['model']}, new_path) in a trusted environment, or pass trusted=True if you trust this file's origin."
        ) from err


def _model_state(obj: dict, path: str) -> dict:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {sorted(obj)[:10]})")
    if all(k.startswith("module.") for k in sd):  # saved from a DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _count(sd: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def infer_tokenizer_config(sd: dict, prefix: str = "", num_tokens: int | None = None) -> TokenizerConfig:
    """Tokenizer sizes from its weights (GroupNorm groups are not visible: 32, the official value)."""
    try:
        ch = sd[prefix + "encoder.conv_in.weight"].shape[0]
        levels = _count(sd, prefix + "encoder.down.")
        ch_mult = tuple(sd[f"{prefix}encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
        num_res_blocks = _count(sd, prefix + "encoder.down.0.block.")
        n_embed, embed_dim = sd[prefix + "quantize.embedding.weight"].shape
    except KeyError as err:
        raise CheckpointError(f"cannot infer the tokenizer: key {err} is missing (prefix {prefix!r})") from None
    grid = int(round(num_tokens**0.5)) if num_tokens else 16
    return TokenizerConfig(resolution=grid * 2 ** (levels - 1), ch=ch, ch_mult=ch_mult,
                           num_res_blocks=num_res_blocks, embed_dim=embed_dim, n_embed=n_embed)


def infer_config(sd: dict) -> MAGEConfig:
    """MAGEConfig of an official-layout state dict. Head counts come from the published sizes."""
    try:
        V, D = sd["token_emb.word_embeddings.weight"].shape
        seq = sd["token_emb.position_embeddings.weight"].shape[0]
        Dd = sd["decoder_embed.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"not a MAGE state dict: key {err} is missing") from None
    if D not in _ENCODER_HEADS or Dd not in _DECODER_HEADS:
        raise CheckpointError(f"unknown model width (encoder {D}, decoder {Dd}): pass config=MAGEConfig(...)")
    tok = infer_tokenizer_config(sd, "vqgan.", num_tokens=seq - 1)
    K = tok.n_embed
    vocab = {K + 1001: "official", K + 2: "compact"}.get(V)
    if vocab is None:
        raise CheckpointError(f"vocabulary of {V} rows fits neither layout for codebook {K} ({K + 1001} or {K + 2})")
    return MAGEConfig(embed_dim=D, depth=_count(sd, "blocks."), num_heads=_ENCODER_HEADS[D], decoder_embed_dim=Dd,
                      decoder_depth=_count(sd, "decoder_blocks."), decoder_num_heads=_DECODER_HEADS[Dd],
                      vocab=vocab, legacy_params="cls_token" in sd, tokenizer=tok)


def read_official_state(path_or_state_dict, *, map_location="cpu", trusted: bool = False) -> tuple[str, dict]:
    """(description, state dict) of a released file or an already loaded dict ('model' / 'state_dict'
    unwrapped, DDP's 'module.' prefix removed, non-tensor entries dropped)."""
    if isinstance(path_or_state_dict, dict):
        return "state dict", _model_state(path_or_state_dict, "state dict")
    what = os.fspath(path_or_state_dict)
    return what, _model_state(read_torch_file(what, map_location=map_location, trusted=trusted), what)


def load_official(
    path_or_state_dict: str | os.PathLike | dict,
    *,
    config: MAGEConfig | None = None,
    map_location="cpu",
    dtype: torch.dtype | None = None,
    trusted: bool = False,
) -> MAGE:
    """Build a MAGE model from a released checkpoint (e.g. mage-vitb-1600.pth; model under 'model').

    The size is inferred from the weights unless `config` is given. The load is strict; a MAGE-C file's
    extra modules are skipped with a warning. The report is kept as `model.load_report`. Tensors are
    loaded onto `map_location` and floating-point ones cast to `dtype` when given.
    """
    what, sd = read_official_state(path_or_state_dict, map_location=map_location, trusted=trusted)
    with torch.device("meta"):
        model = MAGE(config or infer_config(sd))
    model.load_report = load_checked(model, cast_floating(sd, dtype), what=what)
    return model


def load_official_tokenizer(path_or_state_dict, *, config: TokenizerConfig | None = None, map_location="cpu",
                            dtype: torch.dtype | None = None, trusted: bool = False) -> VQGANTokenizer:
    """The released VQGAN tokenizer file (`vqgan_jax_strongaug.ckpt`: keys without the `vqgan.` prefix,
    possibly under 'state_dict'), loaded strictly; sizes inferred from the weights unless `config` is given."""
    what, sd = read_official_state(path_or_state_dict, map_location=map_location, trusted=trusted)
    with torch.device("meta"):
        tok = VQGANTokenizer(config or infer_tokenizer_config(sd))
    load_checked(tok, cast_floating(sd, dtype), what=what)
    return tok


# ------------------------------------------------------------------------------------ our format


def save(model: MAGE, path: str | os.PathLike) -> None:
    """One safetensors file: every state-dict tensor plus {'format', 'config' (JSON)} metadata."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.fspath(path), metadata={"format": FORMAT, "config": json.dumps(model.config.to_dict())})


def load(path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None) -> MAGE:
    """Read a file written by `MAGE.save` (strictly) onto `device`, floating-point tensors cast to `dtype`
    when given. A folder written by `save_pretrained` is read as `MAGE.from_pretrained`."""
    if os.path.isdir(path):
        return MAGE.from_pretrained(path, device=device, dtype=dtype)
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path}: not a mage-kernels safetensors file (metadata {meta}); "
                              "official .pth files are read by mage.load_official")
    config = MAGEConfig.from_dict(json.loads(meta["config"]))
    with torch.device("meta"):
        model = MAGE(config)
    load_checked(model, cast_floating(load_file(path, device=str(device)), dtype), what=path)
    return model


def load_any(path: str | os.PathLike, *, map_location="cpu", dtype: torch.dtype | None = None,
             trusted: bool = False) -> MAGE:
    """Our safetensors files (by suffix) and pretrained folders, anything else as an official .pth."""
    if os.fspath(path).endswith(".safetensors") or os.path.isdir(path):
        return load(path, device=map_location, dtype=dtype)
    return load_official(path, map_location=map_location, dtype=dtype, trusted=trusted)
