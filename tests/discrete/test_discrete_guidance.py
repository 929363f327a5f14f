import pytest
import torch
from scipy.stats import chisquare
from torch import nn

from condiff.discrete import ExactConditional, mask_id, one_hot, sample_ordered
from condiff.discrete.guidance import ClassifierGuided, ExactTilt, FirstOrder
from condiff.errors import ConfigError
from discretekit import index_of, random_joint

V, D = 3, 4


class Linear(nn.Module):
    """log p(y | x) = sum_i W[i, x_i] + b: linear in the (V+1)-way one-hots, mask column included."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(D, V + 1, generator=g, dtype=torch.float64)
        self.b = -1.3

    def forward(self, h):
        return (h.double() * self.w).sum((1, 2)) + self.b


class Nonlinear(nn.Module):
    """log sigmoid(a . tanh(U onehot(x))): a confident classifier, not linear in the one-hots."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.u = torch.randn(16, D * (V + 1), generator=g, dtype=torch.float64)
        self.a = torch.randn(16, generator=g, dtype=torch.float64)

    def forward(self, h):
        return nn.functional.logsigmoid(torch.tanh(h.double().flatten(1) @ self.u.T) @ self.a)


class NoisyExact:
    """The exact noisy classifier log p(y | x_t) = log E[p(y | x_0) | unmasked x_t] of a joint and a clean
    classifier, by enumeration (no gradient: for ExactTilt)."""

    def __init__(self, ex, clean):
        self.ex = ex
        self.log_py = clean(one_hot(ex.sequences, V).double()).detach()  # (V^D,)

    def __call__(self, h):
        x = h.argmax(-1)
        agree = (self.ex.sequences[None] == x[:, None]) | (x == mask_id(V))[:, None]
        logw = torch.where(agree.all(-1), self.ex.log_p[None], torch.tensor(-torch.inf, dtype=torch.float64))
        return (torch.log_softmax(logw, -1) + self.log_py[None]).logsumexp(-1)


def _partially_masked(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, D), generator=g)
    masked = torch.rand(n, D, generator=g) < 0.5
    masked[0] = True  # an all-masked row
    masked[1] = False  # a clean row
    return torch.where(masked, torch.full_like(x, mask_id(V)), x), masked


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.5])
def test_first_order_equals_the_exact_tilt_for_a_classifier_linear_in_the_one_hots(gamma):
    ex = ExactConditional(random_joint(V, D, seed=1))
    x, masked = _partially_masked(64, seed=2)
    clf = Linear()
    exact = ClassifierGuided(ex, clf, ExactTilt(gamma), dtype=torch.float64)(x)
    first = ClassifierGuided(ex, clf, FirstOrder(gamma), dtype=torch.float64)(x)
    assert torch.allclose(first, exact, rtol=0, atol=1e-6)
    base = ex(x)
    assert torch.equal(exact[~masked], base[~masked])  # unmasked positions untouched
    assert torch.allclose(exact.exp().sum(-1), torch.ones(64, D, dtype=torch.float64))
    # and the tilt is not a no-op: the masked rows moved, by exactly gamma * (W[i, v] - W[i, M]) before renormalising
    assert (exact[masked] - base[masked]).abs().max() > 0.1
    want = torch.log_softmax(base + gamma * (clf.w[:, :V] - clf.w[:, V:]), -1)
    assert torch.allclose(exact[masked], want[masked], rtol=0, atol=1e-12)


def test_first_order_differs_from_the_exact_tilt_for_a_nonlinear_classifier():
    ex = ExactConditional(random_joint(V, D, seed=1))
    x, masked = _partially_masked(64, seed=2)
    clf = Nonlinear()
    exact = ClassifierGuided(ex, clf, ExactTilt(2.0), dtype=torch.float64)(x)
    first = ClassifierGuided(ex, clf, FirstOrder(2.0), dtype=torch.float64)(x)
    assert (exact[masked] - first[masked]).abs().max() > 1e-2
    assert torch.equal(exact[~masked], first[~masked])


def test_gamma_zero_returns_the_base_output_without_calling_the_classifier():
    ex = ExactConditional(random_joint(V, D, seed=1))
    x, _ = _partially_masked(32, seed=3)
    calls = []

    def clf(h):
        calls.append(h.shape)
        return h.sum((1, 2))

    for mode in (ExactTilt(0.0), FirstOrder(0)):
        assert torch.equal(ClassifierGuided(ex, clf, mode)(x), ex(x))
    assert calls == []


def test_exact_tilt_at_one_masked_position_is_the_enumerated_tilted_conditional():
    lj = random_joint(V, D, seed=5)
    ex = ExactConditional(lj)
    clf = Nonlinear(seed=1)
    gamma = 1.7
    guided = ClassifierGuided(ex, clf, ExactTilt(gamma, batch_rows=5), dtype=torch.float64)  # several batches
    g = torch.Generator().manual_seed(0)
    for i in range(D):
        rest = torch.randint(0, V, (D,), generator=g)
        x = rest.clone()
        x[i] = mask_id(V)
        out = guided(x[None])[0, i]
        variants = rest.repeat(V, 1)
        variants[:, i] = torch.arange(V)
        log_p = lj[tuple(variants.T)]  # p(x^{i<-v}, rest), unnormalised in v
        log_py = clf(one_hot(variants, V))
        want = torch.log_softmax(log_p + gamma * log_py, -1)
        assert torch.allclose(out, want, rtol=0, atol=1e-12), (i, out, want)


def test_ordered_sampling_with_the_exact_noisy_classifier_at_gamma_one_draws_from_the_posterior():
    """Per position the tilt is exact for gamma = 1 and the exact p(y | x_t): one position per step telescopes
    to p(x | y) proportional to p(x) p(y | x) (with another gamma or classifier it would only approximate)."""
    lj = random_joint(V, D, seed=6)
    ex = ExactConditional(lj)
    clean = Nonlinear(seed=2)
    guided = ClassifierGuided(ex, NoisyExact(ex, clean), ExactTilt(1.0), dtype=torch.float64)
    n = 20000
    x, _ = sample_ordered(guided, n, D, order=torch.tensor([3, 1, 0, 2]), generator=torch.Generator().manual_seed(1))
    post = torch.softmax(lj.reshape(-1) + clean(one_hot(ex.sequences, V)).detach(), 0)
    counts = torch.bincount(index_of(x, V), minlength=V**D).double()

    def pvalue(law):
        expected = law * n
        keep = expected > 5
        return chisquare(counts[keep], expected[keep] * counts[keep].sum() / expected[keep].sum()).pvalue

    assert pvalue(post) > 1e-3
    assert pvalue(lj.exp().reshape(-1)) < 1e-12  # the guidance did change the law


def test_soft_one_hot_inputs_give_the_same_tilt_as_ids():
    ex = ExactConditional(random_joint(V, D, seed=1))
    x, _ = _partially_masked(16, seed=4)
    for mode in (ExactTilt(1.5), FirstOrder(1.5)):
        guided = ClassifierGuided(ex, Nonlinear(), mode, dtype=torch.float64)
        assert torch.equal(guided(one_hot(x, V).double()), guided(x))


def test_bad_guidance_settings_are_refused_with_the_value():
    ex = ExactConditional(random_joint(V, D))
    with pytest.raises(ConfigError, match="nan"):
        ExactTilt(float("nan"))
    with pytest.raises(ConfigError, match="got 'strong'"):
        FirstOrder("strong")
    with pytest.raises(ConfigError, match="got 'exact'"):
        ClassifierGuided(ex, Linear(), "exact")
    with pytest.raises(ConfigError, match=r"shape \(2,\), got \(2, 1\)"):
        ClassifierGuided(ex, lambda h: h.sum((1, 2))[:, None], FirstOrder(1.0))(torch.full((2, D), mask_id(V)))
