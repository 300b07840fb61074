"""mage_kernels.nn.VectorQuantize: layouts and shapes, the loss and gradient rules, the EMA / k-means /
dead-code rules (docs/OPS.md, "VectorQuantize"), DDP sync, and parity with vector-quantize-pytorch
when it is installed (CI does not install it; those tests skip)."""

import os
import socket

import pytest
import torch
import torch.nn.functional as F

import mage_kernels as mk
from mage_kernels.nn import VectorQuantize, kmeans

try:
    import vector_quantize_pytorch as vqp
except ImportError:  # an optional comparison: not a dependency
    vqp = None

requires_vqp = pytest.mark.skipif(vqp is None, reason="vector-quantize-pytorch is not installed")

DIM, K = 16, 24


def nearest(rows: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """fp64 argmin of the squared distances: the assignment rule every update is defined on."""
    return torch.cdist(rows.double(), codebook.double()).argmin(1)


def _x(*shape, seed=0, grad=False):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


LAYOUTS = [  # (constructor kwargs, x shape, indices shape)
    (dict(), (3, 10, DIM), (3, 10)),
    (dict(channel_last=False), (3, DIM, 10), (3, 10)),
    (dict(accept_image_fmap=True), (2, DIM, 4, 5), (2, 4, 5)),
    (dict(), (7, DIM), (7,)),
    (dict(codebook_dim=6), (3, 10, DIM), (3, 10)),
    (dict(codebook_dim=6, accept_image_fmap=True), (2, DIM, 4, 5), (2, 4, 5)),
    (dict(codebook_dim=6, channel_last=False), (3, DIM, 10), (3, 10)),
]


@pytest.mark.parametrize("kw,shape,ishape", LAYOUTS)
@pytest.mark.parametrize("decay", [None, 0.8])
def test_shapes_and_values_in_every_layout(kw, shape, ishape, decay):
    torch.manual_seed(0)
    vq = VectorQuantize(DIM, K, decay=decay, **kw)
    x = _x(*shape, grad=True)
    for training in (True, False):
        vq.train(training)
        codebook = vq.codebook.detach().clone()
        q, idx, loss = vq(x)
        assert q.shape == x.shape and q.dtype == x.dtype and idx.shape == ishape and idx.dtype == torch.int64
        assert loss.shape == () and (loss.item() > 0) == training
        # indices are the nearest codes of the (projected) input, and get_output_from_indices reproduces q
        cf = len(shape) > 2 and (kw.get("channel_last") is False or kw.get("accept_image_fmap"))
        rows = vq.project_in(x.movedim(1, -1) if cf else x).reshape(-1, vq.codebook_dim)
        assert torch.equal(idx.reshape(-1), nearest(rows, codebook))
        if not training:
            torch.testing.assert_close(q, vq.get_output_from_indices(idx))
            codes = vq.get_codes_from_indices(idx)
            assert codes.shape == (q.shape if not kw.get("codebook_dim") else
                                   (*q.shape[:1], 6, *q.shape[2:]) if cf else (*q.shape[:-1], 6))


def test_ema_rule_after_one_step():
    """cluster_size <- d c + (1-d) n_k; embed_avg <- d a + (1-d) s_k; code_k <- a_k / smoothed c_k (VQ-VAE A.1)."""
    torch.manual_seed(0)
    d, eps = 0.7, 1e-5
    vq = VectorQuantize(DIM, K, decay=d, eps=eps, commitment_weight=1.0)
    x = _x(4, 30, DIM, grad=True)
    old_code, old_avg, old_size = (t.clone() for t in (vq.codebook, vq._codebook.embed_avg[0], vq._codebook.cluster_size[0]))
    q, idx, loss = vq(x)
    rows = x.detach().reshape(-1, DIM)
    a = nearest(rows, old_code)
    assert torch.equal(idx.reshape(-1), a)
    n = torch.bincount(a, minlength=K).float()
    s = torch.zeros(K, DIM).index_add_(0, a, rows)
    size = d * old_size + (1 - d) * n
    avg = d * old_avg + (1 - d) * s
    smoothed = (size + eps) / (size.sum() + K * eps) * size.sum()
    torch.testing.assert_close(vq._codebook.cluster_size[0], size)
    torch.testing.assert_close(vq._codebook.embed_avg[0], avg)
    torch.testing.assert_close(vq.codebook, avg / smoothed[:, None])
    # loss: commitment only, on the codes used for q (before the update); the codebook gets no gradient
    torch.testing.assert_close(loss, F.mse_loss(x, old_code[a].view_as(x)))
    assert not vq._codebook.embed.requires_grad
    torch.testing.assert_close(q.detach(), old_code[a].view_as(x))


@pytest.mark.parametrize("w_commit,w_code", [(0.25, 1.0), (1.0, 0.25), (0.0, 1.0), (0.5, 0.0)])
def test_gradient_mode_losses_and_straight_through(w_commit, w_code):
    torch.manual_seed(0)
    vq = VectorQuantize(DIM, K, commitment_weight=w_commit, codebook_weight=w_code)
    x = _x(3, 11, DIM, grad=True)
    g = _x(3, 11, DIM, seed=1)
    q, idx, loss = vq(x)
    gx, gc = torch.autograd.grad((q * g).sum() + loss, [x, vq._codebook.embed])
    # eager VQ-VAE: w_code * |sg(x) - e|^2 + w_commit * |x - sg(e)|^2, straight-through q
    x2 = x.detach().clone().requires_grad_(True)
    e = vq._codebook.embed.detach().clone().requires_grad_(True)
    codes = e[0][idx.reshape(-1)].view_as(x2)
    ref_loss = w_code * F.mse_loss(codes, x2.detach()) + w_commit * F.mse_loss(x2, codes.detach())
    rx, rc = torch.autograd.grad((x2 + (codes - x2).detach()).mul(g).sum() + ref_loss, [x2, e])
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gc, rc)
    assert torch.equal(q.detach(), codes.detach())


def test_rotation_trick_value_and_gradient():
    """Value: the code. Gradient to x: (|q|/|x|) R^T g with R = I - 2 w w^T + 2 q^ u^T (Fifty et al. 2024, 4.2)."""
    torch.manual_seed(0)
    vq = VectorQuantize(DIM, K, decay=0.8, rotation_trick=True, commitment_weight=0.0)
    x = _x(5, DIM, grad=True)
    g = _x(5, DIM, seed=1)
    before = vq.codebook.clone()
    q, idx, _ = vq(x)
    (gx,) = torch.autograd.grad((q * g).sum(), x)
    torch.testing.assert_close(q.detach(), before[idx])
    for r in range(5):
        xv, qv = x[r].detach().double(), q[r].detach().double()
        u, qh = xv / xv.norm(), qv / qv.norm()
        w = (u + qh) / (u + qh).norm()
        R = torch.eye(DIM, dtype=torch.float64) - 2 * torch.outer(w, w) + 2 * torch.outer(qh, u)
        torch.testing.assert_close(R @ xv * (qv.norm() / xv.norm()), qv)  # R maps x onto q
        torch.testing.assert_close(gx[r].double(), (qv.norm() / xv.norm()) * (R.T @ g[r].double()), rtol=1e-5, atol=1e-6)


def test_kmeans_init_on_the_first_batch():
    torch.manual_seed(0)
    centers = torch.randn(K, DIM) * 5
    x = (centers[torch.arange(400) % K] + 0.1 * torch.randn(400, DIM)).view(4, 100, DIM)
    vq = VectorQuantize(DIM, K, decay=0.8, kmeans_init=True, kmeans_iters=10)
    assert not vq._codebook.initted and vq.codebook.abs().sum() == 0
    vq.eval()  # k-means runs on the first batch even in eval mode (as vector-quantize-pytorch)
    torch.manual_seed(1)
    vq(x)
    # the rule: Lloyd's iterations from sampled rows; counts of the last assignment; codes = Laplace-smoothed means
    rows = x.reshape(-1, DIM)
    torch.manual_seed(1)
    means, counts = kmeans(rows, K, 10)
    torch.manual_seed(1)
    before_last, _ = kmeans(rows, K, 9)
    assert torch.equal(counts, torch.bincount(nearest(rows, before_last), minlength=K).float())
    assert vq._codebook.initted and torch.equal(vq._codebook.cluster_size[0], counts)
    torch.testing.assert_close(vq._codebook.embed_avg[0], means * counts[:, None])
    smoothed = (counts + 1e-5) / (counts.sum() + K * 1e-5) * counts.sum()
    torch.testing.assert_close(vq.codebook, means * counts[:, None] / smoothed[:, None])
    # Lloyd's iterations only lower the quantization error of the sampled starting rows
    torch.manual_seed(1)
    start, _ = kmeans(rows, K, 0)
    error = lambda codes: ((rows - codes[nearest(rows, codes)]) ** 2).sum()  # noqa: E731
    assert error(vq.codebook) < error(start)


def test_kmeans_state_is_kept_and_reloaded():
    torch.manual_seed(0)
    vq = VectorQuantize(DIM, K, decay=0.8, kmeans_init=True)
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(_x(2, 50, DIM))
    fresh = VectorQuantize(DIM, K, decay=0.8, kmeans_init=True)
    fresh.load_state_dict(vq.state_dict())
    before = fresh.codebook.clone()
    fresh.eval()(_x(2, 50, DIM, seed=3))  # initted was saved: no second k-means
    assert torch.equal(fresh.codebook, before)
    vq.load_state_dict(state)  # back to not initted: the next batch initialises again
    assert not vq._codebook.initted
    vq.eval()(_x(2, 50, DIM))
    assert vq._codebook.initted and vq.codebook.abs().sum() > 0


@pytest.mark.parametrize("decay", [None, 0.8])
def test_dead_codes_are_replaced_by_batch_vectors(decay):
    torch.manual_seed(0)
    t = 1.5
    vq = VectorQuantize(DIM, K, decay=decay, threshold_ema_dead_code=t)
    with torch.no_grad():
        vq._codebook.cluster_size[0, :5] = 0.0  # five codes whose usage fell below the threshold
    x = _x(2, 40, DIM, grad=True)
    before = vq.codebook.detach().clone()
    q, idx, loss = vq(x)
    rows = x.detach().reshape(-1, DIM)
    a = nearest(rows, before)
    decay_used = 0.8 if decay is None else decay
    size = decay_used * torch.cat([torch.zeros(5), torch.ones(K - 5)]) + (1 - decay_used) * torch.bincount(a, minlength=K)
    dead = size < t
    assert 0 < int(dead.sum()) < K
    new = vq.codebook.detach()[dead]
    # each replaced code is a distinct vector of the batch; its count is reset to the threshold
    match = (new[:, None, :] == rows[None]).all(-1)
    assert match.any(1).all() and len(set(match.float().argmax(1).tolist())) == int(dead.sum())
    assert torch.equal(vq._codebook.cluster_size[0][dead], torch.full((int(dead.sum()),), t))
    torch.testing.assert_close(vq._codebook.embed_avg[0][dead], new * t)
    if decay is None:  # learned by gradient: live codes are untouched by the update
        assert torch.equal(vq.codebook.detach()[~dead], before[~dead])
        loss.backward()  # the op's saved codebook was not disturbed by the in-place replacement
        assert vq._codebook.embed.grad is not None


def test_input_checks():
    vq = VectorQuantize(DIM, K)
    with pytest.raises(ValueError, match=r"\[B, N, 16\]"):
        vq(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="float"):
        vq(torch.ones(2, 3, DIM, dtype=torch.long))
    with pytest.raises(ValueError, match="decay"):
        VectorQuantize(DIM, K, decay=1.0)
    with pytest.raises(ValueError, match="codebook_size"):
        VectorQuantize(DIM, 0)
    with pytest.raises(ValueError, match="non-finite"):
        vq(torch.full((1, 2, DIM), float("nan")))


def test_bfloat16_input_and_compile():
    torch.manual_seed(0)
    vq = VectorQuantize(DIM, K, decay=0.8)
    x = _x(2, 9, DIM).bfloat16()
    q, idx, loss = vq(x)
    assert q.dtype == torch.bfloat16 and torch.isfinite(loss)
    vq.eval()
    compiled = torch.compile(vq, backend="aot_eager", fullgraph=True)
    q2, idx2, _ = compiled(x.float())
    q1, idx1, _ = vq(x.float())
    assert torch.equal(idx1, idx2) and torch.equal(q1, q2)


# ------------------------------------------------------------------------------------ DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        vq = VectorQuantize(DIM, K, decay=0.8, kmeans_init=True, threshold_ema_dead_code=2.0)
        assert vq.sync_codebook
        torch.manual_seed(10 + rank)  # each rank draws its own samples; rank 0's are used
        x = _x(2, 30, DIM, seed=rank)
        for _ in range(3):
            vq(x)
        torch.save({k: v for k, v in vq.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))
        # plain EMA: two ranks' update equals one process's on the concatenated batch
        torch.manual_seed(0)
        ema = VectorQuantize(DIM, K, decay=0.8)
        ema(_x(2, 30, DIM, seed=rank))
        torch.save(ema.state_dict(), os.path.join(out, f"ema{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_ranks_keep_one_codebook(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    torch.manual_seed(0)
    one = VectorQuantize(DIM, K, decay=0.8, sync_codebook=False)
    one(torch.cat([_x(2, 30, DIM, seed=0), _x(2, 30, DIM, seed=1)]))
    e0, e1 = (torch.load(tmp_path / f"ema{r}.pt") for r in (0, 1))
    for k, v in one.state_dict().items():
        torch.testing.assert_close(e0[k], v)
        torch.testing.assert_close(e1[k], v)


# ------------------------------------------------------------------------------------ vector-quantize-pytorch


def _pair(seed=1, **kw):
    """Theirs and ours, built from the same seed (same initial codebook and projections)."""
    only_ours = {k: kw.pop(k) for k in ("codebook_weight",) if k in kw}
    torch.manual_seed(seed)
    theirs = vqp.VectorQuantize(dim=DIM, codebook_size=K, rotation_trick=kw.pop("rotation_trick", False), **kw)
    kw.pop("learnable_codebook", None), kw.pop("ema_update", None)
    torch.manual_seed(seed)
    ours = VectorQuantize(DIM, K, rotation_trick=theirs.rotation_trick, **kw, **only_ours)
    return theirs, ours


@requires_vqp
@pytest.mark.parametrize("kw,shape,ishape", LAYOUTS)
@pytest.mark.parametrize("extra", [dict(), dict(kmeans_init=True), dict(rotation_trick=True)])
def test_same_outputs_state_and_gradients_as_vector_quantize_pytorch(kw, shape, ishape, extra):
    theirs, ours = _pair(decay=0.8, commitment_weight=1.0, **kw, **extra)
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    torch.testing.assert_close(theirs.codebook, ours.codebook)
    x = _x(*shape, grad=True)
    g = _x(*shape, seed=1)
    for training in (True, False):
        theirs.train(training), ours.train(training)
        torch.manual_seed(2)
        qa, ia, la = theirs(x)
        torch.manual_seed(2)
        qb, ib, lb = ours(x)
        assert qa.shape == qb.shape and torch.equal(ia, ib)
        torch.testing.assert_close(qb, qa)
        torch.testing.assert_close(lb, la.float())
        if training:
            (ga,) = torch.autograd.grad((qa * g).sum() + la, x)
            (gb,) = torch.autograd.grad((qb * g).sum() + lb, x)
            torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)
        for k, v in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, msg=lambda m, k=k: f"{k}: {m}")
        torch.testing.assert_close(ours.get_codes_from_indices(ib), theirs.get_codes_from_indices(ia))


@requires_vqp
def test_learned_codebook_matches_vector_quantize_pytorch_gradients():
    """Theirs without EMA (learnable_codebook=True, ema_update=False) weights both terms by
    commitment_weight: ours with codebook_weight = commitment_weight has the same gradients (its loss
    value counts the two equal terms separately, so it is twice theirs)."""
    theirs, ours = _pair(commitment_weight=0.5, learnable_codebook=True, ema_update=False, codebook_weight=0.5)
    x = _x(3, 10, DIM, grad=True)
    qa, ia, la = theirs(x)
    qb, ib, lb = ours(x)
    torch.testing.assert_close(lb, 2 * la)
    ga = torch.autograd.grad((qa * 3).sum() + la, [x, theirs._codebook.embed])
    gb = torch.autograd.grad((qb * 3).sum() + lb, [x, ours._codebook.embed])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a)


@requires_vqp
def test_state_dicts_load_across():
    theirs, ours = _pair(decay=0.8, kmeans_init=True)
    theirs(_x(2, 40, DIM))
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()
    x = _x(2, 7, DIM, seed=5)
    assert torch.equal(ours(x)[1], theirs(x)[1])
    ours.train()(_x(2, 40, DIM, seed=6))
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(ours.eval()(x)[1], theirs(x)[1])


@pytest.mark.parametrize("kmeans_init", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_non_finite_input_error_names_x(training, kmeans_init):
    # The layer's argument is x: the error must not name the op's `z` (or kmeans' `rows`).
    vq = VectorQuantize(DIM, K, kmeans_init=kmeans_init).train(training)
    x = _x(2, 9, DIM)
    x[1, 3, 0] = float("nan")
    with pytest.raises(ValueError) as err:
        vq(x)
    assert str(err.value).startswith("VectorQuantize: x has 1 non-finite value") and " z" not in str(err.value)
    with torch.no_grad():
        vq._codebook.embed.fill_(float("nan"))
    vq._check_init = False
    with pytest.raises(ValueError, match="VectorQuantize: the codebook has no finite code"):
        vq(_x(2, 9, DIM))


def test_kmeans_names_its_argument():
    rows = torch.randn(20, 4)
    rows[3, 1] = float("inf")
    with pytest.raises(ValueError, match="kmeans: rows has 1 non-finite"):
        kmeans(rows, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("training", [True, False])
def test_non_finite_input_on_gpu_gives_nan_rows_not_a_device_assert(training):
    # On GPU the index -1 of a non-finite row is not checked (a host sync); it must not reach F.embedding /
    # index_add_ as an out-of-range index (a device-side assert), nor poison the EMA codebook.
    vq = VectorQuantize(DIM, K, decay=0.8, threshold_ema_dead_code=1).to("cuda").train(training)
    x = _x(2, 9, DIM).cuda()
    x[1, 3] = float("nan")
    q, idx, _ = vq(x)
    torch.cuda.synchronize()
    assert idx[1, 3] == -1 and q[1, 3].isnan().all() and not q[0].isnan().any()
    assert torch.isfinite(vq.codebook).all()
