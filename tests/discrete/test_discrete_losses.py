import itertools
import math

import torch
from scipy.integrate import quad

from condiff.discrete import KDCE, TDCE, ExactConditional, LambdaDCE, LogLinear
from condiff.discrete.losses import apply_mask, masked_nll
from discretekit import random_joint

V, D = 3, 4


def _exact():
    return ExactConditional(random_joint(V, D))


def _h_of_masks(ex):
    """E_x [sum_{i in M} -log p(x^i | x^{M^c})] for every mask pattern M, by enumeration."""
    p = ex.log_p.exp()
    out = {}
    for pattern in itertools.product([False, True], repeat=D):
        m = torch.tensor(pattern).expand(len(ex.sequences), D)
        out[pattern] = float((p * masked_nll(ex(apply_mask(ex.sequences, m, V)), ex.sequences, m)).sum())
    return out


def _mc(loss, n=40000, seed=0):
    ex = _exact()
    g = torch.Generator().manual_seed(seed)
    values = loss(ex, ex.sample(n, g), g)
    return ex, float(values.mean()), float(values.std() / math.sqrt(n))


def test_k_dce_expectation_is_the_entropy_exactly_by_enumeration():
    ex = _exact()
    h = _h_of_masks(ex)
    total = 0.0
    for k in range(1, D + 1):
        same_size = [v for m, v in h.items() if sum(m) == k]
        total += (1 / D) * (D / k) * sum(same_size) / len(same_size)
    assert math.isclose(total, ex.entropy(), rel_tol=1e-12)


def test_lambda_dce_expectation_is_the_entropy_by_quadrature():
    ex = _exact()
    h = _h_of_masks(ex)
    value = quad(lambda lam: sum(lam ** sum(m) * (1 - lam) ** (D - sum(m)) * v for m, v in h.items()) / lam, 0, 1)[0]
    assert math.isclose(value, ex.entropy(), rel_tol=1e-9)


def test_lambda_and_k_dce_monte_carlo_within_three_standard_errors_of_the_entropy():
    for loss in (LambdaDCE(), KDCE()):
        ex, mean, se = _mc(loss)
        assert abs(mean - ex.entropy()) < 3 * se, (type(loss).__name__, mean, ex.entropy(), se)


def test_t_dce_expectation_is_the_entropy_up_to_order_eps_and_monte_carlo_agrees():
    sched, t_min = LogLinear(1e-3), 1e-3
    ex = _exact()
    h = _h_of_masks(ex)

    def integrand(t):
        m = float(sched.mask_prob(torch.tensor(t)))
        sb = float(sched.sigma_bar(torch.tensor(t)))
        w = float(sched.dsigma_bar(torch.tensor(t))) / math.expm1(sb)
        return w * sum(
            m ** sum(k) * (1 - m) ** (D - sum(k)) * (v + sum(k) * math.log(math.expm1(sb))) for k, v in h.items()
        )

    exact = quad(integrand, t_min, 1, limit=400)[0] / (1 - t_min)
    eps = sched.eps
    assert abs(exact - ex.entropy()) < D * eps * (1 + math.log(1 / eps))  # the O(eps) prior and truncation terms
    _, mean, se = _mc(TDCE(sched, t_min), n=100000, seed=1)
    assert abs(mean - exact) < 3 * se


def test_losses_are_nonnegative_per_sample_and_zero_on_a_point_mass():
    lj = torch.full((V,) * D, -torch.inf, dtype=torch.float64)
    lj[0, 1, 2, 0] = 0.0
    ex = ExactConditional(lj)
    x0 = ex.sample(64, torch.Generator().manual_seed(0))
    for loss in (LambdaDCE(), KDCE()):
        assert torch.equal(loss(ex, x0, torch.Generator().manual_seed(0)), torch.zeros(64, dtype=torch.float64))
