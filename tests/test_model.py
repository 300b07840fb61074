"""MAGE encoder-decoder: official layout (docs/REFERENCE.md 4.11), checkpoints, and the forward against a
plain-PyTorch restatement of the published model (4.3-4.6, 4.9)."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from test_tokenizer import official_tokenizer_shapes

import mage
import mage_kernels
from mage.model import num_params

L_TINY = 64  # TokenizerConfig.tiny(): 32x32 images -> 8x8 tokens, codebook 64


def tiny_config(**overrides) -> mage.MAGEConfig:
    base = dict(embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2,
                vocab="compact", legacy_params=False, tokenizer=mage.TokenizerConfig.tiny())
    return mage.MAGEConfig(**{**base, **overrides})


def randomized(model: mage.MAGE, seed: int = 0) -> mage.MAGE:
    """Random values everywhere (the default init leaves biases and the head bias at 0, which would let a
    wrong bias or LayerNorm affine go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("norm1.weight") else 0.0))
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return randomized(mage.MAGE(tiny_config()))


def official_mage_shapes(D: int, depth: int, Dd: int, V: int = 2025, L: int = 256) -> dict:
    """Every key of a released MAGE checkpoint and its shape, written from the table of section 4.11."""
    s = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + L, D), "mask_token": (1, 1, D),
         "decoder_pos_embed": (1, 1 + L, Dd), "decoder_pos_embed_learned": (1, 1 + L, Dd),
         "token_emb.position_ids": (1, 1 + L), "token_emb.word_embeddings.weight": (V, D),
         "token_emb.position_embeddings.weight": (1 + L, D), "token_emb.LayerNorm.weight": (D,),
         "token_emb.LayerNorm.bias": (D,), "patch_embed.proj.weight": (D, 3, 16, 16), "patch_embed.proj.bias": (D,)}

    def blocks(prefix, n, C):
        for i in range(n):
            p = f"{prefix}.{i}"
            s.update({f"{p}.norm1.weight": (C,), f"{p}.norm1.bias": (C,), f"{p}.attn.qkv.weight": (3 * C, C),
                      f"{p}.attn.qkv.bias": (3 * C,), f"{p}.attn.proj.weight": (C, C), f"{p}.attn.proj.bias": (C,),
                      f"{p}.norm2.weight": (C,), f"{p}.norm2.bias": (C,), f"{p}.mlp.fc1.weight": (4 * C, C),
                      f"{p}.mlp.fc1.bias": (4 * C,), f"{p}.mlp.fc2.weight": (C, 4 * C), f"{p}.mlp.fc2.bias": (C,)})

    blocks("blocks", depth, D)
    s.update({"norm.weight": (D,), "norm.bias": (D,), "decoder_embed.weight": (Dd, D), "decoder_embed.bias": (Dd,)})
    blocks("decoder_blocks", 8, Dd)
    s.update({"decoder_norm.weight": (Dd,), "decoder_norm.bias": (Dd,), "decoder_pred.weight": (768, Dd),
              "decoder_pred.bias": (768,), "mlm_layer.fc.weight": (D, Dd), "mlm_layer.fc.bias": (D,),
              "mlm_layer.ln.weight": (D,), "mlm_layer.ln.bias": (D,), "mlm_layer.bias": (1, 1, V)})
    s.update({f"vqgan.{k}": v for k, v in official_tokenizer_shapes().items()})
    return s


def meta_state_dict(shapes: dict) -> dict:
    return {k: torch.empty(v, device="meta", dtype=torch.long if k.endswith("position_ids") else torch.float32)
            for k, v in shapes.items()}


# ------------------------------------------------------------------------------------ the published forward


def _ln(x, P, name, eps):
    return F.layer_norm(x, x.shape[-1:], P[f"{name}.weight"], P[f"{name}.bias"], eps)


def _reference_block(x, P, p, heads):
    B, N, C = x.shape
    h = _ln(x, P, f"{p}.norm1", 1e-6)
    qkv = F.linear(h, P[f"{p}.attn.qkv.weight"], P[f"{p}.attn.qkv.bias"]).reshape(B, N, 3, heads, C // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1)) * (C // heads) ** -0.5
    attn = (attn - attn.max(-1, keepdim=True).values).softmax(-1)
    x = x + F.linear((attn @ v).transpose(1, 2).reshape(B, N, C), P[f"{p}.attn.proj.weight"], P[f"{p}.attn.proj.bias"])
    h = _ln(x, P, f"{p}.norm2", 1e-6)
    h = F.gelu(F.linear(h, P[f"{p}.mlp.fc1.weight"], P[f"{p}.mlp.fc1.bias"]))
    return x + F.linear(h, P[f"{p}.mlp.fc2.weight"], P[f"{p}.mlp.fc2.bias"])


def reference_logits(model, ids, mask=None, drop=None):
    """models_mage.py's forward_encoder / forward_decoder / MlmLayer restated: boolean-index drop,
    [C] padding by scatter then overwrite of every masked slot, head tied to the embedding."""
    c = model.config
    P = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    B, L = ids.shape
    mask = torch.zeros(B, L, dtype=torch.bool) if mask is None else mask
    drop = torch.zeros(B, L, dtype=torch.bool) if drop is None else drop
    zero = torch.zeros(B, 1, dtype=torch.bool)
    token_all_mask, token_drop_mask = torch.cat([zero, mask], 1), torch.cat([zero, drop], 1)
    x_ids = torch.cat([torch.full((B, 1), c.cls_id), torch.where(mask, c.mask_id, ids)], 1)
    positions = P["token_emb.position_ids"][0]
    x = P["token_emb.word_embeddings.weight"][x_ids] + P["token_emb.position_embeddings.weight"][positions]
    x = _ln(x, P, "token_emb.LayerNorm", 1e-6)
    x = x[~token_drop_mask].reshape(B, -1, x.shape[-1])
    for i in range(c.depth):
        x = _reference_block(x, P, f"blocks.{i}", c.num_heads)
    x = _ln(x, P, "norm", 1e-6)
    y = F.linear(x, P["decoder_embed.weight"], P["decoder_embed.bias"])
    pad = y[:, :1].repeat(1, 1 + L, 1)  # [C] everywhere
    full = pad.clone()
    full[~token_drop_mask] = y.reshape(-1, y.shape[-1])
    full = torch.where(token_all_mask[..., None], pad, full) + P["decoder_pos_embed_learned"]
    for i in range(c.decoder_depth):
        full = _reference_block(full, P, f"decoder_blocks.{i}", c.decoder_num_heads)
    full = _ln(full, P, "decoder_norm", 1e-6)
    h = F.layer_norm(F.gelu(F.linear(full, P["mlm_layer.fc.weight"], P["mlm_layer.fc.bias"])), (x.shape[-1],),
                     P["mlm_layer.ln.weight"], P["mlm_layer.ln.bias"], 1e-5)
    return h @ P["token_emb.word_embeddings.weight"].detach().T + P["mlm_layer.bias"]


def plan(B, num_masked, num_dropped, seed=0):
    noise = torch.rand(B, L_TINY, generator=torch.Generator().manual_seed(seed))
    return mage_kernels.mask_plan(noise, num_masked, num_dropped)


# ------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("ctor, D, depth, total", [
    (mage.mage_vit_base_patch16, 768, 12, 200_990_061),
    (mage.mage_vit_large_patch16, 1024, 24, 464_407_405),
])
def test_official_sizes_match_the_checkpoint_table(ctor, D, depth, total):
    with torch.device("meta"):
        m = ctor()
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == official_mage_shapes(D, depth, D)
    assert round(num_params(m) / 1e5) == round(total / 1e5)  # 201.0 M / 464.4 M (section 4.11)
    c = m.config
    assert (c.vocab_size, c.mask_id, c.cls_id) == (2025, 2024, 1100)
    assert m.blocks[0].attn.num_heads == D // 64 and m.decoder_blocks[0].attn.num_heads == 16
    assert m.state_dict()["token_emb.position_ids"].dtype == torch.long


@pytest.mark.parametrize("D, depth", [(768, 12), (1024, 24)])
def test_official_layout_state_dict_loads_strictly_and_round_trips(D, depth):
    sd = meta_state_dict(official_mage_shapes(D, depth, D))
    m = mage.load_official(sd)
    assert m.load_report.ok and m.load_report.loaded == len(sd) and not m.load_report.extra
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert (m.config.embed_dim, m.config.depth, m.config.num_heads) == (D, depth, D // 64)


def test_unused_parameters_are_frozen_and_tokenizer_too():
    with torch.device("meta"):
        m = mage.mage_vit_base_patch16()
    dead = {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"}
    dead_modules = ("patch_embed.", "decoder_pred.", "vqgan.")
    for name, p in m.named_parameters():
        assert p.requires_grad == (name not in dead and not name.startswith(dead_modules)), name


def test_compact_vocabulary():
    c = tiny_config()
    assert (c.vocab_size, c.cls_id, c.mask_id) == (66, 64, 65)
    m = mage.MAGE(c)
    assert m.mlm_layer.bias.shape == (1, 1, 66) and not hasattr(m, "cls_token")


def test_head_layernorm_eps_and_block_eps(model):
    assert model.mlm_layer.ln.eps == 1e-5
    eps = {m.eps for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm) and name != "mlm_layer.ln"}
    assert eps == {1e-6}


# ------------------------------------------------------------------------------------ checkpoints


def test_key_report_names_missing_unexpected_and_mismatched():
    shapes = official_mage_shapes(768, 12, 768)
    sd = meta_state_dict(shapes)
    del sd["token_emb.position_ids"]
    sd["blocks.12.norm1.weight"] = torch.empty(768, device="meta")
    sd["mlm_layer.bias"] = torch.empty(1, 1, 2024, device="meta")
    with pytest.raises(mage.CheckpointError) as err:
        mage.load_official(sd, config=mage.MAGEConfig())  # the defaults are ViT-B
    msg = str(err.value)
    assert "token_emb.position_ids" in msg and "blocks.12.norm1.weight" in msg and "[1, 1, 2024] vs [1, 1, 2025]" in msg


def test_mage_c_extra_modules_are_accepted_and_reported():
    sd = meta_state_dict(official_mage_shapes(768, 12, 768))
    sd["projector.0.weight"] = torch.empty(2048, 768, device="meta")
    sd["projector.2.weight"] = torch.empty(256, 2048, device="meta")
    with pytest.warns(UserWarning, match="projector"):
        m = mage.load_official(sd)
    assert m.load_report.extra == ["projector.0.weight", "projector.2.weight"]
    assert "projector.{0..2}.weight (2)" in str(m.load_report)


def test_official_pth_file_loads_weights_only(tmp_path):
    cfg = tiny_config(vocab="official", legacy_params=True)
    src = randomized(mage.MAGE(cfg))
    path = tmp_path / "checkpoint-1.pth"
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(model="tiny", lr=1e-3), "epoch": 3}, path)
    m = mage.load_official(path, config=cfg).eval()
    ids = torch.randint(0, 64, (2, L_TINY))
    assert torch.equal(m(ids), src(ids))
    assert m.token_emb.word_embeddings.weight.requires_grad and not m.cls_token.requires_grad


class NotAWeight:  # a pickled object that weights-only loading must refuse
    pass


def test_pth_with_arbitrary_objects_is_refused_unless_trusted(tmp_path):
    cfg = tiny_config(vocab="official", legacy_params=True)
    path = tmp_path / "odd.pth"
    torch.save({"model": mage.MAGE(cfg).state_dict(), "extra": NotAWeight()}, path)
    with pytest.raises(mage.CheckpointError, match="trusted=True"):
        mage.load_official(path, config=cfg)
    assert isinstance(mage.load_official(path, config=cfg, trusted=True), mage.MAGE)


def test_safetensors_save_load_round_trip(model, tmp_path):
    path = tmp_path / "m.safetensors"
    model.save(path)
    loaded = mage.load(path).eval()
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(mage.CheckpointError, match="load_official"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
        mage.load(tmp_path / "other.safetensors")


@pytest.mark.slow
def test_official_vit_b_real_weights_round_trip(tmp_path):
    src = randomized(mage.mage_vit_base_patch16())
    path = tmp_path / "b.pth"
    torch.save({"model": src.state_dict()}, path)
    m = mage.load_official(path)
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


# ------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("num_masked, num_dropped", [(0, 0), (40, 0), (40, 20), (64, 32), (64, 64)])
def test_forward_matches_the_published_model(model, num_masked, num_dropped):
    masked, dropped, keep_idx = plan(3, num_masked, num_dropped)
    ids = torch.randint(0, 64, (3, L_TINY), generator=torch.Generator().manual_seed(1))
    expected = reference_logits(model, ids, masked, dropped)
    with torch.no_grad():
        assert_close(model(ids, mask=masked, drop=dropped), expected)
        assert_close(model(ids, mask=masked, keep_idx=keep_idx), expected)
        logits = model(ids, mask=masked, drop=dropped)
    assert logits.shape == (3, 1 + L_TINY, 66)


def test_forward_without_masks_and_features(model):
    ids = torch.randint(0, 64, (2, L_TINY))
    with torch.no_grad():
        assert_close(model(ids), reference_logits(model, ids))
        feats = model.forward_features(ids)
        x = model.token_emb(torch.cat([torch.full((2, 1), model.config.cls_id), ids], 1))
        for blk in model.blocks:
            x = blk(x)
    assert feats.shape == (2, 64)
    assert_close(feats, x[:, 1:].mean(1))


def test_dropped_and_masked_tokens_cannot_influence_logits(model):
    masked, dropped, _ = plan(2, 40, 20)
    ids = torch.randint(0, 64, (2, L_TINY))
    other = torch.where(masked, torch.randint(0, 66, (2, L_TINY)), ids)
    with torch.no_grad():
        assert torch.equal(model(ids, mask=masked, drop=dropped), model(other, mask=masked, drop=dropped))
        visible = (~masked).nonzero()[0]
        changed = ids.clone()
        changed[visible[0], visible[1]] = (ids[visible[0], visible[1]] + 1) % 64
        assert not torch.equal(model(ids, mask=masked, drop=dropped), model(changed, mask=masked, drop=dropped))


def test_head_is_tied_to_detached_embeddings(model):
    m = mage.MAGE(tiny_config()).eval()
    m.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, L_TINY))
    all_masked = torch.ones(2, L_TINY, dtype=torch.bool)
    m(ids, mask=all_masked).sum().backward()
    rows = m.token_emb.word_embeddings.weight.grad.abs().sum(1).nonzero().flatten().tolist()
    assert rows == [m.config.cls_id, m.config.mask_id]  # only the input side reaches the table
    assert m.mlm_layer.bias.grad.abs().sum() > 0
    with torch.no_grad():
        w, b = m.head_weight()
        assert_close(m.head_hidden(ids, mask=all_masked) @ w.T + b, m(ids, mask=all_masked))


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_small_model_head_options_train_the_output_table(head):
    """The demo's deviations (docs/TRAINING.md): without the detach the head's gradient reaches the table;
    untied, the head has a table of its own and the input table gets only input-side gradients."""
    m = mage.MAGE(tiny_config(head=head, embed_std=0.5)).eval()
    assert m.token_emb.word_embeddings.weight.std().item() == pytest.approx(0.5, rel=0.1)
    ids = torch.randint(0, 64, (2, L_TINY))
    all_masked = torch.ones(2, L_TINY, dtype=torch.bool)
    m(ids, mask=all_masked).sum().backward()
    table_rows = m.token_emb.word_embeddings.weight.grad.abs().sum(1).nonzero().flatten().tolist()
    w, b = m.head_weight()
    if head == "tied":
        assert w is m.token_emb.word_embeddings.weight and len(table_rows) == m.config.vocab_size
    else:
        assert w is m.mlm_layer.weight and tuple(w.shape) == (m.config.vocab_size, m.config.embed_dim)
        assert table_rows == [m.config.cls_id, m.config.mask_id]
        assert m.mlm_layer.weight.grad.abs().sum() > 0
        assert "mlm_layer.weight" in m.state_dict()
    with torch.no_grad():
        assert_close(m.head_hidden(ids, mask=all_masked) @ w.T + b, m(ids, mask=all_masked))


def test_head_options_default_to_the_reference_and_are_checked():
    c = mage.MAGEConfig()
    assert (c.head, c.embed_std) == ("tied-detached", 0.02)
    assert "mlm_layer.weight" not in mage.MAGE(tiny_config()).state_dict()  # official layouts are unchanged
    with pytest.raises(ValueError, match="head"):
        tiny_config(head="shared")
    with pytest.raises(ValueError, match="embed_std"):
        tiny_config(embed_std=0.0)


def test_untied_model_round_trips_through_safetensors(tmp_path):
    m = randomized(mage.MAGE(tiny_config(head="untied")))
    m.save(tmp_path / "u.safetensors")
    loaded = mage.load(tmp_path / "u.safetensors").eval()
    assert loaded.config.head == "untied"
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_bf16_autocast_and_fp32_attention(model):
    masked, dropped, _ = plan(2, 40, 20)
    ids = torch.randint(0, 64, (2, L_TINY))
    with torch.no_grad():
        ref = model(ids, mask=masked, drop=dropped)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids, mask=masked, drop=dropped)
        fp32_attn = mage.MAGE(tiny_config(fp32_attention=True)).eval()
        fp32_attn.load_state_dict(model.state_dict())
        assert torch.equal(fp32_attn(ids, mask=masked, drop=dropped), ref)  # no autocast: identical
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low32 = fp32_attn(ids, mask=masked, drop=dropped)
    assert low.dtype == torch.bfloat16 and low32.dtype == torch.bfloat16
    scale = ref.abs().max()
    for out in (low, low32):
        assert (out.float() - ref).abs().max() < 0.1 * scale


def test_compiled_forward_fullgraph(model):
    masked, _, keep_idx = plan(2, 40, 20)
    ids = torch.randint(0, 64, (2, L_TINY))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(ids, mask=masked, keep_idx=keep_idx), model(ids, mask=masked, keep_idx=keep_idx))


def test_training_mode_uses_dropout(model):
    m = mage.MAGE(tiny_config())
    m.load_state_dict(model.state_dict())
    m.train()
    ids = torch.randint(0, 64, (2, L_TINY))
    torch.manual_seed(0)
    a = m(ids)
    torch.manual_seed(1)
    assert not torch.equal(a, m(ids))


def test_bad_inputs_raise_clear_errors(model):
    ids = torch.randint(0, 64, (2, L_TINY))
    mask = torch.zeros(2, L_TINY, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\[B, 64\]"):
        model(ids[:, :10])
    with pytest.raises(TypeError, match="int64"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"\[0, 66\)"):
        model(torch.full((2, L_TINY), 66))
    with pytest.raises(ValueError, match="shape of ids"):
        model(ids, mask=mask[:1])
    with pytest.raises(TypeError, match="bool"):
        model(ids, mask=mask.long())
    uneven = mask.clone()
    uneven[0, :3] = True
    with pytest.raises(ValueError, match="same number"):
        model(ids, mask=uneven, drop=uneven)
    with pytest.raises(ValueError, match="either drop"):
        model(ids, mask=mask, drop=mask, keep_idx=torch.zeros(2, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(num_heads=3)

