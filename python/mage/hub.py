"""Hub-style folders: `model.save_pretrained(dir)` / `Class.from_pretrained(dir)` for `MAGE` and
`VQGANTokenizer`.

A folder holds `config.json` (the model's config dataclass as JSON) and `model.safetensors` (the state
dict), the layout of huggingface_hub's `PyTorchModelHubMixin`. When huggingface_hub is installed the
models inherit that mixin itself, so `push_to_hub("user/name")` and `from_pretrained("user/name")` reach
the Hub too (and `save_pretrained` adds the mixin's model card, README.md); without it the same
folders are written and read locally. Either way the load is strict, weights-only, and builds the
model on the meta device first, so nothing is initialised twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class _Folder:
    """What both mixins share. A model class provides `save(path)` (its single safetensors file),
    `_config_dict()` and the classmethod `_config_from_dict(d)`; its constructor takes the config."""

    def _write_folder(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # Our single-file writer: the weights file alone also loads with mage.load / mage.load_tokenizer.
        from .checkpoint_io import write_atomic

        self.save(folder / WEIGHTS_NAME)
        write_atomic(folder / CONFIG_NAME, json.dumps(self._config_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def _read_folder(cls, folder: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None):
        from ._checks import check_dtype
        from .checkpoint import load_checked, read_folder

        check_dtype(f"{cls.__name__}.from_pretrained", dtype)
        # The config is validated (types, ranges, block counts against the weights) before anything is built.
        config, state, weights = read_folder(folder, CONFIG_NAME, WEIGHTS_NAME, cls._config_from_dict,
                                             cls.__name__, device or "cpu")
        with torch.device("meta"):
            model = cls(config)
        load_checked(model, state, what=weights, dtype=dtype)
        return model.eval()


class LocalHubMixin(_Folder):
    """`save_pretrained` / `from_pretrained` on local folders, used when huggingface_hub is absent."""

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `config.json` and `model.safetensors` into save_directory (created if needed)."""
        self._write_folder(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, device=None,
                        dtype: torch.dtype | None = None):
        """Load a folder written by `save_pretrained` (in eval mode, as the Hub mixin does); `device`
        and `dtype` place and cast the weights. Hub repository ids need huggingface_hub installed."""
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(path):
            raise FileNotFoundError(f"{path} is a file, not a folder written by save_pretrained; a single file "
                                    "written by save() loads with mage.load / mage.load_tokenizer")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such folder; to download a Hub repository install huggingface_hub "
                                    "(pip install huggingface_hub)")
        return cls._read_folder(path, device=device, dtype=dtype)


try:
    from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
except ImportError:  # optional extra
    HubMixin = LocalHubMixin
    HAS_HUB = False
else:
    HAS_HUB = True

    class HubMixin(  # type: ignore[no-redef]
        _Folder,
        PyTorchModelHubMixin,
        library_name="mage-kernels",
        tags=["mage", "masked-generative-encoder", "vqgan"],
    ):
        """huggingface_hub's PyTorchModelHubMixin with our folder writer and strict loader."""

        def _save_pretrained(self, save_directory: Path) -> None:
            self._write_folder(save_directory)

        @classmethod
        def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                             device=None, dtype: torch.dtype | None = None, map_location=None, config=None, **_):
            # `config` (already read by the mixin) is ignored: the folder's config.json is read with its weights.
            folder = model_id
            if not os.path.isdir(model_id):
                kw = dict(repo_id=model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                          local_files_only=local_files_only, token=token)
                hf_hub_download(filename=CONFIG_NAME, **kw)
                folder = os.path.dirname(hf_hub_download(filename=WEIGHTS_NAME, **kw))
            return cls._read_folder(folder, device=device or map_location, dtype=dtype)
