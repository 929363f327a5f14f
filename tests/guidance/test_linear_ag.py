"""LinearAG: exact recovery of the coefficients of an exactly affine toy, fit quality on GMM CFG trajectories
(held out), the network rows it saves, CFG as its limit, the explicit per-trajectory state (evaluation k uses
row k at the fitted time k; each sample() call or start() is a fresh trajectory), and the safetensors round
trip."""

import math
import warnings

import pytest
import torch

from condiff.core.files import save_tensors
from condiff.core.fitted import FitWarning
from condiff.core.grids import make_grid
from condiff.core.sampling import sample
from condiff.core.schedules import VPLinear
from condiff.data.gmm import GMM, NULL_CLASS
from condiff.errors import ConfigError, InputFileError
from condiff.guidance import CFG
from condiff.guidance.adaptive import CountRows
from condiff.guidance.linear_ag import (
    TERMS,
    LinearAG,
    Regressors,
    check_linear_ag_fits,
    fit_linear_ag,
    load_linear_ag,
    predict_record,
    record_cfg,
    save_linear_ag,
)
from condiff.solvers import get_solver

F64 = torch.float64


def b(t):
    """The toy's true coefficients (intercept, x, eps_c) at time t."""
    return 0.1 + 0.2 * t, 0.3 - 0.1 * t, 0.5 + 0.4 * t


class AffineToy:
    """eps_c = (1 + t) tanh(x) + 0.2 t (nonlinear in x); eps_u = b0(t) + b1(t) x + b2(t) eps_c exactly.
    Returns x0 = (x - sigma eps) / alpha; rows labelled NULL_CLASS are the unconditional branch."""

    schedule = VPLinear()

    def __call__(self, x, t, cond):
        t = float(t)
        a, s = (float(f(torch.tensor(t, dtype=F64))) for f in (self.schedule.alpha, self.schedule.sigma))
        eps_c = (1 + t) * torch.tanh(x) + 0.2 * t
        b0, b1, b2 = b(t)
        eps_u = b0 + b1 * x + b2 * eps_c
        null = (cond["y"] == NULL_CLASS).reshape((-1,) + (1,) * (x.dim() - 1))
        return (x - s * torch.where(null, eps_u, eps_c)) / a


def toy_start(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, generator=g, dtype=F64)
    return x, {"y": torch.zeros(n, dtype=torch.long), "null": GMM.null_cond(n)}


def test_exactly_affine_toy_recovers_the_coefficients():
    """Without the collinear eps_u(k-1) term, OLS on the recorded CFG trajectories returns the toy's own
    b(t_k) at every evaluation (and 0 for eps_c(k-1)), with R^2 = 1."""
    grid = make_grid(AffineToy.schedule, 6)
    x, cond = toy_start()
    co = fit_linear_ag(AffineToy(), get_solver("ddim"), grid, x, cond, 3.0, Regressors(prev_uncond=False))
    assert torch.equal(co.times, grid[:-1])
    for k, t in enumerate(co.times.tolist()):
        assert torch.allclose(co.coef[k], torch.tensor([*b(t), 0.0, 0.0], dtype=F64), rtol=0, atol=1e-9)
    assert torch.allclose(co.r2, torch.ones_like(co.r2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m"])
def test_exact_toy_linear_ag_reproduces_cfg(solver):
    """With exact coefficients (full regressor set: minimum-norm where collinear) every predicted unconditional
    branch is exact, so LinearAG replacing all evaluations but the first follows the CFG trajectory, with n rows
    instead of 2n at each replaced evaluation."""
    grid = make_grid(AffineToy.schedule, 6)
    x, cond = toy_start()
    co = fit_linear_ag(AffineToy(), get_solver(solver), grid, x, cond, 3.0)
    ref = sample(CFG(AffineToy(), 3.0), get_solver(solver), grid, x, cond).x
    counted = CountRows(AffineToy())
    out = sample(LinearAG(counted, co, steps=6), get_solver(solver), grid, x, cond).x
    assert torch.allclose(out, ref, rtol=0, atol=1e-9)
    assert counted.rows == 6 * x.shape[0]


def gmm_start(gmm, sch, grid, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = float(sch.sigma(grid[0])) * torch.randn(n, gmm.dim, generator=g, dtype=F64)
    return x, {"y": torch.randint(0, gmm.num_classes, (n,), generator=g), "null": GMM.null_cond(n)}


def direction_r2(pred, record):
    """1 - |eps_u_hat - eps_u|^2 / |d - mean d|^2 per evaluation, d = eps_c - eps_u: how much of the guidance
    direction (what CFG adds) the prediction gets right; R^2 of eps_u itself is dominated by eps_u ~ eps_c."""
    k = pred.shape[0]
    d = record.eps_c[:k] - record.eps_u[:k]
    err = ((pred - record.eps_u[:k]) ** 2).flatten(1).sum(1)
    return 1 - err / ((d - d.flatten(1).mean(1)[:, None, None]) ** 2).flatten(1).sum(1)


def test_gmm_fit_generalises_to_held_out_trajectories(gmm):
    """Specs 5d: OLS on 200 CFG trajectories of the GMM oracle (dpmpp-2m, 10 steps, w = 3); on 200 held-out
    trajectories (teacher forced) R^2 of eps_u > 0.99 at every evaluation of the first half, and the guidance
    direction is predicted with R^2 >= 0.95 at evaluations 1-4 (measured 0.962-1.000). Without the previous
    step's terms it is much worse there (measured 0.55-0.96), so the history carries the information."""
    sch = VPLinear()
    grid = make_grid(sch, 10)
    solver = get_solver("dpmpp-2m")
    x, cond = gmm_start(gmm, sch, grid, 200, 0)
    xh, ch = gmm_start(gmm, sch, grid, 200, 1)
    _, held = record_cfg(gmm.denoiser(sch), solver, grid, xh, ch, 3.0)
    co = fit_linear_ag(gmm.denoiser(sch), solver, grid, x, cond, 3.0)
    pred, r2 = predict_record(co, held, steps=5)
    assert bool((r2 > 0.99).all())
    full = direction_r2(pred, held)
    assert bool((full[1:5] >= 0.95).all())
    no_history = fit_linear_ag(
        gmm.denoiser(sch), solver, grid, x, cond, 3.0, Regressors(prev_cond=False, prev_uncond=False)
    )
    bare = direction_r2(predict_record(no_history, held, steps=5)[0], held)
    assert bool((bare[2:5] < full[2:5] - 0.02).all())


def test_gmm_linear_ag_stays_close_to_cfg_and_saves_rows(gmm):
    """Replacing the first half of the unconditional evaluations saves n rows per replaced evaluation; the final
    samples stay much closer to CFG's than the conditional model's are (mean distance under 1/4 of it; measured
    0.23), and the exact noisy classifier labels them as it labels CFG's (>= 99%; measured 100%, the
    conditional model's samples 93%)."""
    sch = VPLinear()
    grid = make_grid(sch, 10)
    solver = get_solver("dpmpp-2m")
    den = gmm.denoiser(sch)
    co = fit_linear_ag(den, solver, grid, *gmm_start(gmm, sch, grid, 200, 0), 3.0)
    x, cond = gmm_start(gmm, sch, grid, 200, 1)
    ref = sample(CFG(den, 3.0), solver, grid, x, cond).x
    plain = sample(CFG(den, 1.0), solver, grid, x, cond).x
    counted = CountRows(den)
    out = sample(LinearAG(counted, co), solver, grid, x, cond).x
    assert counted.rows == 200 * (2 * 10 - 5)
    dist = (out - ref).norm(dim=1).mean()
    assert dist < 0.25 * (plain - ref).norm(dim=1).mean()

    def label(z):
        return den.class_posterior(z, float(grid[-2])).argmax(1)

    agree = (label(out) == label(ref)).float().mean()
    assert agree >= 0.99 and agree > (label(plain) == label(ref)).float().mean()


def test_zero_steps_is_cfg_and_other_times_are_refused(gmm):
    """steps = 0 runs the exact CFG evaluation: the trajectory is CFG's bit for bit with 2n rows per evaluation
    (on any grid). A predicted evaluation k must be at the fitted time k: a grid whose times were not fitted,
    or a per-sample t that differs from it, is a one-line ConfigError (no silent fallback); a per-sample t
    equal to it is the scalar evaluation."""
    sch = VPLinear()
    grid = make_grid(sch, 8)
    solver = get_solver("unipc")
    den = gmm.denoiser(sch)
    x, cond = gmm_start(gmm, sch, grid, 16, 0)
    co = fit_linear_ag(den, solver, grid, x, cond, 2.0)
    ref = sample(CFG(den, 2.0), solver, grid, x, cond).x
    assert torch.equal(sample(LinearAG(den, co, steps=0), solver, grid, x, cond).x, ref)
    other = make_grid(sch, 7, t_start=0.75)  # its last time is a fitted one, but not its first
    counted = CountRows(den)
    assert (
        torch.equal(
            sample(LinearAG(counted, co, steps=0), solver, other, x, cond).x,
            sample(CFG(den, 2.0), solver, other, x, cond).x,
        )
        and counted.rows == 2 * 16 * 7
    )
    with pytest.raises(ConfigError, match="evaluation 0 .* fitted at t=") as info:
        sample(LinearAG(den, co, steps=8), solver, other, x, cond)
    assert "\n" not in str(info.value)
    t0 = float(grid[0])
    t = torch.full((16,), t0, dtype=F64)
    assert torch.equal(LinearAG(den, co, steps=8).start()(x, t, cond), LinearAG(den, co, steps=8).start()(x, t0, cond))
    t[3] = float(grid[1])
    with pytest.raises(ConfigError, match="fitted at t="):
        LinearAG(den, co, steps=8).start()(x, t, cond)


def test_no_history_leaks_between_trajectories(gmm):
    """A reused LinearAG object gives each trajectory exactly what a fresh object gives: a second run, and the
    first again after a mid-grid start, which is refused (its evaluation 0 is not at the fitted time 0: the
    coefficients of the replaced steps belong to trajectories from the top of the grid)."""
    sch = VPLinear()
    grid = make_grid(sch, 10)
    solver = get_solver("dpmpp-2m")
    den = gmm.denoiser(sch)
    co = fit_linear_ag(den, solver, grid, *gmm_start(gmm, sch, grid, 64, 0), 3.0)
    x1, c1 = gmm_start(gmm, sch, grid, 32, 1)
    x2, c2 = gmm_start(gmm, sch, grid, 32, 2)
    counted = CountRows(den)
    reused = LinearAG(counted, co, steps=6)
    first = sample(reused, solver, grid, x1, c1).x
    assert torch.equal(sample(reused, solver, grid, x2, c2).x, sample(LinearAG(den, co, 6), solver, grid, x2, c2).x)
    assert counted.rows == 2 * 32 * (2 * 10 - 6)  # per run: 6 evaluations replaced (n rows), 4 exact (2n)
    with pytest.raises(ConfigError, match="evaluation 0 .* fitted at t="):
        sample(reused, solver, grid[3:], 0.5 * x2, c2)
    assert torch.equal(sample(reused, solver, grid, x1, c1).x, first)
    assert not hasattr(reused, "history") and not hasattr(reused, "k")


def test_started_trajectory_counts_its_evaluations(gmm):
    """A started trajectory holds k (the next evaluation) and the previous (eps_c, eps_u); evaluation k uses
    coefficient row k and must be at the fitted time k: repeating a time is refused (one line), and start()
    begins again at k = 0."""
    sch = VPLinear()
    grid = make_grid(sch, 6)
    den = gmm.denoiser(sch)
    x, cond = gmm_start(gmm, sch, grid, 8, 0)
    co = fit_linear_ag(den, get_solver("ddim"), grid, x, cond, 2.0)
    lag = LinearAG(den, co, steps=3)
    one = lag.start()
    assert one.k == 0 and one.prev is None and one.config is lag and one.schedule is den.schedule
    one(x, float(grid[0]), cond)
    one(x, float(grid[1]), cond)
    assert one.k == 2 and one.prev[0].shape == x.shape
    with pytest.raises(ConfigError, match="evaluation 2 .* fitted at t=") as info:
        one(x, float(grid[1]), cond)
    assert "\n" not in str(info.value)
    two = one.start()
    assert two.k == 0 and two.prev is None and one.k == 2
    for k in range(5):  # evaluations past ``steps`` run exact CFG at any time
        two(x, float(grid[k]), cond)
    assert two.k == 5 and torch.equal(two(x, 0.123, cond), CFG(den, 2.0)(x, 0.123, cond))


def test_save_load_round_trip(gmm, tmp_path):
    sch = VPLinear()
    grid = make_grid(sch, 5)
    co = fit_linear_ag(
        gmm.denoiser(sch), get_solver("ddim"), grid, *gmm_start(gmm, sch, grid, 32, 0), 2.5, Regressors(intercept=False)
    )
    path = save_linear_ag(co, tmp_path / "coeffs.safetensors")
    back = load_linear_ag(path)
    assert torch.equal(back.times, co.times) and torch.equal(back.coef, co.coef) and torch.equal(back.r2, co.r2)
    assert back.regressors == co.regressors and back.scale == 2.5


def test_load_errors(tmp_path):
    (tmp_path / "x.safetensors").write_text("{}")
    with pytest.raises(InputFileError, match="not a valid safetensors"):
        load_linear_ag(tmp_path / "x.safetensors")
    with pytest.raises(InputFileError, match="not found"):
        load_linear_ag(tmp_path / "missing.safetensors")
    save_tensors(tmp_path / "other.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(InputFileError, match="missing"):
        load_linear_ag(tmp_path / "other.safetensors")
    good = {
        "times": torch.tensor([0.9, 0.5], dtype=F64),
        "coef": torch.zeros(2, len(TERMS), dtype=F64),
        "r2": torch.ones(2, dtype=F64),
        "regressors": torch.ones(len(TERMS), dtype=torch.uint8),
        "scale": torch.tensor([3.0], dtype=F64),
        "format": torch.tensor([1]),
    }
    for key, bad in [
        ("coef", torch.zeros(2, 3, dtype=F64)),
        ("times", torch.tensor([0.5, 0.9], dtype=F64)),
        ("coef", torch.full((2, len(TERMS)), math.nan, dtype=F64)),
    ]:
        save_tensors(tmp_path / "bad.safetensors", {**good, key: bad})
        with pytest.raises(InputFileError, match="malformed"):
            load_linear_ag(tmp_path / "bad.safetensors")


def test_errors(gmm):
    sch = VPLinear()
    grid = make_grid(sch, 4)
    den = gmm.denoiser(sch)
    x, cond = gmm_start(gmm, sch, grid, 8, 0)
    co = fit_linear_ag(den, get_solver("ddim"), grid, x, cond, 2.0)
    for bad in (-1, 5, 2.5, True):
        with pytest.raises(ConfigError, match="steps"):
            LinearAG(den, co, steps=bad)
    with pytest.raises(ConfigError, match="constant guidance scale"):
        fit_linear_ag(den, get_solver("ddim"), grid, x, cond, lambda t: 2.0)
    with pytest.raises(ConfigError, match="at least one term"):
        Regressors(False, False, False, False, False)
    with pytest.raises(ConfigError, match="null"):
        LinearAG(den, co).start()(x, float(grid[0]), {"y": cond["y"]})
    with pytest.raises(ConfigError, match=r"sample\(\).*\.start\(\)") as info:  # a configuration, not a trajectory
        LinearAG(den, co)(x, float(grid[0]), cond)
    assert "\n" not in str(info.value)


def test_coefficients_record_and_check_what_they_were_fitted_for(gmm, tmp_path):
    """fit_linear_ag records the grid, the solver and the model's name and weights digest it is given; they
    round-trip through the file. check_linear_ag_fits refuses other weights, another cfg or another grid with
    one line naming the file; with allow_mismatch it warns, and build_guidance's LinearAG then runs at the
    run's cfg (steps 0: exactly CFG at that cfg) and on the run's grid (no per-evaluation time check)."""
    from condiff.guidance.build import GuidanceOptions, build_guidance

    sch = VPLinear()
    grid = make_grid(sch, 4)
    den = gmm.denoiser(sch)
    x, cond = gmm_start(gmm, sch, grid, 8, 0)
    co = fit_linear_ag(den, get_solver("ddim"), grid, x, cond, 2.0, model="gmm", weights="a" * 64, spacing="uniform-t")
    assert co.grid == tuple(grid.tolist()) and co.solver == "ddim" and (co.model, co.weights) == ("gmm", "a" * 64)
    path = save_linear_ag(co, tmp_path / "c.safetensors")
    back = load_linear_ag(path)
    assert (back.model, back.weights, back.grid, back.spacing, back.solver) == (
        "gmm",
        "a" * 64,
        co.grid,
        "uniform-t",
        "ddim",
    )
    assert back.source == str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_linear_ag_fits(back, 2.0, grid, weights="a" * 64)
    where = f"the LinearAG coefficients {str(path)!r}"
    with pytest.raises(ConfigError) as e:
        check_linear_ag_fits(back, 2.0, grid, weights="b" * 64, model="other")
    assert str(e.value) == (
        f"{where} was fitted for model 'gmm' (weights aaaaaaaaaaaa), but this run uses model 'other' "
        f"(weights bbbbbbbbbbbb); refit it for this run, or give --allow-mismatch to use it anyway"
    )
    with pytest.raises(ConfigError, match=r"was fitted for cfg 2, but this run uses cfg 3; refit"):
        check_linear_ag_fits(back, 3.0, grid)
    other = make_grid(sch, 6)
    t0 = f"{float(grid[0]):g}"
    with pytest.raises(ConfigError) as e:
        check_linear_ag_fits(back, 2.0, other)
    assert f"fitted for a grid of 4 'uniform-t' steps from t={t0} to t=0, but this run uses a grid of 6 " in str(
        e.value
    )
    with pytest.warns(FitWarning, match="cfg 2 and a grid of 4 'uniform-t' steps .* used anyway") as w:
        check_linear_ag_fits(back, 3.0, other, allow_mismatch=True)
    assert len(w) == 1
    opts = GuidanceOptions(cfg=3.0, linear_ag=back, linear_ag_steps=0, allow_mismatch=True)
    with pytest.warns(FitWarning):
        guided = build_guidance(den, opts, other)
    assert torch.equal(
        sample(guided, get_solver("ddim"), other, x, cond).x,
        sample(CFG(den, 3.0), get_solver("ddim"), other, x, cond).x,
    )
    with pytest.warns(FitWarning):
        predicted = build_guidance(den, GuidanceOptions(cfg=2.0, linear_ag=back, allow_mismatch=True), other)
    assert bool(torch.isfinite(sample(predicted, get_solver("ddim"), other, x, cond).x).all())
    with pytest.raises(ConfigError, match="fitted for a grid of 4 'uniform-t' steps"):
        build_guidance(den, GuidanceOptions(cfg=2.0, linear_ag=back), other)


def test_coefficients_without_their_record_load_and_are_checked_by_their_times(gmm, tmp_path):
    """A file written before the coefficients recorded what they were fitted for (tensors only): it loads,
    its evaluation times and scale are still checked, and a run that gives the model's weights is warned that
    they cannot be checked."""
    sch = VPLinear()
    grid = make_grid(sch, 4)
    co = fit_linear_ag(gmm.denoiser(sch), get_solver("ddim"), grid, *gmm_start(gmm, sch, grid, 8, 0), 2.0)
    tensors = {
        "times": co.times,
        "coef": co.coef,
        "r2": co.r2,
        "regressors": co.regressors.mask().to(torch.uint8),
        "scale": torch.tensor([2.0], dtype=F64),
        "format": torch.tensor([1]),
    }
    old = load_linear_ag(save_tensors(tmp_path / "old.safetensors", tensors))
    assert (old.model, old.weights, old.grid, old.spacing, old.solver) == (None,) * 5
    with pytest.warns(FitWarning, match="does not record the weights it was fitted with") as w:
        check_linear_ag_fits(old, 2.0, grid, weights="b" * 64)
    assert len(w) == 1
    t0 = f"{float(grid[0]):g}"
    with pytest.raises(ConfigError) as e:
        check_linear_ag_fits(old, 2.0, make_grid(sch, 6))
    assert (
        f"fitted for 4 evaluations from t={t0} (one per step of its grid, in order), but this run uses a grid"
        in str(e.value)
    )
    with pytest.raises(ConfigError, match="fitted for cfg 2, but this run uses cfg 3"):
        check_linear_ag_fits(old, 3.0, grid)
