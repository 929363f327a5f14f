"""Explicit per-trajectory state (adaptive guidance, LinearAG) and how it travels through wrappers:
``start_trajectory`` and ``Wrapper.start`` on stateless and stateful stacks, two trajectories of one
configuration stepped interleaved by hand, AG nested inside other wrappers, and a Tap shared by PAGTerm and the
AG inside it."""

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import condiff.guidance as G
from condiff.core.denoiser import X0, Wrapper, start_trajectory, wrap
from condiff.core.grids import make_grid
from condiff.core.sampling import CountingDenoiser, Gaussian, sample
from condiff.core.schedules import VPLinear
from condiff.data.gmm import GMM
from condiff.guidance.adaptive import AGTrajectory
from condiff.guidance.build import NegativeAsNull
from condiff.guidance.classifier import exact_gmm_classifier
from condiff.guidance.linear_ag import LinearAGTrajectory
from condiff.interop.tiny import tiny_unet as tiny_cross_attention_unet
from condiff.solvers import get_solver

F64 = torch.float64
SCH = VPLinear()
GRID = make_grid(SCH, 8)


def starts(gmm, n, seed, grid=GRID):
    g = torch.Generator().manual_seed(seed)
    x = float(SCH.sigma(grid[0])) * torch.randn(n, gmm.dim, generator=g, dtype=F64)
    y = torch.randint(0, gmm.num_classes, (n,), generator=g)
    return x, {"y": y, "null": GMM.null_cond(n), "negative": {"y": 1 - y}}


def noise(seed):
    return Gaussian(torch.Generator().manual_seed(seed))


def interleaved(guided, solver, grid, runs):
    """Trajectories of one configuration (``guided.start()`` each) stepped by hand on ``grid``, one step of each
    in turn; ``runs`` = [(x, cond, noise)]. Returns the final samples and the started trajectories."""
    solver = get_solver(solver)
    trajectories = [guided.start() for _ in runs]
    bound = [CountingDenoiser(tr, cond) for tr, (_, cond, _) in zip(trajectories, runs)]
    xs, states = [x for x, _, _ in runs], [solver.init_state(grid) for _ in runs]
    for i in range(grid.numel() - 1):
        for j, (_, _, nz) in enumerate(runs):
            xs[j], states[j] = solver.step(bound[j], xs[j], float(grid[i]), float(grid[i + 1]), states[j], nz)
    return xs, trajectories


def inner_trajectory(den, kind):
    """The first ``kind`` object down the ``denoiser`` chain of a started stack."""
    while not isinstance(den, kind):
        den = den.denoiser
    return den


@pytest.mark.parametrize("solver", ["ddim", "ddpm", "dpmpp-2m", "unipc", "heun"])
def test_interleaved_ag_trajectories_equal_separate_sample_runs(gmm, solver):
    """Two AG trajectories of the same batch size (a, b = ag.start(), ag.start()), stepped alternately on one
    grid, give exactly the samples and switch states of two separate sample() runs: each holds its own state.
    Their rows switch at different times, so one shared state would have changed both."""
    ag = G.AdaptiveGuidance(gmm.denoiser(SCH), 3.0, gamma_bar=0.9999, space=X0())
    (x1, c1), (x2, c2) = starts(gmm, 12, 1), starts(gmm, 12, 2)
    ref1 = sample(ag, get_solver(solver), GRID, x1, c1, noise(5))
    ref2 = sample(ag, get_solver(solver), GRID, x2, c2, noise(6))
    (a, b), (ta, tb) = interleaved(ag, solver, GRID, [(x1, c1, noise(5)), (x2, c2, noise(6))])
    assert torch.equal(a, ref1.x) and torch.equal(b, ref2.x)
    for mine, ref in ((ta.state, ref1.denoiser.state), (tb.state, ref2.denoiser.state)):
        assert torch.equal(mine.switched, ref.switched) and torch.equal(
            mine.switch_t.nan_to_num(-1.0), ref.switch_t.nan_to_num(-1.0)
        )
        assert mine.evaluations == ref1.nfe and mine.rows == ref.rows
    assert bool(ta.state.switched.any()) and bool(tb.state.switched.any())
    assert not torch.equal(ta.state.switch_t.nan_to_num(-1.0), tb.state.switch_t.nan_to_num(-1.0))


@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m", "unipc", "heun"])
def test_interleaved_linear_ag_trajectories_equal_separate_sample_runs(gmm, solver):
    """The same for LinearAG (every fitted evaluation predicted, so every evaluation reads its trajectory's own
    history): interleaved trajectories equal separate sample() runs bit for bit, each counting its own k."""
    den = gmm.denoiser(SCH)
    co = G.fit_linear_ag(den, get_solver(solver), GRID, *starts(gmm, 64, 0)[:2], 3.0)
    lag = G.LinearAG(den, co, steps=co.steps)
    (x1, c1), (x2, c2) = starts(gmm, 12, 1), starts(gmm, 12, 2)
    ref1 = sample(lag, get_solver(solver), GRID, x1, c1, noise(5))
    ref2 = sample(lag, get_solver(solver), GRID, x2, c2, noise(6))
    (a, b), (ta, tb) = interleaved(lag, solver, GRID, [(x1, c1, noise(5)), (x2, c2, noise(6))])
    assert torch.equal(a, ref1.x) and torch.equal(b, ref2.x) and not torch.equal(a, b)
    assert isinstance(ta, LinearAGTrajectory) and ta.k == tb.k == ref1.nfe == co.steps


def loss(x0, cond):
    return (x0 - 1.0).square().sum(1)


NESTS = {
    "classifier": lambda ag, den: G.ClassifierGuidance(ag, exact_gmm_classifier(den), 1.5, drop=()),
    "count-rows": lambda ag, den: G.CountRows(ag),
    "thresholding": lambda ag, den: G.DynamicThresholding(ag, ratio=0.9),
    "negative-as-null": lambda ag, den: NegativeAsNull(ag),
    "universal": lambda ag, den: G.UniversalGuidance(ag, [G.Forward(loss, 0.3)]),
    "inpaint": lambda ag, den: G.inpaint(ag, torch.tensor([1, 0]), torch.tensor([0.0, 0.7])),
    "two-deep": lambda ag, den: G.DynamicThresholding(
        G.ClassifierGuidance(ag, exact_gmm_classifier(den), 1.5, drop=()), ratio=0.9
    ),
}


@pytest.mark.parametrize("nest", sorted(NESTS))
def test_ag_nested_in_a_wrapper_gets_fresh_state_per_sample_call(gmm, nest):
    """AG inside another wrapper: every sample() call of one reused stack starts a fresh AG trajectory (found
    inside the started stack it returns, with exactly that run's evaluations), so a run stopped mid-grid and a
    new one that starts lower (falling t, same batch size: one trajectory to any heuristic) give bit for bit
    what fresh stacks give. The stack object itself is not changed."""
    den = gmm.denoiser(SCH)

    def fresh():
        return NESTS[nest](G.AdaptiveGuidance(den, 3.0, gamma_bar=0.9999, space=X0()), den)

    solver = get_solver("dpmpp-2m")
    (x1, c1), (x2, c2) = starts(gmm, 10, 1), starts(gmm, 10, 2, GRID[4:])
    stack = fresh()
    below, inner = stack.denoiser, inner_trajectory(stack, G.AdaptiveGuidance)
    stopped = sample(stack, solver, GRID[:5], x1, c1)
    lower = sample(stack, solver, GRID[4:], x2, c2)
    assert torch.equal(lower.x, sample(fresh(), solver, GRID[4:], x2, c2).x)
    assert torch.equal(sample(stack, solver, GRID, x1, c1).x, sample(fresh(), solver, GRID, x1, c1).x)
    runs = [inner_trajectory(out.denoiser, AGTrajectory) for out in (stopped, lower)]
    assert runs[0] is not runs[1] and all(r.config is inner for r in runs)
    assert [r.state.evaluations for r in runs] == [stopped.nfe, lower.nfe]
    assert stack.denoiser is below and inner_trajectory(stack, G.AdaptiveGuidance) is inner
    assert not hasattr(inner, "state")


def test_count_rows_over_ag_counts_into_itself(gmm):
    """CountRows around AG: the started copy counts into the CountRows object the caller holds."""
    den = gmm.denoiser(SCH)
    counted = G.CountRows(G.AdaptiveGuidance(den, 3.0, gamma_bar=1.0))
    x, c = starts(gmm, 6, 1)
    out = sample(counted, get_solver("ddim"), GRID, x, c)
    assert out.denoiser is not counted and counted.calls == out.nfe and counted.rows == 6 * out.nfe
    sample(counted, get_solver("ddim"), GRID, x, c)
    assert counted.calls == 2 * out.nfe and out.denoiser.start() is not out.denoiser


@dataclass
class Starts(Wrapper):
    """A transparent wrapper with state of its own: start() returns a new object marked ``started``."""

    denoiser: Any
    started: bool = False

    def start(self, memo=None):
        return Starts(start_trajectory(self.denoiser, memo), True)

    def __call__(self, x, t, cond=None):
        return self.denoiser(x, t, cond)


class OnlyStart:
    """A denoiser outside the Wrapper protocol whose start() takes no argument."""

    def __init__(self, inner):
        self.inner = inner

    @property
    def schedule(self):
        return self.inner.schedule

    def start(self):
        return self.inner

    def __call__(self, x, t, cond=None):
        raise AssertionError("called without start()")


def test_start_trajectory_copies_only_stateful_paths(gmm):
    """Stateless stacks start as themselves (nothing copied); a stack with state inside is copied along the path
    to it only (the configuration objects stay as they are, shared leaves stay shared); an object without
    ``start`` is its own trajectory; a foreign object's start() is called without arguments."""
    den = gmm.denoiser(SCH)
    assert start_trajectory(den) is den
    stateless = [
        G.CFG(den, 3.0),
        G.DynamicThresholding(G.CFG(G.CountRows(den), 3.0)),
        NegativeAsNull(G.CFG(den)),
        G.ClassifierGuidance(G.CFG(den), exact_gmm_classifier(den), 1.0),
        G.Tap(den),
        G.GuidanceInterval(den, 3.0, 0.2, 0.8),
        G.inpaint(den, torch.tensor([1, 0]), torch.tensor([0.0, 0.7])),
    ]
    for stack in stateless:
        assert stack.start() is stack and start_trajectory(stack) is stack
    ag = G.AdaptiveGuidance(den, 3.0)
    cg = G.ClassifierGuidance(G.DynamicThresholding(ag), exact_gmm_classifier(den), 1.0)
    run = start_trajectory(cg)
    assert type(run) is G.ClassifierGuidance and run is not cg and run.log_prob is cg.log_prob
    assert type(run.denoiser) is G.DynamicThresholding and run.denoiser is not cg.denoiser
    assert isinstance(run.denoiser.denoiser, AGTrajectory) and run.denoiser.denoiser.config is ag
    assert run.denoiser.denoiser.denoiser is den and cg.denoiser.denoiser is ag
    interval = G.GuidanceInterval(Starts(den), 3.0, 0.2, 0.8)
    started = interval.start()
    assert started.denoiser.started and started._cfg.denoiser is started.denoiser  # rebuilt over the started one
    x, c = starts(gmm, 4, 3)
    assert sample(OnlyStart(den), get_solver("ddim"), GRID, x, c).denoiser is den


# ---- PAG's term over AG: one Tap, shared inside each trajectory ----------------------------------------------

CTX, LEN = 8, 3


@pytest.fixture(scope="module")
def unet():
    net = tiny_cross_attention_unet(in_channels=3, cross_attention_dim=CTX, seed=0, perturb=0.1)
    net = nn.ModuleDict({"unet": net.to(F64).eval()})

    def call(net, x, t_in, cond):
        return net["unet"](x, t_in, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    den = wrap(net, SCH, "eps", time_input=lambda t: 1000 * t, call=call)
    g = torch.Generator().manual_seed(1)
    n = 2
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=F64)
    cond = {
        "encoder_hidden_states": torch.randn(n, LEN, CTX, generator=g, dtype=F64),
        "null": {"encoder_hidden_states": torch.zeros(n, LEN, CTX, dtype=F64)},
    }
    return den, x, cond


@pytest.mark.parametrize("stateful_tap", [False, True], ids=["tap", "tap-over-stateful"])
def test_pag_term_over_ag_keeps_one_tap_per_trajectory(unet, stateful_tap):
    """PAGTerm(AG(tap), D, tap=tap): the started stack holds one tap, read by the AG trajectory and by the PAG
    term, so x0_c comes from AG's own call (3 rows per sample and evaluation at gamma_bar = 1, not 4) and the
    result is CFG + PAG (to 1e-10). With a tap over a stateful denoiser the tap is copied once per trajectory
    and the copy is what both hold; with a stateless one it is the tap itself. Reused, the stack gives what a
    fresh one gives."""
    den, x, cond = unet
    grid = make_grid(SCH, 3)
    counted = G.CountRows(den)

    def fresh():
        tap = G.Tap(Starts(counted) if stateful_tap else counted)
        return G.PAGTerm(
            G.AdaptiveGuidance(tap, 3.0, gamma_bar=1.0, space=X0()), counted, 2.0, "mid", net=den.net["unet"], tap=tap
        ), tap

    term, tap = fresh()
    run = term.start()
    assert isinstance(run.guided, AGTrajectory) and run.guided.denoiser is run.tap and run.denoiser is counted
    assert (run.tap is not tap and run.tap.denoiser.started) if stateful_tap else run.tap is tap
    assert term.guided.denoiser is tap and term.tap is tap  # the configuration is unchanged
    with torch.no_grad():
        out = sample(term, get_solver("ddim"), grid, x, cond)
        assert counted.rows == 3 * x.shape[0] * out.nfe and out.denoiser.guided.denoiser is out.denoiser.tap
        ref = sample(G.PAG(den, 2.0, "mid", cfg_scale=3.0), get_solver("ddim"), grid, x, cond).x
        assert torch.allclose(out.x, ref, rtol=1e-10, atol=1e-10)
        assert torch.equal(sample(term, get_solver("ddim"), grid, x, cond).x, out.x)
        assert torch.equal(sample(fresh()[0], get_solver("ddim"), grid, x, cond).x, out.x)
