"""Adaptive Guidance on the exact GMM: its two limits (CFG, conditional), the per-sample switch and its network
cost counted in rows, batch independence, and the explicit per-trajectory state: each sample() call (or
start()) is a fresh trajectory, so no switch state leaks from one into the next."""

import math

import pytest
import torch

from condiff.core.denoiser import X0, Eps
from condiff.core.grids import make_grid
from condiff.core.sampling import CountingDenoiser, Gaussian, sample
from condiff.core.schedules import VPLinear
from condiff.data.gmm import GMM
from condiff.errors import ConfigError
from condiff.guidance import CFG
from condiff.guidance.adaptive import AdaptiveGuidance, AGState, AGTrajectory, CountRows, cosine
from condiff.solvers import get_solver

F64 = torch.float64
SOLVERS = ["ddim", "ddpm", "dpmpp-2m", "dpmpp-3m", "unipc", "heun", "dpmpp-2s", "edm-heun"]


def start(gmm, schedule, grid, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = float(schedule.sigma(grid[0])) * torch.randn(n, gmm.dim, generator=g, dtype=F64)
    y = torch.randint(0, gmm.num_classes, (n,), generator=g)
    return x, {"y": y, "null": GMM.null_cond(n)}


def run(den, solver, grid, x, cond, seed=1):
    return sample(den, get_solver(solver), grid, x, cond, Gaussian(torch.Generator().manual_seed(seed)))


def by_hand(trajectory, solver, grid, x, cond, each=None):
    """Step one started trajectory over ``grid`` by hand (deterministic solvers); ``each()`` after every step."""
    solver = get_solver(solver)
    D, state = CountingDenoiser(trajectory, cond), solver.init_state(grid)
    for i in range(grid.numel() - 1):
        x, state = solver.step(D, x, float(grid[i]), float(grid[i + 1]), state, None)
        if each is not None:
            each()
    return x


class FirstCFGThenCond:
    """Reference for gamma_bar = -1: CFG at the first evaluation, the conditional model afterwards."""

    def __init__(self, inner, w):
        self.inner, self.w, self.calls = inner, w, 0

    @property
    def schedule(self):
        return self.inner.schedule

    def __call__(self, x, t, cond):
        self.calls += 1
        if self.calls == 1:
            return CFG(self.inner, self.w)(x, t, cond)
        return self.inner(x, t, {k: v for k, v in cond.items() if k != "null"})


@pytest.mark.parametrize("solver", SOLVERS)
def test_gamma_bar_one_is_cfg_bit_for_bit(gmm, solver):
    """gamma_bar = 1: the clamped cosine never exceeds it, so every evaluation is the CFG call itself: whole
    trajectories (deterministic and stochastic solvers) are bit-identical and cost 2 rows per evaluation."""
    sch = VPLinear()
    grid = make_grid(sch, 8)
    x, cond = start(gmm, sch, grid)
    den = gmm.denoiser(sch)
    ref = run(CFG(den, 3.0), solver, grid, x, cond)
    counted = CountRows(den)
    ag = AdaptiveGuidance(counted, 3.0, gamma_bar=1.0)
    out = run(ag, solver, grid, x, cond)
    assert torch.equal(out.x, ref.x)
    assert out.nfe == ref.nfe and counted.rows == 2 * x.shape[0] * ref.nfe
    state = out.denoiser.state
    assert not bool(state.switched.any()) and state.rows == counted.rows and state.evaluations == out.nfe


@pytest.mark.parametrize("solver", SOLVERS)
def test_gamma_bar_minus_one_is_conditional_after_the_first_evaluation(gmm, solver):
    """gamma_bar = -1: every row switches at its first evaluation (which returns CFG), so the trajectory equals
    'CFG once, then the conditional model' bit for bit, and costs 2n rows once and n rows per later evaluation."""
    sch = VPLinear()
    grid = make_grid(sch, 8)
    x, cond = start(gmm, sch, grid)
    den = gmm.denoiser(sch)
    ref = run(FirstCFGThenCond(den, 3.0), solver, grid, x, cond)
    counted = CountRows(den)
    ag = AdaptiveGuidance(counted, 3.0, gamma_bar=-1.0)
    out = run(ag, solver, grid, x, cond)
    n = x.shape[0]
    assert torch.equal(out.x, ref.x)
    assert counted.rows == 2 * n + n * (out.nfe - 1) and counted.calls == out.nfe
    state = out.denoiser.state
    assert bool(state.switched.all()) and bool((state.switch_t == float(grid[0])).all())


def test_measured_gamma_is_the_cosine_of_the_exact_eps_predictions(gmm):
    """The state's gamma is cos(eps_c, eps_u) of the GMM's exact eps (default space) or of its exact x0 (X0())."""
    sch = VPLinear()
    grid = make_grid(sch, 8)
    x, cond = start(gmm, sch, grid)
    den = gmm.denoiser(sch)
    t = float(grid[2])
    y = {"y": cond["y"]}
    for space, c, u in [(Eps(), den.eps(x, t, y), den.eps(x, t)), (X0(), den(x, t, y), den(x, t))]:
        one = AdaptiveGuidance(den, 3.0, gamma_bar=1.0, space=space).start()
        one(x, t, cond)
        want = torch.nn.functional.cosine_similarity(c, u, dim=1)
        assert torch.allclose(one.state.gamma, want, rtol=0, atol=1e-12)


def test_gamma_rises_to_one_along_cfg_trajectories(gmm):
    """Specs 5d: along CFG trajectories the branches align as t -> 0: the median cosine over the last quarter
    of the grid is above that of evaluations 4-7 and ends above 0.999, in both spaces. In eps space it also
    starts near 1 (alpha is small, eps_c ~ eps_u ~ x / sigma) and dips first, the reason for the x0 option;
    in x0 space it rises monotonically."""
    sch = VPLinear()
    grid = make_grid(sch, 16)
    x, cond = start(gmm, sch, grid, n=256)
    curves = {}
    for space in (Eps(), X0()):
        one = AdaptiveGuidance(gmm.denoiser(sch), 3.0, gamma_bar=1.0, space=space).start()
        medians = []
        by_hand(one, "dpmpp-2m", grid, x, cond, lambda: medians.append(float(one.state.gamma.median())))
        assert min(medians[12:]) > max(medians[4:8]) and medians[-1] > 0.999
        curves[space.name] = torch.tensor(medians)
    eps, x0 = curves["eps"], curves["x0"]
    assert eps[0] > 0.999 and eps[0] > eps.min() + 0.005
    assert bool((x0[1:] >= x0[:-1]).all()) and x0[0] < 0.5


def test_switch_is_per_sample_and_rows_add_up_over_single_rows(gmm):
    """Batch independence: with a threshold that rows cross at different steps, each row's trajectory, switch
    time and network cost are those of the same row sampled alone (rows: batch total = sum of the singles)."""
    sch = VPLinear()
    grid = make_grid(sch, 12)
    x, cond = start(gmm, sch, grid, n=12)
    den = gmm.denoiser(sch)
    counted = CountRows(den)
    ag = AdaptiveGuidance(counted, 3.0, gamma_bar=0.9999, space=X0())
    whole = run(ag, "dpmpp-2m", grid, x, cond)
    out, switch_t = whole.x, whole.denoiser.state.switch_t
    assert torch.unique(switch_t[~switch_t.isnan()]).numel() >= 3  # the rows do switch at different steps
    singles = 0
    for i in range(x.shape[0]):
        one = CountRows(den)
        ag1 = AdaptiveGuidance(one, 3.0, gamma_bar=0.9999, space=X0())
        ci = {"y": cond["y"][i : i + 1], "null": GMM.null_cond(1)}
        single = run(ag1, "dpmpp-2m", grid, x[i : i + 1], ci)
        xi, st1 = single.x, single.denoiser.state
        assert torch.allclose(xi, out[i : i + 1], rtol=0, atol=1e-12)
        assert torch.equal(st1.switch_t.isnan(), switch_t[i : i + 1].isnan())
        assert bool(st1.switch_t.isnan().all()) or float(st1.switch_t) == float(switch_t[i])
        singles += one.rows
    assert counted.rows == singles < 2 * x.shape[0] * 12


def test_no_state_leaks_between_trajectories(gmm):
    """One AG object reused: a second trajectory (new start, same grid), a mid-grid start (SDEdit-like), a
    different batch size, and a repeat of the first all equal a fresh object's run, bit for bit; each run has
    its own started trajectory and the configuration object holds no state."""
    sch = VPLinear()
    grid = make_grid(sch, 10)
    den = gmm.denoiser(sch)
    x1, c1 = start(gmm, sch, grid, seed=1)
    x2, c2 = start(gmm, sch, grid, seed=2)
    x3, c3 = start(gmm, sch, grid, n=7, seed=3)

    def fresh(x, c, g=grid):
        return run(AdaptiveGuidance(den, 3.0, gamma_bar=0.9999, space=X0()), "dpmpp-2m", g, x, c).x

    reused = AdaptiveGuidance(den, 3.0, gamma_bar=0.9999, space=X0())
    whole = run(reused, "dpmpp-2m", grid, x1, c1)
    first = whole.x
    assert bool(whole.denoiser.state.switched.any()) and not hasattr(reused, "state")
    assert run(reused, "dpmpp-2m", grid, x1, c1).denoiser is not whole.denoiser
    assert torch.equal(run(reused, "dpmpp-2m", grid, x2, c2).x, fresh(x2, c2))
    mid = grid[4:]
    assert torch.equal(run(reused, "dpmpp-2m", mid, x2 * 0.5, c2).x, fresh(x2 * 0.5, c2, mid))
    assert torch.equal(run(reused, "dpmpp-2m", grid, x3, c3).x, fresh(x3, c3))
    assert torch.equal(run(reused, "dpmpp-2m", grid, x1, c1).x, first)


def test_explicit_state_and_start(gmm):
    """The state is explicit: a started trajectory records evaluations and rows and keeps its switches across
    all its evaluations (repeated time, as EDM's Heun makes, and rising time, as EDM's churn makes); start()
    gives a new trajectory with no state, leaving the first untouched; a trajectory's batch size is fixed."""
    sch = VPLinear()
    den = gmm.denoiser(sch)
    grid = make_grid(sch, 4)
    x, cond = start(gmm, sch, grid, n=5)
    ag = AdaptiveGuidance(den, 3.0, gamma_bar=-1.0)
    one = ag.start()
    assert isinstance(one, AGTrajectory) and one.state is None and one.config is ag and one.schedule is den.schedule
    one(x, float(grid[0]), cond)
    assert isinstance(one.state, AGState) and one.state.evaluations == 1 and one.state.rows == 10
    one(x, float(grid[1]), cond)
    one(x, float(grid[1]), cond)  # same t again: same trajectory
    one(x, float(grid[0]), cond)  # t rises: still the same trajectory (the switches stay)
    assert one.state.evaluations == 4 and one.state.rows == 25 and bool(one.state.switched.all())
    two = ag.start()
    assert two.state is None and one.state.evaluations == 4
    two(x, float(grid[1]), cond)
    assert two.state.evaluations == 1 and two.state.rows == 10 and one.state.evaluations == 4
    assert one.start().state is None  # start() of a trajectory begins a new one of the same configuration
    with pytest.raises(ConfigError, match="batch of 5"):
        one(x[:3], float(grid[2]), {"y": cond["y"][:3], "null": GMM.null_cond(3)})


def test_per_sample_times_and_mixed_switch_state(gmm):
    """Per-sample t: a row that switched gets the conditional estimate, the others CFG with their own t."""
    sch = VPLinear()
    den = gmm.denoiser(sch)
    n = 6
    t = torch.linspace(0.3, 0.8, n, dtype=F64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, gmm.dim, generator=g, dtype=F64)
    y = torch.arange(n) % 2
    cond = {"y": y, "null": GMM.null_cond(n)}
    counted = CountRows(den)
    ag = AdaptiveGuidance(counted, 2.0, gamma_bar=1.0).start()
    ag.state = AGState.start(n, 1.0)
    switched = torch.tensor([True, False, True, False, False, True])
    ag.state = AGState(switched, ag.state.switch_t, ag.state.gamma, 1.0, 1.0)
    out = ag(x, t, cond)
    cfg = den(x, t) + 2.0 * (den(x, t, {"y": y}) - den(x, t))
    cnd = den(x, t, {"y": y})
    assert torch.allclose(out[switched], cnd[switched], rtol=0, atol=1e-12)
    assert torch.allclose(out[~switched], cfg[~switched], rtol=0, atol=1e-12)
    assert counted.rows == n + int((~switched).sum())
    assert ag.state.gamma[switched].isnan().all() and not ag.state.gamma[~switched].isnan().any()


def test_cosine_is_clamped_and_safe():
    a = torch.randn(4, 3, 2, dtype=torch.float32)
    assert torch.equal(cosine(a, a).clamp(max=1.0), cosine(a, a)) and bool((cosine(a, a) <= 1.0).all())
    assert torch.allclose(cosine(a, -a), -torch.ones(4, dtype=F64), atol=1e-6)
    assert torch.equal(cosine(torch.zeros(2, 3), torch.ones(2, 3)), torch.zeros(2, dtype=F64))


def test_errors(gmm):
    den = gmm.denoiser(VPLinear())
    for bad in (1.5, -1.01, math.nan, "0.9", True):
        with pytest.raises(ConfigError, match="gamma_bar"):
            AdaptiveGuidance(den, 3.0, gamma_bar=bad)
    with pytest.raises(ConfigError, match="space"):
        AdaptiveGuidance(den, 3.0, space="eps")
    with pytest.raises(ConfigError, match="null"):
        AdaptiveGuidance(den, 3.0).start()(torch.zeros(2, 2, dtype=F64), 0.5, {"y": torch.tensor([0, 1])})
    cond = {"y": torch.tensor([0, 1]), "null": GMM.null_cond(2)}
    with pytest.raises(ConfigError, match=r"sample\(\).*\.start\(\)") as info:  # a configuration, not a trajectory
        AdaptiveGuidance(den, 3.0)(torch.zeros(2, 2, dtype=F64), 0.5, cond)
    assert "\n" not in str(info.value)
