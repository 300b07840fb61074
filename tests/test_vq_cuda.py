"""The CUDA C++ kernels of vq_nearest / vq_quantize (csrc/vq_cuda.cu) against the fp64 reference.

Every test needs a GPU and the compiled CUDA kernels (the native backend chosen for CUDA tensors); without
them the whole module skips with the reason. Sizes are chosen so the tile edges of the search (64 rows,
128 codes, 16- or 32-deep chunks of D) fall inside, at and past every shape.
"""

import pytest
import torch
from conftest import assert_close

import mage_kernels as mk
from mage_kernels import reference
from test_vq_exact import FP64_TIED, PLANTED, exact_nearest, fp64_tied_case, rounded
from test_vq_exact import _case as planted_case

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        mk.build_info()["ops"]["vq_nearest"]["cuda"] != "cuda",
        reason="mage_kernels was built without its CUDA kernels (MAGE_CUDA=OFF or no nvcc)",
    ),
]

DEV = "cuda"
NS = (1, 7, 1000, 65536)
KS = (1, 3, 1024, 8192)
DS = (1, 8, 33, 256)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
FP32_ROUNDOFF = 2.0**-24
# The tensor-core path (exact=False, bf16/fp16) multiplies exactly and accumulates in fp32, whose
# rounding on tensor cores may truncate: allow four times the fp32 unit round-off.
TENSOR_CORE_ROUNDOFF = 2.0**-22


def make(n, k, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g).to(device=DEV, dtype=dtype)
    e = torch.randn(k, d, generator=g).to(device=DEV, dtype=dtype)
    return z, e


def gap_bound(z, e, unit_roundoff):
    """csrc/vq_bound.h per row: how far an inexact search may be from the true minimum distance."""
    d = e.shape[1]
    n = d + 5
    gamma = n * unit_roundoff / (1 - n * unit_roundoff)
    z64 = reference.vq_rows(z).reshape(-1, d).double()
    e_norm = e.double().norm(dim=1).max()
    return 4 * gamma * (e_norm**2 + 2 * z64.norm(dim=1) * e_norm)


def check_inexact(z, e, idx, sq, unit_roundoff):
    """exact=False: the chosen code is within the rounding bound of the nearest one, and so is sqdist."""
    ref_idx, ref_sq = reference.vq_nearest(z, e)
    z64 = reference.vq_rows(z).reshape(-1, e.shape[1]).double()
    chosen = ((z64 - e.double()[idx.reshape(-1)]) ** 2).sum(1)
    bound = gap_bound(z, e, unit_roundoff)
    assert (idx.reshape(-1) >= 0).all()
    assert (chosen - ref_sq.double().reshape(-1) <= bound).all()
    assert ((sq.double().reshape(-1) - chosen).abs() <= bound + 1e-6 * chosen).all()
    # Picking another code takes a near-tie within the rounding error: rare on random data.
    differ = int((idx != ref_idx).sum())
    assert differ <= max(1, idx.numel() // 100), f"{differ} of {idx.numel()} rows differ from the exact argmin"


@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", NS)
def test_nearest_matches_reference(n, k, d):
    z, e = make(n, k, d)
    idx, sq = torch.ops.mage.vq_nearest(z, e, exact=True)
    ref_idx, ref_sq = reference.vq_nearest(z, e)
    assert idx.device.type == DEV and idx.dtype == torch.long and sq.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    assert_close(sq, ref_sq)


@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("k", (3, 1024))
@pytest.mark.parametrize("n", (7, 1000))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nearest_inexact_is_within_the_bound(dtype, n, k, d):
    z, e = make(n, k, d, dtype)
    idx, sq = torch.ops.mage.vq_nearest(z, e, exact=False)
    check_inexact(z, e, idx, sq, FP32_ROUNDOFF if dtype == torch.float32 else TENSOR_CORE_ROUNDOFF)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cb_dtype", [None, torch.float32, torch.bfloat16])
def test_nearest_dtypes(dtype, cb_dtype):
    z, e = make(1000, 1024, 64, dtype, seed=1)
    if cb_dtype is not None:
        e = e.to(cb_dtype)
    idx, sq = torch.ops.mage.vq_nearest(z, e)
    ref_idx, ref_sq = reference.vq_nearest(z, e)
    assert torch.equal(idx, ref_idx)  # exact: agrees with the fp64 argmin of the given values
    assert sq.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(sq, ref_sq)
    idx_fast, sq_fast = torch.ops.mage.vq_nearest(z, e, exact=False)
    assert sq_fast.dtype == sq.dtype
    check_inexact(z, e, idx_fast, sq_fast, TENSOR_CORE_ROUNDOFF)


def test_strided_inputs_are_read_in_place():
    z, e = make(300, 77, 40, seed=2)
    z_t = torch.randn(40, 600, device=DEV).t()[::2]  # (300, 40): D stride 600, row stride 2
    e_s = torch.randn(77, 80, device=DEV)[:, ::2]  # (77, 40), D stride 2
    z_x = torch.randn(1, 40, device=DEV).expand(300, 40)  # row stride 0
    for zz, ee in [(z_t, e), (z, e_s), (z_t, e_s), (z_x, e)]:
        for exact in (True, False):
            idx, sq = torch.ops.mage.vq_nearest(zz, ee, exact=exact)
            ref_idx, ref_sq = reference.vq_nearest(zz.contiguous(), ee.contiguous())
            if exact:
                assert torch.equal(idx, ref_idx)
                assert_close(sq, ref_sq)
            else:
                check_inexact(zz, ee, idx, sq, FP32_ROUNDOFF)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(3, 16, 5, 7), (2, 256, 16, 16), (1, 33, 1, 130)])
def test_nchw_rows_are_row_major_over_hw(shape, memory_format, dtype):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(shape, generator=g).to(DEV, dtype).to(memory_format=memory_format)
    e = torch.randn(300, shape[1], generator=g).to(DEV, dtype)
    idx, sq = torch.ops.mage.vq_nearest(z, e)
    flat = z.permute(0, 2, 3, 1).reshape(-1, shape[1])  # the reference tokenizer's layout
    ref_idx, ref_sq = reference.vq_nearest(flat, e)
    assert idx.shape == (shape[0], shape[2] * shape[3])
    assert torch.equal(idx.reshape(-1), ref_idx)
    assert_close(sq.reshape(-1), ref_sq)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_planted_ties_pick_lowest_index(dtype, exact):
    g = torch.Generator().manual_seed(4)
    e = torch.randn(300, 8, generator=g)
    # Duplicates in the same thread's codes (j and j + 4), another code group, another 128-code tile.
    dup = {7: [71, 11, 200], 130: [131, 299], 64: [0 + 64 + 128]}
    for src, copies in dup.items():
        for c in copies:
            e[c] = e[src]
    e[50] = -e[3]  # z = 0 is equidistant from codes 3 and 50 (and every code of equal norm)
    z = torch.cat([e[[7, 71, 200, 130, 299, 192]], torch.zeros(1, 8), e[[7]] + 1e-2 * torch.randn(1, 8, generator=g)])
    z, e = z.to(DEV, dtype), e.to(DEV, dtype)
    idx, sq = torch.ops.mage.vq_nearest(z, e, exact=exact)
    ref_idx, ref_sq = reference.vq_nearest(z, e)
    assert idx[:6].tolist() == [7, 7, 7, 130, 130, 64]
    assert idx[6] == int(torch.argmin((e.double() ** 2).sum(1)))
    assert torch.equal(idx, ref_idx)


def test_near_ties_are_reranked_exactly():
    # Two codes whose distances to z differ far below the fp32 resolution of the expanded form:
    # the fp32 search cannot order them, the fp64 re-rank must.
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1, 256, generator=g) * 30
    e = base.repeat(300, 1)
    for j in range(300):
        e[j, j % 256] += 2.0**-10 * (300 - j)  # code 299 is nearest to base, by a hair
    z = base.repeat(70, 1)
    z, e = z.to(DEV), e.to(DEV)
    idx, sq = torch.ops.mage.vq_nearest(z, e)
    ref_idx, ref_sq = reference.vq_nearest(z, e)
    assert torch.equal(idx, ref_idx) and (idx == 299).all()
    assert_close(sq, ref_sq)


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_exact_cases(name):
    # tests/test_vq_exact.py's planted cases on CUDA tensors. "below-fp64-resolution" (distances 2^-60 apart
    # at 1) failed before the re-rank decided fp64 ties exactly: it kept the lowest fp64-tied index, 0.
    z, e = planted_case(*PLANTED[name])
    z, e = z.to(DEV), e.to(DEV)
    idx, sq = torch.ops.mage.vq_nearest(z, e, exact=True)
    want, dists = exact_nearest(z.cpu(), e.cpu())
    assert idx.tolist() == want
    expected = torch.stack([rounded(d, sq.dtype) for d in dists])
    torch.testing.assert_close(sq.cpu(), expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype,big,small", FP64_TIED, ids=lambda v: str(v).replace("torch.", ""))
def test_rows_fp64_cannot_separate_are_decided_exactly(dtype, big, small):
    # Every code ties with every other in fp64; the exact answer is never code 0 for every row. Before the
    # re-rank compared such codes exactly (csrc/vq_exact.h, the code the CPU kernel runs), it returned the
    # lowest fp64-tied index, 0, on every row: this failed.
    z, e = fp64_tied_case(dtype, big, small, seed=big, device=DEV)
    want, _ = exact_nearest(z.cpu(), e.cpu())
    idx, _ = torch.ops.mage.vq_nearest(z, e, exact=True)
    assert any(w != 0 for w in want) and idx.tolist() == want
    z_q, q_idx, _, counts = torch.ops.mage.vq_quantize(z, e, 0.25)
    assert q_idx.tolist() == want and torch.equal(z_q, e[want])
    assert counts.tolist() == torch.bincount(torch.tensor(want), minlength=e.shape[0]).tolist()
    # The same rows inside a larger batch and codebook: listed among ordinary rows, spread over warps.
    zb, eb = make(300, 500, 2, dtype, seed=21)
    eb = torch.cat([e, (eb.abs().clamp(max=1) + 1) * 2.0**big])  # far codes after the tied ones
    zb = torch.cat([zb * 2.0**small, z, zb * 2.0**small])
    idx, _ = torch.ops.mage.vq_nearest(zb, eb, exact=True)
    assert idx[300:300 + z.shape[0]].tolist() == want
    assert torch.equal(idx.cpu(), torch.ops.mage.vq_nearest(zb.cpu(), eb.cpu(), exact=True)[0])


def test_agrees_with_the_cpu_kernel_on_random_fp64_ties():
    # Random rows whose few nearest codes differ below fp64 resolution: CUDA and CPU run the same exact
    # comparison, so they agree index for index.
    g = torch.Generator().manual_seed(22)
    e = torch.randn(64, 8, generator=g, dtype=torch.float64)
    e[:, 0] = 2.0**40
    z = torch.randn(500, 8, generator=g, dtype=torch.float64) * 2.0**-20
    z[:, 0] = 0.0
    e[:, 1:] = (e[:, 1:] * 2.0**-20 * 256).round() / 256
    for dtype in (torch.float32, torch.float64):
        zc, ec = z.to(dtype), e.to(dtype)
        idx, _ = torch.ops.mage.vq_nearest(zc.to(DEV), ec.to(DEV), exact=True)
        assert torch.equal(idx.cpu(), torch.ops.mage.vq_nearest(zc, ec, exact=True)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_rows_and_codes(dtype):
    z, e = make(100, 200, 12, dtype, seed=6)
    e[2] = float("inf")
    e[150, 3] = float("nan")
    z[1, 0] = float("nan")
    z[64, 11] = float("inf")
    z[99, 5] = -float("inf")
    z[10] = e[2].nan_to_num(posinf=0.0)  # a row nearest to the zeroed-out image of an invalid code
    for exact in (True, False):
        idx, sq = torch.ops.mage.vq_nearest(z, e, exact=exact)
        ref_idx, ref_sq = reference.vq_nearest(z, e)
        bad = torch.tensor([1, 64, 99], device=DEV)
        assert (idx[bad] == -1).all() and torch.isnan(sq[bad]).all()
        assert not ((idx == 2) | (idx == 150)).any()
        if exact:
            assert torch.equal(idx, ref_idx)
            assert_close(sq, ref_sq, equal_nan=True)
    none_finite = torch.full((3, 12), float("nan"), device=DEV, dtype=dtype)
    idx, sq = torch.ops.mage.vq_nearest(z[:5], none_finite)
    assert (idx == -1).all() and torch.isnan(sq).all()


def test_empty_input():
    idx, sq = torch.ops.mage.vq_nearest(torch.randn(0, 8, device=DEV), torch.randn(4, 8, device=DEV))
    assert idx.shape == (0,) and sq.shape == (0,)
    z_q, idx, loss, counts = torch.ops.mage.vq_quantize(torch.randn(0, 8, 2, 2, device=DEV), torch.randn(4, 8, device=DEV), 0.25)
    assert z_q.shape == (0, 8, 2, 2) and idx.shape == (0, 4) and counts.sum() == 0 and loss == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["rows", "nchw", "channels_last"])
def test_quantize_matches_reference(dtype, layout):
    g = torch.Generator().manual_seed(7)
    if layout == "rows":
        z = torch.randn(1001, 32, generator=g)
    else:
        z = torch.randn(2, 32, 13, 11, generator=g)
    z = z.to(DEV, dtype)
    if layout == "channels_last":
        z = z.to(memory_format=torch.channels_last)
    e = torch.randn(257, 32, generator=g).to(DEV, dtype)
    z_q, idx, loss, counts = torch.ops.mage.vq_quantize(z, e, 0.25)
    r_zq, r_idx, r_loss, r_counts = reference.vq_quantize(z, e, 0.25)
    assert torch.equal(idx, r_idx) and torch.equal(counts, r_counts) and torch.equal(z_q, r_zq)
    assert z_q.dtype == dtype and z_q.shape == z.shape and z_q.is_contiguous()
    assert counts.dtype == torch.long and counts.sum() == idx.numel()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.dim() == 0
    assert_close(loss, r_loss)


def test_quantize_mixed_dtypes_and_invalid_rows():
    z, e = make(500, 130, 24, torch.bfloat16, seed=8)
    e = e.float()
    z[3, 0] = float("nan")
    z_q, idx, loss, counts = torch.ops.mage.vq_quantize(z, e, 0.25)
    r_zq, r_idx, r_loss, r_counts = reference.vq_quantize(z, e, 0.25)
    assert torch.equal(idx, r_idx) and idx[3] == -1
    torch.testing.assert_close(z_q, r_zq, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(z_q[3]).all() and torch.isnan(loss) and torch.isnan(r_loss)
    assert torch.equal(counts, r_counts) and counts.sum() == idx.numel() - 1


def test_quantize_loss_is_deterministic():
    z, e = make(65536, 1024, 64, seed=9)
    losses = [torch.ops.mage.vq_quantize(z, e, 0.25)[2] for _ in range(3)]
    assert all(torch.equal(losses[0], x) for x in losses[1:])


def test_counts_under_contention():
    # Every row picks code 5: 2^17 atomic increments on one counter.
    e = torch.randn(64, 16, device=DEV)
    z = e[5].repeat(1 << 17, 1)
    _, idx, _, counts = torch.ops.mage.vq_quantize(z, e, 0.25)
    assert (idx == 5).all() and counts[5] == 1 << 17 and counts.sum() == 1 << 17


def test_no_host_sync_and_cuda_graph_capture():
    z, e = make(4096, 512, 64, seed=10)
    zb, eb = z.bfloat16(), e.bfloat16()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.mage.vq_nearest(z, e, exact=True)
        torch.ops.mage.vq_nearest(z, e, exact=False)
        torch.ops.mage.vq_nearest(zb, eb, exact=False)
        torch.ops.mage.vq_quantize(z, e, 0.25)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as CUDA graphs require
        torch.ops.mage.vq_quantize(z, e, 0.25)
        torch.ops.mage.vq_nearest(zb, eb, exact=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.mage.vq_quantize(z, e, 0.25)
        idx_fast, sq_fast = torch.ops.mage.vq_nearest(zb, eb, exact=False)  # the tensor-core search
    z.copy_(torch.randn_like(z))
    zb.copy_(torch.randn_like(zb))
    graph.replay()
    torch.cuda.synchronize()
    ref = reference.vq_quantize(z, e, 0.25)
    assert torch.equal(out[1], ref[1]) and torch.equal(out[3], ref[3])
    check_inexact(zb, eb, idx_fast, sq_fast, TENSOR_CORE_ROUNDOFF)


def test_runs_on_the_current_stream():
    z, e = make(20000, 1024, 64, seed=11)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        idx, _ = torch.ops.mage.vq_nearest(z, e)
    side.synchronize()
    assert torch.equal(idx, reference.vq_nearest(z, e)[0])


@pytest.mark.parametrize("nchw", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(nchw, requires_grad):
    g = torch.Generator().manual_seed(12)
    z = torch.randn(2, 8, 3, 3, generator=g) if nchw else torch.randn(20, 8, generator=g)
    e = torch.randn(16, 8, generator=g)
    z = z.to(DEV).requires_grad_(requires_grad)
    e = e.to(DEV).requires_grad_(requires_grad)
    # As in test_vq.py: opcheck's aot_dispatch helper cannot sum an int64 first output with gradients.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not requires_grad:
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(torch.ops.mage.vq_nearest.default, (z, e), {"exact": True}, test_utils=utils)
    torch.library.opcheck(torch.ops.mage.vq_nearest.default, (z, e), {"exact": False}, test_utils=utils)
    torch.library.opcheck(torch.ops.mage.vq_quantize.default, (z, e, 0.25), test_utils=utils)


def test_compile_fullgraph_backward():
    z, e = make(512, 64, 16, seed=13)
    z.requires_grad_(True)

    def step(z, e):
        z_q, idx, loss, counts = mk.vq_quantize(z, e)
        return (z_q * z_q).sum() + loss, idx

    ref_out, ref_idx = step(z, e)
    out, idx = torch.compile(step, fullgraph=True, backend="aot_eager")(z, e)
    assert torch.equal(idx, ref_idx)
    assert_close(out, ref_out)
    (grad,) = torch.autograd.grad(out, z)
    (ref_grad,) = torch.autograd.grad(ref_out, z, retain_graph=True)
    assert_close(grad, ref_grad)


def test_agrees_with_the_cpu_kernel():
    z, e = make(3000, 700, 48, torch.bfloat16, seed=14)
    cuda = torch.ops.mage.vq_quantize(z, e, 0.25)
    cpu = torch.ops.mage.vq_quantize(z.cpu(), e.cpu(), 0.25)
    for a, b in zip(cuda[:2] + cuda[3:], cpu[:2] + cpu[3:]):
        assert torch.equal(a.cpu(), b)
    assert_close(cuda[2].cpu(), cpu[2])


@pytest.mark.slow
def test_64bit_indexing_n_times_k_over_2_31():
    z, e = make((1 << 20) + 3, (1 << 11) + 1, 1, seed=15)  # N * K > 2^31
    idx, _ = torch.ops.mage.vq_nearest(z, e)
    assert torch.equal(idx, reference.vq_nearest(z, e)[0])


@pytest.mark.slow
def test_64bit_indexing_n_times_d_over_2_31():
    k, d = 37, 130
    n = (1 << 31) // d + 1000  # N * D > 2^31: the last rows start past element 2^31
    e = torch.randn(k, d, device=DEV, dtype=torch.bfloat16)
    want = torch.arange(n, device=DEV) % k
    z = e[want]  # every row is exactly one code: distance 0, a unique nearest code
    for exact in (True, False):
        idx, sq = torch.ops.mage.vq_nearest(z, e, exact=exact)
        assert torch.equal(idx, want)
    z_q, idx, _, counts = torch.ops.mage.vq_quantize(z, e, 0.25)
    assert torch.equal(idx, want) and torch.equal(z_q[-5:], z[-5:]) and counts.sum() == n
