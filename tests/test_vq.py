"""vq_nearest / vq_quantize against the fp64 reference, on CPU (C++), Triton (interpreter) and the
reference backend; opcheck, gradcheck, compile and bad input."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES, assert_close, requires_cuda, requires_triton, requires_triton_on_cpu

import mage_kernels as mk
from mage_kernels import reference

SHAPES = [(n, k, d) for n in (1, 7, 1000) for k in (1, 3, 1024, 8192) for d in (1, 8, 33, 256)]


def make(n, k, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    e = torch.randn(k, d, generator=g).to(device=device, dtype=dtype)
    return z, e


def triton_vq():
    from mage_kernels.triton import vq

    return vq


@pytest.mark.parametrize("n,k,d", SHAPES)
def test_nearest_matches_reference(n, k, d):
    z, e = make(n, k, d)
    idx, sq = mk.vq_nearest(z, e)
    ref_idx, ref_sq = reference.vq_nearest(z, e)
    assert torch.equal(idx, ref_idx)
    assert_close(sq, ref_sq)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
@pytest.mark.parametrize("cb_dtype", [None, torch.float32])
def test_nearest_dtypes(device, dtype, cb_dtype):
    z, e = make(513, 1024, 64, dtype, device)
    if cb_dtype is not None:
        e = e.to(cb_dtype)
    idx, sq = mk.vq_nearest(z, e)
    ref_idx, ref_sq = reference.vq_nearest(z, e)
    assert torch.equal(idx, ref_idx)  # exact: agrees with the fp64 argmin of the given values
    assert sq.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(sq, ref_sq)


def test_strided_inputs_are_read_in_place():
    z, e = make(200, 77, 40)
    z_t = torch.randn(40, 400).t()[::2]  # (200, 40), column stride != 1, row stride 2
    e_s = torch.randn(77, 80)[:, ::2]  # (77, 40), non-contiguous
    for zz, ee in [(z_t, e), (z, e_s), (z_t, e_s)]:
        idx, sq = mk.vq_nearest(zz, ee)
        ref_idx, ref_sq = reference.vq_nearest(zz.contiguous(), ee.contiguous())
        assert torch.equal(idx, ref_idx)
        assert_close(sq, ref_sq)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_nchw_rows_are_row_major_over_hw(memory_format):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 16, 5, 7, generator=g).to(memory_format=memory_format)
    e = torch.randn(50, 16, generator=g)
    idx, sq = mk.vq_nearest(z, e)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 16)  # the reference tokenizer's layout
    ref_idx, ref_sq = reference.vq_nearest(flat, e)
    assert idx.shape == (3, 35)
    assert torch.equal(idx.reshape(-1), ref_idx)
    assert_close(sq.reshape(-1), ref_sq)


def test_planted_ties_pick_lowest_index():
    g = torch.Generator().manual_seed(2)
    e = torch.randn(64, 8, generator=g)
    e[40] = e[7]  # exact duplicate: code 7 must win
    e[50] = -e[3]  # z = 0 is equidistant from codes 3 and 50 (and every code of equal norm)
    z = torch.cat([e[7:8] + 1e-3 * torch.randn(1, 8, generator=g), torch.zeros(1, 8), e[40:41]])
    idx, _ = mk.vq_nearest(z, e)
    ref_idx, _ = reference.vq_nearest(z, e)
    assert torch.equal(idx, ref_idx)
    assert idx[0] == 7 and idx[2] == 7
    assert idx[1] == int(torch.argmin((e.double() ** 2).sum(1)))


@pytest.mark.parametrize("k", [6, 100])  # below and above the size where the CPU ranks codes in bf16
def test_near_ties_are_reranked_exactly(k):
    # Codes whose distances to z differ far below the resolution of the fp32 (or bf16) expanded form:
    # the fast search cannot order them, the fp64 re-rank must.
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 256, generator=g) * 30
    e = base.repeat(k, 1)
    for j in range(k):
        e[j, j] += 2.0**-10 * (k - j)  # the last code is nearest to base, by a hair
    z = base.repeat(4, 1)
    idx, sq = mk.vq_nearest(z, e)
    ref_idx, ref_sq = reference.vq_nearest(z, e)
    assert torch.equal(idx, ref_idx) and (idx == k - 1).all()
    assert_close(sq, ref_sq)


def test_clustered_codebook_matches_reference():
    # A trained codebook is clustered: many codes fall within the search's rounding bound of the best.
    g = torch.Generator().manual_seed(8)
    centers = torch.randn(8, 64, generator=g) * 4
    e = (centers.repeat_interleave(64, 0) + 0.01 * torch.randn(512, 64, generator=g))
    z = centers.repeat(40, 1) + 0.01 * torch.randn(320, 64, generator=g)
    idx, sq = mk.vq_nearest(z, e)
    ref_idx, ref_sq = reference.vq_nearest(z, e)
    assert torch.equal(idx, ref_idx)
    assert_close(sq, ref_sq)


def test_non_finite_rows_and_codes():
    z, e = make(6, 5, 4)
    e[2] = float("inf")  # a non-finite code is never chosen
    z[1, 0] = float("nan")
    idx, sq = torch.ops.mage.vq_nearest(z, e)
    ref_idx, ref_sq = reference.vq_nearest(z, e)
    assert torch.equal(idx, ref_idx) and idx[1] == -1 and (idx != 2).all()
    assert torch.isnan(sq[1]) and torch.isnan(ref_sq[1])
    with pytest.raises(ValueError, match=r"vq_nearest: 1 row\(s\) of z \(first: flat row 1\)"):
        mk.vq_nearest(z, e)
    with pytest.raises(ValueError, match="no finite code"):
        mk.vq_quantize(z[:1], torch.full((3, 4), float("nan")))


@pytest.mark.parametrize(
    "z,e,err,match",
    [
        (torch.randn(3, 4, 5), torch.randn(2, 4), ValueError, r"z must be \[N, D\] or \[B, D, H, W\], got shape \[3, 4, 5\]"),
        (torch.randn(3, 4), torch.randn(2, 5), ValueError, "must equal codebook.size\\(1\\) = 5"),
        (torch.randn(3, 4), torch.randn(0, 4), ValueError, r"at least one code \(K >= 1\)"),
        (torch.randn(3, 4), torch.randn(4), ValueError, r"codebook must be \[K, D\]"),
        (torch.randint(0, 5, (3, 4)), torch.randn(2, 4), TypeError, "z must be float32.*got torch.int64"),
        (torch.randn(3, 4), torch.randint(0, 5, (2, 4)), TypeError, "codebook must be float32"),
        (torch.randn(3, 4), torch.randn(2, 4, device="meta"), ValueError, "same device"),
    ],
)
def test_bad_input(z, e, err, match):
    with pytest.raises(err, match=match):
        mk.vq_nearest(z, e)
    with pytest.raises(err, match=match.replace("vq_nearest", "vq_quantize")):
        mk.vq_quantize(z, e)


def test_empty_input():
    idx, sq = mk.vq_nearest(torch.randn(0, 8), torch.randn(4, 8))
    assert idx.shape == (0,) and sq.shape == (0,)
    z_q, idx, loss, counts = mk.vq_quantize(torch.randn(0, 8, 2, 2), torch.randn(4, 8))
    assert z_q.shape == (0, 8, 2, 2) and idx.shape == (0, 4) and counts.sum() == 0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("nchw", [False, True])
def test_quantize_matches_reference(dtype, nchw):
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(2, 32, 6, 5, generator=g) if nchw else torch.randn(301, 32, generator=g)).to(dtype)
    e = torch.randn(97, 32, generator=g).to(dtype)
    z_q, idx, loss, counts = mk.vq_quantize(z, e, beta=0.25)
    r_zq, r_idx, r_loss, r_counts = reference.vq_quantize(z, e, 0.25)
    assert torch.equal(idx, r_idx) and torch.equal(counts, r_counts) and torch.equal(z_q, r_zq)
    assert z_q.dtype == dtype and z_q.shape == z.shape and z_q.is_contiguous()
    assert counts.sum() == idx.numel()
    assert_close(loss, r_loss)
    # The legacy taming loss, spelled out (docs/REFERENCE.md 3.3).
    zf, qf = z.double(), z_q.double()
    legacy = ((qf - zf) ** 2).mean() + 0.25 * ((qf - zf) ** 2).mean()
    assert_close(loss.double(), legacy, dtype=torch.float32)


def test_nearest_sqdist_gradcheck():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    zn = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    e = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, e: mk.vq_nearest(z, e)[1], (z, e))
    assert torch.autograd.gradcheck(lambda z, e: mk.vq_nearest(z, e)[1], (zn, e))


def taming_quantize(z, e, beta):
    """The reference tokenizer's quantizer in plain autograd (stop-gradients are not true derivatives,
    so vq_quantize's backward is checked against this rather than by finite differences)."""
    idx, _ = reference.vq_nearest(z.detach(), e.detach())
    rows = reference.vq_rows(z)
    q = e[idx]
    loss = ((q.detach() - rows) ** 2).mean() + beta * ((q - rows.detach()) ** 2).mean()
    z_q = rows + (q - rows).detach()
    return reference.vq_rows_to_layout(z_q, z), loss


@pytest.mark.parametrize("shape", [(9, 5), (2, 5, 3, 2)])
def test_quantize_backward_matches_autograd_of_reference(shape):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    e = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    g_zq = torch.randn(shape, generator=g, dtype=torch.float64)
    g_loss = torch.rand((), generator=g, dtype=torch.float64) + 0.5
    z_q, _, loss, _ = mk.vq_quantize(z, e, beta=0.3)
    got = torch.autograd.grad((z_q * g_zq).sum() + g_loss * loss, (z, e))
    r_zq, r_loss = taming_quantize(z, e, 0.3)
    want = torch.autograd.grad((r_zq * g_zq).sum() + g_loss * r_loss, (z, e))
    torch.testing.assert_close(z_q, r_zq)
    torch.testing.assert_close(loss, r_loss)
    for a, b in zip(got, want):
        assert_close(a, b)


def test_quantize_straight_through_and_loss_split():
    z, e = make(10, 6, 4)
    z.requires_grad_(True)
    e.requires_grad_(True)
    z_q, idx, loss, _ = mk.vq_quantize(z, e, beta=0.25)
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z)) and torch.count_nonzero(e.grad) == 0
    z.grad = e.grad = None
    _, _, loss, _ = mk.vq_quantize(z, e, beta=0.25)
    loss.backward()
    r = (z - e[idx]).detach()
    assert_close(z.grad, 2 * r / z.numel())  # commitment term pulls z
    expect = torch.zeros_like(e).index_add_(0, idx, -0.25 * 2 * r / z.numel())  # codebook term pulls codes
    assert_close(e.grad, expect)


@pytest.mark.parametrize("nchw", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(nchw, requires_grad):
    g = torch.Generator().manual_seed(6)
    z = torch.randn(2, 8, 3, 3, generator=g) if nchw else torch.randn(20, 8, generator=g)
    e = torch.randn(16, 8, generator=g)
    z.requires_grad_(requires_grad)
    e.requires_grad_(requires_grad)
    # opcheck's aot_dispatch helper sums all outputs into the first one's dtype, which fails for an
    # int64 first output once gradients are involved; the backward is covered by the tests above.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not requires_grad:
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(torch.ops.mage.vq_nearest.default, (z, e), {"exact": True}, test_utils=utils)
    torch.library.opcheck(torch.ops.mage.vq_quantize.default, (z, e, 0.25), test_utils=utils)


def test_compile_fullgraph():
    z, e = make(64, 32, 16)
    z.requires_grad_(True)

    def step(z, e):
        z_q, idx, loss, counts = mk.vq_quantize(z, e)
        return (z_q * z_q).sum() + loss, idx

    ref_out, ref_idx = step(z, e)
    for backend in ("aot_eager", "inductor"):
        out, idx = torch.compile(step, fullgraph=True, backend=backend)(z, e)
        assert torch.equal(idx, ref_idx)
        assert_close(out, ref_out)
        (grad,) = torch.autograd.grad(out, z)
        (ref_grad,) = torch.autograd.grad(ref_out, z, retain_graph=True)
        assert_close(grad, ref_grad)


@requires_triton_on_cpu
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (7, 3, 8), (130, 200, 33), (65, 1024, 256)])
@pytest.mark.parametrize("exact", [True, False])
def test_triton_interpreter(n, k, d, exact):
    tv = triton_vq()
    z, e = make(n, k, d)
    idx, sq = tv.vq_nearest(z, e, exact=exact)
    ref_idx, ref_sq = reference.vq_nearest(z, e)
    assert torch.equal(idx, ref_idx)
    assert_close(sq, ref_sq, dtype=torch.float32 if exact else torch.bfloat16)


@requires_triton_on_cpu
def test_triton_interpreter_nchw_ties_and_quantize():
    tv = triton_vq()
    g = torch.Generator().manual_seed(7)
    z = torch.randn(2, 16, 3, 5, generator=g).to(torch.bfloat16)
    e = torch.randn(40, 16, generator=g).to(torch.bfloat16)
    e[30] = e[4]
    z[1, :, 1, 1] = e[30]
    z[0, 3, 2, 2] = float("nan")
    idx, sq = tv.vq_nearest(z, e)
    ref_idx, ref_sq = reference.vq_nearest(z, e)
    assert torch.equal(idx, ref_idx) and idx[1, 6] == 4 and idx[0, 12] == -1
    assert_close(sq, ref_sq, equal_nan=True)
    for a, b in zip(tv.vq_quantize(z, e, 0.25), reference.vq_quantize(z, e, 0.25)):
        torch.testing.assert_close(a, b, equal_nan=True)


@requires_cuda
@requires_triton
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (7, 3, 8), (130, 200, 33), (65, 1024, 256), (3000, 8192, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_triton_on_cuda_matches_reference(n, k, d, dtype):
    """The Triton kernels compiled for the GPU (the tests above interpret them): exact=True gives the
    reference's argmin in every dtype, and vq_quantize the reference's outputs."""
    tv = triton_vq()
    z, e = make(n, k, d, dtype, device="cuda")
    idx, sq = tv.vq_nearest(z, e)
    ref_idx, ref_sq = reference.vq_nearest(z, e)
    assert torch.equal(idx, ref_idx)
    assert_close(sq, ref_sq)
    for a, b in zip(tv.vq_quantize(z, e, 0.25), reference.vq_quantize(z, e, 0.25)):
        torch.testing.assert_close(a, b)


def _fp64_nearest(z: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = ((z.double()[:, None, :] - e.double()[None, :, :]) ** 2).sum(-1)
    return d.argmin(1), d.amin(1)


@requires_triton_on_cpu
def test_triton_large_magnitudes():
    """Finite inputs whose squares overflow fp32 (fp32 near 1e19-3e38, fp64 beyond the fp32 range) rank
    exactly: the search runs on values scaled by a power of two, the re-rank on the values as given."""
    tv = triton_vq()
    idx, sq = tv.vq_nearest(torch.tensor([[1e20]]), torch.tensor([[1e20], [0.0]]))
    assert idx.tolist() == [0] and sq.tolist() == [0.0]
    g = torch.Generator().manual_seed(3)
    for dtype, scale in ((torch.float32, 1e19), (torch.float32, 3e36), (torch.bfloat16, 1e30),
                         (torch.float64, 1e40), (torch.float64, 1e120), (torch.float32, 1e-30)):
        z = (torch.randn(40, 8, generator=g, dtype=torch.float64) * scale).to(dtype)
        e = (torch.randn(30, 8, generator=g, dtype=torch.float64) * scale).to(dtype)
        z[:5] = e[:5]  # exact hits
        ref_idx, ref_sq = _fp64_nearest(z, e)
        for exact in (True, False):
            idx, sq = tv.vq_nearest(z, e, exact=exact)
            assert torch.equal(idx, ref_idx), (dtype, scale, exact)
            if exact:  # in the sqdist dtype: fp32 overflows to inf beyond 3.4e38, as it should
                torch.testing.assert_close(sq, ref_sq.to(sq.dtype), rtol=1e-6, atol=0.0)
    z = torch.tensor([[3e38, -3e38, 3e38]])  # |z|^2 overflows fp32 and so does the scaled search: re-ranked
    e = torch.tensor([[3e38, -3e38, 3e38], [0.0, 0.0, 0.0], [3e38, 3e38, 3e38]])
    assert tv.vq_nearest(z, e)[0].tolist() == [0] and tv.vq_nearest(z, e, exact=False)[0].tolist() == [0]
    z64 = torch.tensor([[1e300, -1e300]], dtype=torch.float64)  # squares overflow fp64 too
    e64 = torch.tensor([[-1e300, 1e300], [1e300, -0.9e300], [0.0, 0.0]], dtype=torch.float64)
    assert tv.vq_nearest(z64, e64)[0].tolist() == [1]


@requires_triton_on_cpu
def test_triton_rows_fp64_cannot_decide_take_the_exact_decision(monkeypatch):
    """Distances 1 + 2^-60 and 1 (fp64 sees a tie), distances 1e-340 and 0 (fp64 underflows), 1e300 + 1 and
    1e300 + (1 - 1e-170)^2, and an exact tie between distinct codes: the re-rank marks these rows and the reference decides them; rows fp64 can
    decide never reach it."""
    tv = triton_vq()
    calls = []
    real = reference.vq_nearest

    def spy(z, e, **kw):
        calls.append(z.shape[0])
        return real(z, e, **kw)

    monkeypatch.setattr(reference, "vq_nearest", spy)
    cases = [  # (z, codebook, rows fp64 cannot decide)
        (torch.tensor([[0.0, 0.0], [3.0, 0.5]]), torch.tensor([[1.0, 2.0**-30], [1.0, 0.0]]), 1),
        (torch.tensor([[1e150, 1e-170], [0.0, 1.0], [-1e150, 1e150]], dtype=torch.float64),
         torch.tensor([[1e150, 0.0], [1e150, 1e-170], [0.0, 1e150]], dtype=torch.float64), 2),
        (torch.tensor([[0.0], [0.25]]), torch.tensor([[1.0], [-1.0], [3.0]]), 1),
    ]
    for z, e, undecided in cases:
        calls.clear()
        idx, sq = tv.vq_nearest(z, e)
        assert calls == [undecided], (z, e)
        ref = real(z, e)
        assert torch.equal(idx, ref[0]) and torch.equal(sq, ref[1])
    calls.clear()
    tv.vq_quantize(torch.randn(40, 8), torch.randn(30, 8), 0.25)
    assert calls == []


@requires_triton_on_cpu
def test_triton_duplicate_codes_are_dropped_once_per_call():
    """Exact copies of an earlier code (also -0.0 for 0.0) can never win, so the prepare step drops them from
    the search and the re-rank; non-finite codes are dropped too; everything else stays."""
    tv = triton_vq()
    g = torch.Generator().manual_seed(5)
    e = torch.randn(50, 7, generator=g)
    e[20] = e[3]
    e[41] = e[3]
    e[30] = e[9]
    e[9, 2], e[30, 2] = 0.0, -0.0
    e[12, 1] = float("nan")
    use = tv._prepare(e)[3]
    dropped = sorted((use == 0).nonzero().flatten().tolist())
    assert dropped == [12, 20, 30, 41]
    z = torch.cat([e[[20, 41, 30, 3, 9]], torch.randn(30, 7, generator=g)])
    idx, sq = tv.vq_nearest(z, e)
    ref = reference.vq_nearest(z, e)
    assert idx[:5].tolist() == [3, 3, 9, 3, 9] and torch.equal(idx, ref[0])
    assert_close(sq, ref[1])


@requires_triton_on_cpu
def test_triton_prepare_scale_is_an_exact_power_of_two():
    tv = triton_vq()
    for big, expected in ((1.0, 1.0), (3e9, 1.0), (1e19, 2.0**-63), (3e38, 2.0**-127), (1e-20, 2.0**67)):
        e = torch.tensor([[big, -big / 3], [0.5 * big, 0.0]])
        scale = tv._prepare(e)[4]
        assert scale[0].item() == expected and scale[1].item() * scale[2].item() == expected, (big, scale)


def test_forced_reference_backend_in_subprocess():
    code = (
        "import torch, mage_kernels as mk; i = mk.build_info(); "
        "assert i['native'] is None and i['ops']['vq_nearest']['cpu'] == 'reference', i; "
        "z = torch.randn(50, 8); e = torch.randn(9, 8); "
        "assert torch.equal(mk.vq_nearest(z, e)[0], mk.reference.vq_nearest(z, e)[0])"
    )
    env = dict(os.environ, MAGE_KERNELS_BACKEND="reference")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_build_info_reports_backends():
    info = mk.build_info()
    assert set(info["ops"]["vq_nearest"]) == {"cpu", "cuda"}
    if os.environ.get("CI"):  # CI builds the extension: the C++ kernels must be what runs
        assert info["native"] is not None, info["native_error"]
    if info["native"] is not None:
        assert info["ops"]["vq_nearest"]["cpu"] == "cpu"


@pytest.mark.slow
def test_large_sweep():
    z, e = make(65536, 8192, 256)
    idx, sq = mk.vq_nearest(z, e)
    ref_idx, ref_sq = reference.vq_nearest(z, e)
    assert torch.equal(idx, ref_idx)
    assert_close(sq, ref_sq)


@pytest.mark.slow
def test_64bit_indexing_n_times_k_over_2_31():
    z, e = make((1 << 20) + 3, (1 << 11) + 1, 1)  # N * K > 2^31
    idx, _ = mk.vq_nearest(z, e)
    ref_idx, _ = reference.vq_nearest(z, e)
    assert torch.equal(idx, ref_idx)
