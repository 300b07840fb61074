"""Checkpoints: the released MAGE `.pth` files (docs/REFERENCE.md 4.11) and our own safetensors format.

Official files are read with `torch.load(weights_only=True)`: tensors and plain containers only (plus
`argparse.Namespace`, which training checkpoints carry under `args`), never arbitrary pickled objects.
Keys are checked strictly against the model with a readable report; MAGE-C files may carry extra
top-level modules (the contrastive projector), which are accepted, skipped and reported.

Our format is one `.safetensors` file whose metadata holds the model config as JSON (`MODEL_FORMAT`, and
`TOKENIZER_FORMAT` for a standalone tokenizer). Loading validates the config (types, ranges, sizes against
the tensors in the file) before building anything, then the tensors' dtypes and finiteness. `load_any`
recognises every format by its header, not its name.
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

from ._checks import all_finite, check_dtype
from .checkpoint_io import MAGIC, MODEL_FORMAT, TOKENIZER_FORMAT, CheckpointError, load_checkpoint
from .model import MAGE, MAGEConfig
from .tokenizer import TokenizerConfig, VQGANTokenizer

# Attention heads are not visible in a state dict; these are the published sizes (section 4.1) and those
# of our small constructors (mage_vit_tiny / mage_vit_small).
_ENCODER_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
_DECODER_HEADS = {192: 3, 384: 6, 768: 16, 1024: 16, 1280: 16}


class UntrustedCheckpointError(CheckpointError):
    """A pickle file that holds objects other than tensors and plain containers: loading it could run code.
    `path` and `reason` let each interface say what to do in its own terms (`trusted=True`, a CLI flag)."""

    def __init__(self, path: str, reason: str, how_to_trust: str = "pass trusted=True"):
        self.path, self.reason = path, reason
        super().__init__(
            f"{path}: refusing to unpickle objects other than tensors and plain containers ({reason}).\n"
            "Either re-save the weights alone, e.g. torch.save({'model': torch.load(path, weights_only=False)"
            f"['model']}}, new_path) in a trusted environment, or {how_to_trust} if you trust this file's origin."
        )


@dataclasses.dataclass
class LoadReport:
    """What a strict load found. `missing`, `unexpected` and `mismatched` make the load fail; `extra`
    (unknown top-level modules, e.g. a MAGE-C projector) are skipped and only reported."""

    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)
    wrong_dtype: list[tuple[str, torch.dtype, torch.dtype]] = dataclasses.field(default_factory=list)
    non_finite: list[str] = dataclasses.field(default_factory=list)
    extra: list[str] = dataclasses.field(default_factory=list)
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.wrong_dtype or self.non_finite)

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
        if self.wrong_dtype:
            lines.append(f"{len(self.wrong_dtype)} key(s) with a dtype the model cannot take (file vs model):")
            lines += [f"  {k}: {a} vs {b}" for k, a, b in self.wrong_dtype]
        if self.non_finite:
            lines.append(f"{len(self.non_finite)} key(s) with NaN or inf values:")
            lines += [f"  {k}" for k in _group_keys(self.non_finite)]
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


def check_state_dict(model: torch.nn.Module, state_dict: dict, *, check_finite: bool = False) -> LoadReport:
    """Compare keys, shapes and dtypes of `state_dict` with `model` without loading anything: a float tensor
    may be any float dtype (it is converted to the model's), an integer one must match exactly. With
    `check_finite`, tensors with NaN or inf values are reported too (this reads every value)."""
    own = model.state_dict()
    top = {k.split(".", 1)[0] for k in own}
    report = LoadReport()
    for k, v in state_dict.items():
        if k not in own:
            (report.unexpected if k.split(".", 1)[0] in top else report.extra).append(k)
            continue
        if not isinstance(v, torch.Tensor):
            report.wrong_dtype.append((k, type(v).__name__, own[k].dtype))
        elif tuple(v.shape) != tuple(own[k].shape):
            report.mismatched.append((k, tuple(v.shape), tuple(own[k].shape)))
        elif v.dtype != own[k].dtype and not (v.is_floating_point() and own[k].is_floating_point()):
            report.wrong_dtype.append((k, v.dtype, own[k].dtype))
        elif check_finite and v.device.type != "meta" and not all_finite(v):
            report.non_finite.append(k)
    report.missing = [k for k in own if k not in state_dict]
    report.loaded = len(own) - len(report.missing) - len(report.mismatched) - len(report.wrong_dtype)
    return report


def load_checked(model: torch.nn.Module, state_dict: dict, *, what: str = "checkpoint",
                 dtype: torch.dtype | None = None, check_finite: bool = True) -> LoadReport:
    """Strict load with a readable report: raises CheckpointError on missing, unexpected, mis-shaped or
    wrongly typed keys and (with `check_finite`) NaN/inf weights; skips (and warns about) extra top-level
    modules. Floating-point tensors are cast to `dtype`, or to the model's own dtype when None (integer
    buffers such as position_ids must match). Tensors are assigned, not copied, so a model built on the
    meta device is materialised by the load."""
    check_dtype("load", dtype)
    report = check_state_dict(model, state_dict, check_finite=check_finite)
    if not report.ok:
        hint = ("\nIf the file is a different size or vocabulary, build the matching model or pass config=..."
                if report.missing or report.unexpected or report.mismatched else "")
        raise CheckpointError(f"{what} does not match the model ({type(model).__name__}):\n{report}{hint}")
    if report.extra:
        warnings.warn(f"{what}: skipped {len(report.extra)} key(s) of modules MAGE does not have:\n"
                      + "\n".join(f"  {k}" for k in _group_keys(report.extra)), stacklevel=3)
    own = model.state_dict()
    target = {k: dtype if dtype is not None and v.is_floating_point() else own[k].dtype
              for k, v in state_dict.items() if k not in report.extra}
    converted = {k: state_dict[k].to(t) for k, t in target.items()}  # .to is a no-op at the same dtype
    model.load_state_dict(converted, strict=True, assign=True)
    return report


# ------------------------------------------------------------------------------------ official files


def read_torch_file(path: str, *, map_location="cpu", trusted: bool = False) -> dict:
    """torch.load with weights_only=True (argparse.Namespace allowed). trusted=True unpickles
    anything: only for files whose origin you trust."""
    if file_kind(path) == "mage-training-state":
        raise CheckpointError(f"{path} is a training state written by mage train, not a released .pth: "
                              "load it with mage.load_any (or mage.checkpoint_io.load_checkpoint)")
    if trusted:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as err:  # "Weights only load failed ... Unsupported global"
        if "weights_only" not in str(err).lower().replace(" ", "_"):
            raise
        raise UntrustedCheckpointError(os.fspath(path), str(err).splitlines()[0]) from err


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
        ch, in_channels = sd[prefix + "encoder.conv_in.weight"].shape[:2]
        levels = _count(sd, prefix + "encoder.down.")
        ch_mult = tuple(sd[f"{prefix}encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
        num_res_blocks = _count(sd, prefix + "encoder.down.0.block.")
        n_embed, embed_dim = sd[prefix + "quantize.embedding.weight"].shape
        grid = int(round(num_tokens**0.5)) if num_tokens else 16
        return TokenizerConfig(resolution=grid * 2 ** (levels - 1), in_channels=in_channels, ch=ch, ch_mult=ch_mult,
                               num_res_blocks=num_res_blocks, embed_dim=embed_dim, n_embed=n_embed)
    except KeyError as err:
        raise CheckpointError(f"cannot infer the tokenizer: key {err} is missing (prefix {prefix!r})") from None
    except (ValueError, TypeError, ZeroDivisionError) as err:  # tensors of unexpected rank or size
        raise CheckpointError(f"cannot infer the tokenizer from its weights (prefix {prefix!r}): {err}") from None


def infer_config(sd: dict) -> MAGEConfig:
    """MAGEConfig of an official-layout state dict. Head counts come from the published sizes."""
    try:
        V, D = sd["token_emb.word_embeddings.weight"].shape
        seq = sd["token_emb.position_embeddings.weight"].shape[0]
        Dd = sd["decoder_embed.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"not a MAGE state dict: key {err} is missing") from None
    except (ValueError, IndexError):
        keys = ("token_emb.word_embeddings.weight", "token_emb.position_embeddings.weight", "decoder_embed.weight")
        shapes = {k: list(sd[k].shape) for k in keys if k in sd}
        raise CheckpointError(f"not a MAGE state dict: its embeddings must be 2-D, got {shapes}") from None
    if D not in _ENCODER_HEADS or Dd not in _DECODER_HEADS:
        raise CheckpointError(f"unknown model width (encoder {D}, decoder {Dd}): attention heads cannot be read from "
                              "weights; in Python pass config=MAGEConfig(...), or keep models in mage's own format "
                              "(model.save), which records the config")
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
    check_finite: bool = True,
) -> MAGE:
    """Build a MAGE model from a released checkpoint (e.g. mage-vitb-1600.pth; model under 'model').

    The size is inferred from the weights unless `config` is given. The load is strict; a MAGE-C file's
    extra modules are skipped with a warning. The report is kept as `model.load_report`. Tensors are
    loaded onto `map_location` and floating-point ones cast to `dtype` when given. `check_finite` refuses
    weights with NaN/inf (reads every value once: ~0.3 s per 100M parameters on one CPU core).
    """
    check_dtype("load_official", dtype)
    what, sd = read_official_state(path_or_state_dict, map_location=map_location, trusted=trusted)
    with torch.device("meta"):
        model = MAGE(config or infer_config(sd))
    model.load_report = load_checked(model, sd, what=what, dtype=dtype, check_finite=check_finite)
    return model


def load_official_tokenizer(path_or_state_dict, *, config: TokenizerConfig | None = None, map_location="cpu",
                            dtype: torch.dtype | None = None, trusted: bool = False,
                            check_finite: bool = True) -> VQGANTokenizer:
    """The released VQGAN tokenizer file (`vqgan_jax_strongaug.ckpt`: keys without the `vqgan.` prefix,
    possibly under 'state_dict'), loaded strictly; sizes inferred from the weights unless `config` is given."""
    check_dtype("load_official_tokenizer", dtype)
    what, sd = read_official_state(path_or_state_dict, map_location=map_location, trusted=trusted)
    with torch.device("meta"):
        tok = VQGANTokenizer(config or infer_tokenizer_config(sd))
    load_checked(tok, sd, what=what, dtype=dtype, check_finite=check_finite)
    return tok


# ------------------------------------------------------------------------------------ our format


def save(model: MAGE, path: str | os.PathLike) -> None:
    """One safetensors file (written atomically): every state-dict tensor plus {'format', 'config' (JSON)}."""
    model.save(path)


def _file_sizes(keys: set[str]) -> dict[str, int]:
    """What a config must agree with before anything is built: the block counts visible in the key names."""
    return {"depth": _count(keys, "blocks."), "decoder_depth": _count(keys, "decoder_blocks."),
            "levels": _count(keys, "encoder.down.") or _count(keys, "vqgan.encoder.down.")}


def _parse_config(where: str, text: str | None, build, what: str) -> object:
    """A `what` config from JSON text, checked (field types and ranges) by `build`; CheckpointError naming
    `where`."""
    try:
        fields = json.loads(text or "")
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{where} is not valid JSON ({err})") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{where} must be a JSON object, got {type(fields).__name__}")
    try:
        return build(fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: not a {what} config ({err})") from None


def _open_safetensors(path: str) -> tuple[dict, set[str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}, set(f.keys())
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None


def _check_sizes(path: str, config, keys: set[str]) -> None:
    """The config's block counts against the tensors in the file, before anything is built (a tampered
    `depth: 10**6` would otherwise spend minutes building modules)."""
    sizes, tok = _file_sizes(keys), config.tokenizer if isinstance(config, MAGEConfig) else config
    expected = {"levels": len(tok.ch_mult)}
    if isinstance(config, MAGEConfig):
        expected.update(depth=config.depth, decoder_depth=config.decoder_depth)
    for name, want in expected.items():
        if sizes[name] != want:
            raise CheckpointError(f"{path}: its config says {name} = {want} but the file holds weights for "
                                  f"{sizes[name]}; the file was modified or damaged")


def _read_tensors(path: str, device) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable tensors ({err})") from None


def _config_builder(config_cls: type):
    return config_cls.from_dict if hasattr(config_cls, "from_dict") else lambda d: config_cls(**d)


def read_our_file(path: str, fmt: str, config_cls: type, device) -> tuple:
    """(config, tensors) of one of our safetensors files, checked before any module is built: the format,
    the config (JSON, field types and ranges, block counts against the tensors in the file)."""
    kind = file_kind(path)
    if kind == "missing":
        raise FileNotFoundError(f"{path}: no such file")
    if kind not in ("model", "tokenizer"):
        raise CheckpointError(f"{path}: not a mage-kernels safetensors file ({_KIND_TEXT.get(kind, kind)}); "
                              "official .pth files are read by mage.load_official")
    meta, keys = _open_safetensors(path)
    if meta.get("format") != fmt:
        other = {MODEL_FORMAT: "a MAGE model (mage.load)", TOKENIZER_FORMAT: "a tokenizer (mage.load_tokenizer)"}
        raise CheckpointError(f"{path} holds {other.get(meta.get('format'), repr(meta.get('format')))}, "
                              f"not {other[fmt]}")
    config = _parse_config(f"{path}: its 'config' metadata", meta.get("config"), _config_builder(config_cls),
                           {MODEL_FORMAT: "MAGE", TOKENIZER_FORMAT: "VQGANTokenizer"}[fmt])
    _check_sizes(path, config, keys)
    return config, _read_tensors(path, device)


def read_folder(folder: str | os.PathLike, config_name: str, weights_name: str, build, what: str, device) -> tuple:
    """(config, tensors, weights path) of a pretrained folder (`save_pretrained`), with the same checks as
    `read_our_file`; the config comes from its JSON file and is built by `build(dict)`."""
    folder = os.fspath(folder)
    config_path, weights = os.path.join(folder, config_name), os.path.join(folder, weights_name)
    for name in (config_path, weights):
        if not os.path.isfile(name):
            raise CheckpointError(f"{folder}: no {os.path.basename(name)}; a pretrained folder holds {config_name} "
                                  f"and {weights_name} (written by save_pretrained)")
    try:
        with open(config_path, encoding="utf-8") as f:
            text = f.read(1_000_000)
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: unreadable ({err})") from None
    config = _parse_config(config_path, text, build, what)
    _check_sizes(weights, config, _open_safetensors(weights)[1])
    return config, _read_tensors(weights, device), weights


def load(path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None,
         check_finite: bool = True) -> MAGE:
    """Read a file written by `MAGE.save`, strictly: the config is validated against the file before the
    model is built; tensors go onto `device`, floating-point ones in `dtype` (the model's float32 when None);
    NaN/inf weights are refused unless `check_finite=False` (which skips reading every value once, ~0.3 s
    per 100M parameters). A folder written by `save_pretrained` is read as `MAGE.from_pretrained`."""
    check_dtype("load", dtype)
    path = os.fspath(path)
    if os.path.isdir(path):
        return MAGE.from_pretrained(path, device=device, dtype=dtype)
    config, tensors = read_our_file(path, MODEL_FORMAT, MAGEConfig, device)
    with torch.device("meta"):
        model = MAGE(config)
    load_checked(model, tensors, what=path, dtype=dtype, check_finite=check_finite)
    return model


# ------------------------------------------------------------------------------------ any file

_KIND_TEXT = {
    "model": "a MAGE model (mage-kernels safetensors)",
    "tokenizer": "a VQGAN tokenizer (mage-kernels safetensors)",
    "safetensors": "a safetensors file without mage-kernels metadata",
    "mage-training-state": "a training state written by mage train",
    "torch": "a torch.save / released .pth file",
    "unknown": "not a file format mage reads",
    "missing": "no such file",
}


def file_kind(path: str | os.PathLike) -> str:
    """What a file is, from its first bytes (never its name): "model" / "tokenizer" (our safetensors),
    "safetensors" (anyone else's), "mage-training-state" (`mage train`'s checkpoint.pt, token caches),
    "torch" (a torch.save zip or legacy pickle: the released .pth files), "unknown" or "missing"."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if head.startswith(MAGIC):
                return "mage-training-state"
            if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
                return "torch"
            size = int.from_bytes(head[:8], "little")
            if len(head) >= 9 and head[8:9] == b"{" and 2 <= size <= 100_000_000:
                f.seek(8)
                header = json.loads(f.read(size))
                fmt = header.get("__metadata__", {}).get("format") if isinstance(header, dict) else None
                return {MODEL_FORMAT: "model", TOKENIZER_FORMAT: "tokenizer"}.get(fmt, "safetensors")
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, UnicodeDecodeError):
        return "unknown"
    return "unknown"


def _training_state_model(path: str | os.PathLike, map_location) -> tuple[dict | None, dict]:
    """(model config dict or None for older files, MAGE weights) of a `mage train` checkpoint (mage / mage-c)."""
    state = load_checkpoint(path, map_location=map_location)
    extra = state.get("extra", {}) if isinstance(state, dict) else {}
    config = extra.get("model_config") if isinstance(extra, dict) else None
    objective = extra.get("config", {}).get("objective") if isinstance(extra.get("config"), dict) else None
    if objective not in (None, "mage", "mage-c") or not isinstance(state.get("model"), dict):
        what = "a token cache" if "ids" in state else f"the training state of a {objective} run"
        raise CheckpointError(f"{path} is {what}, not a MAGE model")
    weights = {k[len("model."):]: v for k, v in state["model"].items() if k.startswith("model.")}
    return (config if isinstance(config, dict) else None), weights


def load_training_state_model(path: str | os.PathLike, *, map_location="cpu", dtype: torch.dtype | None = None,
                              check_finite: bool = True) -> MAGE:
    """The MAGE model inside a `mage train` checkpoint (objective mage or mage-c)."""
    config, weights = _training_state_model(path, map_location)
    if config is None:
        raise CheckpointError(f"{path} is a MAGE training state from an older version that does not record the "
                              "model's config: use the model.safetensors its run wrote at the end")
    try:
        config = MAGEConfig.from_dict(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid model config in the training state: {err}") from None
    _check_sizes(os.fspath(path), config, set(weights))
    with torch.device("meta"):
        model = MAGE(config)
    load_checked(model, weights, what=os.fspath(path), dtype=dtype, check_finite=check_finite)
    return model


def read_state_dict(path: str | os.PathLike, *, map_location="cpu", trusted: bool = False) -> tuple[str, dict]:
    """(description, MAGE state dict) of any file that holds one, recognised by its header: a pretrained
    folder, our or anyone's safetensors file, a `mage train` checkpoint, a released .pth (weights-only
    unless `trusted`). For callers that build the architecture themselves (`create_model`)."""
    from .hub import WEIGHTS_NAME

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS_NAME)
    kind = file_kind(path)
    if kind == "missing":
        raise FileNotFoundError(f"{path}: no such file")
    if kind in ("model", "tokenizer", "safetensors"):
        return path, _read_tensors(path, map_location)
    if kind == "mage-training-state":
        return path, _training_state_model(path, map_location)[1]
    if kind == "torch":
        return read_official_state(path, map_location=map_location, trusted=trusted)
    raise CheckpointError(f"{path} is {_KIND_TEXT[kind]}: expected a pretrained folder, a safetensors file, a "
                          "mage train checkpoint or a released .pth")


def load_any(path: str | os.PathLike, *, map_location="cpu", dtype: torch.dtype | None = None,
             trusted: bool = False) -> MAGE:
    """A MAGE model from any file that holds one, recognised by its header (not its name): our safetensors
    (`load`) or a pretrained folder (`MAGE.from_pretrained`), a `mage train` checkpoint (mage / mage-c), or a
    released .pth (`load_official`, weights-only unless `trusted`). Anything else raises CheckpointError
    saying what the file is. `dtype` casts the floating-point weights."""
    check_dtype("load_any", dtype)
    if os.path.isdir(path):
        return load(path, device=map_location, dtype=dtype)
    kind = file_kind(path)
    if kind == "missing":
        raise FileNotFoundError(f"{os.fspath(path)}: no such file")
    if kind == "model":
        return load(path, device=map_location, dtype=dtype)
    if kind == "mage-training-state":
        return load_training_state_model(path, map_location=map_location, dtype=dtype)
    if kind == "torch":
        return load_official(path, map_location=map_location, dtype=dtype, trusted=trusted)
    advice = {"tokenizer": "; a MAGE model is the model.safetensors that `mage train --objective mage` writes"}
    raise CheckpointError(f"{os.fspath(path)} is {_KIND_TEXT[kind]}, not a MAGE model{advice.get(kind, '')}")
