"""PFGM++ noise (Xu et al. 2023) and EDM preconditioning / weighting (Karras et al. 2022) against exact answers
(spec sec. 12(d) and 16(d)), and their training and sampling integration.

Statistical tests use fixed seeds and state their tolerance: moment checks allow 5 standard errors of the
CLT (the exact variance is known), KS tests need p > 1e-3 (a correct sampler fails one with probability 1e-3).

Exact law used throughout: for the kernel at r = sigma sqrt(D) in R^N (unclipped), ||x||^2 / sigma^2 =
D chi2_N / chi2_D = N F(N, D), so E||x||^2 = sigma^2 N D / (D - 2) and
Var ||x||^2 = 2 sigma^4 N D^2 (N + D - 2) / ((D - 2)^2 (D - 4)); the Gaussian (D = inf) has ||x||^2 / sigma^2
~ chi2_N.
"""

import dataclasses
import math

import pytest
import torch
from scipy import stats

from condiff.core.denoiser import PREDICTIONS, EDMPrecond, as_prediction, coefficients, wrap
from condiff.core.sampling import initial_noise
from condiff.core.schedules import EDM, VPCosine
from condiff.errors import ConfigError
from condiff.solvers.pfgmpp import GaussianNoise, PFGMPPNoise, noise_for_D, noise_from_config
from condiff.training.objectives import EDMWeight, LogNormalSigma, diffusion_loss

F64 = torch.float64
N_DIM = 64  # data dimension N of the statistical tests: images of shape (1, 8, 8)
SHAPE = (20000, 1, 8, 8)
SIGMA = 2.0


def norms2(noise, sigma=SIGMA, seed=0, shape=SHAPE, prior=True):
    g = torch.Generator().manual_seed(seed)
    x = noise.prior(shape, sigma, g, F64) if prior else noise.perturbation(shape, sigma, g, F64)
    return x.flatten(1).square().sum(1)


# ---- PFGM++ kernel -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("D", [16, 128, 2048])
@pytest.mark.parametrize("prior", [True, False], ids=["prior", "training"])
def test_norm_moment_matches_sigma2_N_D_over_D_minus_2(D, prior):
    """E||x||^2 = sigma^2 N D / (D - 2) (spec 12(d)), within 5 CLT standard errors from the exact variance."""
    r2 = norms2(PFGMPPNoise(D), prior=prior)
    n, N = r2.numel(), N_DIM
    mean = SIGMA**2 * N * D / (D - 2)
    var = 2 * SIGMA**4 * N * D**2 * (N + D - 2) / ((D - 2) ** 2 * (D - 4))
    assert abs(float(r2.mean()) - mean) < 5 * math.sqrt(var / n)
    assert abs(float(r2.var()) / var - 1) < 0.1  # the variance too (its estimate is within ~3% here)


@pytest.mark.parametrize("D", [3, 16, 128])
def test_norm_follows_the_exact_F_law(D):
    """||x||^2 / (sigma^2 N) ~ F(N, D) exactly: one-sample KS, prior and (clip inactive) training noise."""
    for prior in (True, False):
        r2 = norms2(PFGMPPNoise(D), prior=prior, seed=D)
        assert stats.kstest((r2 / (SIGMA**2 * N_DIM)).numpy(), stats.f(N_DIM, D).cdf).pvalue > 1e-3


def test_norm_distribution_approaches_the_gaussian_one():
    """The KS distance between the norm law and the Gaussian's (sigma^2 chi2_N) shrinks as D grows, exactly
    and as measured; at D = 1e6 KS cannot tell them apart."""
    ks = []
    grid = torch.linspace(1, 400, 20000, dtype=F64).numpy()
    exact = []
    for D in (4, 16, 64, 256):
        r2 = norms2(PFGMPPNoise(D), seed=7) / SIGMA**2
        ks.append(stats.kstest(r2.numpy(), stats.chi2(N_DIM).cdf).statistic)
        exact.append(abs(stats.f(N_DIM, D).cdf(grid / N_DIM) - stats.chi2(N_DIM).cdf(grid)).max())
    assert all(a > b for a, b in zip(ks, ks[1:])) and all(a > b for a, b in zip(exact, exact[1:]))
    assert all(abs(k - e) < 0.02 for k, e in zip(ks, exact))  # measured distance ~ exact distance
    r2 = norms2(PFGMPPNoise(1e6), seed=8) / SIGMA**2
    assert stats.kstest(r2.numpy(), stats.chi2(N_DIM).cdf).pvalue > 1e-3


def test_small_D_has_heavier_tails():
    """The fraction with ||x|| > 3 sigma sqrt(N) is P(F(N, D) > 9) (within 5 binomial standard errors), strictly
    decreasing in D and above the Gaussian's (~1e-80 here, none observed)."""
    fractions = []
    for D in (2, 3, 5, 8):
        far = norms2(PFGMPPNoise(D), seed=11) > 9 * SIGMA**2 * N_DIM
        p = stats.f.sf(9, N_DIM, D)
        frac = float(far.double().mean())
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / far.numel())
        fractions.append(frac)
    gauss = float((norms2(GaussianNoise(), seed=11) > 9 * SIGMA**2 * N_DIM).double().mean())
    assert all(a > b for a, b in zip(fractions, fractions[1:])) and fractions[-1] > gauss == 0.0


def test_direction_uniform_and_independent_of_the_norm():
    """x / ||x|| has the law of a Gaussian's direction (two-sample KS on a coordinate), and its coordinates are
    uncorrelated with ||x|| (|r| < 5 / sqrt(n)), here for a heavy-tailed D = 4."""
    x = PFGMPPNoise(4).prior(SHAPE, SIGMA, torch.Generator().manual_seed(3), F64).flatten(1)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=F64).flatten(1)
    u, v = x / x.norm(dim=1, keepdim=True), z / z.norm(dim=1, keepdim=True)
    assert stats.ks_2samp(u[:, 5].numpy(), v[:, 5].numpy()).pvalue > 1e-3
    r = stats.pearsonr(u[:, 5].abs().numpy(), x.norm(dim=1).numpy()).statistic
    assert abs(r) < 5 / math.sqrt(x.shape[0])


def test_D_1e6_training_noise_is_indistinguishable_from_gaussian():
    """With D = 1e6 the training perturbation is statistically EDM's Gaussian noise (two-sample KS on norms and
    on one coordinate). N = 4096 keeps B ~ N / (N + D) ~ 0.004 inside the [1e-3, 1 - 1e-3] training clip."""
    shape, sigma = (2000, 4096), 0.7
    a = PFGMPPNoise(1e6).perturbation(shape, sigma, torch.Generator().manual_seed(1), F64)
    b = GaussianNoise().perturbation(shape, sigma, torch.Generator().manual_seed(2), F64)
    assert stats.ks_2samp(a.norm(dim=1).numpy(), b.norm(dim=1).numpy()).pvalue > 1e-3
    assert stats.ks_2samp(a[:, 0].numpy(), b[:, 0].numpy()).pvalue > 1e-3


def test_training_clip_of_B():
    """Where Beta(N/2, D/2) lies below 1e-3 (N = 64, D = 1e6: B ~ 3e-5) the training draw is clipped to
    B = 1e-3, so every norm is sigma sqrt(D * 1e-3 / (1 - 1e-3)); the prior is not clipped (it stays
    Gaussian-like: KS against sigma^2 chi2_N)."""
    D = 1e6
    r = norms2(PFGMPPNoise(D), prior=False, shape=(500, 64)).sqrt()
    assert torch.allclose(r, torch.full_like(r, SIGMA * math.sqrt(D * 1e-3 / (1 - 1e-3))), rtol=1e-9)
    r2 = norms2(PFGMPPNoise(D), prior=True, shape=(5000, 64)) / SIGMA**2
    assert stats.kstest(r2.numpy(), stats.chi2(64).cdf).pvalue > 1e-3


def test_per_sample_sigma_scales_each_sample():
    """perturbation(shape, sigma) with one sigma per sample is sigma_i times the sigma = 1 draw (same seed)."""
    sig = torch.tensor([0.1, 1.0, 10.0], dtype=F64)
    for noise in (GaussianNoise(), PFGMPPNoise(32)):
        a = noise.perturbation((3, 5), sig, torch.Generator().manual_seed(0), F64)
        b = noise.perturbation((3, 5), 1.0, torch.Generator().manual_seed(0), F64)
        assert torch.allclose(a, sig[:, None] * b, rtol=1e-14)


def test_gaussian_noise_is_the_old_draw_bit_for_bit():
    """GaussianNoise.unit is torch.randn and .prior is sampling.initial_noise, bit for bit (same seed)."""
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(GaussianNoise().unit((4, 1, 16, 16), g1), torch.randn((4, 1, 16, 16), generator=g2))
    sch = EDM()
    a = GaussianNoise().prior((4, 3), float(sch.sigma(torch.tensor(80.0))), torch.Generator().manual_seed(1))
    assert torch.equal(a, initial_noise(sch, 80.0, (4, 3), torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, True, "128", 1e13])
def test_bad_D_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="PFGM\\+\\+ D"):
        PFGMPPNoise(bad)


def test_recipe_D_option_and_config_roundtrip():
    """objective.pfgmpp_D: 0 is Gaussian, a positive number PFGM++, inf and negatives refused with the key
    named; noise configs round-trip through JSON form (absent means Gaussian)."""
    assert noise_for_D(0) == GaussianNoise() and noise_for_D(128) == PFGMPPNoise(128)
    for bad in (math.inf, -3, math.nan):
        with pytest.raises(ConfigError, match="objective.pfgmpp_D"):
            noise_for_D(bad)
    for noise in (GaussianNoise(), PFGMPPNoise(128), PFGMPPNoise(2.5)):
        assert noise_from_config(noise.to_config()) == noise
    assert noise_from_config(None) == GaussianNoise()
    with pytest.raises(ConfigError, match="noise"):
        noise_from_config({"type": "pfgmpp"})


# ---- EDM preconditioning and weighting (spec 16) -------------------------------------------------------------

SIGMAS = torch.logspace(-4, 4, 81, dtype=F64)


def test_edm_preconditioning_identities():
    """c_in^2 (sigma^2 + s_d^2) = 1 (unit-variance input for data of variance s_d^2), the F target has unit
    variance ((1 - c_skip)^2 s_d^2 + c_skip^2 sigma^2 = c_out^2), lambda c_out^2 = 1, and the limits
    c_skip -> 1, c_out -> 0 (sigma -> 0; D = x) and c_skip -> 0, c_out -> s_d (sigma -> inf)."""
    p = EDMPrecond()
    sd = p.sigma_data
    c_skip, c_out, c_in, c_noise = p.coefficients(SIGMAS)
    one = torch.ones_like(SIGMAS)
    assert torch.allclose(c_in**2 * (SIGMAS**2 + sd**2), one, rtol=1e-13)
    assert torch.allclose(((1 - c_skip) ** 2 * sd**2 + c_skip**2 * SIGMAS**2) / c_out**2, one, rtol=1e-12)
    assert torch.allclose(EDMWeight(sd)(-2 * torch.log(SIGMAS)) * c_out**2, one, rtol=1e-12)
    assert torch.allclose(c_noise, 250 * torch.log(SIGMAS), rtol=1e-15)
    assert abs(float(c_skip[0]) - 1) < 1e-7 and float(c_out[0]) < 1e-4 * 1.0001
    assert float(c_skip[-1]) < 1e-8 and abs(float(c_out[-1]) - sd) < 1e-8


def test_edm_unit_variance_statistically():
    """For y ~ N(0, s_d^2) and x = y + sigma n: Var(c_in x) = 1 and Var(F target) = 1 (5 CLT standard
    errors, Var of a sample variance of Gaussians being 2/n)."""
    p, sch = EDMPrecond(), EDM()
    g = torch.Generator().manual_seed(0)
    n = 40000
    for sigma in (0.01, 0.5, 5.0, 80.0):
        y = p.sigma_data * torch.randn(n, 1, generator=g, dtype=F64)
        eps = torch.randn(n, 1, generator=g, dtype=F64)
        t = torch.full((n,), sigma, dtype=F64)
        a, s = coefficients(sch, t, y)
        x_in, t_in = p.precondition(y + sigma * eps, t, a, s, sch)
        target = p.target(y, eps, a, s, t, sch)
        tol = 5 * math.sqrt(2 / n)
        assert abs(float(x_in.var()) - 1) < tol and abs(float(target.var()) - 1) < tol
        assert torch.allclose(t_in, torch.full_like(t_in, 250 * math.log(sigma)))


@pytest.mark.parametrize("schedule", [EDM(), VPCosine()], ids=["EDM", "VPCosine"])
def test_edm_target_converts_back_to_x0(schedule):
    """to_x0(target) = x0 (the network that outputs its target is the exact denoiser), on alpha = 1 and VP."""
    p = EDMPrecond()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(16, 3, generator=g, dtype=F64), torch.randn(16, 3, generator=g, dtype=F64)
    t = LogNormalSigma().sample(schedule, 16, g)
    a, s = coefficients(schedule, t, x0)
    back = p.to_x0(p.target(x0, eps, a, s, t, schedule), a * x0 + s * eps, a, s, t, schedule)
    assert torch.allclose(back, x0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("schedule", [EDM(), VPCosine()], ids=["EDM", "VPCosine"])
def test_wrapped_edm_denoiser_feeds_c_in_x_and_c_noise(schedule):
    """wrap(net, schedule, 'edm') calls the network on c_in x / alpha = x / sqrt(sigma^2 + alpha^2 s_d^2) and
    time 250 ln(sigma / alpha), and returns c_skip x / alpha + c_out F."""
    seen = {}

    def net(x, t_in):
        seen["x"], seen["t"] = x, t_in
        return torch.sin(x)

    den = wrap(net, schedule, "edm")
    t = 0.3 if isinstance(schedule, VPCosine) else 1.7
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    out = den(x, t)
    a, s = float(schedule.alpha(torch.tensor(t, dtype=F64))), float(schedule.sigma(torch.tensor(t, dtype=F64)))
    rho, sd = s / a, 0.5
    assert torch.allclose(seen["x"], x / math.sqrt(s * s + a * a * sd * sd), rtol=1e-13)
    assert torch.allclose(seen["t"], torch.full((5,), 250 * math.log(rho), dtype=F64), rtol=1e-13)
    want = sd**2 / (rho**2 + sd**2) * x / a + rho * sd / math.sqrt(rho**2 + sd**2) * torch.sin(seen["x"])
    assert torch.allclose(out, want, rtol=1e-13)


@pytest.mark.parametrize("pred", ["eps", "x0", "v", "flow"])
def test_existing_predictions_feed_the_network_unchanged(pred):
    """For eps, x0, v and flow the network still sees x_t and t themselves (bit for bit): diffusion_loss equals
    the formula written out, and the wrapped denoiser passes x and t through."""
    sch, p = VPCosine(), as_prediction(pred)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    t = LogNormalSigma().sample(sch, 8, g)
    net = lambda x, tt, c: torch.cos(x) * tt[:, None].to(x.dtype)  # noqa: E731
    a, s = coefficients(sch, t, x0)
    x_t = a * x0 + s * eps
    want = (net(x_t, t, None) - p.target(x0, eps, a, s, t, sch)).pow(2).flatten(1).mean(1)
    assert torch.equal(diffusion_loss(net, x0, None, t, eps, sch, p), want)
    seen = []
    den = wrap(lambda x, tt: seen.append((x, tt)) or x, sch, pred)
    den(x_t, t)
    assert seen[0][0] is x_t and torch.equal(seen[0][1], t.to(x_t.dtype))


@pytest.mark.parametrize("pred", ["edm", "eps", "x0", "v"])
def test_edm_weighting_is_lambda_times_x0_error(pred):
    """diffusion_loss with EDMWeight equals lambda(sigma) ||D(x) - x0||^2 / dim whatever the prediction (the
    weighting lives in x0 space and is converted by the prediction's x0 scale); for 'edm' it is the plain
    MSE on the F target (lambda c_out^2 = 1)."""
    sch, p, w = EDM(), PREDICTIONS[pred], EDMWeight()
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(8, 6, generator=g, dtype=F64), torch.randn(8, 6, generator=g, dtype=F64)
    t = LogNormalSigma().sample(sch, 8, g)
    net = lambda x, tt, c: torch.tanh(x) + 0.1  # noqa: E731
    loss = diffusion_loss(net, x0, None, t, eps, sch, p, w)
    a, s = coefficients(sch, t, x0)
    x_t = a * x0 + s * eps
    x_in, t_in = p.precondition(x_t, t, a, s, sch)
    d = p.to_x0(net(x_in, t_in, None), x_t, a, s, t, sch)
    sigma = t
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert torch.allclose(loss, lam * (d - x0).pow(2).mean(1), rtol=1e-10)
    if pred == "edm":
        plain = diffusion_loss(net, x0, None, t, eps, sch, p)
        assert torch.allclose(loss, plain, rtol=1e-12)


# ---- training and sampling integration -----------------------------------------------------------------------


def _objective(D):
    from condiff.training.recipe import ObjectiveConfig

    return ObjectiveConfig(
        prediction="edm", time_sampler="lognormal-sigma", weighting="edm", cond_dropout=0.3, pfgmpp_D=D
    )


def _recording_family():
    from condiff.models.digits import DigitsFamily

    class Recording(DigitsFamily):
        calls: list = []

        def forward(self, module, model_cfg, x, t_in, cond):
            self.calls.append((x.clone(), t_in.clone(), {k: v.clone() for k, v in cond.items()}))
            return 0.3 * x

    return Recording()


def test_pfgmpp_option_changes_only_the_noise():
    """ModelFamily.loss with pfgmpp_D = 64 against 0, same seed: same times, conditions (dropout) and network
    time input; each sample's noise is the Gaussian draw rescaled by a positive factor (the kernel's radius
    over ||z||, same direction), and the factors are not all 1. With D = 0 the loss is bit for bit the
    pre-PFGM++ computation (eps = torch.randn after the dropout and time draws)."""
    from condiff.training.conditioning import cfg_dropout

    fam, sch = _recording_family(), EDM()
    x0 = torch.rand(32, 1, 16, 16) * 2 - 1
    raw = torch.arange(32) % 10
    runs = {}
    for D in (0, 64):
        fam.calls.clear()
        loss = fam.loss(None, {}, sch, _objective(D), x0, raw, torch.Generator().manual_seed(5))
        runs[D] = (loss, fam.calls[0])
    (xg, tg, cg), (xp, tp, cp) = runs[0][1], runs[64][1]
    assert torch.equal(tg, tp) and torch.equal(cg["class_labels"], cp["class_labels"])
    sigma = torch.exp(tg.double() / 250).float()
    c_in = (1 / torch.sqrt(sigma**2 + 0.25))[:, None, None, None]
    ng, np_ = (xg / c_in - x0).flatten(1), (xp / c_in - x0).flatten(1)  # sigma * noise
    cos = (ng * np_).sum(1) / (ng.norm(dim=1) * np_.norm(dim=1))
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-4)
    ratio = np_.norm(dim=1) / ng.norm(dim=1)
    assert float((ratio - 1).abs().max()) > 0.05
    # D = 0: the computation as it was before the option existed
    g = torch.Generator().manual_seed(5)
    obj = _objective(0)
    cond = cfg_dropout({"class_labels": raw}, {"class_labels": fam.null_raw(1)}, obj.cond_dropout, g)
    t = LogNormalSigma().sample(sch, 32, g)
    eps = torch.randn(x0.shape, generator=g)
    fn = lambda x, tt, c: fam.forward(None, {}, x, tt.to(x.dtype), c)  # noqa: E731
    assert torch.equal(runs[0][0], diffusion_loss(fn, x0, cond, t, eps, sch, PREDICTIONS["edm"], EDMWeight()))


def test_recipes_differ_only_in_the_noise():
    """The packaged recipes digits_pfgmpp (D = 128) and digits_edm (D = inf) load and are identical but
    for name and objective.pfgmpp_D; bad pfgmpp_D values are refused naming the key."""
    from pathlib import Path

    import condiff
    from condiff.training.recipe import load_recipe, recipe_from_dict

    root = Path(condiff.__file__).parent / "recipes"
    a, b = load_recipe(root / "digits_pfgmpp.toml"), load_recipe(root / "digits_edm.toml")
    assert a.objective.pfgmpp_D == 128 and b.objective.pfgmpp_D == 0
    same = lambda r: dataclasses.replace(r, name="x", objective=dataclasses.replace(r.objective, pfgmpp_D=0))  # noqa: E731
    assert same(a) == same(b)
    assert (a.schedule["type"], a.objective.prediction, a.objective.weighting) == ("edm", "edm", "edm")
    for bad in (-1, math.inf, "128"):
        data = {"name": "r", "family": "digits", "objective": {"pfgmpp_D": bad}}
        with pytest.raises(ConfigError, match="pfgmpp_D"):
            recipe_from_dict(data)


def test_saved_pfgmpp_model_samples_from_its_prior(tmp_path, monkeypatch):
    """A PFGM++ model records its noise in condiff.json; load_model restores it; LoadedModel.prior is the
    kernel prior at sigma(t_start) (Gaussian models: exactly initial_noise); evaluate.generate starts from it."""
    import json

    import condiff.evaluation.evaluate as ev
    from condiff.core.grids import Karras, make_grid
    from condiff.core.sampling import SampleOutput
    from condiff.models.base import build_model, load_model
    from condiff.solvers import EDMHeun

    unet = {
        "sample_size": 16,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [8, 8],
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "num_class_embeds": 11,
    }
    m = build_model("digits", {"unet": unet}, {"type": "edm"}, "edm", PFGMPPNoise(64))
    m.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "condiff.json").read_text())["noise"] == {"type": "pfgmpp", "D": 64}
    loaded = load_model(tmp_path / "m")
    assert loaded.noise == PFGMPPNoise(64) and loaded.prediction.name == "edm"
    a = loaded.prior((3, 1, 16, 16), 20.0, torch.Generator().manual_seed(0))
    b = PFGMPPNoise(64).prior((3, 1, 16, 16), 20.0, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    gm = build_model("digits", {"unet": unet}, {"type": "edm"}, "eps")
    assert torch.equal(
        gm.prior((3, 2), 20.0, torch.Generator().manual_seed(0)),
        initial_noise(gm.schedule, 20.0, (3, 2), torch.Generator().manual_seed(0)),
    )
    seen = []
    monkeypatch.setattr(ev, "sample", lambda den, sol, grid, x, *r, **k: seen.append(x) or SampleOutput(x, 0))
    ev.generate(loaded, torch.arange(4), EDMHeun(), 5, 2.0, torch.Generator().manual_seed(6), Karras())
    t0 = float(make_grid(loaded.schedule, 5, Karras())[0])
    assert torch.equal(seen[0], loaded.prior((4, 1, 16, 16), t0, torch.Generator().manual_seed(6)))
