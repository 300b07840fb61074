"""The VQGAN parts on their own: PatchGAN discriminator shapes and losses, the adaptive weight, LPIPS-VGG16 with
random weights of the published layouts, and the EMA helper."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mage.discriminator import (
    DiscriminatorObjective,
    PatchDiscriminator,
    adaptive_weight,
    discriminator_loss,
    frozen,
    generator_loss,
)
from mage.ema import EMA
from mage.perceptual import LPIPS, TAP_CHANNELS, canonical_state_dict, convert


# ------------------------------------------------------------------------------------ discriminator


def test_patch_discriminator_is_taming_n_layer_design():
    d = PatchDiscriminator(in_channels=3, channels=64, layers=3, norm="batch")
    convs = [m for m in d.main if isinstance(m, torch.nn.Conv2d)]
    # 4x4 kernels; strides 2, 2, 2, 1, 1; channels 64, 128, 256, 512, 1 (taming's NLayerDiscriminator).
    assert [c.kernel_size for c in convs] == [(4, 4)] * 5
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert all(m.negative_slope == 0.2 for m in d.main if isinstance(m, torch.nn.LeakyReLU))
    # 70x70 PatchGAN: 30x30 patch logits for 256x256 images; our output_size formula agrees with the network.
    assert d.output_size(256) == 30
    convs_and_norms = (3 * 64 * 16 + 64) + (64 * 128 * 16 + 2 * 128) + (128 * 256 * 16 + 2 * 256) + \
        (256 * 512 * 16 + 2 * 512) + (512 * 16 + 1)
    assert sum(p.numel() for p in d.parameters()) == convs_and_norms == 2_765_633
    small = PatchDiscriminator(in_channels=1, channels=8, layers=2)
    for size in (16, 28, 33):
        assert small(torch.rand(2, 1, size, size)).shape == (2, 1, small.output_size(size), small.output_size(size))
    with pytest.raises(ValueError, match="too small"):
        PatchDiscriminator(1, 8, layers=3)(torch.rand(1, 1, 8, 8))
    # Group norm: each image's logits do not depend on the rest of the batch (DDP / accumulation invariant).
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(small(x)[:2], small(x[:2]))


def test_hinge_and_non_saturating_losses():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 1.5])
    hinge = 0.5 * ((0 + 0.5 + 2.0) / 3 + (0 + 1.0 + 2.5) / 3)
    assert math.isclose(float(discriminator_loss(real, fake)), hinge, rel_tol=1e-6)
    assert math.isclose(float(generator_loss(fake)), -fake.mean().item(), rel_tol=1e-6)
    bce = 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones(3)) +
                 F.binary_cross_entropy_with_logits(fake, torch.zeros(3)))
    torch.testing.assert_close(discriminator_loss(real, fake, "non-saturating"), bce)
    torch.testing.assert_close(generator_loss(fake, "non-saturating"),
                               F.binary_cross_entropy_with_logits(fake, torch.ones(3)))
    with pytest.raises(ValueError, match="disc_loss"):
        discriminator_loss(real, fake, "wasserstein")


def test_adaptive_weight_is_the_gradient_norm_ratio_clamped():
    torch.manual_seed(0)
    last = torch.nn.Parameter(torch.randn(3, 4))
    x = torch.randn(5, 3)
    out = x @ last
    rec, gan = out.pow(2).mean(), -(out * 0.01).sum()
    g_rec, = torch.autograd.grad(rec, last, retain_graph=True)
    g_gan, = torch.autograd.grad(gan, last)
    expected = g_rec.norm() / (g_gan.norm() + 1e-4)
    torch.testing.assert_close(adaptive_weight(g_rec, g_gan), expected)
    assert float(adaptive_weight(g_rec, torch.zeros_like(g_gan))) == 1e4  # clamped as taming
    assert float(adaptive_weight(torch.zeros_like(g_rec), g_gan)) == 0.0


def test_frozen_discriminator_passes_gradients_to_its_input_only():
    d = PatchDiscriminator(1, 8, layers=1)
    x = torch.rand(2, 1, 16, 16, requires_grad=True)
    with frozen(d):
        generator_loss(d(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.parameters()) and all(p.requires_grad for p in d.parameters())
    loss, logs = DiscriminatorObjective(d)(x.detach(), torch.rand(2, 1, 16, 16))
    loss.backward()
    assert all(p.grad is not None for p in d.parameters()) and set(logs) == {"disc", "logits_real", "logits_fake"}


# ------------------------------------------------------------------------------------ LPIPS


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random weights in the two public files' layouts: torchvision's vgg16 state dict (with its classifier) and
    LPIPS v0.1's vgg.pth (lin{k}.model.1.weight)."""
    tmp_path = tmp_path_factory.mktemp("lpips")
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LPIPS().state_dict().items()}
    vgg = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.randn(8, 4, generator=g)  # present in torchvision's file, ignored
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(TAP_CHANNELS)}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    convert(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"), str(tmp_path / "lpips.safetensors"))
    return tmp_path, vgg, lin


def test_lpips_loads_the_published_layouts_and_is_a_distance(lpips_files):
    tmp_path, vgg, lin = lpips_files
    merged = LPIPS.from_file(tmp_path / "lpips.safetensors")  # the converter's output
    torch.testing.assert_close(merged.features[28].weight, vgg["features.28.weight"])
    torch.testing.assert_close(merged.lin3.weight, lin["lin3.model.1.weight"])
    # The lpips package's own module layout (net.sliceN.<torchvision index>) loads to the same network.
    package = {f"net.slice{1 + sum(i > t for t in (3, 8, 15, 22))}.{k[len('features.'):]}": v
               for k, v in vgg.items() if k.startswith("features.") for i in [int(k.split(".")[1])]}
    package.update(lin)
    package["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    renamed = canonical_state_dict(package)
    assert renamed.keys() == merged.state_dict().keys()
    for k, v in merged.state_dict().items():
        assert torch.equal(renamed[k], v), k

    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(3, 3, 20, 24, generator=g), torch.rand(3, 3, 20, 24, generator=g)
    d = merged(x, y)
    assert d.shape == (3,) and (d > 0).all()
    torch.testing.assert_close(merged(x, x), torch.zeros(3))
    torch.testing.assert_close(merged(y, x), d)
    torch.testing.assert_close(merged(x[:1, :1], y[:1, :1]), merged(x[:1, :1].expand(-1, 3, -1, -1),
                                                                    y[:1, :1].expand(-1, 3, -1, -1)))
    # Written out: per layer, unit-normalised features, squared difference, channel weights, spatial mean.
    expected = 0
    fx, fy = merged._taps(merged.scale_input(x)), merged._taps(merged.scale_input(y))
    for k, (a, b) in enumerate(zip(fx, fy)):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        expected = expected + ((a - b) ** 2 * lin[f"lin{k}.model.1.weight"]).sum(1).mean((1, 2))
    torch.testing.assert_close(d, expected)
    # Gradients reach the images, never the frozen network.
    x.requires_grad_(True)
    merged(x, y).sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in merged.parameters())


def test_lpips_bad_files_are_clear_errors(lpips_files, tmp_path):
    folder, vgg, lin = lpips_files
    with pytest.raises(ValueError, match="missing 5 keys"):
        LPIPS.from_file(folder / "vgg16.pth")  # only the VGG half
    bad = {**canonical_state_dict(vgg), **canonical_state_dict(lin), "lin0.weight": torch.rand(1, 63, 1, 1)}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="wrong shapes.*lin0.weight"):
        LPIPS.from_file(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError):
        LPIPS.from_file(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="at least 16x16"):
        LPIPS.from_file(folder / "lpips.safetensors")(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


# ------------------------------------------------------------------------------------ EMA


def test_ema_follows_the_documented_rule_and_swaps_weights():
    model = torch.nn.Linear(3, 2)
    frozen_p = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    model.register_parameter("frozen", frozen_p)
    ema = EMA(model, decay=0.9)
    assert set(ema.shadow) == {"weight", "bias"}  # frozen parameters are not averaged
    expected = model.weight.detach().clone()
    for n in range(1, 30):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * model.weight.detach()
        assert math.isclose(ema.current_decay(), min(0.9, (1 + n) / (10 + n)))
    torch.testing.assert_close(ema.shadow["weight"], expected)
    trained = model.weight.detach().clone()
    with ema.applied(model):
        torch.testing.assert_close(model.weight.detach(), expected)
    assert torch.equal(model.weight.detach(), trained)
    copy = EMA(torch.nn.Linear(3, 2), decay=0.9)
    copy.load_state_dict(ema.state_dict())
    assert copy.updates == ema.updates and torch.equal(copy.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(ValueError, match="decay"):
        EMA(model, 1.0)


def test_tokenizer_trains_with_the_perceptual_term(lpips_files, tmp_path):
    """--perceptual-weights: LPIPS joins the reconstruction term (and so the adaptive weight's L_rec); the VGG
    weights stay out of the checkpoint."""
    from mage.checkpoint_io import load_checkpoint
    from mage.train import TrainConfig, train

    folder = lpips_files[0]
    tok = dict(in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, embed_dim=8, n_embed=32, norm_groups=4)
    train(TrainConfig(objective="tokenizer", data="digits", image_size=16, tokenizer=tok, steps=2, batch_size=8,
                      lr=1e-3, log_every=1, progress=False, out_dir=str(tmp_path), disc_weight=0.8, disc_layers=1,
                      disc_channels=8, perceptual_weights=str(folder / "lpips.safetensors"), perceptual_weight=0.5))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["perceptual"] > 0 and math.isfinite(r["disc_weight"]) for r in records)
    state = load_checkpoint(tmp_path / "checkpoint.pt")["model"]
    assert not any("features" in k or "lin0" in k for k in state)
