"""The exact=True contract of vq_nearest / vq_quantize on every backend: the argmin of the exact squared
distances of the given values, ties to the lowest index, for every finite input of every dtype, including
magnitudes whose squares overflow fp32 (fp32 near 1e19-3e38) or fp64 (fp64 beyond ~1e154), distances
that differ below fp64 resolution, and repeated codes. The oracle is an exact rational computation."""

import math
from fractions import Fraction

import pytest
import torch
from backends import BACKENDS, VQ_EXACT_PENDING, backend_params, kernel, vq_exact_marks

import mage_kernels as mk
from mage_kernels import reference
from mage_kernels.vq import _raise_on_invalid


def exact_nearest(z: torch.Tensor, e: torch.Tensor) -> tuple[list[int], list[Fraction]]:
    """argmin over codes with finite entries of the exact squared distance (Fractions), ties to the lowest
    index, and that distance."""
    codes = [(k, [Fraction(v) for v in row]) for k, row in enumerate(e.double().tolist())
             if all(math.isfinite(v) for v in row)]
    indices, dists = [], []
    for row in z.double().tolist():
        zr = [Fraction(v) for v in row]
        d, k = min((sum((a - b) ** 2 for a, b in zip(zr, c)), k) for k, c in codes)
        indices.append(k)
        dists.append(d)
    return indices, dists


def exact_argmin(z: torch.Tensor, e: torch.Tensor) -> list[int]:
    return exact_nearest(z, e)[0]


def rounded(d: Fraction, dtype: torch.dtype) -> torch.Tensor:
    """The exact distance rounded to the output dtype (inf beyond its range)."""
    try:
        value = float(d)
    except OverflowError:
        value = math.inf
    return torch.tensor(value, dtype=torch.float64).to(dtype)


def nearest(backend: str, z, e):
    indices, sqdist = kernel("vq_nearest", backend)(z, e, exact=True)
    _raise_on_invalid("vq_nearest", indices, True)  # what the public op adds on CPU
    return indices, sqdist


def _case(z, e, dtype):
    if dtype == "mixed":  # fp32 vectors, fp64 codebook
        return torch.tensor(z, dtype=torch.float32), torch.tensor(e, dtype=torch.float64)
    return torch.tensor(z, dtype=dtype), torch.tensor(e, dtype=dtype)


# Small planted cases: each has one right answer, away from where fp32 (or, for fp64 inputs, fp64)
# arithmetic can tell it. (z, codebook, dtype)
PLANTED = {
    "fp32-1e20-issue": ([[1e20]], [[1e20], [0.0]], torch.float32),
    "fp32-near-max": ([[3e38, 3e38]], [[-3e38, -3e38], [3e38, -3e38], [3e38, 3e38]], torch.float32),
    "fp32-1e19-close-codes": ([[1e19, -2e19]], [[0.0, 0.0], [1.0000001e19, -2e19], [1e19, -2.0000002e19]],
                              torch.float32),
    "bf16-huge": ([[3e38]], [[-3e38], [3.1e38]], torch.bfloat16),
    "fp64-1e200": ([[1e200]], [[1e200], [0.0]], torch.float64),
    "fp64-squares-overflow": ([[1.7e308, -1.7e308]], [[-1.7e308, 1.7e308], [0.0, 0.0], [1.7e308, -1.6e308]],
                              torch.float64),
    "fp64-huge-and-tiny": ([[1e300, 1e-300]], [[1e300, 0.0], [1e300, 1e-300]], torch.float64),
    # A huge code next to a small winner: its distance must survive whatever scaling the huge one needs
    # (found by test_fuzz.py's extremes sweep on the C++ kernel of branch cpuperf: distance 0, index right).
    "fp64-huge-code-small-winner": ([[0.5, 4.875]], [[1.625, -5.0], [-4.625, 1e300]], torch.float64),
    "mixed-fp32-z-huge-fp64-code": ([[0.5, 4.875]], [[1.625, -5.0], [-4.625, 1e200]], "mixed"),
    "subnormal": ([[1e-45, 0.0]], [[0.0, 0.0], [1e-45, 1e-45], [1.4e-45, 0.0]], torch.float32),
    # A non-finite code before equal finite ones must not hide them (found by tests/test_fuzz.py).
    "nan-code-then-repeats": ([[0.0], [0.4]], [[float("nan")], [0.5], [0.0], [0.0], [0.5]], torch.float32),
    # fp32 values whose distances differ by 2^-60, far below fp64's resolution at 1: an fp64 re-rank
    # sees a tie and picks code 0; the exact answer is code 1.
    "below-fp64-resolution": ([[0.0, 0.0]], [[1.0, 2.0**-30], [1.0, 0.0]], torch.float32),
}
# Cases a kernel listed in VQ_EXACT_PENDING gets wrong (the others it already gets right).
PENDING_CASES = set(PLANTED) - {"subnormal", "nan-code-then-repeats", "fp64-huge-code-small-winner",
                                 "mixed-fp32-z-huge-fp64-code"}


def planted_params():
    return [pytest.param(backend, name, marks=vq_exact_marks(backend) if name in PENDING_CASES else [],
                         id=f"{backend}-{name}")
            for backend in BACKENDS for name in sorted(PLANTED)]


@pytest.mark.parametrize("backend,name", planted_params())
def test_planted_exact_argmin(backend, name):
    z, e = _case(*PLANTED[name])
    indices, sqdist = nearest(backend, z, e)
    want, dists = exact_nearest(z, e)
    assert indices.tolist() == want
    expected = torch.stack([rounded(d, sqdist.dtype) for d in dists])
    torch.testing.assert_close(sqdist, expected, rtol=1e-6, atol=0.0)


def fp64_tied_case(dtype: torch.dtype, big: int, small: int, seed: int, device="cpu"):
    """Rows whose distances to every code agree in fp64 (only exact arithmetic orders them): codes
    [2^big, m_k 2^small], rows [0, u_i] or [c_i, 0], with 2^(2 small + 16) far below fp64's resolution at
    4^big; the exact answer is the code with the nearest second entry, never code 0 alone (lowest-index ties
    are wrong). The entries m 2^small (m < 256) are exact in every dtype the exponents allow."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randperm(255, generator=g)[:40].double() + 1
    m[0] = 255.0  # code 0 is the farthest for rows [c, 0]
    e = torch.stack([torch.full_like(m, 2.0**big), m * 2.0**small], 1)
    u = (torch.randint(-255, 256, (12,), generator=g).double()) * 2.0**small
    z = torch.cat([torch.stack([torch.zeros_like(u), u], 1), torch.tensor([[1.0, 0.0], [-3.0, 0.0]]) * 2.0**small])
    return z.to(device, dtype), e.to(device, dtype)


# (dtype, big, small): fp16 subnormals, bf16 / fp32 in range, fp64 over ~700 and ~2000 bits of exponent.
FP64_TIED = [(torch.float16, 14, -24), (torch.bfloat16, 14, -30), (torch.float32, 30, -60),
             (torch.float64, 300, -400), (torch.float64, 1000, -1070)]


@pytest.mark.parametrize("dtype,big,small", FP64_TIED, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("backend", backend_params())
def test_rows_fp64_cannot_separate_are_decided_exactly(backend, dtype, big, small):
    # Every code ties with every other in fp64: the kernels' exact comparison (csrc/vq_exact.h on CPU and in
    # the CUDA re-rank; the reference's integer stage; Triton through it) decides each row.
    z, e = fp64_tied_case(dtype, big, small, seed=big)
    indices, sqdist = nearest(backend, z, e)
    want, _ = exact_nearest(z, e)
    assert any(w != 0 for w in want) and indices.tolist() == want
    z_q, q_indices, _, counts = kernel("vq_quantize", backend)(z, e, 0.25)
    assert q_indices.tolist() == want and torch.equal(z_q, e[want])
    assert counts.tolist() == torch.bincount(torch.tensor(want), minlength=e.shape[0]).tolist()


@pytest.mark.parametrize("dtype,lo,hi", [(torch.float32, 19, 38), (torch.float64, 38, 307)])
@pytest.mark.parametrize("backend", backend_params(VQ_EXACT_PENDING))
def test_large_magnitudes_random(backend, dtype, lo, hi):
    g = torch.Generator().manual_seed(5)
    exps = torch.randint(lo, hi, (1,), generator=g).item()
    scale = 10.0**exps
    e = torch.randn(23, 5, generator=g, dtype=torch.float64).mul(scale / 4).to(dtype)
    z = (e[torch.randint(0, 23, (40,), generator=g)].double() * (1 + 1e-3 * torch.randn(40, 5, generator=g,
         dtype=torch.float64))).to(dtype)
    indices, sqdist = nearest(backend, z, e)
    assert indices.tolist() == exact_argmin(z, e)
    assert not sqdist.isnan().any()


@pytest.mark.parametrize("backend", backend_params())
def test_repeated_codebook_picks_first_copy(backend):
    # Issue 11 item 2: reference.vq_nearest(z, cat([cb, cb])) picked k + K for some rows (fp64 GEMM rounding
    # differs between equal columns). Every row is a tie, re-ranked in fp64: few rows for the interpreter.
    g = torch.Generator().manual_seed(0)
    z, cb = torch.randn(256, 32, generator=g), torch.randn(64, 32, generator=g)
    z = z[:8] if backend == "triton" else z
    indices, _ = nearest(backend, z, torch.cat([cb, cb]))
    single, _ = nearest(backend, z, cb)
    assert torch.equal(indices, single)


@pytest.mark.parametrize("backend", backend_params(VQ_EXACT_PENDING))
def test_quantize_large_magnitudes(backend):
    z, e = _case([[1e20], [0.5]], [[1e20], [0.0]], torch.float32)
    fn = kernel("vq_quantize", backend)
    z_q, indices, loss, counts = fn(z, e, 0.25)
    assert indices.tolist() == [0, 1] and counts.tolist() == [1, 1]
    torch.testing.assert_close(z_q, e[[0, 1]])
    torch.testing.assert_close(loss, torch.tensor(1.25 * 0.25 / 2))


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=vq_exact_marks("cpu"))])
def test_public_op_issue_example(backend):
    kernel("vq_nearest", backend)  # the public op on CPU tensors runs this kernel; skips where it is not built
    indices, sqdist = mk.vq_nearest(torch.tensor([[1e20]]), torch.tensor([[1e20], [0.0]]))
    assert indices.tolist() == [0] and sqdist.tolist() == [0.0]


def test_reference_matches_exact_oracle_on_wide_exponents():
    # Values spread over the whole fp64 exponent range, few codes: stage 3 (integer arithmetic) decides.
    g = torch.Generator().manual_seed(11)
    for _ in range(20):
        D, K = (int(v) for v in torch.randint(1, 6, (2,), generator=g))
        exps = torch.randint(-300, 300, (K + 4, D), generator=g).double()
        vals = torch.randn(K + 4, D, generator=g, dtype=torch.float64) * 10.0**exps
        z, e = vals[:4], vals[4:]
        assert reference.vq_nearest(z, e)[0].tolist() == exact_argmin(z, e)
