"""Masked-token ops (mage_kernels/masking.py) against the pure-PyTorch reference: bit-exact forwards
(data movement), backward against autograd of the reference and gradcheck, extremes, per-row counts,
bad inputs, opcheck, a compiled masked encoder-decoder step, and the Triton kernels under the
interpreter."""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import mage_kernels
from mage_kernels import reference as ref
_pad_with_cls_backward_reference = ref.pad_with_cls_backward

from conftest import DEVICES, FLOAT_DTYPES, has_triton, requires_cuda, requires_triton

ALL_DTYPES = FLOAT_DTYPES + [torch.float64]
# Triton launchers run on CUDA tensors, or on CPU tensors under the interpreter (no GPU).
# Where Triton kernels run here: CUDA tensors on a GPU, else CPU tensors under the interpreter, else nowhere.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None
requires_triton_here = pytest.mark.skipif(not has_triton() or TRITON_DEVICE is None,
                                          reason="Triton needs a GPU or TRITON_INTERPRET=1")
# (B, L, C): 1s, primes, non-powers of two, MAGE's L = 256 and an odd, large C.
SHAPES = [(1, 1, 1), (3, 7, 5), (2, 13, 33), (5, 256, 12), (2, 31, 1027)]


def _noise(B, L, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, L, generator=g).to(device=device, dtype=dtype)


def _tied_noise(B, L, seed=0):
    """Few distinct values, NaNs and signed zeros: every tie-break path of the rank."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 4, (B, L), generator=g).float() - 1.0
    noise[noise == -1.0] = -0.0
    noise[torch.rand(B, L, generator=g) < 0.15] = float("nan")
    return noise


def _counts(B, L, seed=0):
    """Per-row masked / dropped counts including the extremes 0 and L."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randint(0, L + 1, (B,), generator=g)
    m = torch.randint(0, L + 1, (B,), generator=g)
    d[0], m[0] = 0, L
    if B > 1:
        d[1], m[1] = L, 0
    return m, d


def _plan(B, L, device="cpu", M=None, D=None, seed=0):
    M = (L * 3) // 4 if M is None else M
    D = L // 2 if D is None else D
    return mage_kernels.mask_plan(_noise(B, L, device, seed=seed), M, D)


def _rand(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _equal(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------ mask_plan


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("B,L", [(1, 1), (3, 7), (4, 256), (2, 300)])
def test_mask_plan_matches_reference(device, dtype, B, L):
    noise = _noise(B, L, device, dtype)
    for M, D in [(0, 0), (L, L), (L, 0), (math.ceil(0.7 * L), math.ceil(0.5 * L)), (L // 3, L // 2)]:
        masked, dropped, keep = mage_kernels.mask_plan(noise, M, D)
        expected = ref.mask_plan(noise, torch.tensor(M, device=device), torch.tensor(D, device=device), L - D)
        for a, e in zip((masked, dropped, keep), expected):
            _equal(a, e)
        assert keep.shape == (B, L - D)
        assert (masked.sum(1) == M).all() and (dropped.sum(1) == D).all()


@pytest.mark.parametrize("device", DEVICES)
def test_mask_plan_ties_nan_signed_zero(device):
    noise = _tied_noise(6, 41).to(device)
    m, d = _counts(6, 41)
    m, d = m.to(device), d.to(device)
    out = mage_kernels.mask_plan(noise, m, d, num_kept=41)
    for a, e in zip(out, ref.mask_plan(noise, m, d, 41)):
        _equal(a, e)
    # The rank is (noise, position) with NaN last, so equal values go to the lower position first.
    row = torch.tensor([[0.5, float("nan"), 0.5, -0.0, 0.0, 0.5]], device=device)
    masked, dropped, keep = mage_kernels.mask_plan(row, 4, 3)
    # Order: -0.0 (3), 0.0 (4), 0.5 (0), 0.5 (2), 0.5 (5), NaN (1).
    assert masked.tolist() == [[True, False, True, True, True, False]]
    assert dropped.tolist() == [[True, False, False, True, True, False]]
    assert keep.tolist() == [[1, 2, 5]]


@pytest.mark.parametrize("device", DEVICES)
def test_mask_plan_per_row_counts_pad_with_minus_one(device):
    B, L = 7, 29
    noise = _noise(B, L, device)
    m, d = _counts(B, L, seed=3)
    m, d = m.to(device), d.to(device)
    masked, dropped, keep = mage_kernels.mask_plan(noise, m, d)
    assert keep.shape == (B, L - int(d.min()))
    assert torch.equal(masked.sum(1), m) and torch.equal(dropped.sum(1), d)
    for b in range(B):
        kept = (~dropped[b]).nonzero().flatten()
        assert torch.equal(keep[b, : kept.numel()], kept)
        assert (keep[b, kept.numel():] == -1).all()
    # Counts may be strided views.
    strided = mage_kernels.mask_plan(noise, torch.stack([m, m], 1)[:, 0], torch.stack([d, d], 1)[:, 1])
    for a, e in zip(strided, (masked, dropped, keep)):
        _equal(a, e)
    # A wider keep_idx than needed is padded too.
    wide = mage_kernels.mask_plan(noise, m, d, num_kept=L)[2]
    assert torch.equal(wide[:, : keep.shape[1]], keep) and (wide[:, keep.shape[1]:] == -1).all()


def test_mask_plan_matches_published_procedure():
    """Without ties the plan is the published sort + cut-off (docs/REFERENCE.md 4.4 step 4)."""
    noise = _noise(8, 256)
    masked, dropped, _ = mage_kernels.mask_plan(noise, 180, 128)
    pub_mask, pub_drop = ref.published_mask_plan(noise, 180, 128)
    assert torch.equal(masked, pub_mask[:, 1:].bool()) and torch.equal(dropped, pub_drop[:, 1:].bool())


def test_mask_plan_dropped_subset_of_masked():
    masked, dropped, _ = _plan(16, 256, M=200, D=128)
    assert not (dropped & ~masked).any()


# ---------------------------------------------------------------------------------- gather / scatter


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("B,L,C", SHAPES)
def test_gather_keep_matches_reference(device, dtype, B, L, C):
    _, _, keep = _plan(B, L, device)
    x = _rand((B, 1 + L, C), dtype, device)
    _equal(mage_kernels.gather_keep(x, keep), ref.gather_keep(x, keep))
    y = ref.gather_keep(x, keep)
    _equal(torch.ops.mage.scatter_keep(y, keep, L), ref.scatter_keep(y, keep, L))


@pytest.mark.parametrize("device", DEVICES)
def test_gather_keep_non_contiguous_and_padding(device):
    B, L, C = 4, 23, 9
    m, d = _counts(B, L, seed=1)
    _, _, keep = mage_kernels.mask_plan(_noise(B, L, device), m.to(device), d.to(device), num_kept=L)
    base = _rand((B, C, 1 + L), torch.float32, device)
    for x in (base.transpose(1, 2), _rand((B, 1 + L, 2 * C), torch.float32, device)[..., ::2]):
        assert not x.is_contiguous()
        y = mage_kernels.gather_keep(x, keep)
        _equal(y, ref.gather_keep(x, keep))
        assert (y[:, 1:][keep < 0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_gather_keep_empty(device):
    x = torch.zeros(0, 5, 3, device=device)
    keep = torch.zeros(0, 2, dtype=torch.long, device=device)
    assert mage_kernels.gather_keep(x, keep).shape == (0, 3, 3)
    x = torch.zeros(2, 5, 0, device=device)
    keep = torch.tensor([[0, 1], [2, 3]], device=device)
    assert mage_kernels.gather_keep(x, keep).shape == (2, 3, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_keep_backward_matches_reference_autograd(device, dtype):
    B, L, C = 3, 17, 10
    m, d = _counts(B, L, seed=2)
    _, _, keep = mage_kernels.mask_plan(_noise(B, L, device), m.to(device), d.to(device))
    x = _rand((B, 1 + L, C), dtype, device).requires_grad_()
    g = _rand((B, 1 + keep.shape[1], C), dtype, device, seed=1)
    (gx,) = torch.autograd.grad(mage_kernels.gather_keep(x, keep), x, g)
    (ex,) = torch.autograd.grad(ref.gather_keep(x, keep), x, g)
    _equal(gx, ex)  # a scatter of distinct rows: exact


def test_gather_keep_gradcheck():
    B, L, C = 2, 9, 3
    m, d = _counts(B, L, seed=4)
    _, _, keep = mage_kernels.mask_plan(_noise(B, L), m, d)
    x = _rand((B, 1 + L, C), torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: mage_kernels.gather_keep(x, keep), (x,))
    y = _rand((B, 1 + keep.shape[1], C), torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda y: torch.ops.mage.scatter_keep(y, keep, L), (y,))


# -------------------------------------------------------------------------------------- pad_with_cls


def _pad_inputs(B, L, C, dtype, device, M=None, D=None, seed=0):
    masked, _, keep = _plan(B, L, device, M, D, seed)
    y = _rand((B, 1 + keep.shape[1], C), dtype, device, seed)
    pos = _rand((1 + L, C), dtype, device, seed + 1)
    pad = _rand((C,), dtype, device, seed + 2)
    return y, keep, masked, pos, pad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("B,L,C", SHAPES)
def test_pad_with_cls_matches_reference(device, dtype, B, L, C):
    y, keep, masked, pos, pad = _pad_inputs(B, L, C, dtype, device)
    for kwargs in ({}, {"pos_embed": pos}, {"pad": pad}, {"pos_embed": pos, "pad": pad}):
        z = mage_kernels.pad_with_cls(y, keep, masked, **kwargs)
        _equal(z, ref.pad_with_cls(y, keep, masked, kwargs.get("pos_embed"), kwargs.get("pad")))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the Triton interpreter
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_pad_with_cls_special_values(device, dtype):
    """The fused pos_embed add rounds like torch's add: NaN, inf, overflow and ties to even."""
    B, L, C = 2, 9, 40
    y, keep, masked, pos, _ = _pad_inputs(B, L, C, dtype, device)
    eps, big = torch.finfo(dtype).eps, torch.finfo(dtype).max
    # Everywhere else: 1 + eps/2 and (1 + eps) + eps/2, exact ties that round to even.
    y = (1.0 + eps * (torch.arange(y.numel(), device=device) % 2)).to(dtype).reshape(y.shape)
    pos = torch.full_like(pos, eps / 2)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), big, -big, 0.0, -0.0, 1.0], dtype=dtype)
    y.view(-1)[: 8 * 5] = specials.to(device).repeat(5)
    pos.view(-1)[: 8 * 5] = specials.to(device).repeat_interleave(5)
    expected = ref.pad_with_cls(y, keep, masked, pos)
    _equal(mage_kernels.pad_with_cls(y, keep, masked, pos_embed=pos), expected)
    if has_triton() and device == TRITON_DEVICE:
        from mage_kernels.triton import masking as tri

        _equal(tri.pad_with_cls(y, keep, masked, pos, None), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_pad_with_cls_non_contiguous(device):
    B, L, C = 3, 21, 6
    m, d = _counts(B, L, seed=11)
    masked, _, keep = mage_kernels.mask_plan(_noise(B, L, device), m.to(device), d.to(device), num_kept=L)
    y = _rand((B, C, 1 + L), torch.float32, device).transpose(1, 2)
    pos = _rand((C, 1 + L), torch.float32, device, seed=1).t()
    pad = _rand((2 * C,), torch.float32, device, seed=2)[::2]
    for kwargs in ({"pos_embed": pos}, {"pad": pad}):
        expected = ref.pad_with_cls(y, keep, masked, kwargs.get("pos_embed"), kwargs.get("pad"))
        _equal(mage_kernels.pad_with_cls(y, keep, masked, **kwargs), expected)
    gz = _rand((B, 1 + L, 2 * C), torch.float32, device, seed=3)[..., ::2]
    for mae, pos in BACKWARD_FLAGS:
        actual = torch.ops.mage.pad_with_cls_backward(gz, keep, masked, mae, pos)
        _check_pad_backward(actual, _pad_with_cls_backward_reference(gz, keep, masked, mae, pos), L)


@pytest.mark.parametrize("device", DEVICES)
def test_pad_with_cls_matches_published_padding(device):
    """The published decoder padding (docs/REFERENCE.md 4.5) on the published masks."""
    B, L, C = 4, 64, 16
    noise = _noise(B, L, device)
    pub_mask, pub_drop = ref.published_mask_plan(noise, 45, 32)
    masked, _, keep = mage_kernels.mask_plan(noise, 45, 32)
    y = _rand((B, 1 + L - 32, C), torch.float32, device)
    pos = _rand((1, 1 + L, C), torch.float32, device)
    expected = ref.published_pad_with_cls(y, pub_drop, pub_mask, pos)
    _equal(mage_kernels.pad_with_cls(y, keep, masked, pos_embed=pos), expected)
    x = _rand((B, 1 + L, C), torch.float32, device)
    _equal(mage_kernels.gather_keep(x, keep), ref.published_gather_keep(x, pub_drop))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,D", [(0, 0), (19, 19), (19, 0), (10, 4), (0, 7)])
def test_pad_with_cls_extremes(device, M, D):
    """Nothing masked, everything masked and dropped, nothing dropped, masked < dropped."""
    B, L, C = 3, 19, 7
    y, keep, masked, pos, _ = _pad_inputs(B, L, C, torch.float32, device, M, D)
    z = mage_kernels.pad_with_cls(y, keep, masked)
    _equal(z, ref.pad_with_cls(y, keep, masked))
    if M == L:
        _equal(z, y[:, :1].expand(B, 1 + L, C))
    if M == 0 and D == 0:
        _equal(z, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["cls", "mae"])
def test_pad_with_cls_backward_matches_reference_autograd(device, dtype, mode):
    B, L, C = 3, 40, 24
    y, keep, masked, pos, pad = _pad_inputs(B, L, C, dtype, device)
    pad = pad if mode == "mae" else None
    leaves = [t.clone().requires_grad_() for t in (y, pos) + ((pad,) if pad is not None else ())]
    g = _rand((B, 1 + L, C), dtype, device, seed=5)

    def grads(fn):
        y_, pos_, *pad_ = leaves
        out = fn(y_, keep, masked, pos_, pad_[0] if pad_ else None)
        return torch.autograd.grad(out, leaves, g)

    actual = grads(lambda *a: mage_kernels.pad_with_cls(a[0], a[1], a[2], pos_embed=a[3], pad=a[4]))
    # Oracle: autograd of the reference in fp64, so the bound is the kernel's own rounding.
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    out = ref.pad_with_cls(leaves64[0], keep, masked, leaves64[1], leaves64[2] if pad is not None else None)
    expected = torch.autograd.grad(out, leaves64, g.double())
    for a, e in zip(actual, expected):
        assert a.dtype == dtype
        # Sums of up to L + 1 terms rounded once to dtype: one ulp of the sum's magnitude.
        torch.testing.assert_close(a.double(), e, rtol=TOL_SUM[dtype], atol=TOL_SUM[dtype] * e.abs().max().item())


# Relative rounding of a sum of unit-scale terms accumulated in fp32 (fp64) and rounded once to dtype.
TOL_SUM = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def _close_sums(actual, expected, n_terms):
    """Sums of up to n_terms unit-scale terms, in another order than the oracle's."""
    tol = TOL_SUM[actual.dtype] if actual.dtype in TOL_SUM else TOL_SUM[torch.float32]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * math.sqrt(n_terms))


# (mae, pos) flag pairs of pad_with_cls_backward: [C] padding with pos_embed, MAE padding without.
BACKWARD_FLAGS = [(False, True), (True, False)]


def _check_pad_backward(actual, expected, L):
    """Gathered rows bit for bit; the sums (row 0 and pad_sum over L tokens, grad_pos over B rows) closely."""
    (gy, ps, gp), (ey, es, ep) = [[t.cpu() for t in r] for r in (actual, expected)]
    assert ps.shape == es.shape and gp.shape == ep.shape
    _equal(gy[:, 1:], ey[:, 1:])
    _close_sums(gy[:, 0], ey[:, 0], L)
    _close_sums(ps, es, L)
    _close_sums(gp, ep, max(gy.shape[0], 1))


@pytest.mark.parametrize("mode", ["cls", "mae"])
def test_pad_with_cls_gradcheck(mode):
    B, L, C = 2, 11, 3
    m, d = _counts(B, L, seed=6)
    masked, _, keep = mage_kernels.mask_plan(_noise(B, L), m, d)
    y = _rand((B, 1 + keep.shape[1], C), torch.float64).requires_grad_()
    pos = _rand((1 + L, C), torch.float64, seed=1).requires_grad_()
    pad = _rand((C,), torch.float64, seed=2).requires_grad_() if mode == "mae" else None
    inputs = (y, pos) + ((pad,) if pad is not None else ())
    assert torch.autograd.gradcheck(
        lambda y, pos, *p: mage_kernels.pad_with_cls(y, keep, masked, pos_embed=pos, pad=p[0] if p else None), inputs
    )


def test_pad_with_cls_accumulates_into_class_slot():
    """Every padded token's gradient lands in y[:, 0] (or in pad), the rest goes back to its row."""
    B, L, C = 2, 8, 3
    masked, _, keep = _plan(B, L, M=6, D=4)
    y = torch.zeros(B, 1 + keep.shape[1], C, dtype=torch.float64, requires_grad=True)
    mage_kernels.pad_with_cls(y, keep, masked).sum().backward()
    n_padded = masked.sum(1).double()  # dropped are masked here (M >= D)
    assert torch.equal(y.grad[:, 0, 0], 1.0 + n_padded)
    pad = torch.zeros(C, dtype=torch.float64, requires_grad=True)
    y.grad = None
    mage_kernels.pad_with_cls(y, keep, masked, pad=pad).sum().backward()
    assert torch.equal(pad.grad, torch.full((C,), n_padded.sum().item(), dtype=torch.float64))
    assert (y.grad[:, 0] == 1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mae,pos", BACKWARD_FLAGS + [(False, False), (True, True)])
def test_pad_with_cls_backward_op_matches_reference(device, dtype, mae, pos):
    B, L, C = 4, 37, 70
    m, d = _counts(B, L, seed=7)
    masked, _, keep = mage_kernels.mask_plan(_noise(B, L, device), m.to(device), d.to(device))
    gz = _rand((B, 1 + L, C), dtype, device)
    actual = torch.ops.mage.pad_with_cls_backward(gz, keep, masked, mae, pos)
    _check_pad_backward(actual, _pad_with_cls_backward_reference(gz, keep, masked, mae, pos), L)


def _set_isa(monkeypatch, isa: str) -> None:
    """MAGE_CPU_ISA=isa for the test (avx2 skipped where the CPU lacks it; avx512_bf16 runs everywhere, on the
    AVX2 or portable loops where the CPU lacks AVX-512 BF16 or AVX2); on Linux, checks that the bf16 adds take
    AVX-512 BF16 exactly where they should: auto and avx512_bf16 on a CPU whose /proc/cpuinfo lists it."""
    if isa == "avx2" and mage_kernels.cpu_isa()["detected"] == "scalar":
        pytest.skip("this CPU lacks AVX2/FMA")
    monkeypatch.setenv("MAGE_CPU_ISA", isa)
    info = mage_kernels.cpu_isa()
    assert info["path"] == (info["detected"] if isa == "auto" else isa)
    if sys.platform.startswith("linux"):
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        has_bf16 = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16"} <= set(flags)
        assert info["avx512_bf16_loops"] == (has_bf16 and isa in ("auto", "avx512_bf16"))


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512_bf16", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_row_loops_every_isa_path_and_thread_count(isa, dtype, monkeypatch, on_threads):
    """MAGE_CPU_ISA picks the row loops' portable, AVX2 or (auto and avx512_bf16, where the CPU has it) AVX-512
    BF16 build per call; each, on 1 or 2 threads, gives the reference's bits (forward) and the same bits on 1
    and 2 threads (backward sums in a fixed order)."""
    _set_isa(monkeypatch, isa)
    B, L, C = 6, 37, 1027  # C: whole vectors and a tail
    y, keep, masked, pos, _ = _pad_inputs(B, L, C, dtype, "cpu")
    gz = _rand((B, 1 + L, C), dtype, "cpu", seed=5)

    def run():
        z = mage_kernels.pad_with_cls(y, keep, masked, pos_embed=pos)
        _equal(z, ref.pad_with_cls(y, keep, masked, pos, None))
        return [z, *torch.ops.mage.pad_with_cls_backward(gz, keep, masked, False, True)]

    results = on_threads(run)
    _check_pad_backward(results[0][1:], _pad_with_cls_backward_reference(gz, keep, masked, False, True), L)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _bf16_bits_equal(actual, expected):
    """Bit for bit where expected is a number; every NaN as c10::BFloat16's 0x7FC0 (torch's own vector
    conversion writes other NaN payloads)."""
    a, e = actual.view(torch.int16), expected.view(torch.int16)
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(a[~nan], e[~nan])
    assert (a[nan] == 0x7FC0).all()


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512_bf16"])
def test_cpu_bf16_add_and_round_every_bit_pattern(isa, monkeypatch):
    """The bf16 adds and roundings of the CPU row loops (hand-vectorized on the AVX2 path: widen, fp32 add,
    round to nearest even, NaN, pack; on AVX-512 BF16 vcvtne2ps2bf16, with the subnormal and NaN sums it
    rounds otherwise redone) on every one of the 65,536 bf16 bit patterns: forward y + pos_embed against fp32
    add rounded by torch, in an output of >= 8 MiB (rows streamed out) and a small one, and y + 0 (every
    subnormal pattern a subnormal sum); the backward's grad_pos, two rows summed in fp32 from +0 and rounded
    once, likewise."""
    _set_isa(monkeypatch, isa)
    L, C = 255, 257  # (1 + L) * C >= 2^16; C: whole vectors and a tail
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    flat = torch.cat([patterns, patterns[: (1 + L) * C - 2**16]]).view(torch.bfloat16)
    pos = _rand((1 + L, C), torch.bfloat16, seed=1)
    pos.view(-1)[:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, 2.0**-133, 3e38])
    for B in (64, 2):  # 64 * 256 * 257 * 2 bytes >= 8 MiB
        y = torch.stack([flat.roll(1031 * b).view(1 + L, C) for b in range(B)])
        masked, _, keep = mage_kernels.mask_plan(_noise(B, L), 0, 0)  # every row is y's own
        z = mage_kernels.pad_with_cls(y, keep, masked, pos_embed=pos)
        _bf16_bits_equal(z, (y.float() + pos.float()).to(torch.bfloat16))
    z = mage_kernels.pad_with_cls(y, keep, masked, pos_embed=torch.zeros_like(pos))
    _bf16_bits_equal(z, (y.float() + 0.0).to(torch.bfloat16))
    gy, _, gp = torch.ops.mage.pad_with_cls_backward(y, keep, masked, False, True)
    _bf16_bits_equal(gp, (torch.zeros(1 + L, C) + y[0].float() + y[1].float()).to(torch.bfloat16))


# ---------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors():
    B, L, C = 2, 6, 4
    x = torch.randn(B, 1 + L, C)
    good = torch.tensor([[0, 2, 5], [1, 3, 4]])
    masked = torch.zeros(B, L, dtype=torch.bool)
    cases = [
        (lambda: mage_kernels.gather_keep(x, torch.tensor([[0, 2, 6], [1, 3, 4]])), ValueError, r"\[0, L\) = \[0, 6\)"),
        (lambda: mage_kernels.gather_keep(x, torch.tensor([[0, -2, 5], [1, 3, 4]])), ValueError, "or -1"),
        (lambda: mage_kernels.gather_keep(x, torch.tensor([[0, 2, 2], [1, 3, 4]])), ValueError, "strictly increasing"),
        (lambda: mage_kernels.gather_keep(x, torch.tensor([[0, 3, 2], [1, 3, 4]])), ValueError, "strictly increasing"),
        (lambda: mage_kernels.gather_keep(x, torch.tensor([[0, -1, 2], [1, 3, 4]])), ValueError, "followed only by -1"),
        (lambda: mage_kernels.gather_keep(x, good.int()), TypeError, "int64"),
        (lambda: mage_kernels.gather_keep(x, good[:1]), ValueError, "B = 2"),
        (lambda: mage_kernels.gather_keep(x[0], good), ValueError, r"\[B, 1\+L, C\]"),
        (lambda: mage_kernels.gather_keep(x.long(), good), TypeError, "float32"),
        (lambda: mage_kernels.pad_with_cls(x, good, masked), ValueError, "Lk = keep_idx.size"),
        (lambda: mage_kernels.pad_with_cls(x[:, :4], good, masked.int()), TypeError, "bool"),
        (lambda: mage_kernels.pad_with_cls(x[:, :4], good, masked[:, :5]), ValueError, r"\[0, L\) = \[0, 5\)"),
        (lambda: mage_kernels.pad_with_cls(x[:, :4], good, masked, pos_embed=torch.randn(L, C)), ValueError, "pos_emb"),
        (lambda: mage_kernels.pad_with_cls(x[:, :4], good, masked, pad=torch.randn(C + 1)), ValueError, "pad must be"),
        (lambda: mage_kernels.mask_plan(torch.rand(B, L), L + 1, 0), ValueError, "num_masked"),
        (lambda: mage_kernels.mask_plan(torch.rand(B, L), 3, torch.tensor([1, 7])), ValueError, "num_dropped"),
        (lambda: mage_kernels.mask_plan(torch.rand(B, L), 3, torch.tensor([1, 2]), num_kept=4), ValueError, "num_kept"),
        (lambda: mage_kernels.mask_plan(torch.rand(B, L), 3, torch.tensor([1, 2, 3])), ValueError, r"\[B\]"),
        (lambda: mage_kernels.mask_plan(torch.rand(B, L), torch.tensor([1.0, 2.0]), 1), TypeError, "int64"),
        (lambda: mage_kernels.mask_plan(torch.rand(B, L, 1), 3, 2), ValueError, r"\[B, L\]"),
    ]
    for fn, err, pattern in cases:
        with pytest.raises(err, match=pattern):
            fn()


@pytest.mark.parametrize("op", ["gather_keep", "scatter_keep", "pad_with_cls", "mask_plan"])
def test_reference_and_native_reject_the_same_keep_idx(op):
    """The C++ kernel and the Python checks (reference, Triton, fake) agree on what is invalid."""
    B, L, C = 2, 6, 4
    bad = torch.tensor([[0, 4, 3], [1, 3, 4]])
    args = {
        "gather_keep": (torch.randn(B, 1 + L, C), bad),
        "scatter_keep": (torch.randn(B, 4, C), bad, L),
        "pad_with_cls": (torch.randn(B, 4, C), bad, torch.zeros(B, L, dtype=torch.bool)),
        "mask_plan": (torch.rand(B, L), torch.tensor(3), torch.tensor([4, 1]), 3),
    }[op]
    with pytest.raises(ValueError):
        getattr(torch.ops.mage, op)(*args)
    with pytest.raises(ValueError):
        getattr(ref, op)(*args)


# ------------------------------------------------------------------------------------ opcheck/compile


def _opcheck_samples(device):
    B, L, C = 3, 10, 5
    m, d = (t.to(device) for t in _counts(B, L, seed=8))
    noise = _noise(B, L, device)
    masked, _, keep = mage_kernels.mask_plan(noise, m, d)
    x = _rand((B, 1 + L, C), torch.float32, device, seed=1).requires_grad_()
    y = _rand((B, 1 + keep.shape[1], C), torch.float32, device, seed=2).requires_grad_()
    pos = _rand((1 + L, C), torch.float32, device, seed=3).requires_grad_()
    pad = _rand((C,), torch.float32, device, seed=4).requires_grad_()
    gz = _rand((B, 1 + L, C), torch.float32, device, seed=5)
    count = lambda n: torch.tensor(n, device=device)  # noqa: E731
    return [
        (torch.ops.mage.mask_plan.default, (noise, m, d, keep.shape[1])),
        (torch.ops.mage.mask_plan.default, (noise, count(7), count(4), 6)),
        (torch.ops.mage.gather_keep.default, (x, keep)),
        (torch.ops.mage.scatter_keep.default, (y, keep, L)),
        (torch.ops.mage.pad_with_cls.default, (y, keep, masked, pos, None)),
        (torch.ops.mage.pad_with_cls.default, (y, keep, masked, None, pad)),
        (torch.ops.mage.pad_with_cls_backward.default, (gz, keep, masked, False, True)),
        (torch.ops.mage.pad_with_cls_backward.default, (gz, keep, masked, True, False)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(8))
def test_opcheck(device, index):
    op, args = _opcheck_samples(device)[index]
    torch.library.opcheck(op, args)


class _TinyMAGE(torch.nn.Module):
    """A masked encoder-decoder step with MAGE's data flow (docs/REFERENCE.md 4.4-4.5)."""

    def __init__(self, vocab=11, L=16, C=8):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, C)
        self.pos = torch.nn.Parameter(torch.randn(1, 1 + L, C) * 0.02)
        self.enc = torch.nn.Linear(C, C)
        self.dec_embed = torch.nn.Linear(C, C)
        self.dec_pos = torch.nn.Parameter(torch.randn(1, 1 + L, C) * 0.02)
        self.head = torch.nn.Linear(C, vocab)

    def forward(self, ids, noise, num_masked, num_dropped):
        masked, dropped, keep = mage_kernels.mask_plan(noise, num_masked, num_dropped)
        ids = torch.where(masked, self.tok.num_embeddings - 1, ids)
        emb = self.tok(F.pad(ids, (1, 0), value=0)) + self.pos  # (B, 1+L, C)
        x = torch.tanh(self.enc(mage_kernels.gather_keep(emb, keep)))  # (B, 1+Lk, C)
        z = mage_kernels.pad_with_cls(self.dec_embed(x), keep, masked, pos_embed=self.dec_pos[0])  # (B, 1+L, C)
        logits = self.head(z)[:, 1:]
        loss = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
        return (loss * masked).sum() / masked.sum().clamp_min(1)


@pytest.mark.parametrize("per_row", [False, True])
def test_compile_masked_encoder_decoder_step_fullgraph(per_row):
    torch.manual_seed(0)
    B, L = 4, 16
    model = _TinyMAGE(L=L)
    ids = torch.randint(0, 10, (B, L))
    noise = _noise(B, L)
    M = torch.tensor([9, 16, 8, 12]) if per_row else 12
    D = 8  # per-row masked counts keep a static encoder length

    def step(ids, noise):
        return model(ids, noise, M, D)

    eager_loss = step(ids, noise)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled_loss = torch.compile(step, backend="aot_eager", fullgraph=True)(ids, noise)
    compiled_loss.backward()  # the backward graph of the same compiled region
    torch.testing.assert_close(compiled_loss, eager_loss)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)


# ----------------------------------------------------------------------------------- masking policy


def test_sample_mask_counts_reference_policy():
    L = 256
    g = torch.Generator().manual_seed(0)
    M, D = mage_kernels.sample_mask_counts(L, generator=g)
    assert isinstance(M, int) and D == 128 and 128 <= M <= 256
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert mage_kernels.sample_mask_counts(L, generator=g1) == mage_kernels.sample_mask_counts(L, generator=g2)
    rows, D = mage_kernels.sample_mask_counts(L, batch=40000, generator=g)
    assert rows.dtype == torch.int64 and rows.shape == (40000,) and D == 128
    assert rows.min() >= 128 and rows.max() <= 256
    r = rows.double() / L
    # Truncated normal(0.55, 0.25) on [0.5, 1]: mean 0.694, std 0.129 (docs/REFERENCE.md 4.4); the
    # ceil adds at most 1/L to the ratio. Bounds are 5 standard errors wide.
    assert abs(r.mean().item() - 0.694 - 0.5 / L) < 5 * 0.129 / math.sqrt(40000) + 1e-3
    assert abs(r.std().item() - 0.129) < 0.005
    assert abs((r < 0.534).double().mean().item() - 0.1) < 0.01


def test_sample_mask_counts_feed_mask_plan():
    g = torch.Generator().manual_seed(2)
    rows, D = mage_kernels.sample_mask_counts(32, batch=5, generator=g)
    masked, dropped, keep = mage_kernels.mask_plan(_noise(5, 32), rows, D)
    assert keep.shape == (5, 32 - D) and torch.equal(masked.sum(1), rows)


# ------------------------------------------------------------------------------------------- Triton


@requires_triton_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_triton_kernels_match_reference(dtype):
    from mage_kernels.triton import masking as tri

    B, L, C = 3, 37, 70
    dev = TRITON_DEVICE
    noise = _tied_noise(B, L).to(device=dev, dtype=dtype)
    m, d = (t.to(dev) for t in _counts(B, L, seed=9))
    for a, e in zip(tri.mask_plan(noise, m, d, L), ref.mask_plan(noise, m, d, L)):
        _equal(a, e)
    masked, _, keep = ref.mask_plan(_noise(B, L, dev, dtype), m, d, L - int(d.min()))
    x = _rand((B, C, 1 + L), dtype, dev).transpose(1, 2)
    _equal(tri.gather_keep(x, keep), ref.gather_keep(x, keep))
    y = _rand((B, 1 + keep.shape[1], C), dtype, dev)
    pos, pad = _rand((1 + L, C), dtype, dev, seed=1), _rand((C,), dtype, dev, seed=2)
    _equal(tri.scatter_keep(y, keep, L), ref.scatter_keep(y, keep, L))
    _equal(tri.pad_with_cls(y, keep, masked, pos, None), ref.pad_with_cls(y, keep, masked, pos))
    _equal(tri.pad_with_cls(y, keep, masked, None, pad), ref.pad_with_cls(y, keep, masked, None, pad))
    gz = _rand((B, 1 + L, C), dtype, dev, seed=3)
    for mae, pos in BACKWARD_FLAGS:
        actual = tri.pad_with_cls_backward(gz, keep, masked, mae, pos)
        _check_pad_backward(actual, _pad_with_cls_backward_reference(gz, keep, masked, mae, pos), L)


# --------------------------------------------------------------------------------------------- CUDA


@requires_cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_cuda_matches_cpu_kernels(dtype):
    B, L, C = 5, 256, 200
    noise = _tied_noise(B, L)
    m, d = _counts(B, L, seed=10)
    cpu = mage_kernels.mask_plan(noise.to(dtype), m, d, num_kept=L)
    gpu = mage_kernels.mask_plan(noise.to(dtype).cuda(), m.cuda(), d.cuda(), num_kept=L)
    for a, e in zip(gpu, cpu):
        _equal(a.cpu(), e)
    masked, _, keep = _plan(B, L, M=180, D=128)
    x = _rand((B, 1 + L, C), dtype)
    y = _rand((B, 1 + keep.shape[1], C), dtype, seed=1)
    pos, pad = _rand((1 + L, C), dtype, seed=2), _rand((C,), dtype, seed=3)
    cu = lambda t: t.cuda()  # noqa: E731
    _equal(mage_kernels.gather_keep(cu(x), cu(keep)).cpu(), mage_kernels.gather_keep(x, keep))
    _equal(torch.ops.mage.scatter_keep(cu(y), cu(keep), L).cpu(), torch.ops.mage.scatter_keep(y, keep, L))
    for kw in ({"pos_embed": pos}, {"pad": pad}):
        gpu_z = mage_kernels.pad_with_cls(cu(y), cu(keep), cu(masked), **{k: cu(v) for k, v in kw.items()})
        _equal(gpu_z.cpu(), mage_kernels.pad_with_cls(y, keep, masked, **kw))
    gz = _rand((B, 1 + L, C), dtype, seed=4)
    for mae, pos in BACKWARD_FLAGS:
        a = torch.ops.mage.pad_with_cls_backward(cu(gz), cu(keep), cu(masked), mae, pos)
        _check_pad_backward(a, torch.ops.mage.pad_with_cls_backward(gz, keep, masked, mae, pos), L)


@requires_cuda
def test_cuda_ops_do_not_sync():
    B, L, C = 8, 256, 64
    noise = torch.rand(B, L, device="cuda")
    x = torch.randn(B, 1 + L, C, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        masked, _, keep = mage_kernels.mask_plan(noise, 180, 128)
        y = mage_kernels.gather_keep(x, keep)
        z = mage_kernels.pad_with_cls(y, keep, masked, pos_embed=torch.zeros(1 + L, C, device="cuda"))
        z.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


_COMPILE_FOR_SM90 = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mage_kernels.triton import masking as tri

def compile(fn, names, types, constexprs):
    signature = dict(zip(names, types), **{name: "constexpr" for name in constexprs})
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))

rows = ["i64", "i64", "i64"]
for dtype, acc in (("*bf16", tl.float32), ("*fp64", tl.float64)):
    compile(tri._mask_plan_kernel, ["noise", "stride_b", "stride_l", "num_masked", "m_step", "num_dropped", "d_step",
            "masked", "dropped", "keep", "L", "num_kept"],
            [dtype, "i64", "i64", "*i64", "i32", "*i64", "i32", "*i1", "*i1", "*i64", "i32", "i32"],
            {"ACC": acc, "BLOCK_T": 64, "BLOCK_S": 64})
    compile(tri._gather_rows_kernel, ["x", "sxb", "sxs", "sxc", "keep", "masked", "out", "L", "Lk", "C"],
            [dtype, *rows, "*i64", "*i1", dtype, "i32", "i32", "i32"], {"USE_MASK": True, "BLOCK_C": 1024})
    compile(tri._expand_rows_kernel, ["y", "syb", "sys", "syc", "src", "pad", "pos", "out", "L", "C"],
            [dtype, *rows, "*i64", dtype, dtype, dtype, "i32", "i32"],
            {"FILL": 2, "HAS_POS": True, "ACC": acc, "BLOCK_C": 1024})
    compile(tri._pad_sum_kernel, ["gz", "sgb", "sgs", "sgc", "src", "grad_y", "pad_sum", "L", "Lk", "C"],
            [dtype, *rows, "*i64", dtype, "*fp32", "i32", "i32", "i32"],
            {"MAE": False, "ACC": acc, "BLOCK_T": 32, "BLOCK_C": 128})
    compile(tri._pos_sum_kernel, ["gz", "sgb", "sgs", "sgc", "grad_pos", "B", "C"],
            [dtype, *rows, dtype, "i32", "i32"], {"ACC": acc, "BLOCK_B": 32, "BLOCK_C": 128})
compile(tri._slot_source_kernel, ["keep", "masked", "src", "L", "Lk"], ["*i64", "*i1", "*i64", "i32", "i32"],
        {"USE_MASK": True, "BLOCK": 128})
"""


@requires_triton
def test_triton_kernels_compile_for_sm90():
    """The interpreter is lenient about types; compiling for an H100 (ptxas ships with triton, no GPU
    needed) is not. Runs in a subprocess because this process has TRITON_INTERPRET=1."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,L,C", [(9, 255, 1811), (37, 31, 2051), (1, 1, 1)])
def test_cpu_large_outputs_and_batch_blocks(isa, dtype, B, L, C, monkeypatch, on_threads):
    """Outputs of 8 MiB and up are written with streaming stores (rows of odd byte length: unaligned heads
    and tails written plainly); pad_with_cls's backward sums grad_pos over fixed batch blocks of 16 and channel
    chunks of 2048 (B = 37, C = 2051: a partial last block and chunk). Forward ops give the reference's
    bits, backward rows too, sums close to the fp64 oracle and the same bits on 1 and 2 threads."""
    if isa != "scalar" and mage_kernels.cpu_isa()["detected"] == "scalar":
        pytest.skip("this CPU lacks AVX2/FMA")
    monkeypatch.setenv("MAGE_CPU_ISA", isa)
    y, keep, masked, pos, pad = _pad_inputs(B, L, C, dtype, "cpu")
    x = _rand((B, 1 + L, C), dtype, "cpu", seed=3)
    gz = _rand((B, 1 + L, C), dtype, "cpu", seed=5)

    def run():
        gathered = mage_kernels.gather_keep(x, keep)
        _equal(gathered, ref.gather_keep(x, keep))
        _equal(torch.ops.mage.scatter_keep(gathered, keep, L), ref.scatter_keep(gathered, keep, L))
        z = mage_kernels.pad_with_cls(y, keep, masked, pos_embed=pos)
        _equal(z, ref.pad_with_cls(y, keep, masked, pos, None))
        _equal(mage_kernels.pad_with_cls(y, keep, masked, pad=pad), ref.pad_with_cls(y, keep, masked, None, pad))
        backward = [torch.ops.mage.pad_with_cls_backward(gz, keep, masked, mae, p) for mae, p in BACKWARD_FLAGS]
        for (mae, p), actual in zip(BACKWARD_FLAGS, backward):
            _check_pad_backward(actual, _pad_with_cls_backward_reference(gz, keep, masked, mae, p), L)
        return [t for r in backward for t in r]

    results = on_threads(run)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _pad_backward_in_cpu_order(gz, keep, masked, mae, pos):
    """pad_with_cls_backward with the CPU kernel's summation order spelled out, one fp32 (fp64) add at a time:
    grad_pos sums batch blocks of 16 rows (rows in order, from +0), then the blocks in order (from +0); a
    row's padded tokens sum in token order from +0, and without `mae` its class-slot gradient is added last."""
    B, S, C = gz.shape
    L = S - 1
    acc = torch.float64 if gz.dtype == torch.float64 else torch.float32
    g = gz.to(acc)
    own = (keep >= 0) & ~masked.gather(1, keep.clamp_min(0))
    padded = ref._slot_source(keep, L, own) < 0
    pad_sum = torch.zeros(B, C, dtype=acc)
    for s in range(1, S):
        pad_sum = torch.where(padded[:, s - 1, None], pad_sum + g[:, s], pad_sum)
    rows = ref.gather_slots(gz, torch.where(own, keep, -1))
    grad_pos = gz.new_empty((0, C))
    if pos:
        total = torch.zeros(S, C, dtype=acc)
        for b0 in range(0, B, 16):
            block = torch.zeros(S, C, dtype=acc)
            for b in range(b0, min(B, b0 + 16)):
                block = block + g[b]
            total = total + block
        grad_pos = total.to(gz.dtype)
    if mae:
        return rows, pad_sum, grad_pos
    rows[:, 0] = (pad_sum + g[:, 0]).to(gz.dtype)
    return rows, pad_sum.new_empty((0, C)), grad_pos


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512_bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("B,L,C", [(37, 31, 2051), (20, 9, 13), (64, 64, 96), (24, 255, 1027), (5, 7, 50)])
def test_cpu_pad_backward_sums_in_a_fixed_order(isa, dtype, B, L, C, monkeypatch, on_threads):
    """The CPU backward's sums (grad_pos, pad_sum, the class slot) give exactly the bits of the order that
    `_pad_backward_in_cpu_order` spells out, on 1 and 2 threads, for every (mae, pos) and every loop table
    (portable, AVX2, AVX-512 BF16 where the CPU has it): B = 37, 20, 24 and 5 end in a partial batch block,
    C = 2051 spans two channel chunks, C = 13, 50, 1027 and 2051 end in a vector tail, and grad_y at
    (24, 255, 1027) is >= 8 MiB in every dtype (rows streamed out, unaligned)."""
    _set_isa(monkeypatch, isa)
    m, d = _counts(B, L, seed=8)
    masked, _, keep = mage_kernels.mask_plan(_noise(B, L, seed=8), m, d)
    gz = _rand((B, 1 + L, C), dtype, "cpu", seed=9)
    flags = [(False, True), (True, False), (False, False), (True, True)]

    def run():
        return [t for mae, pos in flags for t in torch.ops.mage.pad_with_cls_backward(gz, keep, masked, mae, pos)]

    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    expected = [t for mae, pos in flags for t in _pad_backward_in_cpu_order(gz, keep, masked, mae, pos)]
    for actual in on_threads(run):
        for a, e in zip(actual, expected):
            assert a.dtype == e.dtype and torch.equal(a.view(bits[a.element_size()]), e.view(bits[e.element_size()]))


def _output_cache_bytes() -> int:
    import ctypes

    from mage_kernels import _cpu_isa

    fn = _cpu_isa._lib().mage_output_cache_bytes
    fn.restype = ctypes.c_size_t
    return fn()


requires_native = pytest.mark.skipif(mage_kernels.build_info()["native"] is None, reason="needs the native library")


@requires_native
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts the process's page faults (Linux)")
def test_cpu_large_output_reuses_the_block_a_freed_one_left():
    """A new output above glibc's mmap threshold (32 MiB at most) is fresh pages, each zeroed by the kernel
    on first touch: ~8,300 page faults for this 32.4 MiB one, every call. A training loop asks for the same
    sizes every step, so the next call takes the block the last one freed, pages in place; stale contents
    are overwritten."""
    import resource

    L, C = 256, 33_000  # scatter_keep's output [1, 1 + L, C] fp32: 32.4 MiB, from a 2-row input
    keep = torch.tensor([[5]])
    grad = _rand((1, 2, C), torch.float32, "cpu", seed=1)
    first = torch.ops.mage.scatter_keep(grad, keep, L)
    ptr = first.data_ptr()
    first.fill_(float("nan"))
    del first
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = torch.ops.mage.scatter_keep(grad, keep, L)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    assert second.data_ptr() == ptr
    assert faults < second.nbytes // 4096 // 100, f"{faults} page faults for {second.nbytes // 4096} pages"
    _equal(second, ref.scatter_keep(grad, keep, L))


_OUTPUT_CACHE_LIMITS = r"""
import ctypes, os, torch, mage_kernels
from mage_kernels import _cpu_isa
fn = _cpu_isa._lib().mage_output_cache_bytes
fn.restype = ctypes.c_size_t
keep = torch.tensor([[0]])

def out(C):  # scatter_keep's output [1, 257, C] fp32: 8.04 MiB and up
    return torch.ops.mage.scatter_keep(torch.ones(1, 2, C), keep, 256)

os.environ["MAGE_CPU_OUTPUT_CACHE_MIB"] = "lots"
try:
    out(8200)
    raise SystemExit("no error for MAGE_CPU_OUTPUT_CACHE_MIB=lots")
except ValueError as e:
    assert "MAGE_CPU_OUTPUT_CACHE_MIB" in str(e) and "'lots'" in str(e), e
os.environ["MAGE_CPU_OUTPUT_CACHE_MIB"] = "20"
for C in (8200, 8300, 8400):
    t = out(C)
    assert t.data_ptr() % (2 << 20) == 0  # 2 MiB-aligned: huge pages can back all of it
    del t
assert fn() == 257 * 4 * (8300 + 8400), fn()  # the oldest block went back when the third came
"""


@requires_native
def test_cpu_output_cache_limit_comes_from_the_environment():
    """MAGE_CPU_OUTPUT_CACHE_MIB bounds the freed outputs kept (oldest given back first); a bad value is a
    clear error naming the variable."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _OUTPUT_CACHE_LIMITS], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
