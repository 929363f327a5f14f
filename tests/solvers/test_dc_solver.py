"""DC-Solver (condiff.solvers.dc_solver): rho = 1 is the base solver exactly, the compensation is the Lagrange
interpolant (exact for polynomial model outputs), and bad configurations are one-line ConfigErrors."""

import math

import pytest
import torch

from condiff.core.grids import Karras, UniformLogSNR, UniformT, make_grid
from condiff.core.sampling import initial_noise, sample
from condiff.core.schedules import EDM, Flow, VPCosine, VPDiscrete, VPLinear
from condiff.errors import ConfigError
from condiff.guidance import CFG
from condiff.solvers import DPMSolverPP2M, DPMSolverPP3M, Heun, UniPC, get_solver, point
from condiff.solvers.dc_solver import DCSolver, LambdaAxis, TimeAxis, compensate, lagrange_weights

F64 = torch.float64
SETUPS = [
    (VPLinear(), UniformLogSNR()),
    (VPCosine(), UniformT()),
    (VPDiscrete.from_betas("squaredcos_cap_v2"), UniformT()),
    (EDM(), Karras()),
    (Flow(), UniformLogSNR()),
]
IDS = ["vplinear", "vpcosine", "vpdiscrete", "edm", "flow"]


def _start(gmm, schedule, spacing, steps, n=32, dtype=F64, w=5.0):
    grid = make_grid(schedule, steps, spacing)
    x = initial_noise(schedule, float(grid[0]), (n, gmm.dim), torch.Generator().manual_seed(3), dtype=dtype)
    cond = {"y": torch.arange(n) % gmm.num_classes, "null": gmm.null_cond(n)}
    return CFG(gmm.denoiser(schedule), w), grid, x, cond


@pytest.mark.parametrize("schedule, spacing", SETUPS, ids=IDS)
@pytest.mark.parametrize(
    "base",
    [UniPC(), UniPC(variant="bh1", order=3), DPMSolverPP2M(), DPMSolverPP3M()],
    ids=["unipc", "unipc-bh1-3", "dpmpp-2m", "dpmpp-3m"],
)
def test_unit_ratios_reproduce_the_base_bit_for_bit(gmm, schedule, spacing, base):
    """rho = 1 at every step (or no ratios) gives exactly the base solver's trajectory, with CFG."""
    steps = 7
    den, grid, x, cond = _start(gmm, schedule, spacing, steps)
    ref = sample(den, base, grid, x, cond)
    for ratios in (None, (1.0,) * steps):
        for axis in (TimeAxis(), LambdaAxis()):
            out = sample(den, DCSolver(ratios, base=base, axis=axis), grid, x, cond)
            assert torch.equal(out.x, ref.x) and out.nfe == ref.nfe


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64_keep_their_dtype_and_unit_ratios_stay_exact(gmm, dtype):
    """Both precisions run with non-trivial ratios; rho = 1 equals UniPC in each."""
    den, grid, x, cond = _start(gmm, VPLinear(), UniformLogSNR(), 6, dtype=dtype)
    ratios = (1.0, 0.9, 1.2, 0.8, 1.1, 1.0)
    out = sample(den, DCSolver(ratios), grid, x, cond).x
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    assert torch.equal(sample(den, DCSolver((1.0,) * 6), grid, x, cond).x, sample(den, UniPC(), grid, x, cond).x)
    assert not torch.equal(out, sample(den, UniPC(), grid, x, cond).x)


def test_gradients_flow_with_ratios(gmm):
    """Nothing is detached: d(final)/d(x_T) is finite and non-zero with non-unit ratios."""
    den, grid, x, cond = _start(gmm, VPLinear(), UniformLogSNR(), 5)
    x = x.requires_grad_(True)
    out = sample(den, DCSolver((1.0, 1.0, 1.3, 0.7, 1.0)), grid, x, cond).x
    (g,) = torch.autograd.grad(out.square().sum(), x)
    assert bool(torch.isfinite(g).all()) and float(g.abs().max()) > 0


# ---- the compensation is Lagrange interpolation ----------------------------------------------------------


def _poly(coeffs, c):
    return sum(a * c**k for k, a in enumerate(coeffs))


@pytest.mark.parametrize("K", [1, 2, 3])
def test_compensation_is_exact_for_polynomials_up_to_degree_k(K):
    """With nodes m_j = P(c_j), deg P <= K, the compensated value is P(tau), tau = c_{-2} + rho (c_{-1} - c_{-2}),
    for interpolation and extrapolation; a degree K + 1 polynomial is not reproduced (the test can fail)."""
    g = torch.Generator().manual_seed(K)
    coords = sorted((torch.rand(K + 1, generator=g, dtype=F64) * 5).tolist(), reverse=True)
    for deg in range(K + 2):
        coeffs = [torch.randn(3, generator=g, dtype=F64) for _ in range(deg + 1)]
        ms = tuple(_poly(coeffs, c) for c in coords)
        for rho in (0.3, 1.0, 1.7, -0.4):
            tau = coords[-2] + rho * (coords[-1] - coords[-2])
            got = compensate(tuple(coords), ms, rho)
            if deg <= K:
                assert torch.allclose(got, _poly(coeffs, tau), rtol=1e-11, atol=1e-11)
            elif rho != 1.0:
                assert not torch.allclose(got, _poly(coeffs, tau), rtol=1e-6, atol=1e-6)
    assert sum(lagrange_weights(coords, 0.37)) == pytest.approx(1.0, abs=1e-12)


def test_compensation_is_differentiable_in_the_ratio():
    """A 0-d tensor ratio gives the derivative of the interpolant, P'(tau) (c_{-1} - c_{-2})."""
    coords, coeffs = (
        (3.0, 2.0, 0.5),
        [
            torch.tensor([1.0, -2.0], dtype=F64),
            torch.tensor([0.5, 0.25], dtype=F64),
            torch.tensor([-0.3, 0.7], dtype=F64),
        ],
    )
    ms = tuple(_poly(coeffs, c) for c in coords)
    rho = torch.tensor(1.4, dtype=F64, requires_grad=True)
    out = compensate(coords, ms, rho)
    (g,) = torch.autograd.grad(out.sum(), rho)
    tau = coords[-2] + 1.4 * (coords[-1] - coords[-2])
    deriv = coeffs[1] + 2 * coeffs[2] * tau
    assert float(g) == pytest.approx(float((deriv * (coords[-1] - coords[-2])).sum()), rel=1e-12)


class PolyDenoiser:
    """x0_hat(x, t) = P(c(t)) independent of x, P quadratic with vector coefficients, c the axis coordinate."""

    def __init__(self, schedule, axis, coeffs):
        self.schedule, self.axis, self.coeffs = schedule, axis, coeffs

    def __call__(self, x, t, cond=None):
        c = self.axis.coord(point(self.schedule, float(t)))
        return _poly(self.coeffs, c).expand_as(x).clone()


@pytest.mark.parametrize("axis", [TimeAxis(), LambdaAxis()], ids=["t", "lambda"])
@pytest.mark.parametrize("base", [UniPC(), DPMSolverPP2M()], ids=["unipc", "dpmpp-2m"])
def test_solver_stores_and_uses_the_interpolant_of_a_quadratic_model(axis, base):
    """Through the solver, with one non-unit ratio at step i (the nodes are raw outputs), the stored output is
    P(tau_i) exactly and the step equals the base's predictor fed P(tau_i)."""
    sch = VPLinear()
    grid = make_grid(sch, 6, UniformLogSNR())
    g = torch.Generator().manual_seed(0)
    coeffs = [torch.randn(1, 3, generator=g, dtype=F64) * s for s in (1.0, 0.2, 0.03)]
    D = PolyDenoiser(sch, axis, coeffs)
    x0 = torch.randn(4, 3, generator=g, dtype=F64)
    for i, rho in ((2, 1.35), (3, 0.6), (4, 2.0)):
        ratios = tuple(rho if k == i else 1.0 for k in range(6))
        dc = DCSolver(ratios, base=base, axis=axis)
        st, bst, x, xb = dc.init_state(grid), base.init_state(grid), x0, x0
        for k in range(i):
            x, st = dc.step(D, x, float(grid[k]), float(grid[k + 1]), st, None)
            xb, bst = base.step(D, xb, float(grid[k]), float(grid[k + 1]), bst, None)
        assert torch.equal(x, xb)
        x_next, st = dc.step(D, x, float(grid[i]), float(grid[i + 1]), st, None)
        c_prev, c_cur = (axis.coord(point(sch, float(grid[j]))) for j in (i - 1, i))
        want = _poly(coeffs, c_prev + rho * (c_cur - c_prev)).expand_as(x)
        assert torch.allclose(st.ms[-1], want, rtol=1e-11, atol=1e-12)
        p, q = point(sch, float(grid[i])), point(sch, float(grid[i + 1]))
        halves = dc.halves(sch)
        expect, _ = halves.predict(halves.correct(x, p, D(x, p.t), bst), p, q, want, bst)
        assert torch.allclose(x_next, expect, rtol=1e-12, atol=1e-12)


# ---- configuration errors --------------------------------------------------------------------------------


def test_ratio_count_must_match_the_grid(gmm):
    """A ratios tuple of the wrong length is a ConfigError naming both counts, before any evaluation."""
    den, grid, x, cond = _start(gmm, VPLinear(), UniformLogSNR(), 5)
    with pytest.raises(ConfigError, match="4 ratios but the grid has 5 steps"):
        sample(den, DCSolver((1.0, 1.0, 1.1, 1.0)), grid, x, cond)
    with pytest.raises(ConfigError, match="has 2 ratios but is asked for step 3"):  # grid unknown: caught late
        st = None
        s = DCSolver((1.0, 1.0))
        D = lambda xx, t: den(xx, t, cond)  # noqa: E731
        D.schedule = den.schedule
        for k in range(3):
            x, st = s.step(D, x, float(grid[k]), float(grid[k + 1]), st, None)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"ratios": (1.2, 1.0)}, "step 0 must be 1"),
        ({"ratios": (1.0, math.nan)}, "ratio 1 must be a finite number"),
        ({"ratios": (1.0, "a")}, "ratio 1"),
        ({"ratios": ()}, "empty"),
        ({"ratios": 3.0}, "sequence of numbers"),
        ({"dc_order": 0}, "dc_order"),
        ({"dc_order": 4}, "dc_order"),
        ({"dc_order": True}, "dc_order"),
        ({"base": Heun()}, "base must be"),
        ({"base": "unipc"}, "base must be"),
        ({"axis": "t"}, "axis must be"),
    ],
)
def test_bad_configuration_is_a_one_line_config_error(kwargs, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        DCSolver(**kwargs)
    assert "\n" not in str(e.value)


def test_registry_builds_it_with_ratios():
    """`dc-solver` is in the solver registry and takes its ratios as a list."""
    s = get_solver("dc-solver", ratios=[1, 1, 1.25])
    assert isinstance(s, DCSolver) and s.ratios == (1.0, 1.0, 1.25) and s.convergence_order == 3
