"""What every Triton launcher must do wherever it runs: launch on the inputs' device, refuse inputs on two
devices, launch grids within the hardware limits, and index with 64-bit offsets where a stride product can
pass 2^31 (checked under the interpreter on views of a sparse file, so no memory is spent)."""

import contextlib
import types

import pytest
import torch
from conftest import requires_triton, requires_triton_on_cpu

from mage_kernels import reference as R

pytestmark = requires_triton

MASK = 2024
SEED = torch.tensor([5, 6], dtype=torch.int64)
KW = dict(mask_id=MASK, choice_temperature=1.0, temperature=1.0, reference_ties=False)


def _modules():
    from mage_kernels.triton import _launch
    from mage_kernels.triton import masking as tm
    from mage_kernels.triton import remask as tr
    from mage_kernels.triton import vq as tv

    return _launch, tm, tr, tv


def _entry_points():
    """Every Triton entry point as (name, call, inputs): call(**inputs) runs it on small CPU tensors."""
    _, tm, tr, tv = _modules()
    g = torch.Generator().manual_seed(0)
    B, L, C, V = 2, 9, 8, 12
    t = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    keep = torch.tensor([[0, 2, 4, 6, -1], [1, 3, 5, 7, 8]])
    masked = torch.zeros(B, L, dtype=torch.bool)
    ids = torch.full((B, L), MASK)
    ids[:, ::2] = 1
    k = torch.tensor([1, 2])
    vq = dict(z=t(6, 4), codebook=t(5, 4))
    return [
        ("vq_nearest", lambda z, codebook: tv.vq_nearest(z, codebook), vq),
        ("vq_quantize", lambda z, codebook: tv.vq_quantize(z, codebook, 0.25), vq),
        ("mask_plan", lambda noise, m: tm.mask_plan(noise, m, m, L), dict(noise=t(B, L), m=torch.tensor([3, 5]))),
        ("gather_keep", tm.gather_keep, dict(x=t(B, 1 + L, C), keep_idx=keep)),
        ("scatter_keep", lambda y, keep_idx: tm.scatter_keep(y, keep_idx, L), dict(y=t(B, 6, C), keep_idx=keep)),
        ("pad_with_cls", lambda y, keep_idx, masked, pos_embed: tm.pad_with_cls(y, keep_idx, masked, pos_embed),
         dict(y=t(B, 6, C), keep_idx=keep, masked=masked, pos_embed=t(1 + L, C))),
        ("pad_with_cls_backward", lambda grad_z, keep_idx, masked: tm.pad_with_cls_backward(grad_z, keep_idx, masked,
                                                                                            True, True),
         dict(grad_z=t(B, 1 + L, C), keep_idx=keep, masked=masked)),
        ("remask_step", lambda logits, ids, k, seed: tr.remask_step(logits, ids, k, seed, vocab_size=V, **KW),
         dict(logits=t(B, L, V), ids=ids, k=k, seed=SEED)),
        ("remask_step_from_hidden", lambda hidden, weight, bias, ids, k, seed: tr.remask_step_from_hidden(
            hidden, weight, bias, ids, k, seed, vocab_size=V, **KW),
         dict(hidden=t(B, L, C), weight=t(V, C), bias=t(V), ids=ids, k=k, seed=SEED)),
    ]


@requires_triton_on_cpu
def test_every_launch_runs_under_the_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device; each entry point makes its inputs' device current (a CUDA
    device context) around all of its launches, and hands the guard every tensor argument."""
    _launch, *_ = _modules()
    real_on_device, real_launch = _launch.on_device, _launch.launch
    state = {"inside": 0, "guarded": [], "launches": []}

    def on_device(op, **tensors):
        state["guarded"].append((op, {id(t) for t in tensors.values() if t is not None}))

        @contextlib.contextmanager
        def ctx():
            with real_on_device(op, **tensors):
                state["inside"] += 1
                try:
                    yield
                finally:
                    state["inside"] -= 1

        return ctx()

    def launch(kernel, grid, *args, **kwargs):
        state["launches"].append(state["inside"])
        real_launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_launch, "on_device", on_device)
    monkeypatch.setattr(_launch, "launch", launch)
    for name, call, inputs in _entry_points():
        state["guarded"].clear()
        state["launches"].clear()
        call(**inputs)
        assert state["launches"] and all(state["launches"]), f"{name}: a launch outside the device guard"
        assert state["guarded"] and state["guarded"][0][0] == name
        assert {id(t) for t in inputs.values()} <= state["guarded"][0][1], f"{name}: not every input is guarded"


def test_the_guard_makes_the_inputs_cuda_device_current():
    _launch, *_ = _modules()
    fake = types.SimpleNamespace(device=torch.device("cuda", 1))
    ctx = _launch.on_device("op", a=fake, b=fake, c=None)
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1  # entered only around launches on a GPU
    assert isinstance(_launch.on_device("op", a=torch.zeros(1)), contextlib.nullcontext)


@pytest.mark.parametrize("index", range(9))
def test_inputs_on_two_devices_are_refused(index):
    """Each input in turn moved to the meta device: a clear error naming the arguments, before any launch."""
    name, call, inputs = _entry_points()[index]
    for moved in inputs:
        bad = dict(inputs, **{moved: inputs[moved].to("meta")})
        with pytest.raises(ValueError, match="same device|must be on"):
            call(**bad)


def test_grids_fit_the_hardware_limits(monkeypatch):
    """Grid x up to 2^31 - 1 blocks, y and z up to 65535: launch configurations for large batches (meta
    tensors: nothing runs) stay inside them. The vq search once put the batch on the y axis."""
    _launch, tm, tr, tv = _modules()
    grids = []
    monkeypatch.setattr(_launch, "hook", lambda kernel, grid, args, kwargs: grids.append((kernel.fn.__name__, grid)))
    meta = dict(device="meta")
    B = 70000
    tv.vq_quantize(torch.empty(B, 16, 2, 2, **meta), torch.empty(64, 16, **meta), 0.25)
    tm.mask_plan(torch.empty(B, 256, **meta), torch.empty(B, dtype=torch.long, **meta),
                 torch.empty(B, dtype=torch.long, **meta), 128)
    x = torch.empty(B, 257, 8, **meta)
    keep = torch.empty(B, 128, dtype=torch.long, **meta)
    masked = torch.empty(B, 256, dtype=torch.bool, **meta)
    tm.pad_with_cls_backward(x, keep, masked, False, True)
    tm.pad_with_cls(tm.gather_keep(x, keep), keep, masked)
    ids = torch.empty(B, 256, dtype=torch.long, **meta)
    tr.remask_step(torch.empty(B, 256, 64, **meta), ids, torch.empty(B, dtype=torch.long, **meta),
                   torch.empty(2, dtype=torch.long, **meta), vocab_size=64, **KW)
    tr.remask_step_from_hidden(torch.empty(B, 256, 32, **meta), torch.empty(64, 32, **meta), None, ids,
                               torch.empty(B, dtype=torch.long, **meta), torch.empty(2, dtype=torch.long, **meta),
                               vocab_size=64, **KW)
    assert len({name for name, _ in grids}) >= 10
    for name, grid in grids:
        assert grid[0] < 2**31 and all(g <= 65535 for g in grid[1:]), (name, grid)


# ------------------------------------------------------------------------------- 64-bit offsets


@pytest.fixture
def sparse(tmp_path):
    """A float tensor of n elements backed by a sparse file: only the pages a test touches use memory."""

    def make(n, dtype):
        path = tmp_path / f"big{n}.bin"
        with open(path, "wb") as f:
            f.truncate(n * torch.tensor([], dtype=dtype).element_size())
        return torch.from_file(str(path), shared=True, size=n, dtype=dtype)

    return make


def _fill(view, g):
    """Random values into a strided view (touching only its elements), returned as a compact copy."""
    values = torch.randn(view.shape, generator=g).to(view.dtype)
    view.copy_(values)
    return values


@requires_triton_on_cpu
def test_64bit_offsets_masking(sparse):
    """pad_with_cls_backward of a sequence-first (L, B, C) gradient: (1 + t) * stride of a slot passes 2^31."""
    _, tm, _, _ = _modules()
    B, L, C, S = 1, 40, 8, 2**26  # slot stride S: the last slot starts at 40 * 2^26 > 2^31
    base = sparse(L * S + C + 1, torch.float16)
    gz = base.as_strided((B, 1 + L, C), (C, S, 1))
    g = torch.Generator().manual_seed(0)
    compact = _fill(gz, g)
    keep = torch.arange(0, L, 2)[None]
    masked = torch.zeros(B, L, dtype=torch.bool)
    masked[:, 1::4] = True
    for mae, pos in ((False, True), (True, False)):
        got = tm.pad_with_cls_backward(gz, keep, masked, mae, pos)
        ref = R.pad_with_cls_backward(compact, keep, masked, mae, pos)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


@requires_triton_on_cpu
def test_64bit_offsets_vq(sparse):
    """An NCHW map whose channel stride H*W times D passes 2^31: d * stride_zd must not wrap."""
    _, _, _, tv = _modules()
    D, HW = 40, 2**26
    base = sparse(D * HW, torch.float16)
    z = base.as_strided((1, D, 1, 3), (D * HW, HW, 3, 1))
    g = torch.Generator().manual_seed(1)
    compact = _fill(z, g)
    e = torch.randn(9, D, generator=g).to(torch.float16)
    for exact in (True, False):
        got = tv.vq_nearest(z, e, exact=exact)
        ref = R.vq_nearest(compact, e)
        assert torch.equal(got[0], ref[0])


@requires_triton_on_cpu
def test_64bit_offsets_remask(sparse):
    """Logits read with a vocabulary stride, and a head weight with a row stride, whose products with the
    code index pass 2^31."""
    _, _, tr, _ = _modules()
    g = torch.Generator().manual_seed(2)
    B, L, V, S = 1, 2, 40, 2**26
    base = sparse(V * S + 8, torch.float16)
    logits = base.as_strided((B, L, V), (L, 1, S))
    compact = _fill(logits, g)
    ids = torch.full((B, L), MASK)
    k = torch.tensor([1])
    got = tr.remask_step(logits, ids, k, SEED, vocab_size=V, **KW)
    ref = R.remask_step(compact, ids, k, SEED, vocab_size=V, **KW)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    C = 8
    weight = base.as_strided((V, C), (S, 1))
    w = _fill(weight, g)
    hidden = torch.randn(B, L, C, generator=g)
    got = tr.remask_step_from_hidden(hidden, weight, None, ids, k, SEED, vocab_size=V, **KW)
    ref = R.remask_step_from_hidden(hidden, w, None, ids, k, SEED, vocab_size=V, **KW)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
