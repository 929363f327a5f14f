"""The Gaussian closed form and the analytic skip (Wang & Vastola 2023; TMLR 2024; specs sec. 14):
exactness against a float64 numerical ODE solve, the low-rank + isotropic fit, the skip's grids and NFE
accounting, its error on near-Gaussian mixtures, and the per-model fit cache."""

import math

import pytest
import torch
from torch import nn

from condiff.core.grids import Karras, UniformT, make_grid
from condiff.core.sampling import sample
from condiff.core.schedules import EDM, Flow, VPCosine, VPDiscrete, VPLinear
from condiff.data.gmm import GMM, reference_pf_ode
from condiff.errors import ConfigError, InputFileError
from condiff.solvers import DPMSolverPP2M, analytic
from condiff.solvers.analytic import AnalyticSkip, GaussianFit, fit_gaussian, load_fit, model_fit, save_fit

F64 = torch.float64


def _ids(s):
    return type(s).__name__


def random_moments(d, seed, rank=None, iso=0.05):
    """A random mean and covariance; with ``rank``, rank eigenvalues in [0.2, 4] plus ``iso`` elsewhere."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g, dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    if rank is None:
        lam = torch.exp(math.log(0.01) + math.log(400) * torch.rand(d, generator=g, dtype=F64))  # [0.01, 4]
    else:
        lam = torch.full((d,), iso, dtype=F64)
        lam[:rank] = 0.2 + 3.8 * torch.rand(rank, generator=g, dtype=F64)
    return mean, (q * lam) @ q.T


SCHEDULES = [VPLinear(), VPCosine(), VPDiscrete.from_betas("squaredcos_cap_v2"), EDM(), Flow()]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=_ids)
def test_closed_form_matches_numerical_ode(schedule):
    """Acceptance: the flow map (14a), full rank and rank-4 + isotropic, equals an RK4 float64 solve of the
    PF-ODE with the exact Gaussian denoiser to 1e-6 (max abs), for random mu, Sigma in R^16 and every
    schedule family (VP, VP-discrete, EDM, flow)."""
    t_from, t_to = schedule.default_t_start(), schedule.t_min
    x = float(schedule.sigma(t_from)) * torch.randn(8, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    for rank, seed in ((None, 2), (4, 3)):
        mean, cov = random_moments(16, seed, rank)
        fit = GaussianFit.from_moments(mean, cov, rank=rank)
        assert fit.rank == (16 if rank is None else 4)
        exact = fit.flow(schedule, x, t_from, t_to)
        ref = reference_pf_ode(GMM.gaussian(mean, cov).denoiser(schedule), x, t_from, t_to, steps=512)
        assert float((exact - ref).abs().max()) < 1e-6, rank
        # a flow: running it back recovers the start
        back = fit.flow(schedule, exact, t_to, t_from)
        assert float((back - x).abs().max()) < 1e-9 * float(x.abs().max())


@pytest.mark.parametrize("rank", [None, 4])
def test_gaussian_denoiser_is_the_exact_posterior_mean(rank):
    """GaussianFit.denoise equals the GMM oracle's exact E[x_0 | x_t] for one Gaussian (VP-linear)."""
    sch = VPLinear()
    mean, cov = random_moments(10, seed=13, rank=rank)
    fit = GaussianFit.from_moments(mean, cov, rank=rank)
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(14), dtype=F64)
    for t in (0.05, 0.3, 0.9):
        exact = GMM.gaussian(mean, cov).denoiser(sch)(x, t)
        assert torch.allclose(fit.denoise(sch, x, t), exact, atol=1e-12)


def _exact_samples(mean, cov, n, seed):
    """n samples whose sample mean and unbiased sample covariance are exactly mean and cov."""
    w = torch.randn(n, mean.numel(), generator=torch.Generator().manual_seed(seed), dtype=F64)
    w = w - w.mean(0)
    s = w.T @ w / (n - 1)
    lam_s, u_s = torch.linalg.eigh(s)
    lam_c, u_c = torch.linalg.eigh(cov)
    white = (u_s / lam_s.sqrt()) @ u_s.T
    root = (u_c * lam_c.clamp(min=0).sqrt()) @ u_c.T
    return mean + w @ white @ root


def test_low_rank_fit_recovers_known_covariance():
    """Data whose sample covariance is exactly U diag(l) U^T + iso (I - U U^T) (rank 3, iso 0.05): the rank-3
    fit recovers the mean, l, iso and the covariance to round-off; rank None recovers it in full; a rank-5
    fit of the same data puts the extra iso eigenvalues in its spectrum and keeps the covariance."""
    mean, cov = random_moments(12, seed=7, rank=3, iso=0.05)
    x = _exact_samples(mean, cov, 400, seed=8)
    fit = fit_gaussian(x.reshape(400, 3, 4), rank=3)  # any sample shape is flattened
    true = torch.linalg.eigvalsh(cov).flip(0)
    assert torch.allclose(fit.mean, mean, atol=1e-12)
    assert torch.allclose(fit.evals, true[:3], rtol=1e-10)
    assert abs(fit.iso - 0.05) < 1e-10
    assert torch.allclose(fit.cov(), cov, atol=1e-10)
    assert torch.allclose(fit_gaussian(x).cov(), cov, atol=1e-10)
    five = fit_gaussian(x, rank=5)
    assert torch.allclose(five.evals[3:], torch.full((2,), 0.05, dtype=F64), atol=1e-10)
    assert torch.allclose(five.cov(), cov, atol=1e-10)


def test_fit_with_fewer_samples_than_dimensions_matches_the_covariance_route():
    """n < d (the SVD route): the same eigenvalues, iso and covariance as the eigendecomposition of the sample
    covariance, for a rank within and beyond the data's span."""
    x = torch.randn(20, 40, generator=torch.Generator().manual_seed(9), dtype=F64) * torch.linspace(0.1, 2, 40)
    centred = x - x.mean(0)
    cov = centred.T @ centred / 19
    lam = torch.linalg.eigvalsh(cov).flip(0).clamp(min=0)
    for rank in (5, 25, None):
        fit = fit_gaussian(x, rank=rank)
        r = 40 if rank is None else rank
        assert torch.allclose(fit.evals, lam[:r], atol=1e-10)
        assert abs(fit.iso - (float(lam[r:].sum()) / (40 - r) if r < 40 else 0.0)) < 1e-10
        if rank != 5:
            assert torch.allclose(fit.cov(), cov, atol=1e-10)


def test_fit_refuses_bad_input():
    """Too few samples, non-finite values and a rank outside [1, d] are one-line ConfigErrors."""
    with pytest.raises(ConfigError, match="at least 2 samples"):
        fit_gaussian(torch.zeros(1, 4))
    with pytest.raises(ConfigError, match="NaN"):
        fit_gaussian(torch.tensor([[0.0, 1.0], [math.nan, 2.0]]))
    for rank in (0, 5, 2.5, True):
        with pytest.raises(ConfigError, match="rank"):
            fit_gaussian(torch.randn(10, 4), rank=rank)


SHAPES_SCHEDULE = VPDiscrete.from_betas("squaredcos_cap_v2")


def test_plan_fraction_and_sigma_semantics():
    """A whole-step fraction stops exactly at a grid point; same_nfe keeps the number of steps and the end,
    same_nfe=False runs the original grid's remaining points; a sigma plan stops where sigma/alpha = sigma;
    fractional positions interpolate in the step index."""
    sch = SHAPES_SCHEDULE
    grid = make_grid(sch, 8)
    p = AnalyticSkip(fraction=0.25).plan(sch, grid)
    assert p.t_skip == float(grid[2]) and p.steps == pytest.approx(2.0)
    assert p.grid.numel() == 9 and float(p.grid[0]) == p.t_skip and torch.equal(p.grid[-2:], grid[-2:])
    assert torch.allclose(p.grid[:-1], make_grid(sch, 8, t_start=p.t_skip)[:-1])
    saved = AnalyticSkip(fraction=0.25, same_nfe=False).plan(sch, grid)
    assert torch.equal(saved.grid, grid[2:])
    half = AnalyticSkip(fraction=0.3125).plan(sch, grid)  # 2.5 steps
    assert half.t_skip == pytest.approx(0.5 * float(grid[2] + grid[3]), rel=1e-12)
    assert half.steps == pytest.approx(2.5)
    s = AnalyticSkip(sigma=3.0).plan(sch, grid, Karras())
    assert float(sch.sigma_over_alpha(s.t_skip)) == pytest.approx(3.0, rel=1e-9)
    assert float(s.grid[0]) == s.t_skip and s.grid.numel() == 9
    assert torch.allclose(s.grid, make_grid(sch, 8, Karras(), t_start=s.t_skip))


@pytest.mark.parametrize(
    "skip, needle",
    [
        (AnalyticSkip(sigma=25.0), "25"),
        (AnalyticSkip(sigma=20.0), "20"),
        (AnalyticSkip(sigma=1e-4), "0.0001"),
        (AnalyticSkip(fraction=0.8), "80%"),
    ],
)
def test_plan_refuses_skips_off_the_grid(skip, needle):
    """A sigma at or above the start, at or below the last noisy point, or a fraction reaching the last noisy
    point is one ConfigError line naming the value and the accepted range."""
    with pytest.raises(ConfigError) as e:
        skip.plan(SHAPES_SCHEDULE, make_grid(SHAPES_SCHEDULE, 5))
    assert needle in str(e.value) and "accepted" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="at least 2 noisy points"):
        skip.plan(SHAPES_SCHEDULE, make_grid(SHAPES_SCHEDULE, 1))


@pytest.mark.parametrize(
    "text, want",
    [
        ("2.5", AnalyticSkip(sigma=2.5)),
        ("25%", AnalyticSkip(fraction=0.25)),
        (" 1e1 ", AnalyticSkip(sigma=10.0)),
        ("0.5%", AnalyticSkip(fraction=0.005)),
    ],
)
def test_parse_accepts_sigma_and_percent(text, want):
    """'2.5' is a sigma/alpha, '25%' a share of the budget; describe() gives the CLI form back."""
    got = AnalyticSkip.parse(text)
    assert got == want and AnalyticSkip.parse(got.describe()) == got


@pytest.mark.parametrize("text", ["-1", "0", "nan", "inf", "abc", "150%", "100%", "0%", "-5%", "%", ""])
def test_parse_refuses_other_values(text):
    """Anything else is a one-line ConfigError naming the value and both accepted forms."""
    with pytest.raises(ConfigError) as e:
        AnalyticSkip.parse(text, "--analytic-skip")
    assert repr(text) in str(e.value) and "25%" in str(e.value) and "sigma/alpha" in str(e.value)


def test_constructor_refuses_ambiguous_or_bad_amounts():
    """Exactly one of sigma / fraction, each in range."""
    for kwargs in (
        {},
        {"sigma": 1.0, "fraction": 0.2},
        {"sigma": -1.0},
        {"sigma": math.nan},
        {"fraction": 1.0},
        {"fraction": 0.0},
        {"sigma": 1.0, "same_nfe": 1},
    ):
        with pytest.raises(ConfigError):
            AnalyticSkip(**kwargs)


def _mixture_moments(gmm):
    w = gmm.weights
    mean = (w[:, None] * gmm.means).sum(0)
    diff = gmm.means - mean
    cov = (w[:, None, None] * (gmm.covs + diff[:, :, None] * diff[:, None, :])).sum(0)
    return mean, cov


def test_skip_nfe_accounting_and_exactness_on_gaussian_data():
    """On Gaussian data with the exact denoiser: skipping costs 0 NFE (same_nfe: all N steps remain;
    otherwise the whole skipped steps are saved), and the skip leg itself adds no error: teleport then
    DPM-Solver++(2M) equals the same solver on the same post-skip grid started from the exact ODE state."""
    sch = VPLinear()
    mean, cov = random_moments(6, seed=11)
    den = GMM.gaussian(mean, cov).denoiser(sch)
    fit = GaussianFit.from_moments(mean, cov)
    grid = make_grid(sch, 8)
    x = float(sch.sigma(grid[0])) * torch.randn(16, 6, generator=torch.Generator().manual_seed(12), dtype=F64)
    for skip, nfe in ((AnalyticSkip(fraction=0.3), 8), (AnalyticSkip(fraction=0.3, same_nfe=False), 6)):
        plan = skip.plan(sch, grid, UniformT())
        out = sample(den, DPMSolverPP2M(), plan.grid, plan.teleport(fit, sch, x))
        assert out.nfe == nfe == plan.grid.numel() - 1
        exact_start = reference_pf_ode(den, x, plan.t_from, plan.t_skip, steps=256)
        assert float((plan.teleport(fit, sch, x) - exact_start).abs().max()) < 1e-7
        assert torch.allclose(out.x, sample(den, DPMSolverPP2M(), plan.grid, exact_start).x, atol=1e-6)


def test_teleport_error_decreases_as_sigma_skip_increases():
    """Spec 14(d): on a mixture with small separation, teleporting with its exact Gaussian moments to
    sigma_skip and then integrating the exact mixture PF-ODE, the mean final error against the full
    reference ODE falls strictly as sigma_skip rises (and is tiny near the start)."""
    gmm = GMM.random(dim=3, components=3, num_classes=1, seed=4, spread=0.6, var_range=(0.3, 1.0))
    sch = EDM()
    den = gmm.denoiser(sch)
    fit = GaussianFit.from_moments(*_mixture_moments(gmm))
    t0, t_end = 80.0, 0.05
    x = t0 * torch.randn(64, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    ref = reference_pf_ode(den, x, t0, t_end, steps=512)
    errors = []
    for s in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0):
        mid = fit.flow(sch, x, t0, s)
        out = reference_pf_ode(den, mid, s, t_end, steps=256)
        errors.append(float((out - ref).norm(dim=1).mean()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-2 * errors[0], errors


# ---- the per-model fit and its cache ------------------------------------------------------------------


class _Family:
    """A stand-in model family: 2x2x3 'images' from a fixed Gaussian, served in training batches."""

    name = "toy"
    image_shape = (3, 2, 2)

    def __init__(self):
        self.calls = 0
        self.mean, self.cov = random_moments(12, seed=21, rank=3, iso=0.1)

    def training_batch(self, step, n, generator, seed, objective):
        self.calls += 1
        root = torch.linalg.cholesky(self.cov)
        z = torch.randn(n, 12, generator=generator, dtype=F64)
        return (self.mean + z @ root.T).float().reshape(n, 3, 2, 2), torch.zeros(n, dtype=torch.long)


class _Model:
    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.family, self.module = _Family(), nn.Linear(3, 3)

    def data_batch(self, step, n, generator, seed):
        return self.family.training_batch(step, n, generator, seed, None)[0]


def test_model_fit_fits_training_data_and_round_trips_through_the_cache(tmp_path, monkeypatch):
    """model_fit fits the family's training batches (a rank-3 + iso Gaussian: recovered to sampling
    accuracy), writes a safetensors cache entry under $CONDIFF_CACHE, and the next call reads it back
    bit-identically without touching the data; other weights get another entry."""
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path))
    m = _Model()
    fit = model_fit(m, n=20000, rank=3)
    files = list((tmp_path / "analytic").glob("toy-*.safetensors"))
    assert len(files) == 1 and m.family.calls > 0
    rel = float((fit.cov() - m.family.cov).norm() / m.family.cov.norm())
    assert rel < 0.05 and abs(fit.iso - 0.1) < 0.01
    calls = m.family.calls
    again = model_fit(m, n=20000, rank=3)
    assert m.family.calls == calls
    for a, b in ((fit.mean, again.mean), (fit.evecs, again.evecs), (fit.evals, again.evals)):
        assert torch.equal(a, b)
    assert fit.iso == again.iso and again.n == 20000
    with torch.no_grad():
        m.module.weight.add_(1.0)
    model_fit(m, n=20000, rank=3)
    assert len(list((tmp_path / "analytic").glob("toy-*.safetensors"))) == 2


def test_corrupted_cache_is_refused_and_refit(tmp_path):
    """A truncated cache file, or a valid safetensors file with non-orthonormal eigenvectors or the wrong
    key, is refused by load_fit with a message naming the file and the reason; model_fit warns and refits,
    leaving a valid entry."""
    m = _Model()
    fit = model_fit(m, n=500, rank=2, directory=tmp_path)
    path, key = analytic.fit_path(m, 500, 2, 0, tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputFileError, match="not a valid safetensors"):
        load_fit(path, key)
    with pytest.warns(UserWarning, match="refitting"):
        refit = model_fit(m, n=500, rank=2, directory=tmp_path)
    assert torch.equal(refit.evecs, fit.evecs) and load_fit(path, key, 12).rank == 2
    bad = GaussianFit(fit.mean, fit.evecs * 2, fit.evals, fit.iso)
    save_fit(path, bad, key)
    with pytest.raises(InputFileError, match="orthonormal") as e:
        load_fit(path, key)
    assert str(path) in str(e.value)
    save_fit(path, fit, "another key")
    with pytest.raises(InputFileError, match="key mismatch"):
        load_fit(path, key)
    with pytest.raises(InputFileError, match="dimension"):
        load_fit(path, None, dim=13)
    with pytest.warns(UserWarning, match="key mismatch"):
        model_fit(m, n=500, rank=2, directory=tmp_path)
    assert load_fit(path, key).rank == 2


def test_prepare_binds_the_fit_and_refuses_non_gaussian_noise(tmp_path):
    """prepare() on a Gaussian-noise model teleports with the given fit onto the plan's grid; a PFGM++
    (finite D) model is refused before anything is fitted (the closed form is for Gaussian noise)."""
    from condiff.solvers.pfgmpp import GaussianNoise, PFGMPPNoise

    m = _Model()
    m.schedule, m.noise = VPLinear(), GaussianNoise()
    mean, cov = m.family.mean, m.family.cov
    fit = GaussianFit.from_moments(mean, cov)
    grid = make_grid(m.schedule, 6)
    prepared = AnalyticSkip(sigma=2.0, fit=fit).prepare(m, grid)
    x = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(prepared.grid, AnalyticSkip(sigma=2.0).plan(m.schedule, grid).grid)
    assert torch.equal(prepared.teleport(x), fit.flow(m.schedule, x, float(grid[0]), prepared.plan.t_skip))
    m.noise = PFGMPPNoise(D=128.0)
    with pytest.raises(ConfigError, match="Gaussian-noise model"):
        AnalyticSkip(sigma=2.0).prepare(m, grid)
    assert m.family.calls == 0


def test_cache_dir_default(monkeypatch, tmp_path):
    """$CONDIFF_CACHE when set, else ~/.cache/condiff."""
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path))
    assert analytic.cache_dir() == tmp_path
    monkeypatch.delenv("CONDIFF_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert analytic.cache_dir() == tmp_path / "home" / ".cache" / "condiff"


def test_unwritable_cache_warns_and_still_fits(tmp_path):
    """The cache is optional: a cache location that cannot be written (a file where the directory should be)
    gives a warning naming it, and the fit is returned all the same."""
    m = _Model()
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="could not cache the Gaussian fit"):
        fit = model_fit(m, n=500, rank=2, directory=blocker / "sub")
    assert torch.equal(fit.evecs, model_fit(m, n=500, rank=2, directory=tmp_path).evecs)
