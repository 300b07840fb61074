"""Confidence re-masking (docs/OPS.md op 5): kernels against the reference, the sampler's statistics, the
exactly-k selection, the published "<=" rule, the fused head, non-finite logits, bad input, opcheck,
compile, the Triton kernels under the interpreter, and the schedule helpers (docs/REFERENCE.md 5)."""

import math

import numpy as np
import pytest
import torch

import mage_kernels as mk
from mage_kernels import reference as R

from conftest import DEVICES, FLOAT_DTYPES, requires_cuda, requires_triton_on_cpu

MASK = 2024
OP = torch.ops.mage.remask_step
OP_HIDDEN = torch.ops.mage.remask_step_from_hidden
# chi-square critical values at p = 0.001, by degrees of freedom
CHI2_999 = {4: 18.47, 7: 24.32}


def make_case(B, L, V, *, vocab=None, known_frac=0.3, seed=0, device="cpu", dtype=torch.float32, strided=True,
              scale=3.0):
    """Logits (B, L, V) (a [:, 1:, :] slice of a (B, 1+L, V+3) tensor when strided), ids with a fraction of
    known tokens, and a valid random num_masked per row."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, L + 1, V + 3, generator=g) * scale
    logits = (full[:, 1:, :V] if strided else full[:, 1:, :V].contiguous()).to(device=device, dtype=dtype)
    vocab = V if vocab is None else vocab
    ids = torch.randint(0, vocab, (B, L), generator=g)
    ids = torch.where(torch.rand(B, L, generator=g) < known_frac, ids, MASK)
    unknown = (ids == MASK).sum(1)
    k = (torch.rand(B, generator=g) * (unknown + 1)).long().clamp(max=unknown)
    return logits, ids.to(device), k.to(device)


def kwargs(vocab, *, tau=4.5, temperature=1.0, ties=False):
    return dict(mask_id=MASK, choice_temperature=tau, vocab_size=vocab, temperature=temperature, reference_ties=ties)


SEED = torch.tensor([20231, -77], dtype=torch.int64)
SHAPES = [(1, 1, 1), (2, 7, 13), (3, 37, 300), (2, 16, 1029), (0, 5, 8), (2, 0, 8)]


@pytest.mark.parametrize("B,L,V", SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_cpu_kernel_matches_reference(B, L, V, dtype, ties):
    vocab = max(1, V - 4) if V > 8 else V
    logits, ids, k = make_case(B, L, V, vocab=vocab, dtype=dtype)
    kw = kwargs(vocab, temperature=0.7, ties=ties)
    sampled, new_ids = OP(logits, ids, k, SEED, **kw)
    ref_sampled, ref_new = R.remask_step(logits, ids, k, SEED, **kw)
    assert sampled.dtype == new_ids.dtype == torch.int64 and sampled.shape == ids.shape
    torch.testing.assert_close(sampled, ref_sampled, rtol=0, atol=0)
    torch.testing.assert_close(new_ids, ref_new, rtol=0, atol=0)


def test_cpu_kernel_independent_of_threads(on_threads):
    logits, ids, k = make_case(5, 33, 200, seed=2)
    one, two = on_threads(lambda: OP(logits, ids, k, SEED, **kwargs(200)))
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512_bf16"])
def test_cpu_kernel_every_isa_path_matches_reference(isa, monkeypatch):
    """MAGE_CPU_ISA picks the sampler's portable or AVX2 build per call: both give the reference's bits."""
    if isa == "avx2" and mk.cpu_isa()["detected"] == "scalar":
        pytest.skip("this CPU lacks AVX2/FMA")
    monkeypatch.setenv("MAGE_CPU_ISA", isa)
    assert mk.cpu_isa()["path"] == isa
    logits, ids, k = make_case(3, 37, 1029, vocab=1025, seed=4)
    kw = kwargs(1025, temperature=0.7)
    got, ref = OP(logits, ids, k, SEED, **kw), R.remask_step(logits, ids, k, SEED, **kw)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    hidden, weight = torch.randn(2, 9, 16), torch.randn(40, 16)
    ids = torch.full((2, 9), MASK)
    k = torch.tensor([4, 0])
    fused = OP_HIDDEN(hidden, weight, None, ids, k, SEED, **kwargs(33))
    explicit = OP(R.remask_head_logits(hidden, weight, None, 33), ids, k, SEED, **kwargs(33))
    assert torch.equal(fused[0], explicit[0]) and torch.equal(fused[1], explicit[1])


@pytest.mark.parametrize("device", DEVICES)
def test_exactly_k_and_known_untouched(device):
    logits, ids, k = make_case(6, 50, 64, known_frac=0.5, seed=3, device=device)
    sampled, new_ids = mk.remask_step(logits, ids, k, mask_id=MASK, choice_temperature=2.0,
                                      generator=torch.Generator(device).manual_seed(1))
    known = ids != MASK
    assert torch.equal(sampled[known], ids[known]) and torch.equal(new_ids[known], ids[known])
    assert torch.equal(((new_ids == MASK) & ~known).sum(1), k)
    assert bool(((sampled[~known] >= 0) & (sampled[~known] < 64)).all())
    assert torch.equal(torch.where(new_ids == MASK, sampled, new_ids), sampled)


def test_remasked_set_is_the_k_least_confident():
    logits, ids, k = make_case(4, 40, 50, seed=5)
    kw = kwargs(50, tau=1.5)
    _, new_ids = OP(logits, ids, k, SEED, **kw)
    # The confidence under the op's fixed noise, and the k smallest by (confidence, position) in numpy.
    _, logp = R.remask_sample(logits, ids, SEED, mask_id=MASK, vocab_size=50, temperature=1.0)
    _, g = R.remask_token_keys(SEED, *ids.shape)
    conf = (logp + torch.tensor(1.5) * R.remask_choice_gumbel(g)).numpy()
    for b in range(ids.shape[0]):
        unknown = np.flatnonzero(ids[b].numpy() == MASK)
        order = unknown[np.lexsort((unknown, conf[b, unknown]))]
        expected = set(order[: int(k[b])].tolist())
        got = set(torch.nonzero(new_ids[b] == MASK).flatten().tolist()) - set(np.flatnonzero(ids[b].numpy() != MASK))
        assert got == expected


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_samples_follow_softmax(temperature):
    """Chi-square of 16384 independent samples of one small distribution against softmax(logits / T)."""
    V, B, L = 5, 64, 256
    row = torch.tensor([1.0, -0.5, 0.3, 2.0, -2.0])
    logits = row.expand(B, L, V)  # stride 0 over tokens: strided input too
    ids = torch.full((B, L), MASK)
    sampled, _ = OP(logits, ids, torch.zeros(B, dtype=torch.long), SEED, **kwargs(V, temperature=temperature))
    counts = torch.bincount(sampled.flatten(), minlength=V).double()
    expected = torch.softmax(row.double() / temperature, 0) * B * L
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[V - 1], (chi2, counts, expected)


def test_noise_is_gumbel():
    _, g = R.remask_token_keys(SEED, 256, 256)
    x = R.remask_choice_gumbel(g).double()
    assert abs(float(x.mean()) - 0.5772156649) < 0.01
    assert abs(float(x.var()) - math.pi**2 / 6) < 0.03
    u = R.hash_to_gumbel(torch.tensor([0, 2**32 - 1]))
    assert bool(torch.isfinite(u).all())


@pytest.mark.parametrize("device", DEVICES)
def test_seed_reproducibility(device):
    logits, ids, k = make_case(3, 30, 100, device=device)

    def run(seed):
        return mk.remask_step(logits, ids, k, mask_id=MASK, choice_temperature=3.0,
                              generator=torch.Generator(device).manual_seed(seed))

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    torch.manual_seed(11)
    d = mk.remask_step(logits, ids, k, mask_id=MASK, choice_temperature=3.0)
    torch.manual_seed(11)
    e = mk.remask_step(logits, ids, k, mask_id=MASK, choice_temperature=3.0)
    assert torch.equal(d[1], e[1])


def test_reference_ties_is_the_published_rule():
    """With no choice noise, tokens sampled from identical rows have identical confidences: the published
    "<= the k-th smallest" rule can then re-mask more than k; the exact mode re-masks exactly k, the lower
    positions first among ties."""
    B, L, V = 4, 48, 3
    logits = torch.tensor([2.0, 0.0, -1.0]).expand(B, L, V)
    ids = torch.full((B, L), MASK)
    ids[:, :5] = 1
    k = torch.tensor([1, 10, 20, 43])
    kw = kwargs(V, tau=0.0, ties=True)
    sampled, new_ids = OP(logits, ids, k, SEED, **kw)
    # The published rule, written out as the published sampler does it.
    _, logp = R.remask_sample(logits, ids, SEED, mask_id=MASK, vocab_size=V, temperature=1.0)
    sorted_conf = torch.sort(logp, dim=-1).values
    cutoff = sorted_conf.gather(1, (k - 1)[:, None])
    expected = torch.where(logp <= cutoff, MASK, sampled)
    assert torch.equal(new_ids, expected)
    assert bool(((new_ids == MASK).sum(1) >= k).all()) and bool(((new_ids == MASK).sum(1) > k).any())
    _, exact = OP(logits, ids, k, SEED, **kwargs(V, tau=0.0))
    assert torch.equal((exact == MASK).sum(1), k)
    # Among equal confidences the lower positions are re-masked: no kept unknown token precedes a
    # re-masked one of the same confidence.
    pos = torch.arange(L)
    remasked, kept = (exact == MASK) & (ids == MASK), (exact != MASK) & (ids == MASK)
    same = logp[:, :, None] == logp[:, None, :]
    violation = remasked[:, :, None] & kept[:, None, :] & same & (pos[:, None] > pos[None, :])
    assert not bool(violation.any())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_head_matches_explicit_logits(dtype, with_bias):
    B, L, C, V, vocab = 2, 23, 40, 70, 64
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(B, L + 1, C, generator=g).to(dtype)[:, 1:]
    weight = (torch.randn(V, C, generator=g) * 0.3).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype) if with_bias else None
    ids = torch.where(torch.rand(B, L, generator=g) < 0.3, 5, MASK)
    k = ((ids == MASK).sum(1) // 2)
    kw = kwargs(vocab, tau=2.0, temperature=0.9)
    fused = OP_HIDDEN(hidden, weight, bias, ids, k, SEED, **kw)
    explicit = OP(R.remask_head_logits(hidden, weight, bias, vocab), ids, k, SEED, **kw)
    assert torch.equal(fused[0], explicit[0]) and torch.equal(fused[1], explicit[1])
    via_wrapper = mk.remask_step_from_hidden(hidden, weight, None if bias is None else bias[None, None], ids, k,
                                             mask_id=MASK, choice_temperature=2.0, vocab_size=vocab)
    assert torch.equal(((via_wrapper[1] == MASK) & (ids == MASK)).sum(1), k)


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_non_finite_logits(impl):
    """NaN counts as -inf; an all -inf (or NaN) token is sampled uniformly; +inf entries share all the mass."""
    fn = OP if impl == "cpu" else R.remask_step
    B, L, V = 2, 512, 6
    logits = torch.randn(B, L, V)
    logits[0, :, 2] = float("nan")
    logits[1, :128] = float("-inf")
    logits[1, 128:256] = float("nan")
    logits[1, 256:, [1, 4]] = float("inf")
    ids = torch.full((B, L), MASK)
    k = torch.tensor([100, 200])
    sampled, new_ids = fn(logits, ids, k, SEED, **kwargs(V))
    assert not bool((sampled[0] == 2).any())
    uniform = torch.bincount(sampled[1, :256], minlength=V)
    assert bool((uniform > 20).all())  # 256 uniform draws over 6 ids
    assert set(sampled[1, 256:].tolist()) == {1, 4}
    assert torch.equal((new_ids == MASK).sum(1), k)
    if impl == "cpu":
        ref = R.remask_step(logits, ids, k, SEED, **kwargs(V))
        assert torch.equal(sampled, ref[0]) and torch.equal(new_ids, ref[1])


@pytest.mark.parametrize("fn", [OP, R.remask_step], ids=["cpu", "reference"])
def test_bad_input(fn):
    logits, ids, k = make_case(2, 9, 16)
    unknown = (ids == MASK).sum(1)
    kw = kwargs(16)
    with pytest.raises(ValueError, match="num_masked must lie in"):
        fn(logits, ids, unknown + torch.tensor([0, 1]), SEED, **kw)
    with pytest.raises(ValueError, match="num_masked must lie in"):
        fn(logits, ids, torch.tensor([-1, 0]), SEED, **kw)
    with pytest.raises(TypeError, match="ids must be int64"):
        fn(logits, ids.int(), k, SEED, **kw)
    with pytest.raises(TypeError, match="logits must be float32"):
        fn(logits.double(), ids, k, SEED, **kw)
    with pytest.raises(ValueError, match="vocab_size must be in"):
        fn(logits, ids, k, SEED, **kwargs(17))
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        fn(logits, ids, k, SEED, **kwargs(16, temperature=0.0))
    with pytest.raises(ValueError, match="num_masked must be"):
        fn(logits, ids, k[:1], SEED, **kw)
    with pytest.raises(ValueError, match="disagree"):
        fn(logits[:, :5], ids, k, SEED, **kw)


@pytest.mark.parametrize("fn", [OP_HIDDEN, R.remask_step_from_hidden], ids=["cpu", "reference"])
def test_bad_input_from_hidden(fn):
    hidden, weight, bias = torch.randn(2, 9, 8), torch.randn(16, 8), torch.randn(16)
    ids = torch.full((2, 9), MASK)
    k = torch.tensor([3, 4])
    with pytest.raises(ValueError, match="weight must be"):
        fn(hidden, torch.randn(16, 7), bias, ids, k, SEED, **kwargs(16))
    with pytest.raises(ValueError, match="bias must be"):
        fn(hidden, weight, torch.randn(15), ids, k, SEED, **kwargs(16))
    with pytest.raises(TypeError, match="hidden must be"):
        fn(hidden.double(), weight, bias, ids, k, SEED, **kwargs(16))
    with pytest.raises(ValueError, match="vocab_size must be in"):
        fn(hidden, weight, bias, ids, k, SEED, **kwargs(17))
    with pytest.raises(ValueError, match="num_masked must lie in"):
        fn(hidden, weight, bias, ids, k + 7, SEED, **kwargs(16))
    with pytest.raises(ValueError, match="seed must be"):
        fn(hidden, weight, bias, ids, k, SEED[:1], **kwargs(16))


def test_opcheck():
    logits, ids, k = make_case(2, 9, 16)
    torch.library.opcheck(OP, (logits, ids, k, SEED), kwargs(12))
    hidden = torch.randn(2, 9, 8)
    torch.library.opcheck(OP_HIDDEN, (hidden, torch.randn(16, 8), torch.randn(16), ids, k, SEED), kwargs(12))
    torch.library.opcheck(OP_HIDDEN, (hidden, torch.randn(16, 8), None, ids, k, SEED), kwargs(16, ties=True))


def test_compile_fullgraph():
    logits, ids, _ = make_case(2, 16, 32, known_frac=0.0)

    def step(logits, ids):
        k = mk.remask_count(ids, mask_id=MASK, mask_ratio=mk.cosine_mask_ratio(2, 8))
        return mk.remask_step(logits, ids, k, mask_id=MASK, choice_temperature=1.5, vocab_size=30)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    expected = step(logits, ids)
    torch.manual_seed(3)
    got = compiled(logits, ids)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])

    def seeded(logits, ids, k, seed):
        return mk.remask_step(logits, ids, k, mask_id=MASK, choice_temperature=1.5, seed=seed)

    k = mk.remask_count(ids, mask_id=MASK, mask_ratio=0.5)
    got = torch.compile(seeded, fullgraph=True, backend="aot_eager")(logits, ids, k, SEED)
    expected = R.remask_step(logits, ids, k, SEED, **kwargs(32, tau=1.5))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@requires_triton_on_cpu
@pytest.mark.parametrize("ties", [False, True])
def test_triton_matches_reference(ties):
    from mage_kernels.triton import remask as T

    logits, ids, k = make_case(2, 11, 37, vocab=33, dtype=torch.bfloat16)
    kw = kwargs(33, temperature=0.8, ties=ties)
    got = T.remask_step(logits, ids, k, SEED, **kw)
    ref = R.remask_step(logits, ids, k, SEED, **kw)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    with pytest.raises(ValueError, match="num_masked must lie in"):
        T.remask_step(logits, ids, k + 100, SEED, **kw)


@requires_triton_on_cpu
def test_triton_fused_head_and_non_finite():
    from mage_kernels.triton import remask as T

    B, L, C, V = 2, 10, 24, 40
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(B, L + 1, C, generator=g)[:, 1:]
    weight, bias = torch.randn(V, C, generator=g) * 0.3, torch.randn(V, generator=g)
    ids = torch.where(torch.rand(B, L, generator=g) < 0.3, 7, MASK)
    k = (ids == MASK).sum(1) - 1
    kw = kwargs(36, tau=1.0)
    got = T.remask_step_from_hidden(hidden, weight, bias, ids, k, SEED, **kw)
    ref = R.remask_step_from_hidden(hidden, weight, bias, ids, k, SEED, **kw)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    logits = torch.randn(1, 4, 6)
    logits[0, 0, 1] = float("nan")
    logits[0, 1] = float("-inf")
    logits[0, 2, [0, 5]] = float("inf")
    ids, k = torch.full((1, 4), MASK), torch.tensor([2])
    got = T.remask_step(logits, ids, k, SEED, **kwargs(6))
    ref = R.remask_step(logits, ids, k, SEED, **kwargs(6))
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@requires_triton_on_cpu
def test_triton_fused_head_non_finite_logits_match_the_logits_kernels():
    """+inf logits share all the mass, an all -inf (or NaN) token is sampled uniformly, as remask_step does:
    the fused head's online softmax once turned inf - inf into NaN."""
    from mage_kernels.triton import remask as T

    B, L, C, V = 2, 96, 8, 6
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(B, L, C, generator=g)
    weight = torch.randn(V, C, generator=g)
    ids = torch.full((B, L), MASK)
    k = torch.tensor([30, 40])
    for bias in (torch.tensor([0.0, float("inf"), 0.0, 0.0, float("inf"), 0.0]),
                 torch.full((V,), float("-inf")),
                 torch.tensor([float("nan")] * 3 + [float("-inf")] * 3)):
        got = T.remask_step_from_hidden(hidden, weight, bias, ids, k, SEED, **kwargs(V, tau=1.0))
        ref = R.remask_step_from_hidden(hidden, weight, bias, ids, k, SEED, **kwargs(V, tau=1.0))
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        assert torch.equal((got[1] == MASK).sum(1), k)
    got = T.remask_step_from_hidden(hidden, weight, torch.tensor([0.0, float("inf"), 0.0, 0.0, float("inf"), 0.0]),
                                    ids, k, SEED, **kwargs(V))[0]
    assert set(got.flatten().tolist()) == {1, 4} and 0.3 < (got == 1).float().mean() < 0.7


@requires_triton_on_cpu
def test_triton_fused_head_skips_known_tokens_and_packs_unknown_ones():
    """Tokens are packed per row (unknown ones first) into tiles: rows with few, none or only unknown tokens,
    and rows longer than one tile, all give the logits kernels' tokens."""
    from mage_kernels.triton import remask as T

    B, L, C, V = 4, 70, 16, 40
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(B, L, C, generator=g)
    weight, bias = torch.randn(V, C, generator=g) * 0.5, torch.randn(V, generator=g)
    ids = torch.randint(0, 30, (B, L), generator=g)
    ids[0] = MASK  # all unknown
    ids[2, 65] = MASK  # one unknown token, beyond the first tile
    ids[3, ::3] = MASK
    k = (ids == MASK).sum(1) // 2
    got = T.remask_step_from_hidden(hidden, weight, bias, ids, k, SEED, **kwargs(36))
    ref = R.remask_step_from_hidden(hidden, weight, bias, ids, k, SEED, **kwargs(36))
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert torch.equal(got[0][1], ids[1])  # a row with nothing unknown is left as it is


def test_schedule_matches_published_table():
    """Tokens still masked after each step from 256 [MASK] (docs/REFERENCE.md 5, the T = 12 and 20 tables)."""
    table = {
        12: [253, 247, 236, 221, 203, 181, 155, 128, 97, 66, 33],
        20: [255, 252, 248, 243, 236, 228, 218, 207, 194, 181, 166, 150, 133, 116, 97, 79, 59, 40, 20],
    }
    for T, expected in table.items():
        ids = torch.full((1, 256), MASK)
        got = []
        for step in range(T):
            k = mk.remask_count(ids, mask_id=MASK, mask_ratio=mk.cosine_mask_ratio(step, T))
            got.append(int(k))
            ids = torch.where(torch.arange(256) < int(k), MASK, 0)[None]
        assert got[:-1] == expected and got[-1] == 1
    assert mk.annealed_choice_temperature(19, 20, 6.0) == 0.0
    assert mk.annealed_choice_temperature(0, 20, 6.0) == pytest.approx(5.7)
    assert mk.annealed_choice_temperature(0, 20, 6.0, power=2.0) == pytest.approx(6.0 * 0.95**2)
    assert mk.annealed_choice_temperature(19, 20, 6.0, power=2.0) == 0.0
    ids = torch.tensor([[MASK] * 4, [MASK, 0, 0, 0], [0, 0, 0, 0]])
    assert mk.remask_count(ids, mask_id=MASK, mask_ratio=1.0).tolist() == [3, 1, 0]


def test_decoding_loop_commits_everything():
    """A whole T-step decode with the helpers: every step keeps its count masked, the last leaves none."""
    B, L, V, T = 3, 64, 20, 8
    ids = torch.full((B, L), MASK)
    g = torch.Generator().manual_seed(0)
    for step in range(T):
        logits = torch.randn(B, L + 1, V + 5, generator=g)[:, 1:]
        k = mk.remask_count(ids, mask_id=MASK, mask_ratio=mk.cosine_mask_ratio(step, T))
        sampled, ids = mk.remask_step(logits, ids, k, mask_id=MASK, generator=g, vocab_size=V,
                                      choice_temperature=mk.annealed_choice_temperature(step, T, 4.5))
        assert torch.equal((ids == MASK).sum(1), k)
    assert bool((sampled < V).all()) and torch.equal(ids == MASK, sampled != ids)


@requires_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_cuda_matches_cpu(dtype, ties):
    """Same seed, same tokens on every backend (up to GPU exp/division last-ulp flips at near-exact ties)."""
    logits, ids, k = make_case(8, 256, 1029, vocab=1024, dtype=dtype)
    kw = kwargs(1024, temperature=0.9, ties=ties)
    cpu = OP(logits, ids, k, SEED, **kw)
    cuda = OP(logits.cuda(), ids.cuda(), k.cuda(), SEED.cuda(), **kw)
    assert (cuda[0].cpu() != cpu[0]).float().mean() < 1e-3
    assert torch.equal(((cuda[1] == MASK) & (ids.cuda() == MASK)).sum(1), k.cuda())
    from mage_kernels.triton import remask as T

    tri = T.remask_step(logits.cuda(), ids.cuda(), k.cuda(), SEED.cuda(), **kw)
    assert (tri[0].cpu() != cpu[0]).float().mean() < 1e-3


@requires_cuda
def test_cuda_fused_head_and_graph_capture():
    B, L, C, V = 4, 256, 64, 1029
    hidden = torch.randn(B, L, C, device="cuda")
    weight, bias = torch.randn(V, C, device="cuda") * 0.2, torch.randn(V, device="cuda")
    ids = torch.full((B, L), MASK, device="cuda")
    k = torch.full((B,), 100, device="cuda")
    seed = SEED.cuda()
    fused = OP_HIDDEN(hidden, weight, bias, ids, k, seed, **kwargs(1024))
    explicit = OP(R.remask_head_logits(hidden, weight, bias, 1024), ids, k, seed, **kwargs(1024))
    assert (fused[0] != explicit[0]).float().mean() < 0.02  # tf32 logits may flip near-ties
    logits = torch.randn(B, L, V, device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    mk.remask_step(logits, ids, k, mask_id=MASK, choice_temperature=1.0, generator=gen)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mk.remask_step(logits, ids, k, mask_id=MASK, choice_temperature=1.0)
    graph.replay()
    first = out[0].clone()
    graph.replay()
    assert not torch.equal(first, out[0])  # a fresh (seed, offset) every replay
    assert torch.equal((out[1] == MASK).sum(1), k)


@requires_cuda
def test_cuda_step_has_no_host_sync():
    B, L, C, V = 4, 256, 64, 1029
    logits = torch.randn(B, L + 1, V, device="cuda")[:, 1:]
    hidden, weight = torch.randn(B, L, C, device="cuda"), torch.randn(V, C, device="cuda")
    ids = torch.full((B, L), MASK, device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        k = mk.remask_count(ids, mask_id=MASK, mask_ratio=mk.cosine_mask_ratio(0, 12))
        mk.remask_step(logits, ids, k, mask_id=MASK, choice_temperature=4.5, generator=gen, vocab_size=1024)
        mk.remask_step_from_hidden(hidden, weight, None, ids, k, mask_id=MASK, choice_temperature=4.5, vocab_size=1024)
    finally:
        torch.cuda.set_sync_debug_mode(0)
