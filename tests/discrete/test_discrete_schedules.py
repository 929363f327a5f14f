import torch

from condiff.discrete import Linear, LogLinear
from condiff.discrete.schedules import euler_fraction, unmask_fraction


def test_log_linear_mask_probability_and_sigma_derivative():
    s = LogLinear(1e-3)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(s.mask_prob(t), (1 - 1e-3) * t)
    assert torch.allclose(1 - torch.exp(-s.sigma_bar(t)), s.mask_prob(t))
    (grad,) = torch.autograd.grad(s.sigma_bar(t).sum(), t)
    assert torch.allclose(grad, s.dsigma_bar(t.detach()))


def test_linear_schedule_derivative_and_fractions():
    s = Linear()
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(s.sigma_bar(t).sum(), t)
    assert torch.allclose(grad, s.dsigma_bar(t.detach()))
    assert abs(unmask_fraction(s, 0.8, 0.6) - 0.25) < 1e-12
    # Euler's rate for m(t) = t is 1/t: the step 0.8 -> 0.6 unmasks 0.2 / 0.8
    assert abs(euler_fraction(s, 0.8, 0.6) - 0.25) < 1e-12
