"""Drop-in modules on the fused ops.

`VectorQuantize` has the constructor, forward and state-dict layout of the core `VectorQuantize` layer of
vector-quantize-pytorch (the most used VQ layer in PyTorch), computed by `vq_quantize` (docs/OPS.md
op 1): the nearest code of every vector is found exactly, without the [N, K] distance matrix, and the
per-code counts the op returns drive the EMA codebook update and dead-code replacement. docs/OPS.md
("VectorQuantize") lists the supported options and every difference from that layer.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import reference
from ._checks import InputTypeError, InputValueError, check_bool, check_int, check_real, check_tensor
from .vq import vq_nearest, vq_quantize

# Usage decay for dead-code detection when the codebook is learned by gradient (decay=None):
# vector-quantize-pytorch tracks usage with its default decay, 0.8, in that mode too.
USAGE_DECAY = 0.8


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sample_rows(rows: torch.Tensor, num: int) -> torch.Tensor:
    """`num` rows of `rows` [M, D]: distinct ones when M >= num (a random permutation's prefix), else drawn
    with replacement. Uses the default generator of rows' device, as vector-quantize-pytorch does."""
    m = rows.shape[0]
    if m >= num:
        pick = torch.randperm(m, device=rows.device)[:num]
    else:
        pick = torch.randint(0, m, (num,), device=rows.device)
    return rows[pick]


def _broadcast_from_rank0(t: torch.Tensor, sync: bool) -> torch.Tensor:
    if sync:
        dist.broadcast(t, src=0)
    return t


def _all_reduce(t: torch.Tensor, sync: bool) -> torch.Tensor:
    if sync:
        dist.all_reduce(t)
    return t


def kmeans(
    rows: torch.Tensor, num_clusters: int, num_iters: int = 10, *, sync: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on rows [M, D] (float32): (means [K, D], counts [K] of the last assignment).

    Starts from `num_clusters` rows sampled as `_sample_rows` (on rank 0 and broadcast when `sync`);
    each iteration assigns every row to its exact nearest mean (`vq_nearest`) and moves each mean to
    the average of its rows, summed over all ranks when `sync`; a mean with no rows stays where it is.
    """
    if rows.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(torch.isfinite(rows).all()):
        raise InputValueError(f"kmeans: rows has {int((~torch.isfinite(rows)).sum())} non-finite value(s) (NaN or "
                              f"inf); k-means needs finite vectors")
    if sync and dist.get_rank() != 0:
        means = rows.new_empty(num_clusters, rows.shape[1])
    else:
        means = _sample_rows(rows, num_clusters)
    means = _broadcast_from_rank0(means.contiguous(), sync)
    counts = rows.new_zeros(num_clusters)
    for _ in range(num_iters):
        idx, _ = vq_nearest(rows, means)
        counts = _all_reduce(torch.bincount(idx, minlength=num_clusters).to(rows.dtype), sync)
        sums = _all_reduce(rows.new_zeros(num_clusters, rows.shape[1]).index_add_(0, idx, rows), sync)
        means = torch.where((counts == 0)[:, None], means, sums / counts.clamp_min(1)[:, None])
    return means, counts


def _rotate_to(src: torch.Tensor, tgt: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation Trick",
    sec. 4.2): a value equal to tgt, whose gradient to src is the rotation of src's direction onto tgt's,
    scaled by |tgt| / |src|, applied to the incoming gradient (rows along the last dim; tgt is constant)."""
    n_src = src.norm(dim=-1, keepdim=True)
    n_tgt = tgt.norm(dim=-1, keepdim=True)
    u = (src / n_src.clamp_min(eps)).detach()
    q = tgt / n_tgt.clamp_min(eps)
    w = F.normalize(u + q, dim=-1, eps=eps)
    e = src
    rotated = e - 2 * (e * w).sum(-1, keepdim=True) * w + 2 * (e * u).sum(-1, keepdim=True) * q
    return rotated * (n_tgt / n_src.clamp_min(eps)).detach()


class _Codebook(nn.Module):
    """The codebook state, under vector-quantize-pytorch's names and shapes (one codebook):
    `embed` [1, K, D] (a Parameter when learned by gradient), `embed_avg` [1, K, D] (EMA of the sum of
    the vectors assigned to each code), `cluster_size` [1, K] (EMA of the counts), `initted`."""

    def __init__(self, dim: int, codebook_size: int, *, kmeans_init: bool, learnable: bool):
        super().__init__()
        if kmeans_init:
            embed = torch.zeros(1, codebook_size, dim)
        else:
            embed = torch.empty(1, codebook_size, dim)
            nn.init.kaiming_uniform_(embed)  # the same draw as vector-quantize-pytorch's uniform_init
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(1, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        if learnable:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)


class VectorQuantize(nn.Module):
    """Vector quantization layer: `quantized, indices, loss = vq(x)` (van den Oord et al. 2017, "Neural
    Discrete Representation Learning"; EMA updates from its appendix A.1).

    The interface of vector-quantize-pytorch's `VectorQuantize` for its core options, on the fused
    `vq_quantize` op: exact nearest code (ties to the lowest index), no [N, K] distance matrix.

    Args:
        dim: feature size of x.
        codebook_size: number of codes K.
        codebook_dim: code size; if it differs from dim, x is projected in and out by Linear layers.
        commitment_weight: weight of the commitment term mean((x - sg(code))^2), which pulls x to its code.
        codebook_weight: weight of the codebook term mean((sg(x) - code)^2) when the codebook is learned by
            gradient (decay=None); with EMA updates the codebook gets no gradient and this is unused.
        decay: None: the codebook is an nn.Parameter learned by the loss (VQ-VAE). A float in [0, 1): the
            codebook is a buffer updated by exponential moving averages of the assigned vectors (EMA
            VQ-VAE), as vector-quantize-pytorch does (its default is 0.8).
        eps: Laplace smoothing of the EMA counts.
        kmeans_init: initialise the codebook by k-means on the first batch seen (`kmeans_iters` rounds).
        threshold_ema_dead_code: a code whose EMA usage falls below this is replaced by a random vector of
            the current batch (its EMA count reset to the threshold). 0 disables it.
        channel_last: x is [B, N, dim] (True) or [B, dim, N] (False).
        accept_image_fmap: x is an image feature map [B, dim, H, W] (read in place); indices are [B, H, W].
        rotation_trick: pass gradients to x by the rotation trick instead of the straight-through
            estimator (vector-quantize-pytorch's default for dim > 1 since 1.20; ours is straight-through).
        sync_codebook: all-reduce the counts and sums of the EMA update, the k-means statistics and the
            dead-code replacements across DDP ranks, so every rank keeps the same codebook. Default: on
            when torch.distributed is initialised with more than one process.

    forward(x) returns (quantized like x, indices int64, loss scalar). In training mode: quantized carries
    the straight-through (or rotation) gradient, loss = commitment_weight * commitment term (+
    codebook_weight * codebook term when learned by gradient), and the codebook state is updated. In eval
    mode: quantized is the codes themselves, loss is 0, nothing is updated (as vector-quantize-pytorch).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        codebook_dim: int | None = None,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        decay: float | None = None,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        rotation_trick: bool = False,
        sync_codebook: bool | None = None,
    ):
        super().__init__()
        op = "VectorQuantize"
        for name, value in (("dim", dim), ("codebook_size", codebook_size), ("kmeans_iters", kmeans_iters)):
            check_int(op, name, value, 1)
        if codebook_dim is not None:
            check_int(op, "codebook_dim", codebook_dim, 1)
        if decay is not None:
            decay = check_real(op, "decay", decay, 0.0, 1.0)
            if decay == 1.0:
                raise InputValueError(f"{op}: decay must be None (codebook learned by gradient) or in [0, 1), got "
                                      f"{decay}")
        for name, value in (("commitment_weight", commitment_weight), ("codebook_weight", codebook_weight),
                            ("threshold_ema_dead_code", threshold_ema_dead_code), ("eps", eps)):
            check_real(op, name, value, 0.0)
        for name, value in (("kmeans_init", kmeans_init), ("channel_last", channel_last),
                            ("accept_image_fmap", accept_image_fmap), ("rotation_trick", rotation_trick)):
            check_bool(op, name, value)
        if sync_codebook is not None:
            check_bool(op, "sync_codebook", sync_codebook)
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim or dim
        self.commitment_weight = float(commitment_weight)
        self.codebook_weight = float(codebook_weight)
        self.decay = decay
        self.eps = eps
        self.kmeans_iters = kmeans_iters
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.channel_last = channel_last
        self.accept_image_fmap = accept_image_fmap
        self.rotation_trick = rotation_trick
        self.sync_codebook = _distributed() if sync_codebook is None else sync_codebook
        self.learnable_codebook = decay is None
        # Created in vector-quantize-pytorch's order, so the same seed gives the same initial weights.
        self.has_projections = self.codebook_dim != dim
        self.project_in = nn.Linear(dim, self.codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, dim) if self.has_projections else nn.Identity()
        self._codebook = _Codebook(self.codebook_dim, codebook_size, kmeans_init=kmeans_init,
                                   learnable=self.learnable_codebook)
        self._check_init = kmeans_init  # host-side flag: skip reading `initted` once it is known true

    # ------------------------------------------------------------------------------------ state

    @property
    def codebook(self) -> torch.Tensor:
        """The codes [K, codebook_dim] (a view of `_codebook.embed`)."""
        return self._codebook.embed[0]

    @codebook.setter
    def codebook(self, codes: torch.Tensor) -> None:
        with torch.no_grad():
            self._codebook.embed.copy_(codes.reshape(self._codebook.embed.shape))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._check_init = True  # a loaded `initted` may be False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        mode = "learned by gradient" if self.decay is None else f"EMA decay {self.decay}"
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
                f"{mode}, commitment_weight={self.commitment_weight}")

    # ------------------------------------------------------------------------------------ layouts

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputTypeError(f"VectorQuantize: x must be a float tensor, got {got}")
        if x.dim() == 2:
            expected, channel = f"[B, {self.dim}]", 1
        elif self.accept_image_fmap:
            expected, channel = f"[B, {self.dim}, H, W] (accept_image_fmap=True)", 1
            if x.dim() != 4:
                channel = None
        elif self.channel_last:
            expected, channel = f"[B, N, {self.dim}] (channel_last=True)", 2 if x.dim() == 3 else None
        else:
            expected, channel = f"[B, {self.dim}, N] (channel_last=False)", 1 if x.dim() == 3 else None
        if channel is None or x.shape[channel] != self.dim:
            raise InputValueError(f"VectorQuantize: x must be {expected} or [B, {self.dim}], got shape {list(x.shape)}")

    def _channel_first(self, x: torch.Tensor) -> bool:
        return x.dim() > 2 and (self.accept_image_fmap or not self.channel_last)

    def _to_codes_space(self, x: torch.Tensor) -> torch.Tensor:
        """x -> z, the op's input: [M, codebook_dim] rows, or a channels-first [B, D, H, W] map read in place."""
        if self.has_projections:
            h = x.movedim(1, -1) if self._channel_first(x) else x
            return self.project_in(h).reshape(-1, self.codebook_dim)
        if x.dim() == 4:
            return x
        if x.dim() == 3 and not self.channel_last:
            return x.unsqueeze(-1)  # [B, D, N, 1]: the op reads channels-first maps without a copy
        return x.reshape(-1, self.dim)

    def _from_codes_space(self, zq: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `_to_codes_space` for the quantized vectors (project_out applied)."""
        if self.has_projections:
            cf = self._channel_first(x)
            lead = x.movedim(1, -1).shape[:-1] if cf else x.shape[:-1]
            out = self.project_out(zq.reshape(*lead, self.codebook_dim))
            return out.movedim(-1, 1) if cf else out
        return zq.reshape(x.shape)

    def _indices_shape(self, x: torch.Tensor) -> tuple:
        if x.dim() == 2:
            return (x.shape[0],)
        if x.dim() == 4:
            return (x.shape[0], x.shape[2], x.shape[3])
        return (x.shape[0], x.shape[1] if self.channel_last else x.shape[2])

    # ------------------------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, N, dim] (channel_last), [B, dim, N], [B, dim, H, W] (accept_image_fmap) or [B, dim] ->
        (quantized like x, indices [B, N] / [B, H, W] / [B], loss scalar)."""
        self._check_input(x)
        z = self._to_codes_space(x)
        self._maybe_kmeans_init(x, z)
        if self.training:
            zq, indices, loss = self._quantize_and_update(x, z)
        else:
            indices, _ = vq_nearest(z, self.codebook, check_finite=False)
            # Index -1 (no nearest code: checked below on CPU; on GPU a check would sync) gives a NaN row,
            # as vq_quantize does, rather than an out-of-range lookup.
            codes = F.embedding(indices.clamp_min(0), self.codebook).to(z.dtype)
            codes = codes.masked_fill((indices < 0).unsqueeze(-1), float("nan"))
            zq = reference.vq_rows_to_layout(codes, z)
            loss = torch.zeros((), device=x.device)
            self._raise_on_invalid(indices, x, z)
        return self._from_codes_space(zq, x), indices.reshape(self._indices_shape(x)), loss

    def _raise_on_invalid(self, indices: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> None:
        """What the ops check on CPU tensors (where it costs no host sync), said in terms of this layer's
        argument x: rows with index -1 have no nearest code."""
        if indices.device.type == "cpu" and not torch.compiler.is_compiling() and bool((indices < 0).any()):
            self._raise_non_finite(x, z)

    def _raise_non_finite(self, x: torch.Tensor, z: torch.Tensor) -> None:
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise InputValueError(f"VectorQuantize: x has {bad} non-finite value(s) (NaN or inf); no nearest code "
                                  "exists for them")
        if not bool(torch.isfinite(z).all()):
            raise InputValueError("VectorQuantize: project_in maps the finite x to non-finite values (its weights are "
                                  "not finite, or the values overflow)")
        raise InputValueError("VectorQuantize: the codebook has no finite code (every code has a NaN or inf entry)")

    def _quantize_and_update(self, x: torch.Tensor, z: torch.Tensor):
        updates = self.decay is not None or self.threshold_ema_dead_code > 0
        # The op keeps the codebook for its backward; the update below writes the codebook in place.
        codebook = self.codebook.clone() if updates else self.codebook
        w_commit, w_code = self.commitment_weight, self.codebook_weight
        if not self.learnable_codebook:
            zq, indices, loss, counts = vq_quantize(z, codebook, beta=0.0, check_finite=False)
            loss = loss * w_commit
        elif w_commit > 0:
            # The op's loss is commit + beta * codebook term; scaled, it is w_commit * commit + w_code * codebook.
            zq, indices, loss, counts = vq_quantize(z, codebook, beta=w_code / w_commit, check_finite=False)
            loss = loss * w_commit
        else:
            # No commitment term: run the op on sg(z) (its loss is then 2x the codebook term in value, all
            # of whose gradient is the codebook term's) and restore the straight-through path to z.
            zq, indices, loss, counts = vq_quantize(z.detach(), codebook, beta=1.0, check_finite=False)
            loss = w_code * (loss - 0.5 * loss.detach())
            zq = zq + (z - z.detach())
        self._raise_on_invalid(indices, x, z)  # before the codebook update
        if self.rotation_trick and z.requires_grad:
            rows = _rotate_to(reference.vq_rows(z), reference.vq_rows(zq).detach())
            zq = reference.vq_rows_to_layout(rows, z)
        if updates:
            with torch.no_grad():
                self._update_codebook(z.detach(), indices, counts)
        return zq, indices, loss

    # ------------------------------------------------------------------------------------ codebook updates

    def _rows(self, z: torch.Tensor) -> torch.Tensor:
        return reference.vq_rows(z).reshape(-1, self.codebook_dim).float()

    def _smoothed_codes(self, embed_avg: torch.Tensor, cluster_size: torch.Tensor) -> torch.Tensor:
        """embed_avg / Laplace-smoothed counts: (n_k + eps) / (n + K eps) * n, n the total count."""
        total = cluster_size.sum(-1, keepdim=True)
        smoothed = (cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        return embed_avg / smoothed[..., None]

    def _maybe_kmeans_init(self, x: torch.Tensor, z: torch.Tensor) -> None:
        if not self._check_init:
            return
        cb = self._codebook
        if bool(cb.initted):
            self._check_init = False
            return
        rows = self._rows(z.detach())
        if not bool(torch.isfinite(rows).all()):  # once, at init (which syncs anyway)
            self._raise_non_finite(x, z)
        if rows.shape[0] < self.codebook_size:
            warnings.warn(f"VectorQuantize: k-means init got {rows.shape[0]} vectors for {self.codebook_size} codes; "
                          "some codes start as duplicates", stacklevel=3)
        with torch.no_grad():
            means, counts = kmeans(rows, self.codebook_size, self.kmeans_iters, sync=self.sync_codebook)
            cb.embed_avg.copy_((means * counts[:, None])[None])
            cb.cluster_size.copy_(counts[None])
            cb.embed.copy_(self._smoothed_codes(cb.embed_avg, cb.cluster_size))
            cb.initted.fill_(True)
        self._check_init = False

    def _update_codebook(self, z: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """The EMA update and dead-code replacement after a training step (no_grad).

        With the batch's per-code counts n_k (from the op) and sums s_k of the vectors assigned to code k,
        summed over ranks when syncing: cluster_size <- decay * cluster_size + (1 - decay) * n_k,
        embed_avg <- decay * embed_avg + (1 - decay) * s_k, code_k <- embed_avg_k / smoothed cluster_size_k.
        Then every code with cluster_size < threshold_ema_dead_code becomes a distinct random vector of
        the batch (drawn on rank 0 when syncing), with cluster_size = threshold, embed_avg = threshold * code.
        """
        cb, sync = self._codebook, self.sync_codebook
        # Rows without a nearest code (index -1: non-finite input, unchecked on GPU, where a check would
        # sync) are left out of the sums, as the op's counts leave them out, and never become a code (zeroed).
        found = indices.reshape(-1) >= 0
        rows = self._rows(z).masked_fill(~found.unsqueeze(-1), 0.0)
        indices = indices.reshape(-1).clamp_min(0)
        counts = _all_reduce(counts.to(torch.float32), sync)
        decay = USAGE_DECAY if self.decay is None else self.decay
        cb.cluster_size.lerp_(counts[None], 1.0 - decay)
        if self.decay is not None:
            sums = rows.new_zeros(self.codebook_size, self.codebook_dim).index_add_(0, indices, rows)
            cb.embed_avg.lerp_(_all_reduce(sums, sync)[None], 1.0 - self.decay)
            cb.embed.copy_(self._smoothed_codes(cb.embed_avg, cb.cluster_size))
        if self.threshold_ema_dead_code > 0 and rows.shape[0] > 0:
            self._replace_dead_codes(rows)

    def _replace_dead_codes(self, rows: torch.Tensor) -> None:
        cb, t = self._codebook, float(self.threshold_ema_dead_code)
        dead = (cb.cluster_size[0] < t)[:, None]  # [K, 1]; decided without a host sync
        new = _broadcast_from_rank0(_sample_rows(rows, self.codebook_size).contiguous(), self.sync_codebook)
        cb.embed.copy_(torch.where(dead, new.to(cb.embed.dtype), cb.embed[0])[None])
        cb.embed_avg.copy_(torch.where(dead, new * t, cb.embed_avg[0])[None])
        cb.cluster_size.copy_(torch.where(dead[:, 0], t, cb.cluster_size[0])[None])

    # ------------------------------------------------------------------------------------ lookups

    def _checked_indices(self, op: str, indices) -> torch.Tensor:
        """Integer code indices in [0, codebook_size) (values read on CPU only: a host sync elsewhere)."""
        check_tensor(f"VectorQuantize.{op}", "indices", indices)
        if indices.dtype not in (torch.int64, torch.int32):
            raise InputTypeError(f"VectorQuantize.{op}: indices must be int64 or int32, got {indices.dtype}")
        if indices.device.type == "cpu" and indices.numel() and not torch.compiler.is_compiling():
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= self.codebook_size:
                raise InputValueError(f"VectorQuantize.{op}: indices must lie in [0, {self.codebook_size}), "
                                      f"got min {lo}, max {hi}")
        return indices

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (any shape, int64) -> codes [..., codebook_dim]; channels moved to dim 1 when the layer
        is channels-first (channel_last=False or accept_image_fmap), as vector-quantize-pytorch."""
        codes = F.embedding(self._checked_indices("get_codes_from_indices", indices), self.codebook)
        return codes.movedim(-1, 1) if (not self.channel_last or self.accept_image_fmap) else codes

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices -> what forward would output for them (codes passed through project_out), in x's layout."""
        codes = self.project_out(F.embedding(self._checked_indices("get_output_from_indices", indices), self.codebook))
        return codes.movedim(-1, 1) if (not self.channel_last or self.accept_image_fmap) else codes


__all__ = ["VectorQuantize", "kmeans"]
