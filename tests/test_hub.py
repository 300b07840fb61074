"""Hub-style folders (save_pretrained / from_pretrained, with and without huggingface_hub), models by
name (create_model / list_models) and dtype / device on every loader."""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_model import randomized, tiny_config

import mage
from mage import hub
from mage.checkpoint import CheckpointError

requires_hub = pytest.mark.skipif(not hub.HAS_HUB, reason="huggingface_hub is not installed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def model():
    return randomized(mage.MAGE(tiny_config()))


def test_folder_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "m"))
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == json.loads(json.dumps(model.config.to_dict()))
    loaded = mage.MAGE.from_pretrained(tmp_path / "m")
    assert same_state(loaded, model) and loaded.config == model.config and not loaded.training
    # the weights file alone is our single-file format; mage.load also takes the folder
    assert same_state(mage.load(tmp_path / "m" / "model.safetensors"), model)
    assert same_state(mage.load(tmp_path / "m"), model)
    half = mage.MAGE.from_pretrained(tmp_path / "m", dtype=torch.bfloat16, device="cpu")
    assert half.token_emb.word_embeddings.weight.dtype == torch.bfloat16
    assert half.token_emb.position_ids.dtype == torch.int64  # integer buffers keep their dtype

    tok = model.vqgan
    tok.save_pretrained(tmp_path / "t")
    loaded = mage.VQGANTokenizer.from_pretrained(tmp_path / "t")
    assert same_state(loaded, tok) and loaded.config == tok.config


def test_folder_errors(model, tmp_path):
    model.vqgan.save_pretrained(tmp_path / "t")
    with pytest.raises(CheckpointError, match="not a MAGE config"):
        mage.MAGE.from_pretrained(tmp_path / "t")
    os.remove(tmp_path / "t" / "config.json")
    with pytest.raises(CheckpointError, match="no config.json"):
        mage.VQGANTokenizer.from_pretrained(tmp_path / "t")


_WITHOUT_HUB = """
import sys
sys.modules["huggingface_hub"] = None  # as if it were not installed
import torch, mage
from mage import hub
assert not hub.HAS_HUB and not hasattr(mage.MAGE, "push_to_hub")
src, dst = sys.argv[1], sys.argv[2]
m = mage.MAGE.from_pretrained(src)
m.save_pretrained(dst)
try:
    mage.MAGE.from_pretrained("user/some-repo")
except FileNotFoundError as err:
    assert "huggingface_hub" in str(err)
else:
    raise AssertionError("a repository id without huggingface_hub must fail")
"""


@pytest.mark.skipif(hub.HAS_HUB, reason="huggingface_hub is installed (the next test covers this path)")
def test_without_huggingface_hub_folders_are_local():
    assert mage.MAGE.__mro__[2] is hub.LocalHubMixin and not hasattr(mage.MAGE, "push_to_hub")
    with pytest.raises(FileNotFoundError, match="huggingface_hub"):
        mage.MAGE.from_pretrained("user/some-repo")


@requires_hub
def test_folders_are_the_same_without_huggingface_hub(model, tmp_path):
    """A folder the hub mixin writes loads in a process without huggingface_hub, and what that process
    writes loads here: one layout either way."""
    model.save_pretrained(tmp_path / "here")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")])}
    subprocess.run([sys.executable, "-c", _WITHOUT_HUB, str(tmp_path / "here"), str(tmp_path / "there")],
                   check=True, env=env, timeout=300)
    assert same_state(mage.MAGE.from_pretrained(tmp_path / "there"), model)


@requires_hub
def test_hub_mixin_push_and_download(model, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, PyTorchModelHubMixin

    assert isinstance(model, PyTorchModelHubMixin) and isinstance(model.vqgan, PyTorchModelHubMixin)
    uploaded = {}

    def upload_folder(self, *, repo_id, folder_path, **kw):
        uploaded[repo_id] = {name: open(os.path.join(folder_path, name), "rb").read() for name in os.listdir(folder_path)}
        return "commit-url"

    class Repo:
        repo_id = "user/mage-tiny"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, **kw: Repo())
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert model.push_to_hub("user/mage-tiny") == "commit-url"
    files = uploaded["user/mage-tiny"]
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)

    def download(repo_id, filename, **kw):  # the Hub's cache, served from what was pushed
        path = tmp_path / "cache" / repo_id / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(uploaded[repo_id][filename])
        return str(path)

    monkeypatch.setattr(hub, "hf_hub_download", download)
    monkeypatch.setattr("huggingface_hub.hub_mixin.hf_hub_download", download)
    loaded = mage.MAGE.from_pretrained("user/mage-tiny", dtype=torch.float64)
    assert loaded.mlm_layer.bias.dtype == torch.float64
    assert torch.equal(loaded.mlm_layer.bias.float(), model.mlm_layer.bias)


def test_create_model_and_list_models(model, tmp_path):
    assert mage.list_models() == ["mage_vit_base_patch16", "mage_vit_huge_patch16", "mage_vit_large_patch16",
                                  "mage_vit_small", "mage_vit_tiny"]
    assert mage.list_models("*large*") == ["mage_vit_large_patch16"]
    fresh = mage.create_model("mage_vit_tiny", tokenizer=mage.TokenizerConfig.tiny(), depth=1, dtype=torch.bfloat16)
    assert fresh.config.depth == 1 and fresh.mlm_layer.fc.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="list_models"):
        mage.create_model("mage_vit_giant")

    over = {k: v for k, v in tiny_config().to_dict().items()}
    model.save_pretrained(tmp_path / "folder")
    model.save(tmp_path / "file.safetensors")
    torch.save({"model": model.state_dict()}, tmp_path / "released.pth")  # the official layout: under 'model'
    for path in ("folder", "file.safetensors", "released.pth"):
        loaded = mage.create_model("mage_vit_tiny", checkpoint_path=tmp_path / path, **over)
        assert same_state(loaded, model), path
    with pytest.raises(CheckpointError, match="overrides"):
        mage.create_model("mage_vit_tiny", checkpoint_path=tmp_path / "folder", tokenizer=mage.TokenizerConfig.tiny())


def test_loaders_take_dtype(model, tmp_path):
    model.save(tmp_path / "m.safetensors")
    assert mage.load(tmp_path / "m.safetensors", dtype=torch.bfloat16).norm.weight.dtype == torch.bfloat16
    official = mage.MAGE(tiny_config(vocab="official", legacy_params=True))
    loaded = mage.load_official(official.state_dict(), config=official.config, dtype=torch.float16)
    assert loaded.norm.weight.dtype == torch.float16
    tok = mage.load_official_tokenizer(model.vqgan.state_dict(), config=model.vqgan.config, dtype=torch.bfloat16)
    assert tok.codebook.dtype == torch.bfloat16
    mage.save_tokenizer(model.vqgan, tmp_path / "t.safetensors")
    tok = mage.load_tokenizer(tmp_path / "t.safetensors", dtype=torch.float64)
    assert tok.codebook.dtype == torch.float64 and torch.equal(tok.codebook.float(), model.vqgan.codebook)


def test_package_ships_type_information():
    import mage_kernels

    for pkg in (mage, mage_kernels):
        assert os.path.isfile(os.path.join(os.path.dirname(pkg.__file__), "py.typed")), pkg.__name__
    # scikit-build-core puts every file of these package folders into the wheel
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert 'wheel.packages = ["mage_kernels", "python/mage"]' in pyproject


# Each writer first writes a good file, then rewrites it while writes past 16 bytes fail (RLIMIT_FSIZE: EFBIG,
# as on a full disk). The old file must survive whole, with no temp file left: a truncating write loses it.
_DISK_FULL = """
import json, os, resource, signal, sys
from pathlib import Path
import torch, mage
from mage import cli
from mage.metrics import FeatureStats
from mage.report import save_image

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
src, out = Path(sys.argv[1]), Path(sys.argv[2])
model = mage.MAGE.from_pretrained(src)
model.save = lambda path: None  # keep the weights file out of it: the config is what is tested
stats = FeatureStats()
stats.update(torch.randn(5, 3, dtype=torch.float64))
writers = {
    "save_pretrained config.json": (out / "m" / "config.json", lambda: model.save_pretrained(out / "m")),
    "FeatureStats.save": (out / "s" / "stats.npz", lambda: stats.save(out / "s" / "stats.npz")),
    "mage fid --out": (out / "j" / "result.json",
                       lambda: cli._write_json({"fid": 1.5, "network": "tf-inception"}, str(out / "j" / "result.json"))),
    "save_image (mage sample / inpaint --out)": (out / "i" / "x.png",
                                                 lambda: save_image(torch.rand(3, 8, 8), out / "i" / "x.png")),
}
report = {}
for name, (path, write) in writers.items():
    path.parent.mkdir(parents=True, exist_ok=True)
    write()
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, hard))
    try:
        write()
        failed = False
    except OSError:
        failed = True
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    report[name] = {"failed": failed, "intact": path.read_bytes() == before,
                    "left": sorted(p.name for p in path.parent.iterdir() if p.name.endswith(".tmp"))}
print(json.dumps(report))
"""


def test_writers_are_atomic_on_a_full_disk(model, tmp_path):
    model.save_pretrained(tmp_path / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")])}
    run = subprocess.run([sys.executable, "-c", _DISK_FULL, str(tmp_path / "src"), str(tmp_path / "out")],
                         env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    for name, r in report.items():
        assert r == {"failed": True, "intact": True, "left": []}, (name, r)
