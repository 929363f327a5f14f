import functools

import pytest
import torch
from scipy.stats import chisquare

from condiff.discrete import ExactConditional, LogitDenoiser, mask_id, sample
from condiff.discrete.block import FixedBlocks, LearnedBlockPolicy, PolicyBlocks, sample_blocks
from condiff.errors import ConfigError
from discretekit import index_of, random_joint

V, D = 3, 4
M = mask_id(V)


class Recording(LogitDenoiser):
    """Passes through and keeps every input it was called with."""

    def __init__(self, denoiser):
        self.denoiser, self.vocab_size, self.inputs = denoiser, denoiser.vocab_size, []

    def __call__(self, x, cond=None):
        self.inputs.append(x.clone())
        return self.denoiser(x, cond)


def _pvalue(x, law, n):
    counts = torch.bincount(index_of(x, V), minlength=V**D).double()
    expected = law * n
    keep = expected > 5
    return chisquare(counts[keep], expected[keep] * counts[keep].sum() / expected[keep].sum()).pvalue


@pytest.mark.parametrize("cache", [True, False])
def test_one_block_of_the_full_length_is_sample_exactly(cache):
    ex = ExactConditional(random_joint(V, D, seed=1))
    a, ra = sample_blocks(ex, 500, D, FixedBlocks(D), 7, generator=torch.Generator().manual_seed(4), cache=cache)
    b, rb = sample(ex, 500, D, 7, generator=torch.Generator().manual_seed(4), cache=cache)
    assert torch.equal(a, b) and ra == rb
    c, rc = sample_blocks(ex, 500, D, FixedBlocks(10), 7, generator=torch.Generator().manual_seed(4), cache=cache)
    assert torch.equal(c, b) and rc == rb  # a block larger than the length is cut to it


@pytest.mark.parametrize("steps", [1, 3])
def test_blocks_of_one_token_draw_from_the_exact_joint(steps):
    """Each block is one token drawn from p(x^i | x^{<i}) (the masked future marginalised out): the chain rule."""
    lj = random_joint(V, D, seed=2)
    n = 20000
    x, rows = sample_blocks(
        ExactConditional(lj), n, D, FixedBlocks(1), steps, generator=torch.Generator().manual_seed(0)
    )
    assert rows == D * n  # one call per sequence and block
    assert _pvalue(x, lj.exp().reshape(-1), n) > 1e-3


def test_two_blocks_of_two_in_one_step_draw_from_the_blockwise_factorised_law():
    """With one step per block the two tokens of a block are drawn independently given the prefix:
    q(x) = p(x0) p(x1) p(x2 | x0 x1) p(x3 | x0 x1), which differs from p; seeing or unmasking the future would
    change it."""
    lj = random_joint(V, D, seed=3)
    p = lj.exp()
    n = 20000
    x, rows = sample_blocks(ExactConditional(lj), n, D, FixedBlocks(2), 1, generator=torch.Generator().manual_seed(0))
    assert rows == 2 * n
    p01 = p.sum((2, 3))
    p0, p1 = p01.sum(1), p01.sum(0)
    cond23 = p / p01[:, :, None, None]
    q = p0[:, None, None, None] * p1[None, :, None, None] * cond23.sum(3, keepdim=True) * cond23.sum(2, keepdim=True)
    assert abs(float(q.sum()) - 1) < 1e-12
    assert (q - p).abs().sum() > 0.1
    assert _pvalue(x, q.reshape(-1), n) > 1e-3
    assert _pvalue(x, p.reshape(-1), n) < 1e-6


def test_the_denoiser_sees_clean_previous_blocks_and_a_masked_future():
    rec = Recording(ExactConditional(random_joint(V, 6, seed=4)))
    sizes = iter([1, 0, 2])  # block sizes 3, 1, 2 from candidates (1, 3, 2)
    seen = []

    def policy(prefix, cond):
        seen.append(prefix.shape[1])
        return next(sizes)

    x, _ = sample_blocks(rec, 40, 6, PolicyBlocks(policy, [1, 3, 2]), 4, generator=torch.Generator().manual_seed(0))
    assert seen == [0, 3, 4]
    assert (x < V).all()
    for inp in rec.inputs:
        assert inp.shape == (inp.shape[0], 6)
        ends = [e for a, e in [(0, 3), (3, 4), (4, 6)] if (inp[:, :a] < V).all() and (inp[:, e:] == M).all()]
        assert ends, inp  # some block [a, e): clean before it, all masked after it
    assert len(rec.inputs) > 3


def test_policy_blocks_of_one_candidate_equal_fixed_blocks_and_bad_choices_are_refused():
    ex = ExactConditional(random_joint(V, D, seed=5))
    a, ra = sample_blocks(ex, 300, D, FixedBlocks(3), 4, generator=torch.Generator().manual_seed(2))
    b, rb = sample_blocks(
        ex, 300, D, PolicyBlocks(lambda p, c: 1, (5, 3)), 4, generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(a, b) and ra == rb
    with pytest.raises(ConfigError, match=r"\[0, 1\], got 2"):
        sample_blocks(ex, 3, D, PolicyBlocks(lambda p, c: 2, (1, 2)), 1)


def test_prompt_tokens_are_kept_and_the_rest_follows_the_exact_conditional():
    lj = random_joint(V, D, seed=6)
    n = 20000
    start = torch.full((n, D), M)
    start[:, 0] = 2
    x, _ = sample_blocks(
        ExactConditional(lj), n, D, FixedBlocks(1), 2, generator=torch.Generator().manual_seed(1), start=start
    )
    assert (x[:, 0] == 2).all()
    law = torch.zeros_like(lj)
    law[2] = lj[2].exp() / lj[2].exp().sum()
    assert _pvalue(x, law.reshape(-1), n) > 1e-3


def test_learned_policy_features_log_prob_and_choices():
    pol = LearnedBlockPolicy(V, 3, length=8, context=2)
    prefix = torch.tensor([[0, 1, 2], [2, 2, 0]])
    # last two tokens: [1, 2] and [2, 0] -> mean one-hot (1/4, 1/4, 2/4); 3 of 8 done
    assert torch.allclose(pol.features(prefix), torch.tensor([0.25, 0.25, 0.5, 3 / 8]))
    assert torch.allclose(pol.features(prefix[:, :0]), torch.zeros(4))
    assert torch.allclose(pol.log_prob(prefix, torch.arange(3)).exp(), torch.full((3,), 1 / 3))  # uniform at start
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([pol.choose(prefix, generator=g) for _ in range(3000)])
    assert set(draws.tolist()) == {0, 1, 2}
    assert chisquare(torch.bincount(draws, minlength=3).double()).pvalue > 1e-3


def test_a_reinforce_step_rewarding_a_candidate_raises_its_probability():
    pol = LearnedBlockPolicy(V, 3, length=8)
    prefix = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]])
    favoured = 2
    before = pol.log_prob(prefix, favoured).exp().item()
    g = torch.Generator().manual_seed(0)
    choices = torch.tensor([pol.choose(prefix, generator=g) for _ in range(64)])
    reward = (choices == favoured).double()
    opt = torch.optim.SGD(pol.parameters(), lr=1.0)
    loss = -((reward - reward.mean()) * pol.log_prob(prefix, choices)).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = pol.log_prob(prefix, favoured).exp().item()
    assert after > before + 0.05, (before, after)


def test_learned_policy_drives_the_sampler():
    pol = LearnedBlockPolicy(V, 2, length=D)
    with torch.no_grad():
        pol.linear.bias.copy_(torch.tensor([0.0, 50.0]))  # always the second candidate
    ex = ExactConditional(random_joint(V, D, seed=7))
    blocks = PolicyBlocks(functools.partial(pol.choose, generator=torch.Generator().manual_seed(0)), (1, 2))
    a, ra = sample_blocks(ex, 200, D, blocks, 3, generator=torch.Generator().manual_seed(3))
    b, rb = sample_blocks(ex, 200, D, FixedBlocks(2), 3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and ra == rb


def test_bad_block_settings_are_refused_with_the_value():
    ex = ExactConditional(random_joint(V, D))
    for bad in (0, -2, 1.5):
        with pytest.raises(ConfigError, match=f"got {bad}"):
            FixedBlocks(bad)
    with pytest.raises(ConfigError, match=r"got \(\)"):
        PolicyBlocks(lambda p, c: 0, ())
    with pytest.raises(ConfigError, match="got 0"):
        PolicyBlocks(lambda p, c: 0, (2, 0))
    with pytest.raises(ConfigError, match="steps_per_block.*got 0"):
        sample_blocks(ex, 2, D, FixedBlocks(2), 0)
    with pytest.raises(ConfigError, match="got 'fixed'"):
        sample_blocks(ex, 2, D, "fixed", 1)
    with pytest.raises(ConfigError, match=r"shape \(2, 4\), got \(2, 3\)"):
        sample_blocks(ex, 2, D, FixedBlocks(2), 1, start=torch.full((2, 3), M))
    assert FixedBlocks(3).next_size(None, None, 5) == 3 and FixedBlocks(3).next_size(None, None, 2) == 2
