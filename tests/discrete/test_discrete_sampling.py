import math

import pytest
import torch
from scipy.stats import chisquare

from condiff.discrete import (
    Euler,
    ExactConditional,
    LogitDenoiser,
    TopK,
    TopP,
    TweedieTauLeap,
    expected_nfe,
    mask_id,
    sample,
    sample_ordered,
)
from condiff.errors import ConfigError
from discretekit import index_of, random_joint


class Uniform(LogitDenoiser):
    """Constant log-probabilities: cheap, so E-NFE can be measured on long sequences."""

    def __init__(self, vocab_size=5):
        self.vocab_size = vocab_size

    def __call__(self, x, cond=None):
        return torch.full((*x.shape, self.vocab_size), -math.log(self.vocab_size))


def test_cached_sampler_gives_the_same_samples_as_the_uncached_one_with_fewer_calls():
    ex = ExactConditional(random_joint(3, 4))
    for step in (TweedieTauLeap(), Euler()):
        a, na = sample(ex, 2000, 4, 16, generator=torch.Generator().manual_seed(3), step=step)
        b, nb = sample(ex, 2000, 4, 16, generator=torch.Generator().manual_seed(3), step=step, cache=False)
        assert torch.equal(a, b)
        assert nb == 2000 * 16 and na < nb / 3


@pytest.mark.parametrize("steps,length", [(256, 64), (512, 128), (64, 64)])
def test_empirical_e_nfe_matches_the_formula_within_two_percent(steps, length):
    _, rows = sample(Uniform(), 400, length, steps, generator=torch.Generator().manual_seed(0))
    assert abs(rows / 400 / expected_nfe(steps, length) - 1) < 0.02


def test_ordered_sampler_with_exact_conditionals_draws_from_the_joint():
    lj = random_joint(3, 4, seed=2)
    ex = ExactConditional(lj)
    n = 20000
    x, nfe = sample_ordered(ex, n, 4, order=torch.tensor([2, 0, 3, 1]), generator=torch.Generator().manual_seed(0))
    assert nfe == 4 * n
    counts = torch.bincount(index_of(x, 3), minlength=81).double()
    expected = lj.exp().reshape(-1) * n
    keep = expected > 5
    assert chisquare(counts[keep], expected[keep] * counts[keep].sum() / expected[keep].sum()).pvalue > 1e-3


def test_one_token_per_step_makes_the_diffusion_sampler_exact():
    """With N >> L almost every step unmasks at most one token, so tau-leaping approaches the joint."""
    lj = random_joint(3, 3, seed=4)
    ex = ExactConditional(lj)
    n = 20000
    x, _ = sample(ex, n, 3, 400, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(index_of(x, 3), minlength=27).double()
    assert chisquare(counts, lj.exp().reshape(-1) * n).pvalue > 1e-3


def test_start_tokens_are_kept_and_every_mask_is_filled():
    ex = ExactConditional(random_joint(3, 4))
    start = torch.full((50, 4), mask_id(3))
    start[:, 1] = 2
    x, _ = sample(ex, 50, 4, 3, start=start, generator=torch.Generator().manual_seed(0))
    assert (x[:, 1] == 2).all() and (x < 3).all()


def test_top_k_one_is_greedy_and_top_p_keeps_the_smallest_set_reaching_p():
    lp = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isfinite(TopK(1)(lp)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(TopP(0.8)(lp)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(TopP(0.81)(lp)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(TopP(1.0)(lp)).all()


def test_bad_sampler_settings_are_refused_with_the_value():
    with pytest.raises(ConfigError, match="got 0"):
        TopK(0)
    with pytest.raises(ConfigError, match="got 1.5"):
        TopP(1.5)
    with pytest.raises(ConfigError, match="got 0"):
        sample(Uniform(), 2, 4, 0)
    with pytest.raises(ConfigError, match="permutation"):
        sample_ordered(Uniform(), 2, 3, order=torch.tensor([0, 0, 1]))
