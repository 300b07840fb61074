"""MAGE: a masked generative encoder over VQGAN tokens (Li et al., CVPR 2023; docs/REFERENCE.md section 4).

One ViT encoder-decoder does both jobs. An image becomes L = 256 tokens; some are replaced by [MASK],
some of those are dropped; the encoder sees the class slot [C0] and the kept tokens; the decoder sees
every position, with each masked or dropped one filled by the image's own class feature [C]; a head
tied to the input embedding predicts the token at every position. At a high mask ratio this is a
generator (section 5), at a low one a representation learner (section 6).

The forward is functional: the caller chooses which tokens are masked and dropped (training policy,
sampling, inpainting), `logits = model(ids, mask=masked, drop=dropped)`. Module and parameter names
follow the reference (section 4.11), including its unused parameters, so official checkpoints load
strictly (`mage.load_official`).
"""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn as nn
import torch.nn.functional as F

import mage_kernels

from ._checks import InputTypeError, InputValueError, check_config, check_ids
from .checkpoint_io import MODEL_FORMAT, save_safetensors
from .hub import HubMixin
from .tokenizer import TokenizerConfig, VQGANTokenizer

# MaskGIT's class-conditional layout, kept by the released weights (section 4.2): K codes, 1000 class
# rows, [MASK] last; the fake class [C0] is class 76 (id 1100 for K = 1024).
_NUM_CLASS_ROWS = 1000
_FAKE_CLASS = 76
HEADS = ("tied-detached", "tied", "untied")


@dataclasses.dataclass
class MAGEConfig:
    """Sizes and constants of one MAGE model. Defaults: ViT-B (section 4.1) with the official tokenizer.

    vocab:
        "official": K + 1000 + 1 rows, [C0] = K + 76, [MASK] = K + 1000 (2025 / 1100 / 2024 for K =
            1024); needed to load the released checkpoints.
        "compact": K + 2 rows, [C0] = K, [MASK] = K + 1 (the author's note in issue #53: the class
            rows are legacy); for models trained here.
    legacy_params: keep the reference's unused parameters (`cls_token`, `pos_embed`, `mask_token`,
        `decoder_pos_embed`, `patch_embed`, `decoder_pred`) so official state dicts load strictly. They
        never take part in the forward, are left zero and have requires_grad=False.
    fp32_attention: compute the attention scores, softmax and attention-value product in fp32 even
        under autocast, as the reference does for q.k (section 4.9; issue #26: fp16 ViT-L overflowed).
    head: the output layer (section 4.6).
        "tied-detached" (the reference): logits against the word-embedding table, detached, so the head
            never trains the table.
        "tied": the same table without the detach (MaskGIT's head): the head's gradient also trains it.
        "untied": a table of its own, `mlm_layer.weight` [V, D].
        The reference's head starts with very flat logits (0.02-scale rows): a small model trained for a
        few thousand steps sits at the token-frequency entropy for hundreds of them. The demo deviates
        here (docs/TRAINING.md); official sizes and checkpoints keep the reference.
    embed_std: std of the normal init of the word and position tables (the reference: 0.02, section 4.8).
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.1  # embedding, attention probabilities, projections and MLP (section 4.1)
    norm_eps: float = 1e-6
    head_norm_eps: float = 1e-5  # mlm_layer.ln keeps PyTorch's default eps (section 4.6)
    vocab: str = "official"
    legacy_params: bool = True
    fp32_attention: bool = False
    head: str = "tied-detached"
    embed_std: float = 0.02
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)

    def __post_init__(self):
        if isinstance(self.tokenizer, dict):
            self.tokenizer = TokenizerConfig(**self.tokenizer)
        if not isinstance(self.tokenizer, TokenizerConfig):
            raise InputTypeError(f"MAGEConfig: tokenizer must be a TokenizerConfig or dict, got "
                                 f"{type(self.tokenizer).__name__}")
        check_config(self)
        if self.vocab not in ("official", "compact"):
            raise InputValueError(f"MAGEConfig.vocab must be 'official' or 'compact', got {self.vocab!r}")
        if self.head not in HEADS:
            raise InputValueError(f"MAGEConfig.head must be one of {HEADS}, got {self.head!r}")
        sizes = ((self.embed_dim, self.num_heads, ""), (self.decoder_embed_dim, self.decoder_num_heads, "decoder_"))
        for dim, heads, name in sizes:
            if dim % heads != 0:
                raise InputValueError(f"MAGEConfig: {name}embed_dim={dim} is not divisible by {name}num_heads={heads}")

    @property
    def codebook_size(self) -> int:
        return self.tokenizer.n_embed

    @property
    def vocab_size(self) -> int:
        extra = _NUM_CLASS_ROWS + 1 if self.vocab == "official" else 2
        return self.codebook_size + extra

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1

    @property
    def cls_id(self) -> int:
        return self.codebook_size + (_FAKE_CLASS if self.vocab == "official" else 0)

    @property
    def num_tokens(self) -> int:
        return self.tokenizer.num_tokens

    @property
    def patch_size(self) -> int:
        """Side of the image patch one token stands for (the unused `patch_embed` is built with it)."""
        return self.tokenizer.downsample

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MAGEConfig":
        return cls(**d)


class TokenEmbedding(nn.Module):
    """BERT-style input embedding, attribute `token_emb` (section 4.3): word + learned position,
    LayerNorm, dropout. `position_ids` is a persistent buffer because official files carry it."""

    def __init__(self, vocab_size: int, dim: int, seq_len: int, eps: float, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(seq_len, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("position_ids", torch.arange(seq_len).unsqueeze(0), persistent=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids) + self.position_embeddings(self.position_ids[:, : ids.shape[1]])
        return self.dropout(self.LayerNorm(x))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float, fp32: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = dropout
        self.proj_drop = nn.Dropout(dropout)
        self.fp32 = fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, N, Dh) each
        p = self.attn_drop if self.training else 0.0
        if self.fp32:
            with torch.autocast(x.device.type, enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=p).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LN ViT block (section 4.9): x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float, eps: float, fp32_attention: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, dropout, fp32_attention)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MlmLayer(nn.Module):
    """BERT/MaskGIT prediction head (section 4.6): Linear -> exact GELU -> LayerNorm(eps 1e-5), then
    logits against the input embedding table (or, untied, its own `weight` [V, D]) plus `bias` [1, 1, V]
    (applied by the caller, see `MAGE.head_weight`)."""

    def __init__(self, decoder_dim: int, dim: int, vocab_size: int, eps: float, untied: bool = False):
        super().__init__()
        self.fc = nn.Linear(decoder_dim, dim)
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab_size))
        if untied:
            self.weight = nn.Parameter(torch.zeros(vocab_size, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(F.gelu(self.fc(x)))


class MAGE(nn.Module, HubMixin):
    """The MAGE encoder-decoder with its frozen tokenizer (`vqgan`). See `forward` for the contract.

    Files: `save(path)` / `mage.load(path)` (one safetensors file), `save_pretrained(dir)` /
    `MAGE.from_pretrained(dir)` (config.json + model.safetensors; with huggingface_hub installed also
    `push_to_hub` and Hub repository ids), `mage.load_official` for the released .pth files.
    """

    def __init__(self, config: MAGEConfig | None = None):
        super().__init__()
        self.config = c = config or MAGEConfig()
        L, D, Dd = c.num_tokens, c.embed_dim, c.decoder_embed_dim

        if c.legacy_params:
            dead = dict(requires_grad=False)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, D), **dead)
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + L, D), **dead)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, D), **dead)
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + L, Dd), **dead)
            self.patch_embed = nn.Module()
            self.patch_embed.proj = nn.Conv2d(c.tokenizer.in_channels, D, c.patch_size, c.patch_size)
            self.decoder_pred = nn.Linear(Dd, c.patch_size**2 * c.tokenizer.in_channels)
            for p in (*self.patch_embed.parameters(), *self.decoder_pred.parameters()):
                p.requires_grad_(False)

        self.token_emb = TokenEmbedding(c.vocab_size, D, 1 + L, c.norm_eps, c.dropout)
        self.blocks = nn.ModuleList(
            Block(D, c.num_heads, c.mlp_ratio, c.dropout, c.norm_eps, c.fp32_attention) for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(D, eps=c.norm_eps)

        self.decoder_embed = nn.Linear(D, Dd)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, 1 + L, Dd))
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, c.decoder_num_heads, c.mlp_ratio, c.dropout, c.norm_eps, c.fp32_attention)
            for _ in range(c.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(Dd, eps=c.norm_eps)
        self.mlm_layer = MlmLayer(Dd, D, c.vocab_size, c.head_norm_eps, untied=c.head == "untied")

        self.vqgan = VQGANTokenizer(c.tokenizer)
        self.vqgan.requires_grad_(False)
        self.init_weights()

    def init_weights(self) -> None:
        """Section 4.8: tables and the learned decoder positions normal(0.02), Linear xavier-uniform with
        zero bias, LayerNorm (1, 0), head bias 0. The tokenizer is left alone (it is loaded, not trained here).
        `embed_std` replaces the tables' 0.02; an untied head table is initialised like the word table."""
        if self.mlm_layer.bias.is_meta:
            return
        std = self.config.embed_std
        nn.init.normal_(self.token_emb.word_embeddings.weight, std=std)
        nn.init.normal_(self.token_emb.position_embeddings.weight, std=std)
        if self.config.head == "untied":
            nn.init.normal_(self.mlm_layer.weight, std=std)
        nn.init.normal_(self.decoder_pos_embed_learned, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("vqgan") or name.startswith("decoder_pred"):
                continue
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.mlm_layer.bias)
        if self.config.legacy_params:
            for p in (*self.patch_embed.parameters(), *self.decoder_pred.parameters()):
                nn.init.zeros_(p)

    @property
    def tokenizer(self) -> VQGANTokenizer:
        return self.vqgan

    @property
    def device(self) -> torch.device:
        return self.token_emb.word_embeddings.weight.device

    # ------------------------------------------------------------------------------------ checks

    def _check_inputs(self, ids: torch.Tensor, mask: torch.Tensor | None, name_ids: str = "ids") -> None:
        check_ids(self.config, ids, mask, name_ids)

    def keep_index(self, drop: torch.Tensor) -> torch.Tensor:
        """Bool drop mask [B, L] with the same count D in every row -> kept positions [B, L-D], ascending.

        Reads D from the mask (a host sync on GPU); sync-free callers pass `keep_idx` from
        `mage_kernels.mask_plan` instead.
        """
        L = self.config.num_tokens
        if not isinstance(drop, torch.Tensor) or drop.dtype != torch.bool or drop.dim() != 2 or drop.shape[1] != L:
            desc = f"{drop.dtype} {tuple(drop.shape)}" if isinstance(drop, torch.Tensor) else type(drop).__name__
            raise InputValueError(f"MAGE: drop must be a bool tensor [B, {L}], got {desc}")
        counts = drop.sum(1)
        if drop.shape[0] and not bool((counts == counts[0]).all()):
            raise InputValueError("MAGE: every row of drop must drop the same number of tokens (static encoder "
                                  f"length), got counts {counts.tolist()}")
        num_kept = L - (int(counts[0]) if drop.shape[0] else 0)
        # A stable sort of the 0/1 flags puts kept positions first, in ascending order.
        return torch.sort(drop.to(torch.uint8), dim=1, stable=True).indices[:, :num_kept]

    # ------------------------------------------------------------------------------------ forward

    def forward_encoder(
        self, ids: torch.Tensor, mask: torch.Tensor | None = None, keep_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ids [B, L] -> encoder output [B, 1+Lk, D] (after `norm`): slot 0 is the class slot [C0]."""
        c = self.config
        if mask is not None:
            ids = torch.where(mask, c.mask_id, ids)
        ids = torch.cat([ids.new_full((ids.shape[0], 1), c.cls_id), ids], dim=1)  # (B, 1+L)
        x = self.token_emb(ids)  # (B, 1+L, D): embed everything, then drop (section 4.4 step 7)
        if keep_idx is not None:
            x = mage_kernels.gather_keep(x, keep_idx)  # (B, 1+Lk, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, keep_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encoder output [B, 1+Lk, D] -> decoder output [B, 1+L, Dd] (after `decoder_norm`).

        Every masked or dropped position is filled with the projected class feature [C] (section 4.5),
        then the learned decoder position embedding is added; `pad_with_cls` does both in one pass.
        """
        y = self.decoder_embed(x)  # (B, 1+Lk, Dd)
        B, L = y.shape[0], self.config.num_tokens
        if keep_idx is None and mask is None:
            z = y + self.decoder_pos_embed_learned.to(y.dtype)
        else:
            if keep_idx is None:
                keep_idx = torch.arange(L, device=y.device).expand(B, L).contiguous()
            if mask is None:
                mask = torch.zeros(B, L, dtype=torch.bool, device=y.device)
            z = mage_kernels.pad_with_cls(y, keep_idx, mask, pos_embed=self.decoder_pos_embed_learned)  # (B, 1+L, Dd)
        for blk in self.decoder_blocks:
            z = blk(z)
        return self.decoder_norm(z)

    def head_hidden(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
        *,
        keep_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The head's hidden states [B, 1+L, D], i.e. `forward` without the final product with the
        vocabulary: logits = hidden @ W.T + b with (W, b) = `head_weight()`. Lets a loss take only the
        masked rows, and the sampler fuse the product into `remask_step_from_hidden`."""
        self._check_inputs(ids, mask)
        if drop is not None:
            if keep_idx is not None:
                raise InputValueError("MAGE: pass either drop (a bool mask) or keep_idx (kept positions), not both")
            keep_idx = self.keep_index(drop)
        x = self.forward_encoder(ids, mask, keep_idx)
        return self.mlm_layer(self.forward_decoder(x, mask, keep_idx))

    def head_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [V, D], b [V]) of the output layer and `mlm_layer.bias`. W is the word-embedding table,
        detached as in the reference (the head never trains the table, section 4.6), unless config.head
        says otherwise (see `MAGEConfig`)."""
        head = self.config.head
        if head == "untied":
            weight = self.mlm_layer.weight
        else:
            weight = self.token_emb.word_embeddings.weight
            weight = weight.detach() if head == "tied-detached" else weight
        return weight, self.mlm_layer.bias.view(-1)

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
        *,
        keep_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of every position, class slot first, exactly as the reference computes them.

        Args:
            ids: int64 [B, L] token ids (values at masked positions are ignored: they become [MASK]).
            mask: bool [B, L], True = masked (input [MASK], decoder input [C]). None: nothing masked.
            drop: bool [B, L], True = removed before the encoder (the reference drops a subset of the
                masked tokens; a dropped token is treated as masked either way). Every row must drop
                the same number. None: nothing dropped, as at sampling. Reading the count costs one
                host sync on GPU; pass `keep_idx` from `mage_kernels.mask_plan` to avoid it.
            keep_idx: int64 [B, Lk] kept positions, ascending (alternative to drop).

        Returns:
            logits [B, 1+L, V] (V = config.vocab_size; the first K columns are the codebook).
        """
        hidden = self.head_hidden(ids, mask, drop, keep_idx=keep_idx)  # (B, 1+L, D)
        weight, bias = self.head_weight()
        return F.linear(hidden, weight, bias)  # (B, 1+L, V)

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Representation [B, D]: the mean of the L token outputs of the encoder blocks, no masking
        (section 6, `global_pool`); the final `norm` is not applied, since the probe puts its own fresh
        LayerNorm (`fc_norm`) on this feature."""
        self._check_inputs(ids, None)
        c = self.config
        ids = torch.cat([ids.new_full((ids.shape[0], 1), c.cls_id), ids], dim=1)
        x = self.token_emb(ids)
        for blk in self.blocks:
            x = blk(x)
        return x[:, 1:].mean(dim=1)

    def save(self, path: str) -> None:
        """Write weights and config to one safetensors file, atomically (`mage.load(path)` reads it back)."""
        save_safetensors(self.state_dict(), {"format": MODEL_FORMAT, "config": json.dumps(self.config.to_dict())}, path)

    def _config_dict(self) -> dict:
        return self.config.to_dict()

    @classmethod
    def _config_from_dict(cls, d: dict) -> MAGEConfig:
        return MAGEConfig.from_dict(d)


# ------------------------------------------------------------------------------------ named sizes

# MAGEConfig fields of each named size (the constructors below); overrides replace them.
SIZES = {
    "mage_vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=192, decoder_depth=4,
                          decoder_num_heads=3, vocab="compact", legacy_params=False),
    "mage_vit_small": dict(embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=384, decoder_depth=4,
                           decoder_num_heads=6, vocab="compact", legacy_params=False),
    "mage_vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=768, decoder_depth=8,
                                  decoder_num_heads=16),
    "mage_vit_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=1024, decoder_depth=8,
                                   decoder_num_heads=16),
    "mage_vit_huge_patch16": dict(embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=1280, decoder_depth=8,
                                  decoder_num_heads=16),
}


def named_config(name: str, **overrides) -> MAGEConfig:
    """The MAGEConfig of a named size (a key of SIZES) with MAGEConfig fields in `overrides` replacing its own:
    checked without building anything."""
    return MAGEConfig(**{**SIZES[name], **overrides})


def mage_vit_tiny(**overrides) -> MAGE:
    """ViT-Ti encoder (192/12/3) and a 4-block decoder; compact vocabulary, no legacy parameters.
    Not an official size: for CPU experiments (override `tokenizer` for small images)."""
    return MAGE(named_config("mage_vit_tiny", **overrides))


def mage_vit_small(**overrides) -> MAGE:
    """ViT-S encoder (384/12/6) and a 4-block decoder; compact vocabulary, no legacy parameters."""
    return MAGE(named_config("mage_vit_small", **overrides))


def mage_vit_base_patch16(**overrides) -> MAGE:
    """The released ViT-B: encoder 768/12/12, decoder 768/8/16 (section 4.1)."""
    return MAGE(named_config("mage_vit_base_patch16", **overrides))


def mage_vit_large_patch16(**overrides) -> MAGE:
    """The released ViT-L: encoder 1024/24/16, decoder 1024/8/16 (section 4.1)."""
    return MAGE(named_config("mage_vit_large_patch16", **overrides))


def mage_vit_huge_patch16(**overrides) -> MAGE:
    """ViT-H of the RCG fork: encoder 1280/32/16, decoder 1280/8/16 (section 4.1)."""
    return MAGE(named_config("mage_vit_huge_patch16", **overrides))


CONSTRUCTORS = {
    "mage_vit_tiny": mage_vit_tiny,
    "mage_vit_small": mage_vit_small,
    "mage_vit_base_patch16": mage_vit_base_patch16,
    "mage_vit_large_patch16": mage_vit_large_patch16,
    "mage_vit_huge_patch16": mage_vit_huge_patch16,
}


def num_params(module: nn.Module) -> int:
    """Element count of the whole state dict (parameters and buffers), the way section 4.11 counts."""
    return sum(t.numel() for t in module.state_dict().values())
