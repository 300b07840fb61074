"""Property-based differential fuzz: every op's C++ kernel and Triton kernel (under the interpreter on CPU)
against the reference, over random shapes (empty dims included), dtypes, strides and special values (NaN,
+-inf, -0.0, ties), and on bad values (both raise the same error type, or both agree).

The default run is a small, deterministic sample (derandomized, so CI never flakes); `-m slow` runs the
big, random sweep. Shapes for Triton stay small: the interpreter executes every program instance in Python.
"""

from __future__ import annotations

import math

import pytest
import torch
from backends import kernel, vq_exact_marks
from conftest import TOLERANCES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mage_kernels import reference as R

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LOGIT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (backend, budget) -> examples per op; triton runs under the interpreter (slow), the sweep behind -m slow.
EXAMPLES = {("cpu", "ci"): 40, ("triton", "ci"): 6, ("cpu", "sweep"): 600, ("triton", "sweep"): 80}
RUNS = [pytest.param(b, "ci", id=f"{b}") for b in ("cpu", "triton")] + [
    pytest.param(b, "sweep", id=f"{b}-sweep", marks=pytest.mark.slow) for b in ("cpu", "triton")]


def fuzz(backend: str, budget: str):
    """Hypothesis settings for one (backend, budget): bounded examples, no deadline, reproducible in CI."""
    return settings(max_examples=EXAMPLES[backend, budget], deadline=None, derandomize=budget == "ci",
                    database=None, suppress_health_check=list(HealthCheck))


def dim(data, backend: str, lo: int, hi: int, name: str) -> int:
    """A size in [lo, hi], smaller for the interpreter; the ends (empty, 1) come up often."""
    return data.draw(st.integers(lo, hi if backend == "cpu" else min(hi, 9)), label=name)


SPECIALS = (math.nan, math.inf, -math.inf, -0.0, 1e-30)


def tensor(data, shape, dtype, *, kind: str | None = None, specials=SPECIALS, name: str = "x") -> torch.Tensor:
    """Values of one of several kinds: normal, small integers, few distinct values (ties), multiples of 1/8
    (exact in every dtype and in every sum and square below); then NaN / +-inf / -0.0 / tiny at random places;
    then a random memory layout (contiguous, transposed copy read back, or a strided slice)."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label=f"{name} seed"))
    kind = kind or data.draw(st.sampled_from(["normal", "integers", "ties", "eighths"]), label=f"{name} kind")
    if kind == "normal":
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    elif kind == "integers":
        x = torch.randint(-3, 4, shape, generator=g).double()
    elif kind == "ties":
        x = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=torch.float64)[torch.randint(0, 4, shape, generator=g)]
    else:
        x = torch.randint(-64, 65, shape, generator=g).double() / 8
    x = x.to(dtype)
    if specials and x.numel() and data.draw(st.booleans(), label=f"{name} specials"):
        pick = torch.rand(shape, generator=g) < data.draw(st.sampled_from([0.02, 0.2]), label=f"{name} rate")
        value = data.draw(st.sampled_from(specials), label=f"{name} special")
        x = torch.where(pick, torch.tensor(value, dtype=dtype), x)
    return layout(data, x, name)


def layout(data, x: torch.Tensor, name: str) -> torch.Tensor:
    """The same values, read through a different memory layout."""
    how = data.draw(st.sampled_from(["contiguous", "transposed", "strided"]), label=f"{name} layout")
    if how == "transposed" and x.dim() >= 2:
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    if how == "strided":
        wide = torch.empty((*x.shape[:-1], 2 * x.shape[-1] + 1), dtype=x.dtype) if x.dim() else None
        if wide is not None:
            wide[..., 1::2] = x
            return wide[..., 1::2]
    return x


def same(actual, expected, rtol=0.0, atol=0.0):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


def differential(backend: str, op: str, args, kwargs=None, compare=None):
    """Run the kernel and the reference; both raise the same error type, or both return and `compare` holds."""
    kwargs = kwargs or {}
    try:
        expected = getattr(R, op)(*args, **kwargs)
    except (ValueError, TypeError) as err:  # the C++ kernels raise the builtin class, our checks InputError's
        with pytest.raises(TypeError if isinstance(err, TypeError) else ValueError):
            kernel(op, backend)(*args, **kwargs)
        return None
    actual = kernel(op, backend)(*args, **kwargs)
    (compare or (lambda a, e: [same(x, y) for x, y in zip(a, e)]))(actual, expected)
    return actual


# ---------------------------------------------------------------------------------------------- vq


VQ_SPECIALS = (math.nan, -0.0, 1e-30, 1e-300, 3e38, -1e20, 1e300)


def vq_inputs(data, backend, extremes: bool = False):
    N, K, D = dim(data, backend, 0, 70, "N"), dim(data, backend, 0, 40, "K"), dim(data, backend, 1, 20, "D")
    z_dtype, cb_dtype = (data.draw(st.sampled_from(FLOATS), label=n) for n in ("z dtype", "codebook dtype"))
    # Multiples of 1/8 (and ties) make every distance exact in fp64; large magnitudes and ties below fp64's
    # resolution (a 1e-30 next to integers) are `test_vq_nearest_extremes` (and tests/test_vq_exact.py).
    kind = data.draw(st.sampled_from(["eighths", "ties", "integers"]), label="vq kind")
    specials = VQ_SPECIALS if extremes else SPECIALS[:4]
    e = tensor(data, (K, D), cb_dtype, kind=kind, specials=specials, name="codebook")
    if data.draw(st.booleans(), label="nchw"):
        B, H = dim(data, backend, 0, 3, "B"), dim(data, backend, 1, 5, "H")
        z = tensor(data, (B, D, H, data.draw(st.integers(1, 4), label="W")), z_dtype, kind=kind, specials=specials,
                   name="z")
    else:
        z = tensor(data, (N, D), z_dtype, kind=kind, specials=specials, name="z")
    if K and data.draw(st.booleans(), label="repeat codes"):
        e = torch.cat([e, e[: max(1, K // 2)]])  # exact duplicates: the first copy must win
    return z, e


def sqdist_close(actual, expected):
    same(actual[0], expected[0])
    rtol = 1e-12 if expected[1].dtype == torch.float64 else 1e-5
    same(actual[1], expected[1], rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("backend,budget", RUNS)
def test_vq_nearest(backend, budget):
    @fuzz(backend, budget)
    @given(st.data())
    def check(data):
        z, e = vq_inputs(data, backend)
        differential(backend, "vq_nearest", (z, e), {"exact": True}, sqdist_close)

    check()


@pytest.mark.parametrize("backend,budget", [
    pytest.param(b, "sweep", id=b, marks=[pytest.mark.slow, *vq_exact_marks(b)])
    for b in ("cpu", "triton")])
def test_vq_nearest_extremes(backend, budget):
    # Values over the whole range of each dtype next to small integers: the exact=True contract for every
    # finite input (fp64 values beyond the fp32 range become inf in fp32 inputs: rows then give -1).
    @fuzz(backend, budget)
    @given(st.data())
    def check(data):
        z, e = vq_inputs(data, backend, extremes=True)
        differential(backend, "vq_nearest", (z, e), {"exact": True}, sqdist_close)

    check()


@pytest.mark.parametrize("backend,budget", RUNS)
def test_vq_quantize(backend, budget):
    def compare(actual, expected):
        same(actual[0], expected[0])
        same(actual[1], expected[1])
        same(actual[3], expected[3])
        same(actual[2], expected[2], rtol=1e-5, atol=1e-6)

    @fuzz(backend, budget)
    @given(st.data())
    def check(data):
        z, e = vq_inputs(data, backend)
        beta = data.draw(st.sampled_from([0.0, 0.25, 1.0]), label="beta")
        differential(backend, "vq_quantize", (z, e, beta), compare=compare)

    check()


# ------------------------------------------------------------------------------------------ masking


def counts(data, B: int, L: int, name: str) -> torch.Tensor:
    """A count in [0, L] for the batch (a 0-dim tensor) or per row ([B]); sometimes out of range."""
    hi = L + 1 if data.draw(st.integers(0, 9), label=f"{name} bad") == 0 else L
    lo = -1 if hi > L else 0
    if data.draw(st.booleans(), label=f"{name} per row"):
        return torch.tensor(data.draw(st.lists(st.integers(lo, hi), min_size=B, max_size=B), label=name),
                            dtype=torch.long)
    return torch.tensor(data.draw(st.integers(lo, hi), label=name))


def plan_inputs(data, backend):
    B, L = dim(data, backend, 0, 6, "B"), dim(data, backend, 0, 40, "L")
    noise = tensor(data, (B, L), data.draw(st.sampled_from(FLOATS), label="noise dtype"), name="noise")
    num_masked, num_dropped = counts(data, B, L, "num_masked"), counts(data, B, L, "num_dropped")
    least_dropped = int(num_dropped.min()) if num_dropped.numel() else 0
    num_kept = data.draw(st.integers(max(0, L - least_dropped) - 1, L), label="num_kept")  # one too few now and then
    return noise, num_masked, num_dropped, max(num_kept, 0)


@pytest.mark.parametrize("backend,budget", RUNS)
def test_mask_plan(backend, budget):
    @fuzz(backend, budget)
    @given(st.data())
    def check(data):
        differential(backend, "mask_plan", plan_inputs(data, backend))

    check()


def keep_inputs(data, backend, C):
    """A valid plan (masked, keep_idx) of some batch, or now and then a keep_idx with a bad entry."""
    noise, m, d, _ = plan_inputs(data, backend)
    B, L = noise.shape
    m, d = m.clamp(0, L), d.clamp(0, L)
    masked, _, keep = R.mask_plan(noise, m, d, L - (int(d.min()) if d.numel() else 0))
    if keep.numel() and data.draw(st.integers(0, 9), label="corrupt keep_idx") == 0:
        keep = keep.clone()
        keep.view(-1)[data.draw(st.integers(0, keep.numel() - 1), label="where")] = data.draw(
            st.sampled_from([-2, L, L + 5, 0]), label="bad entry")
    return masked, layout(data, keep, "keep_idx"), L


@pytest.mark.parametrize("backend,budget", RUNS)
def test_gather_and_scatter_keep(backend, budget):
    @fuzz(backend, budget)
    @given(st.data())
    def check(data):
        C = dim(data, backend, 1, 12, "C")
        dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
        masked, keep, L = keep_inputs(data, backend, C)
        B = masked.shape[0]
        x = tensor(data, (B, 1 + L, C), dtype, name="x")
        differential(backend, "gather_keep", (x, keep), compare=same)
        y = tensor(data, (B, 1 + keep.shape[1], C), dtype, name="y")
        differential(backend, "scatter_keep", (y, keep, L), compare=same)

    check()


@pytest.mark.parametrize("backend,budget", RUNS)
def test_pad_with_cls_and_backward(backend, budget):
    def close_sums(actual, expected):
        (gy, ps, gp), (ey, es, ep) = actual, expected
        same(gy[:, 1:], ey[:, 1:])
        rtol, atol = TOLERANCES[ey.dtype]
        for a, e in ((gy[:, 0], ey[:, 0]), (ps, es), (gp, ep)):
            same(a, e, rtol=rtol * 10, atol=atol * 10 * max(1, a.shape[-1]))

    @fuzz(backend, budget)
    @given(st.data())
    def check(data):
        C = dim(data, backend, 1, 12, "C")
        dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
        masked, keep, L = keep_inputs(data, backend, C)
        B = masked.shape[0]
        y = tensor(data, (B, 1 + keep.shape[1], C), dtype, name="y")
        mae = data.draw(st.booleans(), label="mae")
        pos = tensor(data, (1 + L, C), dtype, name="pos_embed") if data.draw(st.booleans(), label="pos") else None
        pad = tensor(data, (C,), dtype, name="pad") if mae else None
        differential(backend, "pad_with_cls", (y, keep, layout(data, masked, "masked"), pos, pad), compare=same)
        # The sums are compared in a dtype's tolerance: finite values of moderate size only.
        gz = tensor(data, (B, 1 + L, C), dtype, kind="eighths", specials=False, name="grad_z")
        differential(backend, "pad_with_cls_backward", (gz, keep, masked, mae, pos is not None), compare=close_sums)

    check()


# ------------------------------------------------------------------------------------------ remask


def remask_inputs(data, backend, V_cols):
    B, L = dim(data, backend, 0, 5, "B"), dim(data, backend, 0, 24, "L")
    vocab = data.draw(st.integers(1, V_cols), label="vocab_size")
    mask_id = vocab + data.draw(st.integers(0, 3), label="mask_id - vocab_size")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="ids seed"))
    known = torch.rand(B, L, generator=g) < data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="known share")
    ids = torch.where(known, torch.randint(0, vocab, (B, L), generator=g), mask_id)
    unknown = (ids == mask_id).sum(1)
    k = (torch.rand(B, generator=g) * (unknown + 1)).long().clamp(max=unknown)
    if B and data.draw(st.integers(0, 9), label="bad count") == 0:
        k[0] = unknown[0] + 1
    seed = torch.tensor(data.draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=2, max_size=2), label="seed"))
    kwargs = dict(mask_id=mask_id, vocab_size=vocab,
                  choice_temperature=data.draw(st.sampled_from([0.0, 1.5, 4.5]), label="choice_temperature"),
                  temperature=data.draw(st.sampled_from([0.5, 1.0, 3.0]), label="temperature"),
                  reference_ties=data.draw(st.booleans(), label="reference_ties"))
    return layout(data, ids, "ids"), k, seed, kwargs


@pytest.mark.parametrize("backend,budget", RUNS)
def test_remask_step(backend, budget):
    @fuzz(backend, budget)
    @given(st.data())
    def check(data):
        V = dim(data, backend, 1, 40, "V'")
        ids, k, seed, kw = remask_inputs(data, backend, V)
        dtype = data.draw(st.sampled_from(LOGIT_DTYPES), label="logits dtype")
        logits = tensor(data, (*ids.shape, V), dtype, name="logits")
        differential(backend, "remask_step", (logits, ids, k, seed), kw)

    check()


@pytest.mark.parametrize("backend,budget", RUNS)
def test_remask_step_from_hidden(backend, budget):
    @fuzz(backend, budget)
    @given(st.data())
    def check(data):
        V, C = dim(data, backend, 1, 40, "V'"), dim(data, backend, 1, 16, "C")
        ids, k, seed, kw = remask_inputs(data, backend, V)
        dtype = data.draw(st.sampled_from(LOGIT_DTYPES), label="dtype")
        # Small integers: every product and sum is exact, so the fused matmul equals the reference's.
        hidden = tensor(data, (*ids.shape, C), dtype, kind="integers", name="hidden")
        weight = tensor(data, (V, C), dtype, kind="integers", specials=False, name="weight")
        bias = tensor(data, (V,), dtype, kind="integers", specials=False, name="bias") if data.draw(
            st.booleans(), label="bias") else None
        differential(backend, "remask_step_from_hidden", (hidden, weight, bias, ids, k, seed), kw)

    check()
