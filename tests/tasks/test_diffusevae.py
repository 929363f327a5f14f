"""condiff.tasks.diffusevae: the VAE's ELBO pieces against torch.distributions' exact values, the reparameterisation,
Formulation 1's concatenation, the two-stage sampler's plumbing and the measures of an interpolation path."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from condiff.errors import ConfigError
from condiff.tasks.diffusevae import (
    condition_input,
    fit_latent_mixture,
    gaussian_kl,
    gaussian_nll,
    lerp_path,
    mixture_latents,
    paired_smoothness,
    path_changes,
    path_reversals,
    prior_latents,
    reconstruction,
    reparameterize,
    smoothness,
    two_stage_sample,
    vae_loss,
)


def test_kl_matches_the_closed_form_of_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 7, generator=g, dtype=torch.float64)
    logvar = torch.randn(5, 7, generator=g, dtype=torch.float64)
    want = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), want, rtol=1e-12, atol=1e-12)


def test_kl_is_zero_exactly_at_the_prior_and_one_half_mu_squared_at_unit_variance():
    mu = torch.tensor([[0.0, 0.0], [3.0, -1.0]], dtype=torch.float64)
    kl = gaussian_kl(mu, torch.zeros_like(mu))
    assert kl[0].item() == 0.0
    assert kl[1].item() == 0.5 * (9 + 1)


def test_gaussian_nll_matches_normal_log_prob():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    m = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    for sigma in (0.05, 0.2, 1.0, 3.0):
        want = -Normal(m, torch.full_like(m, sigma)).log_prob(x).flatten(1).sum(1)
        torch.testing.assert_close(gaussian_nll(x, m, sigma), want, rtol=1e-12, atol=1e-10)
    # at x = mean only the normaliser is left: D/2 log(2 pi sigma^2)
    assert gaussian_nll(x, x, 1.0)[0].item() == pytest.approx(0.5 * 12 * math.log(2 * math.pi), rel=1e-14)
    with pytest.raises(ConfigError, match="sigma must be > 0, got 0"):
        gaussian_nll(x, m, 0.0)


def test_reparameterize_is_mu_plus_std_times_the_generators_noise():
    mu = torch.tensor([[1.0, -2.0, 0.5]])
    logvar = torch.tensor([[0.0, math.log(4.0), math.log(0.25)]])
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(3))
    z = reparameterize(mu, logvar, torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, mu + torch.tensor([[1.0, 2.0, 0.5]]) * eps, rtol=0, atol=1e-6)


def test_vae_loss_is_the_nll_of_the_reparameterised_decode_plus_beta_kl():
    w = torch.tensor([[0.5, -1.0], [2.0, 0.25], [0.0, 1.0]])  # a linear "decoder" from 2-d z to 3 values

    def encode(x):
        return x[:, :2] * 0.1, torch.full((x.shape[0], 2), -1.0)

    def decode(z):
        return z @ w.T

    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(4))
    parts = vae_loss(encode, decode, x, sigma=0.3, beta=0.25, generator=torch.Generator().manual_seed(9))
    mu, logvar = encode(x)
    z = reparameterize(mu, logvar, torch.Generator().manual_seed(9))
    torch.testing.assert_close(parts.nll, gaussian_nll(x, decode(z), 0.3))
    torch.testing.assert_close(parts.kl, gaussian_kl(mu, logvar))
    torch.testing.assert_close(parts.loss, parts.nll + 0.25 * parts.kl)
    torch.testing.assert_close(parts.neg_elbo, parts.nll + parts.kl)


def test_condition_input_concatenates_the_reconstruction_after_x_t():
    x_t, x_hat = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    h = condition_input(x_t, x_hat)
    assert h.shape == (2, 6, 4, 4)
    assert torch.equal(h[:, :3], x_t) and torch.equal(h[:, 3:], x_hat)
    with pytest.raises(ConfigError, match=r"x_t \(2, 3, 4, 4\) and x_hat \(2, 3, 8, 8\)"):
        condition_input(x_t, torch.zeros(2, 3, 8, 8))
    with pytest.raises(ConfigError, match="but for channels"):
        condition_input(x_t, torch.zeros(3, 3, 4, 4))


def test_two_stage_sample_refines_the_decode_of_z():
    seen = {}

    def decode(z):
        return z.view(-1, 1, 1, 2) * 2

    def refine(x_hat):
        seen["x_hat"] = x_hat
        return x_hat + 1, 7

    z = prior_latents(3, 2, torch.Generator().manual_seed(0))
    assert torch.equal(z, torch.randn(3, 2, generator=torch.Generator().manual_seed(0)))
    out = two_stage_sample(decode, refine, z)
    assert torch.equal(seen["x_hat"], decode(z)) and torch.equal(out.x, decode(z) + 1) and out.nfe == 7


def test_reconstruction_decodes_a_draw_from_the_posterior_without_gradient():
    w = torch.nn.Parameter(torch.ones(1))

    def encode(x):
        return x * w, torch.zeros_like(x)

    x = torch.tensor([[1.0, 2.0]])
    r = reconstruction(encode, lambda z: z, x, torch.Generator().manual_seed(5))
    assert not r.requires_grad
    torch.testing.assert_close(r, x + torch.randn(x.shape, generator=torch.Generator().manual_seed(5)))


def test_lerp_path_hits_both_ends_exactly_and_is_linear_between():
    a, b = torch.tensor([0.1, -3.0, 7.0]), torch.tensor([0.7, 2.0, -1.3])
    p = lerp_path(a, b, 5)
    assert p.shape == (5, 3) and torch.equal(p[0], a) and torch.equal(p[-1], b)
    torch.testing.assert_close(p[2], (a + b) / 2)
    torch.testing.assert_close(p[1:] - p[:-1], ((b - a) / 4).expand(4, 3))
    with pytest.raises(ConfigError, match="at least 2 frames, got 1"):
        lerp_path(a, b, 1)


def test_path_changes_counts_flips_against_the_attributes_that_differ():
    minimal = torch.tensor([[0, 1, 0, 4], [0, 1, 1, 4], [2, 1, 1, 4], [2, 1, 1, 4]])
    assert path_changes(minimal) == (2, 2)
    flicker = torch.tensor([[0, 1, 0, 4], [0, 2, 0, 4], [0, 1, 0, 5], [0, 1, 0, 5]])
    assert path_changes(flicker) == (3, 1)  # color out and back (2) + position (1); only position differs
    s = smoothness([minimal, flicker])
    assert s == {
        "paths": 2,
        "changes": 2.5,
        "minimum": 1.5,
        "excess": 1.0,
        "minimal_share": 0.5,
        "reversals": 0.5,
        "monotone_share": 0.5,
    }
    with pytest.raises(ConfigError, match="frames >= 2"):
        path_changes(torch.zeros(1, 4))
    with pytest.raises(ConfigError, match="at least one path"):
        smoothness([])


def test_reversals_count_returns_but_not_passing_through_an_intermediate_value():
    through = torch.tensor([[0, 1, 0, 0], [0, 1, 0, 4], [0, 1, 0, 8]])  # top-left -> centre -> bottom-right
    assert path_changes(through) == (2, 1)  # one change of excess by the minimum ...
    assert path_reversals(through) == 0  # ... but monotone
    back = torch.tensor([[2, 0, 1, 0], [1, 0, 1, 0], [2, 0, 1, 0], [0, 0, 1, 0], [2, 0, 1, 0]])  # 2 1 2 0 2
    assert path_reversals(back) == 2  # back to 2 twice (1 -> 2, 0 -> 2)
    assert path_reversals(torch.tensor([[-1, 3], [0, 3], [-1, 3], [-1, 2]])) == 1  # 'no object' counts as a value
    with pytest.raises(ConfigError, match="frames >= 2"):
        path_reversals(torch.zeros(1, 4))


def test_paired_smoothness_on_hand_counted_paths():
    """Differences (0, 1, -1, 2, 0, 0): their mean and sample standard error; paths 2 and 4 are monotone in base only
    and path 3 in other only, so McNemar's exact p is twice the binomial P(X <= 1 | 3, 1/2) = 2 * 4/8 = 1."""

    def path(reversals: int) -> torch.Tensor:  # one attribute going 0 1 0 1 ...: exactly `reversals` returns
        return torch.tensor([[k % 2] for k in range(reversals + 2)] + [[(reversals + 1) % 2]] * (4 - reversals))

    base, other = [0, 0, 1, 0, 2, 1], [0, 1, 0, 2, 2, 1]
    assert [path_reversals(path(r)) for r in range(3)] == [0, 1, 2]
    out = paired_smoothness([path(r) for r in base], [path(r) for r in other])
    d = [0, 1, -1, 2, 0, 0]
    mean = sum(d) / 6
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / 5)
    assert out["reversals_difference"] == pytest.approx(mean, abs=1e-12)
    assert out["reversals_difference_se"] == pytest.approx(sd / math.sqrt(6), abs=1e-12)
    assert (out["monotone_base_only"], out["monotone_other_only"]) == (2, 1)
    assert out["mcnemar_p"] == pytest.approx(1.0)
    lop = paired_smoothness([path(0)] * 10, [path(1)] * 10)  # 10 discordant, all one way: p = 2 / 2**10
    assert lop["mcnemar_p"] == pytest.approx(2 / 1024, rel=1e-9)
    assert paired_smoothness([path(1), path(0)], [path(1), path(0)])["mcnemar_p"] == 1.0  # no discordant path
    with pytest.raises(ConfigError, match="two equal lists"):
        paired_smoothness([path(0), path(1)], [path(0)])


def test_mixture_latents_pick_their_component_and_scale_it():
    """One-hot weights pick that component for every row, and z = m_k + L_k eps with the generator's eps (drawn
    after the components); the sample covariance of many draws is L L^T (within 5 standard errors)."""
    means = torch.tensor([[9.0, 9.0], [1.0, -2.0], [-9.0, 0.0]])
    tril = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [1.5, 0.5]], [[1.0, 0.0], [0.0, 1.0]]])
    w = torch.tensor([0.0, 1.0, 0.0])
    z = mixture_latents(5, w, means, tril, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    torch.multinomial(w.double(), 5, replacement=True, generator=g)
    eps = torch.randn(5, 2, generator=g)
    torch.testing.assert_close(z, means[1] + eps @ tril[1].T)
    n = 40000
    many = mixture_latents(n, w, means, tril, torch.Generator().manual_seed(4)).double()
    cov = torch.cov(many.T)
    want = (tril[1] @ tril[1].T).double()
    se = ((want.diagonal().outer(want.diagonal()) + want**2) / n).sqrt()
    assert ((cov - want).abs() < 5 * se).all()


def test_one_component_fit_is_the_maximum_likelihood_gaussian():
    """K = 1: EM's answer is exact, the sample mean and the 1/N covariance (plus the 1e-5 ridge on the diagonal)."""
    z = torch.randn(300, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [0.0, -1.0, 0.3]], dtype=torch.float64
    )
    w, m, tril = fit_latent_mixture(z, 1)
    c = z - z.mean(0)
    cov = c.T @ c / len(z) + 1e-5 * torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(w, torch.ones(1))
    torch.testing.assert_close(m[0], z.mean(0).float())
    torch.testing.assert_close(tril[0] @ tril[0].T, cov.float(), rtol=1e-4, atol=1e-5)


def test_two_separated_clusters_give_their_shares_and_means():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(60, 2, generator=g, dtype=torch.float64) + 50
    b = torch.randn(140, 2, generator=g, dtype=torch.float64) - 50
    w, m, _ = fit_latent_mixture(torch.cat([a, b]), 2, seed=0)
    order = m[:, 0].argsort(descending=True)
    torch.testing.assert_close(w[order], torch.tensor([0.3, 0.7]))
    torch.testing.assert_close(m[order], torch.stack([a.mean(0), b.mean(0)]).float())
    with pytest.raises(ConfigError, match="3-component mixture needs"):
        fit_latent_mixture(torch.zeros(2, 4), 3)


def test_object_measures_are_exact_on_a_flat_square():
    from condiff.tasks.diffusevae import MEASURES, object_measures

    x = -torch.ones(2, 3, 32, 32)
    x[0, :, 4:10, 20:26] = torch.tensor([1.0, -1.0, 0.0]).view(3, 1, 1)  # red 1, green 0, blue 1/2
    x[1, 1, 10:21, 0:11] = 1.0  # a green 11x11 square at rows 10..20, columns 0..10
    m = object_measures(x)
    assert m.shape == (2, len(MEASURES))
    torch.testing.assert_close(m[0], torch.tensor([6.5, 22.5, 6.0, 1.0, 0.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(m[1], torch.tensor([15.0, 5.0, 11.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    dark = object_measures(-torch.ones(1, 3, 8, 8))[0]  # no lit pixel: size 0, the rest undefined
    assert dark[2] == 0 and torch.isnan(dark[[0, 1, 3, 4, 5]]).all()
    with pytest.raises(ConfigError, match="needs \\(B, 3, H, W\\)"):
        object_measures(torch.zeros(3, 32, 32))


def test_only_bright_pixels_count_each_by_its_intensity():
    from condiff.tasks.diffusevae import object_measures

    x = -torch.ones(1, 3, 4, 4)
    x[0, 2, 0, 0] = 1.0  # blue, full
    x[0, 2, 0, 2] = 0.0  # blue at half intensity: not bright (w > 1/2 is), so it counts for nothing
    x[0, 2, 3, 3] = 0.2  # intensity 0.6: bright, weight 0.6; the bounding box is rows 0..3, columns 0..3
    x[0, 0, 1, :] = -0.8  # a faint red row (w = 0.1): background texture, ignored
    m = object_measures(x)[0]
    mass = 1 + 0.6
    blue = (1 * 1.0 + 0.6 * 0.6) / mass  # the w-weighted mean of the bright pixels' blue values
    want = torch.tensor([3 * 0.6 / mass, 3 * 0.6 / mass, 4.0, 0.0, 0.0, blue], dtype=torch.float64)
    torch.testing.assert_close(m, want)


def test_excess_variation_is_zero_exactly_for_monotone_paths():
    from condiff.tasks.diffusevae import excess_variation

    v = torch.tensor([[0.0, 5.0, 1.0], [1.0, 5.0, 3.0], [1.0, 4.0, 0.0], [3.0, 2.0, 1.0]])
    # column 0 rises monotonically (0); column 1 falls monotonically (0); column 2 goes 1 -> 3 -> 0 -> 1:
    # variation 2 + 3 + 1 = 6 against a net change of 0
    torch.testing.assert_close(excess_variation(v), torch.tensor([0.0, 0.0, 6.0]))
    with pytest.raises(ConfigError, match="frames >= 2"):
        excess_variation(torch.zeros(1, 3))


def test_product_mixture_is_the_independent_blocks():
    """Weights multiply, means concatenate, scale_tril is block-diagonal; draws match each block's mixture."""
    from condiff.tasks.diffusevae import product_mixture

    a = (torch.tensor([0.25, 0.75]), torch.tensor([[0.0], [10.0]]), torch.tensor([[[1.0]], [[2.0]]]))
    b = (torch.tensor([0.5, 0.3, 0.2]), torch.tensor([[1.0, 1], [2, 2], [3, 3]]), torch.eye(2).repeat(3, 1, 1) * 0.5)
    w, means, tril = product_mixture([a, b])
    assert w.shape == (6,) and means.shape == (6, 3) and tril.shape == (6, 3, 3)
    torch.testing.assert_close(w, torch.tensor([0.125, 0.075, 0.05, 0.375, 0.225, 0.15]))
    assert means[4].tolist() == [10.0, 2.0, 2.0]  # block a's component 1, block b's component 1
    want = torch.zeros(3, 3)
    want[0, 0], want[1, 1], want[2, 2] = 2.0, 0.5, 0.5
    assert torch.equal(tril[3], want)
    z = mixture_latents(40000, w, means, tril, torch.Generator().manual_seed(0))
    high = z[:, 0] > 5  # block a's component 1: probability 0.75, whatever block b drew
    assert abs(high.float().mean() - 0.75) < 3 * (0.75 * 0.25 / 40000) ** 0.5
    near3 = ((z[:, 1] - 3).abs() < 0.5).float()  # mostly block b's component 2: the same share whatever block a drew
    p1, p0, n1, n0 = near3[high].mean(), near3[~high].mean(), high.sum(), (~high).sum()
    se = (p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0).sqrt()
    assert abs(p1 - p0) < 3 * se
