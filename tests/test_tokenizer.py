"""The VQGAN tokenizer: official layout and quirks (docs/REFERENCE.md 3.2, 3.5), encode/decode, checks."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import mage
from mage.tokenizer import ResnetBlock, TokenizerConfig, VQGANTokenizer

OFFICIAL_TOKENIZER_PARAMS = 54_515_587  # section 3.5


def official_tokenizer_shapes() -> dict:
    """Every key of the released tokenizer and its shape, written from the tables of section 3.5."""
    shapes = {"encoder.conv_in.weight": (128, 3, 3, 3)}

    def block(prefix, cin, cout):
        shapes.update({
            f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,),
            f"{prefix}.conv1.weight": (cout, cin, 3, 3),
            f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,),
            f"{prefix}.conv2.weight": (cout, cout, 3, 3),
        })
        if cin != cout:
            shapes[f"{prefix}.nin_shortcut.weight"] = (cout, cout, 1, 1)  # the shortcut acts on the output

    for level, (cin, cout) in enumerate([(128, 128), (128, 128), (128, 256), (256, 256), (256, 512)]):
        block(f"encoder.down.{level}.block.0", cin, cout)
        block(f"encoder.down.{level}.block.1", cout, cout)
    for part in ("encoder", "decoder"):
        block(f"{part}.mid.block_1", 512, 512)
        block(f"{part}.mid.block_2", 512, 512)
    shapes.update({"encoder.norm_out.weight": (512,), "encoder.norm_out.bias": (512,),
                   "encoder.conv_out.weight": (256, 512, 1, 1), "encoder.conv_out.bias": (256,),
                   "decoder.conv_in.weight": (512, 256, 3, 3), "decoder.conv_in.bias": (512,)})
    for level, (cin, cout) in {4: (512, 512), 3: (512, 256), 2: (256, 256), 1: (256, 128), 0: (128, 128)}.items():
        block(f"decoder.up.{level}.block.0", cin, cout)
        block(f"decoder.up.{level}.block.1", cout, cout)
        if level > 0:
            shapes[f"decoder.up.{level}.upsample.conv.weight"] = (cout, cout, 3, 3)
            shapes[f"decoder.up.{level}.upsample.conv.bias"] = (cout,)
    shapes.update({"decoder.norm_out.weight": (128,), "decoder.norm_out.bias": (128,),
                   "decoder.conv_out.weight": (3, 128, 3, 3), "decoder.conv_out.bias": (3,),
                   "quantize.embedding.weight": (1024, 256)})
    return shapes


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return VQGANTokenizer(TokenizerConfig.tiny()).eval()


def test_official_layout_matches_the_reference_tables():
    with torch.device("meta"):
        tok = VQGANTokenizer(TokenizerConfig.official())
    got = {k: tuple(v.shape) for k, v in tok.state_dict().items()}
    assert got == official_tokenizer_shapes()
    assert sum(p.numel() for p in tok.parameters()) == OFFICIAL_TOKENIZER_PARAMS
    assert not any("quant_conv" in k or "downsample" in k for k in got)  # no quant_conv, pool has no weights


def test_groupnorm_is_32_groups_eps_1e6():
    with torch.device("meta"):
        tok = VQGANTokenizer()
    norms = [m for m in tok.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 for m in norms)


def test_resnet_block_applies_the_shortcut_to_its_output():
    torch.manual_seed(1)
    cfg = TokenizerConfig.tiny()
    blk = ResnetBlock(cfg, 8, 16).eval()
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 8, 5, 5)
    h = F.conv2d(F.silu(F.group_norm(x, 8, blk.norm1.weight, blk.norm1.bias, 1e-6)), blk.conv1.weight, padding=1)
    h = F.conv2d(F.silu(F.group_norm(h, 8, blk.norm2.weight, blk.norm2.bias, 1e-6)), blk.conv2.weight, padding=1)
    assert_close(blk(x), h + F.conv2d(h, blk.nin_shortcut.weight))
    same = ResnetBlock(cfg, 8, 8).eval()
    assert not hasattr(same, "nin_shortcut")
    x8 = torch.randn(2, 8, 5, 5)
    h8 = same.conv2(F.silu(same.norm2(same.conv1(F.silu(same.norm1(x8))))))
    assert_close(same(x8), x8 + h8)


def test_encode_is_the_nearest_code_of_the_encoder_output_row_major(tiny):
    images = torch.rand(3, 3, 32, 32)
    ids = tiny.encode(images)
    assert ids.shape == (3, 64) and ids.dtype == torch.long
    with torch.no_grad():
        z = tiny.encoder(images)  # (B, D, 8, 8)
    assert z.shape == (3, 16, 8, 8)
    rows = z.permute(0, 2, 3, 1).reshape(3, 64, 16).double()
    expected = torch.cdist(rows, tiny.codebook.double()[None].expand(3, -1, -1)).argmin(-1)
    assert torch.equal(ids, expected)


def test_encoder_downsamples_by_2x2_average_pooling_and_decoder_by_nearest_conv(tiny):
    seen = {}
    hooks = [
        tiny.encoder.down[0].block[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("enc_out0", o)),
        tiny.encoder.down[1].block[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("enc_in1", i[0])),
        tiny.decoder.up[2].block[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("dec_out2", o)),
        tiny.decoder.up[1].block[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("dec_in1", i[0])),
    ]
    try:
        with torch.no_grad():
            tiny.decode(tiny.encode(torch.rand(1, 3, 32, 32)))
            up = tiny.decoder.up[2].upsample.conv(F.interpolate(seen["dec_out2"], scale_factor=2.0, mode="nearest"))
    finally:
        for h in hooks:
            h.remove()
    assert_close(seen["enc_in1"], F.avg_pool2d(seen["enc_out0"], 2))
    assert_close(seen["dec_in1"], up)
    assert tiny.config.grid == 8


def test_decode_shape_range_and_codes(tiny):
    ids = torch.randint(0, 64, (2, 64))
    with torch.no_grad():
        out = tiny.decode(ids)
        raw = tiny.decode(ids, clamp=False)
        codes = tiny.codes(ids)
    assert out.shape == (2, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    assert_close(out, raw.clamp(0, 1))
    assert_close(codes[1, :, 2, 5], tiny.codebook[ids[1, 2 * 8 + 5]])  # row-major grid


def test_training_forward_gives_straight_through_gradients(tiny):
    tok = VQGANTokenizer(TokenizerConfig.tiny())
    images = torch.rand(2, 3, 32, 32)
    recon, loss, ids, counts = tok(images)
    assert recon.shape == images.shape and ids.shape == (2, 64) and counts.sum() == 128
    ((recon - images) ** 2).mean().add(loss).backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tok.codebook.grad.abs().sum() > 0


def test_state_dict_round_trip(tiny, tmp_path):
    path = tmp_path / "tok.pth"
    torch.save({"state_dict": tiny.state_dict()}, path)
    loaded = mage.load_official_tokenizer(path, config=TokenizerConfig.tiny())
    for k, v in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize(
    "images, error, match",
    [
        (torch.rand(2, 3, 32, 32) * 255, ValueError, r"\[0, 1\]"),
        (torch.rand(2, 3, 64, 64), ValueError, r"\[B, 3, 32, 32\]"),
        (torch.rand(2, 1, 32, 32), ValueError, r"\[B, 3, 32, 32\]"),
        (torch.rand(3, 32, 32), ValueError, r"\[B, 3, 32, 32\]"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError, "float"),
    ],
)
def test_bad_images_raise_clear_errors(tiny, images, error, match):
    with pytest.raises(error, match=match):
        tiny.encode(images)


def test_bad_ids_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tiny.decode(torch.full((1, 64), 64))
    with pytest.raises(ValueError, match=r"\[B, 64\]"):
        tiny.decode(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        tiny.decode(torch.zeros(1, 64, dtype=torch.int32))
