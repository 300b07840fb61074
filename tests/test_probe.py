"""Linear probe (LARS, BN without affine, cosine schedule) and the schedule / weight-decay groups it shares with
pre-training."""

import math

import pytest
import torch
from torch import nn

from mage.data import load_digits
from mage.probe import LARS, LinearProbeHead, ProbeConfig, extract_features, linear_probe, probe_extractor
from mage.schedule import build_adamw, cosine_lr, param_groups_weight_decay, scaled_lr, set_lr

FAST = ProbeConfig(epochs=15, warmup_epochs=2, batch_size=64)


def _digits_split():
    x, y = load_digits()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1200], y[:1200]), (x[1200:], y[1200:])


@pytest.mark.parametrize("optimizer", ["lars", "sgd"])
def test_probe_beats_chance_on_raw_digit_pixels(optimizer):
    (xtr, ytr), (xte, yte) = _digits_split()
    # LARS moves each weight by lr * 0.001 * ||w|| per step: with ~300 steps instead of the reference's ~28k at
    # lr 1.6 it needs a far larger base lr than the reference's 0.1 (see ProbeConfig).
    config = ProbeConfig(**{**FAST.__dict__, "optimizer": optimizer, "base_lr": 20.0 if optimizer == "lars" else 0.1})
    result = probe_extractor(lambda im: im.flatten(1), (xtr, ytr), (xte, yte), config)
    assert result.top1 > 0.85, result.top1  # chance is 0.1; a linear model on pixels gets ~0.95
    assert result.top5 >= result.top1 and result.train_top1 > 0.85
    assert result.losses[-1] < result.losses[0]


def test_probe_is_deterministic_and_uninformative_features_stay_near_chance():
    (xtr, ytr), (xte, yte) = _digits_split()
    a = linear_probe(xtr.flatten(1), ytr, xte.flatten(1), yte, FAST)
    b = linear_probe(xtr.flatten(1), ytr, xte.flatten(1), yte, FAST)
    assert a.top1 == b.top1 and a.losses == b.losses
    noise = torch.randn(xtr.shape[0], 64, generator=torch.Generator().manual_seed(1))
    noise_test = torch.randn(xte.shape[0], 64, generator=torch.Generator().manual_seed(2))
    assert linear_probe(noise, ytr, noise_test, yte, FAST).top1 < 0.25


def test_head_matches_reference_layout():
    g = torch.Generator().manual_seed(0)
    head = LinearProbeHead(384, 1000, generator=g)
    assert not head.norm.affine and head.norm.eps == 1e-6 and head.norm.weight is None
    w = head.linear.weight.detach()
    assert abs(float(w.std()) - 0.01) < 5e-4 and float(w.abs().max()) <= 0.06
    assert float(head.linear.bias.detach().abs().max()) == 0
    x = torch.randn(8, 384) * 5 + 3
    ln = LinearProbeHead(384, 10, layer_norm=True, generator=g).train()
    assert ln(x).shape == (8, 10)


def test_extract_features_from_loader_and_errors():
    (xtr, ytr), _ = _digits_split()
    batches = [(xtr[i : i + 100], ytr[i : i + 100]) for i in range(0, 300, 100)]
    f, y = extract_features(lambda im: im.flatten(1) * 2, batches)
    assert f.shape == (300, 64) and torch.equal(y, ytr[:300])
    with pytest.raises(ValueError, match=r"features \[B, D\]"):
        extract_features(lambda im: im, (xtr, ytr))
    with pytest.raises(ValueError, match="optimizer"):
        linear_probe(f, y, f, y, ProbeConfig(optimizer="adam"))


def test_lars_update_rule():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    w.grad = torch.tensor([[0.0, 1.0]])
    b.grad = torch.tensor([2.0, 0.0])
    opt.step()
    update = torch.tensor([[0.3, 1.4]])  # g + wd * w
    expected_w = torch.tensor([[3.0, 4.0]]) - 0.5 * update * (0.001 * 5 / float(update.norm()))
    torch.testing.assert_close(w.detach(), expected_w)
    torch.testing.assert_close(b.detach(), torch.tensor([0.0, -1.0]))  # 1-D: plain momentum SGD, no decay
    b.grad = torch.tensor([2.0, 0.0])
    opt.step()
    torch.testing.assert_close(b.detach(), torch.tensor([0.0 - 0.5 * (0.9 * 2 + 2), -1.0]))
    zero = nn.Parameter(torch.zeros(2, 2))  # ||p|| = 0: the update is left unscaled
    opt = LARS([zero], lr=1.0, momentum=0.0)
    zero.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(zero.detach(), -torch.ones(2, 2))


# ---- schedule ----


def test_cosine_lr_shape():
    lr, total, warm = 1.0, 100, 10
    assert cosine_lr(0, total, warm, lr) == 0.0
    assert math.isclose(cosine_lr(5, total, warm, lr), 0.5)
    assert math.isclose(cosine_lr(10, total, warm, lr), 1.0)
    assert math.isclose(cosine_lr(55, total, warm, lr), 0.5)  # halfway through the cosine
    assert math.isclose(cosine_lr(100, total, warm, lr, min_lr=0.1), 0.1)
    assert math.isclose(cosine_lr(150, total, warm, lr, min_lr=0.1), 0.1)
    values = [cosine_lr(s, total, warm, lr) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert math.isclose(scaled_lr(1.5e-4, 4096), 2.4e-3)  # docs/REFERENCE.md 4.10


def test_weight_decay_groups_follow_timm_rule():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_emb = nn.Embedding(11, 4)
            self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, 5, 4))
            self.norm = nn.LayerNorm(4)
            self.proj = nn.Linear(4, 4)
            self.mlm_layer = nn.Module()
            self.mlm_layer.bias = nn.Parameter(torch.zeros(1, 5, 11))  # 3-D but named .bias
            self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)

    model = Toy()
    no_decay, decay = param_groups_weight_decay(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = sorted(names[id(p)] for p in no_decay["params"])
    decay_names = sorted(names[id(p)] for p in decay["params"])
    assert no_decay_names == ["mlm_layer.bias", "norm.bias", "norm.weight", "proj.bias"]
    assert decay_names == ["decoder_pos_embed_learned", "proj.weight", "token_emb.weight"]
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    skipped = param_groups_weight_decay(model, 0.05, skip=["decoder_pos_embed_learned"])
    assert len(skipped[0]["params"]) == 5
    opt = build_adamw(model, lr=1e-3)
    assert opt.defaults["betas"] == (0.9, 0.95)
    opt.param_groups[0]["lr_scale"] = 0.5
    set_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 2e-3]


def test_default_warmup_is_cut_to_short_probes():
    """The reference's 10 warm-up epochs, or all of a shorter probe's (its lr would never reach the peak)."""
    assert ProbeConfig().warmup_epochs == 10 and ProbeConfig(epochs=5).warmup_epochs == 5
    assert ProbeConfig(epochs=5, warmup_epochs=0).warmup_epochs == 0
