"""Round trips between eps / x0 / v / score / flow, and the Prediction objects behind ``wrap``."""

import pytest
import torch

from condiff.core import parameterization as P
from condiff.core.denoiser import PREDICTIONS, coefficients
from condiff.core.schedules import EDM, Flow, VPCosine, VPDiscrete, VPLinear

F64 = torch.float64
SCHEDULES = [VPLinear(), VPCosine(), VPDiscrete.from_betas("linear"), EDM(), Flow()]


def _ids(s):
    return type(s).__name__


def _batch(schedule, per_sample: bool, n=16, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, generator=g, dtype=F64)
    eps = torch.randn(n, d, generator=g, dtype=F64)
    lo, hi = schedule.t_min, schedule.t_max
    t = lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64) if per_sample else 0.5 * (lo + hi)
    a, s = coefficients(schedule, t, x0)
    return x0, eps, t, a, s, a * x0 + s * eps


def _derivatives(schedule, t, like, h=1e-7):
    t = torch.as_tensor(t, dtype=F64)
    da = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    ds = (schedule.sigma(t + h) - schedule.sigma(t - h)) / (2 * h)
    shape = (-1, 1) if t.dim() else ()
    return da.reshape(shape), ds.reshape(shape)


def close(u, v, tol=1e-10):
    return torch.allclose(u, v, rtol=tol, atol=tol)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=_ids)
def test_conversions_recover_the_truth(schedule, per_sample):
    x0, eps, t, a, s, x = _batch(schedule, per_sample)
    assert close(P.eps_to_x0(x, eps, a, s), x0)
    assert close(P.x0_to_eps(x, x0, a, s), eps)
    v = a * eps - s * x0
    assert close(P.x0_to_v(x, x0, a, s), v)
    assert close(P.v_to_x0(x, v, a, s), x0)
    score = -eps / s
    assert close(P.x0_to_score(x, x0, a, s), score)
    assert close(P.score_to_x0(x, score, a, s), x0)
    da, ds = _derivatives(schedule, t, x)
    u = da * x0 + ds * eps
    assert close(P.x0_to_flow(x, x0, a, s, da, ds), u)
    assert close(P.flow_to_x0(x, u, a, s, da, ds), x0, tol=1e-8)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=_ids)
def test_round_trips_of_arbitrary_outputs(schedule, per_sample):
    """x0 -> param -> x0 and param -> x0 -> param are identities for any values, not only consistent ones."""
    x0, eps, t, a, s, x = _batch(schedule, per_sample)
    other = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    da, ds = _derivatives(schedule, t, x)
    pairs = [
        (P.x0_to_eps, P.eps_to_x0, ()),
        (P.x0_to_v, P.v_to_x0, ()),
        (P.x0_to_score, P.score_to_x0, ()),
        (P.x0_to_flow, P.flow_to_x0, (da, ds)),
    ]
    for fwd, back, extra in pairs:
        assert close(back(x, fwd(x, other, a, s, *extra), a, s, *extra), other, tol=1e-8)
        assert close(fwd(x, back(x, other, a, s, *extra), a, s, *extra), other, tol=1e-8)


def test_flow_velocity_on_rectified_flow_is_eps_minus_x0():
    sch = Flow()
    x0, eps, t, a, s, x = _batch(sch, per_sample=True)
    target = PREDICTIONS["flow"].target(x0, eps, a, s, t, sch)
    assert close(target, eps - x0, tol=1e-8)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=_ids)
@pytest.mark.parametrize("pred", sorted(PREDICTIONS))
def test_prediction_target_then_to_x0_is_identity(pred, schedule, per_sample):
    x0, eps, t, a, s, x = _batch(schedule, per_sample)
    p = PREDICTIONS[pred]
    out = p.target(x0, eps, a, s, t, schedule)
    assert close(p.to_x0(out, x, a, s, t, schedule), x0, tol=1e-8)
