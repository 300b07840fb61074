"""mage_kernels.maskgit_sample: iterative decoding for any masked-token model (docs/REFERENCE.md 5.2),
here a small token model that is not ours, and MAGE through it."""

import math

import pytest
import torch
import torch.nn as nn
from test_model import L_TINY, randomized, tiny_config

import mage
import mage_kernels as mk

K, L = 12, 20  # codebook ids 0..11, [MASK] = 12 (a MaskGIT-style layout: logits over K + 1 ids)


class TokenModel(nn.Module):
    """Embedding -> one Transformer layer -> head over K + 1 ids: a stand-in for a user's MaskGIT/MUSE."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(K + 1, 32)
        self.pos = nn.Parameter(torch.randn(L, 32) * 0.1)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, K + 1)

    def hidden(self, ids):
        return self.layer(self.emb(ids) + self.pos)

    def forward(self, ids):
        return self.head(self.hidden(ids))


@pytest.fixture(scope="module")
def net():
    return TokenModel().eval()


def _run(net, ids, steps=6, seed=0, **kw):
    history = []
    out = mk.maskgit_sample(net, ids, steps=steps, mask_id=K, vocab_size=K, generator=torch.Generator().manual_seed(seed),
                            on_step=lambda t, x: history.append(x.clone()), **kw)
    return out, history


def test_fills_every_mask_keeps_known_tokens_and_follows_the_schedule(net):
    ids = torch.full((3, L), K)
    ids[1, :7] = torch.arange(7)  # row 1 starts with 7 known tokens
    out, history = _run(net, ids)
    assert out.shape == ids.shape and out.dtype == torch.int64 and int(out.max()) < K and int(out.min()) >= 0
    assert torch.equal(out[1, :7], ids[1, :7])
    for row, n0 in ((0, L), (1, L - 7), (2, L)):  # each row follows its own count (docs/REFERENCE.md 5.2.9)
        assert [int((x[row] == K).sum()) for x in history] == mage.mask_schedule(n0, 6)
    prev = ids
    for x in history:  # committed tokens never change
        known = prev != K
        assert torch.equal(x[known], prev[known])
        prev = x
    assert torch.equal(out, _run(net, ids)[0]) and not torch.equal(out, _run(net, ids, seed=1)[0])


@pytest.mark.parametrize("schedule", ["linear", "square", "cubic", "sqrt", lambda r: (1 - r) ** 3])
def test_other_schedules(net, schedule):
    ids = torch.full((2, L), K)
    out, history = _run(net, ids, steps=5, schedule=schedule)
    fn = mk.sampling.SCHEDULES.get(schedule) if isinstance(schedule, str) else schedule
    unknown = L
    for t, x in enumerate(history[:-1]):
        want = min(max(min(math.floor(L * fn((t + 1) / 5)), unknown - 1), 1), unknown)
        assert int((x[0] == K).sum()) == want
        unknown = want
    assert not (out == K).any()


def test_fused_head_path_matches_the_logits_path(net):
    ids = torch.full((4, L), K)
    a, _ = _run(net, ids)
    b, _ = _run(None, ids, hidden_fn=net.hidden, head_weight=net.head.weight, head_bias=net.head.bias)
    assert (a == b).float().mean() > 0.98  # equal up to the rounding of the fused matmul


def test_mage_generates_through_it():
    m = randomized(mage.MAGE(tiny_config()))
    c = m.config
    ids = torch.full((2, L_TINY), c.mask_id)
    expected = mage.decode_tokens(m, ids, steps=5, generator=torch.Generator().manual_seed(3), fused_head=False)
    got = mk.maskgit_sample(lambda x: m(x, mask=x == c.mask_id)[:, 1:], ids, steps=5, mask_id=c.mask_id,
                            vocab_size=c.codebook_size, choice_temperature=6.0,
                            generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, expected)


def test_clear_errors(net):
    ids = torch.full((2, L), K)
    with pytest.raises(ValueError, match="either logits_fn"):
        mk.maskgit_sample(None, ids, steps=2, mask_id=K)
    with pytest.raises(ValueError, match="head_weight"):
        mk.maskgit_sample(None, ids, steps=2, mask_id=K, hidden_fn=net.hidden)
    with pytest.raises(ValueError, match="could draw"):
        mk.maskgit_sample(net, ids, steps=2, mask_id=K)  # logits cover [MASK]: vocab_size is needed
    with pytest.raises(ValueError, match=r"logits \[B, L, V\]"):
        mk.maskgit_sample(lambda x: net(x)[:, 1:], ids, steps=2, mask_id=K, vocab_size=K)
    with pytest.raises(ValueError, match="schedule"):
        mk.maskgit_sample(net, ids, steps=2, mask_id=K, vocab_size=K, schedule="quadratic")
    with pytest.raises(ValueError, match="steps"):
        mk.maskgit_sample(net, ids, steps=0, mask_id=K, vocab_size=K)
    with pytest.raises(TypeError, match="int64"):  # a wrong dtype is a TypeError, as in every op
        mk.maskgit_sample(net, ids.int(), steps=2, mask_id=K, vocab_size=K)
