"""Algebraic identities between solvers, in float64 on the exact GMM denoiser."""

import pytest
import torch

from condiff.core.grids import UniformLogSNR, make_grid
from condiff.core.sampling import initial_noise, sample
from condiff.core.schedules import EDM, VPLinear
from condiff.errors import ConfigError
from condiff.solvers import DDIM, DPMSolverPP2M, DPMSolverPP3M, UniPC

F64 = torch.float64


def setup(schedule, steps=8, final_zero=True):
    grid = make_grid(schedule, steps, UniformLogSNR(), final_zero=final_zero)
    x = initial_noise(schedule, float(grid[0]), (32, 2), torch.Generator().manual_seed(0), dtype=F64)
    return grid, x


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("schedule", [VPLinear(), EDM()], ids=lambda s: type(s).__name__)
def test_unipc_order1_without_corrector_is_ddim(gmm, schedule, variant):
    grid, x = setup(schedule)
    den = gmm.denoiser(schedule)
    a = sample(den, UniPC(order=1, variant=variant, corrector=False), grid, x).x
    b = sample(den, DDIM(eta=0.0), grid, x).x
    assert float((a - b).abs().max()) <= 1e-10


def test_unipc_bh2_order2_predictor_is_dpmpp_2m(gmm):
    grid, x = setup(VPLinear(), final_zero=False)
    den = gmm.denoiser(VPLinear())
    a = sample(den, UniPC(order=2, variant="bh2", corrector=False, lower_order_final=False), grid, x).x
    b = sample(den, DPMSolverPP2M(), grid, x).x
    assert float((a - b).abs().max()) <= 1e-10


@pytest.mark.parametrize("schedule", [VPLinear(), EDM()], ids=lambda s: type(s).__name__)
def test_dpmpp_3m_first_step_is_ddim(gmm, schedule):
    grid, x = setup(schedule)
    den = gmm.denoiser(schedule)
    one = grid[:2]
    a = sample(den, DPMSolverPP3M(), one, x).x
    b = sample(den, DDIM(eta=0.0), one, x).x
    assert float((a - b).abs().max()) <= 1e-10


def test_dpmpp_3m_second_step_is_dpmpp_2m(gmm):
    grid, x = setup(VPLinear(), final_zero=False)
    den = gmm.denoiser(VPLinear())
    a = sample(den, DPMSolverPP3M(lower_order_final=False), grid[:3], x).x
    b = sample(den, DPMSolverPP2M(), grid[:3], x).x
    assert float((a - b).abs().max()) <= 1e-10


@pytest.mark.parametrize(
    "kwargs", [dict(order=0), dict(order=4), dict(order=True), dict(variant="bh3"), dict(corrector="yes")]
)
def test_unipc_rejects_bad_arguments(kwargs):
    with pytest.raises(ConfigError) as e:
        UniPC(**kwargs)
    assert "\n" not in str(e.value)
