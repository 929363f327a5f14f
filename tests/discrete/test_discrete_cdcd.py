"""CDCD's contrastive term against exact answers: the InfoNCE value on known scores, the scores against the
exact conditionals of an enumerable joint, the negatives' construction, and lambda = 0 as the baseline bit for bit."""

import copy
import itertools
import math

import pytest
import torch
from scipy.stats import chisquare
from torch import nn

from condiff.discrete import ExactConditional, LambdaDCE, LogitDenoiser, NetworkDenoiser, mask_id
from condiff.discrete.cdcd import (
    cdcd_loss,
    contrastive_term,
    inter_negatives,
    intra_negatives,
    with_contrastive,
)
from condiff.errors import ConfigError
from discretekit import random_joint

V, D = 3, 4


def test_equal_scores_give_log_of_n_plus_one_exactly():
    for n_neg in (1, 4, 31):
        for c in (0.0, -3.7, 250.0, -1e4):
            pos = torch.full((5,), c, dtype=torch.float64)
            loss = cdcd_loss(pos, torch.full((5, n_neg), c, dtype=torch.float64))
            assert torch.equal(loss, torch.full((5,), math.log(n_neg + 1), dtype=torch.float64))


def test_the_loss_is_the_infonce_formula_and_stays_finite_for_tiny_likelihoods():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(8, generator=g, dtype=torch.float64) * 3
    neg = torch.randn(8, 5, generator=g, dtype=torch.float64) * 3
    naive = -torch.log(pos.exp() / (pos.exp() + neg.exp().sum(1)))
    assert torch.allclose(cdcd_loss(pos, neg), naive, rtol=1e-12, atol=0)
    # log s of a long sequence is very negative: exp underflows, the log-space form does not
    far = cdcd_loss(pos - 2e4, neg - 2e4)
    assert torch.isfinite(far).all() and torch.allclose(far, naive, rtol=1e-9, atol=0)
    assert torch.equal(cdcd_loss(torch.zeros(1), torch.full((1, 3), -torch.inf)), torch.zeros(1))


def _exact_masked_log_likelihood(lj, x0, xt):
    """sum over masked i of log p(x^i = x0^i | the unmasked tokens of xt), by brute force over the joint."""
    p = lj.exp()
    seqs = list(itertools.product(range(V), repeat=D))
    seen = [i for i in range(D) if xt[i] != mask_id(V)]
    evidence = sum(float(p[s]) for s in seqs if all(s[i] == int(xt[i]) for i in seen))
    out = 0.0
    for i in range(D):
        if xt[i] == mask_id(V):
            both = sum(float(p[s]) for s in seqs if s[i] == int(x0[i]) and all(s[j] == int(xt[j]) for j in seen))
            out += math.log(both / evidence)
    return out


class Counting(LogitDenoiser):
    def __init__(self, inner):
        self.inner, self.vocab_size, self.calls = inner, inner.vocab_size, 0

    def __call__(self, x, cond=None):
        self.calls += 1
        return self.inner(x, cond)


def test_scores_are_the_exact_masked_conditionals_from_one_shared_call():
    lj = random_joint(V, D, seed=3)
    ex = Counting(ExactConditional(lj))
    g = torch.Generator().manual_seed(1)
    x0 = ex.inner.sample(6, g)
    masked = torch.rand(6, D, generator=g) < 0.5
    masked[:, 0] = True
    xt = torch.where(masked, torch.full_like(x0, mask_id(V)), x0)
    negs = intra_negatives(x0, 3, V, g, corrupt=0.5)
    pos, neg = contrastive_term(ex, x0, xt, None, negs)
    assert ex.calls == 1 and pos.shape == (6,) and neg.shape == (6, 3)
    for b in range(6):
        assert math.isclose(float(pos[b]), _exact_masked_log_likelihood(lj, x0[b], xt[b]), rel_tol=1e-10)
        for j in range(3):
            # the score reads the masked positions only: a negative scores as the positive with its masked tokens
            mixed = torch.where(masked[b], negs[b, j], x0[b])
            assert math.isclose(float(neg[b, j]), _exact_masked_log_likelihood(lj, mixed, xt[b]), rel_tol=1e-10)


def test_inter_negatives_are_other_rows_of_the_batch_and_never_the_positive():
    b, n_neg = 9, 8
    x0 = torch.arange(b)[:, None] * 10 + torch.arange(3)[None]  # row r is identifiable by its first entry
    for seed in range(5):
        negs = inter_negatives(x0, n_neg, torch.Generator().manual_seed(seed))
        assert negs.shape == (b, n_neg, 3)
        rows = negs[..., 0] // 10
        assert torch.equal(negs, x0[rows])
        assert (rows != torch.arange(b)[:, None]).all()
        assert all(len(set(r.tolist())) == n_neg for r in rows)  # distinct negatives per sample
    with pytest.raises(ConfigError, match="got 9"):
        inter_negatives(x0, 9)


def test_intra_negatives_corrupt_the_given_fraction_with_uniform_other_tokens():
    v, length = 5, 8
    x0 = torch.randint(0, v, (400, length), generator=torch.Generator().manual_seed(0))
    negs = intra_negatives(x0, 6, v, torch.Generator().manual_seed(1), corrupt=0.25)
    diff = negs != x0[:, None]
    assert negs.shape == (400, 6, length) and (negs >= 0).all() and (negs < v).all()
    assert (diff.sum(-1) == 2).all()  # round(0.25 * 8) tokens, each changed
    shift = ((negs - x0[:, None]) % v)[diff]
    assert chisquare(torch.bincount(shift, minlength=v)[1:].double()).pvalue > 1e-3
    assert (intra_negatives(x0, 1, v, corrupt=0.01) != x0[:, None]).sum(-1).eq(1).all()  # at least one token


class CondNet(nn.Module):
    def __init__(self, vocab, length, classes, hidden=32):
        super().__init__()
        self.vocab, self.length = vocab, length
        self.body = nn.Sequential(nn.Linear(length * (vocab + 1), hidden), nn.Tanh(), nn.Linear(hidden, length * vocab))
        self.cond = nn.Embedding(classes, length * vocab)

    def forward(self, h, cond):
        return (self.body(h.flatten(1)) + self.cond(cond)).view(-1, self.length, self.vocab)


def _batch(seed=0, b=32):
    g = torch.Generator().manual_seed(seed)
    x0 = ExactConditional(random_joint(V, D, seed=seed)).sample(b, g)
    cond = torch.randint(0, 4, (b,), generator=g)
    masked = torch.rand(b, D, generator=g) < 0.5
    masked[:, 1] = True
    xt = torch.where(masked, torch.full_like(x0, mask_id(V)), x0)
    return x0, cond, xt, inter_negatives(x0, 5, g)


def test_one_gradient_step_on_the_contrastive_term_raises_the_positive_above_the_negatives():
    torch.manual_seed(0)
    den = NetworkDenoiser(CondNet(V, D, 4), V)
    x0, cond, xt, negs = _batch()

    def margin_and_loss():
        pos, neg = contrastive_term(den, x0, xt, cond, negs)
        return (pos - neg.logsumexp(1)).mean(), cdcd_loss(pos, neg).mean()

    before, loss = margin_and_loss()
    opt = torch.optim.SGD(den.net.parameters(), lr=0.05)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after, loss_after = margin_and_loss()
    assert after > before and loss_after < loss


def test_lambda_zero_reproduces_the_baseline_bit_for_bit():
    torch.manual_seed(0)
    init = CondNet(V, D, 4).state_dict()
    nets = {}
    for lam in (None, 0.0, 0.5):
        net = CondNet(V, D, 4)
        net.load_state_dict(init)
        den = NetworkDenoiser(net, V)
        x0, cond, xt, negs = _batch()
        base = LambdaDCE()(den, x0, torch.Generator().manual_seed(2), cond)
        if lam is None:
            total = base
        else:
            total = with_contrastive(base, cdcd_loss(*contrastive_term(den, x0, xt, cond, negs)), lam)
            if lam == 0:
                assert torch.equal(total, base)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        opt.zero_grad()
        total.mean().backward()
        opt.step()
        nets[lam] = copy.deepcopy(net)
    same = [torch.equal(a, b) for a, b in zip(nets[None].parameters(), nets[0.0].parameters())]
    assert all(same)
    assert not all(torch.equal(a, b) for a, b in zip(nets[None].parameters(), nets[0.5].parameters()))


def test_bad_contrastive_settings_are_refused_with_the_value():
    x0 = torch.zeros(4, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match="got -0.1"):
        with_contrastive(torch.zeros(4), torch.zeros(4), -0.1)
    with pytest.raises(ConfigError, match=r"\(4,\) and \(3,\)"):
        with_contrastive(torch.zeros(4), torch.zeros(3), 1.0)
    with pytest.raises(ConfigError, match="got 0"):
        intra_negatives(x0, 2, 3, corrupt=0.0)
    with pytest.raises(ConfigError, match="got 1"):
        intra_negatives(x0, 2, 1)
    with pytest.raises(ConfigError, match=r"\(4, 2\)"):
        cdcd_loss(torch.zeros(3), torch.zeros(4, 2))
