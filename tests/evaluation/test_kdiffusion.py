"""k-diffusion's samplers as peers (condiff.evaluation.kdiffusion): loaded without the package's training stack,
driven in the Karras parametrisation on the same grid and denoiser, they reproduce condiff's own solvers where
the algorithm is the same (DPM-Solver++(2M); Euler in sigma = DDIM), so the benchmark compares algorithms."""

import importlib.util

import pytest
import torch

from condiff.errors import ConfigError
from condiff.evaluation import bench, kdiffusion
from condiff.evaluation.kdiffusion import KPEERS, karras_sigmas, sigmas_of
from condiff.solvers import get_solver


@pytest.fixture(scope="module")
def problem():
    return bench.gmm_problem(dim=3, components=4, classes=2, seed=4, n=64, cfg=2.0, ref_steps=512)


def _peer(label):
    return bench.KDiffusionCase(next(p for p in KPEERS if p.label == label))


@pytest.mark.parametrize("condiff_name, label", [("dpmpp-2m", "k-dpmpp-2m"), ("ddim", "k-euler")])
@pytest.mark.parametrize("nfe", [4, 9])
def test_same_algorithm_same_samples(problem, condiff_name, label, nfe):
    """Same grid, same float64 denoiser: the end points agree to round-off (float64)."""
    x_c, n_c = bench.CondiffCase(condiff_name, get_solver(condiff_name)).run(problem, nfe)
    x_k, n_k = _peer(label).run(problem, nfe)
    assert n_c == n_k == nfe
    assert float((x_c - x_k).abs().max()) < 1e-9 * float(x_c.abs().max())


@pytest.mark.parametrize("label", ["k-heun", "k-dpm-2", "k-dpmpp-2s"])
def test_two_evaluation_samplers_count_their_last_step_once(problem, label):
    x, nfe = _peer(label).run(problem, 9)  # 5 steps: 4 of two evaluations, the last (into sigma 0) of one
    assert nfe == 9 and bool(torch.isfinite(x).all())


def test_second_order_samplers_converge_faster_than_euler(problem):
    err = {}
    for label in ("k-euler", "k-heun", "k-dpmpp-2m"):
        x, _ = _peer(label).run(problem, 20)
        err[label] = bench.rms_error(x, problem.x_ref)
    assert err["k-heun"] < err["k-euler"] and err["k-dpmpp-2m"] < err["k-euler"]


def test_sigmas_are_the_grids_sigma_over_alpha_then_zero(problem):
    grid = problem.grid(6)
    s = sigmas_of(problem.schedule, grid)
    assert s.shape == (7,) and s[-1] == 0 and bool((s[1:] < s[:-1]).all())
    assert torch.allclose(s[0], problem.schedule.sigma_over_alpha(grid[0]).double())


def test_karras_sigmas_span_the_schedule():
    sch = bench.gmm_problem(dim=2, components=2, classes=2, n=2, ref_steps=8).schedule
    s = karras_sigmas(sch, 10)
    assert s.shape == (11,) and s[-1] == 0
    assert torch.isclose(s[0], torch.as_tensor(float(sch.sigma_over_alpha(sch.t_max)), dtype=s.dtype))
    assert torch.isclose(s[-2], torch.as_tensor(float(sch.sigma_over_alpha(sch.t_min)), dtype=s.dtype))


def test_a_missing_peer_is_a_one_line_error_naming_the_install(monkeypatch):
    kdiffusion.sampling_module.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match="requirements-peers.txt"):
        kdiffusion.sampling_module()
    monkeypatch.undo()
    kdiffusion.sampling_module.cache_clear()
    assert hasattr(kdiffusion.sampling_module(), "sample_dpmpp_2m")


def test_the_real_package_is_left_untouched():
    """The peer loads under a private name; `k_diffusion` itself (whose __init__ needs torchvision) is not
    imported by it."""
    import sys

    kdiffusion.sampling_module()
    assert "k_diffusion" not in sys.modules
