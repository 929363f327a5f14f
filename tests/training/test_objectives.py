import math

import pytest
import torch

from condiff.core.denoiser import as_prediction, coefficients
from condiff.core.schedules import EDM, VPCosine, VPDiscrete
from condiff.training.objectives import (
    ConstantWeight,
    LogitNormalTime,
    LogNormalSigma,
    MinSNRWeight,
    UniformTime,
    diffusion_loss,
)


@pytest.mark.parametrize("pred", ["eps", "x0", "v", "flow"])
def test_a_perfect_model_has_zero_loss(pred):
    """If the network outputs exactly the target built from (x0, eps), the loss is zero; and the target
    converts back to x0 through the same Prediction."""
    sch = VPCosine()
    p = as_prediction(pred)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(8, 3, generator=g, dtype=torch.float64)
    t = UniformTime().sample(sch, 8, g)

    def oracle(x_t, tt, cond):
        a, s = coefficients(sch, tt, x_t)
        return p.target(x0, eps, a, s, tt, sch)

    loss = diffusion_loss(oracle, x0, None, t, eps, sch, p)
    assert loss.shape == (8,) and torch.all(loss == 0)
    a, s = coefficients(sch, t, x0)
    x_t = a * x0 + s * eps
    back = p.to_x0(p.target(x0, eps, a, s, t, sch), x_t, a, s, t, sch)
    assert torch.allclose(back, x0, atol=1e-6)


def test_time_samplers_stay_in_range():
    g = torch.Generator().manual_seed(0)
    for sch in (VPCosine(), VPDiscrete.from_betas("linear"), EDM()):
        for ts in (UniformTime(), LogitNormalTime(), LogNormalSigma()):
            t = ts.sample(sch, 1000, g)
            assert t.min() >= sch.t_min - 1e-12 and t.max() <= sch.t_max + 1e-12


def test_min_snr_weight():
    w = MinSNRWeight(5.0)
    log_snr = torch.tensor([math.log(1.0), math.log(10.0)])
    assert torch.allclose(w(log_snr), torch.tensor([1.0, 0.5]))
    assert torch.equal(ConstantWeight()(log_snr), torch.ones(2))
