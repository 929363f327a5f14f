"""Empirical model statistics (condiff.solvers.ems) against exact answers: Gaussian data (exact l), the GMM oracle (s, b
against a direct least-squares fit with f' taken along the PF-ODE by finite differences), and the file format."""

import json
import math
import warnings

import pytest
import torch

from condiff.core.fitted import FitWarning
from condiff.core.schedules import EDM, Flow, VPCosine, VPDiscrete, VPLinear
from condiff.data.gmm import GMM
from condiff.errors import ConfigError, InputFileError
from condiff.solvers.ems import (
    EMS,
    CentralDifference,
    ForwardAD,
    check_ems_fits,
    compute_ems,
    eps_function,
    gmm_ems,
    load_ems,
    smooth_derivative,
)

F64 = torch.float64
SCHEDULES = [VPLinear(), VPCosine(), VPDiscrete.from_betas("squaredcos_cap_v2"), EDM(), Flow()]


def coefs(schedule, lam):
    """alpha and sigma at the float64 lambdas ``lam``, shaped (G, 1)."""
    a = torch.exp(schedule.log_alpha(schedule.t_from_log_snr(2 * lam)))[:, None]
    return a, a * torch.exp(-lam)[:, None]


def gaussian_ems(schedule, cov, n, n_grid=12, seed=0, jvp=ForwardAD()):
    g = GMM.gaussian(torch.zeros(cov.shape[0], dtype=F64), cov)
    gen = torch.Generator().manual_seed(seed)
    x0, _ = g.sample(n, gen)
    return compute_ems(
        g.denoiser(schedule),
        x0,
        None,
        schedule,
        schedule.default_t_start(),
        schedule.t_min,
        n_grid,
        gen,
        batch_size=1024,
        jvp=jvp,
    )


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
def test_l_is_exact_for_diagonal_gaussian_data(schedule):
    """Data N(0, diag(s_i^2)): l_i = sigma^2 / (alpha^2 s_i^2 + sigma^2) on every grid point, any schedule (the
    Jacobian is diagonal, so one Rademacher probe is exact); f = 0 exactly, so s = 0 (the zero-variance guard)."""
    sd = torch.tensor([0.3, 0.7, 1.0, 1.6], dtype=F64)
    ems = gaussian_ems(schedule, torch.diag(sd**2), n=64)
    a, s = coefs(schedule, ems.lam)
    exact = s**2 / (a**2 * sd**2 + s**2)
    assert torch.allclose(ems.l, exact, rtol=1e-8, atol=0)
    assert float(ems.s.abs().max()) == 0.0
    assert ems.info["jvp"] == "forward-ad" and ems.n_data == 64


def test_hutchinson_converges_for_a_full_covariance():
    """Data N(0, Sigma) with Sigma not diagonal: l_i = sigma^2 [C^-1]_ii, C = alpha^2 Sigma + sigma^2 I; the
    Rademacher probes average the off-diagonal terms away: within 2% with 4096 data points (float64). Here the
    standard error sqrt(sum_{j != i} J_ij^2) / (J_ii sqrt(4096)) is at most 0.45%, so 2% is a 4.5-sigma line."""
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=F64))
    cov = q @ torch.diag(torch.tensor([0.4, 0.6, 0.8, 1.0], dtype=F64)) @ q.T
    sch = VPLinear()
    ems = gaussian_ems(sch, cov, n=4096, n_grid=8)
    a, s = coefs(sch, ems.lam)
    c = a[:, :, None] ** 2 * cov + s[:, :, None] ** 2 * torch.eye(4, dtype=F64)
    exact = s**2 * torch.diagonal(torch.linalg.inv(c), dim1=1, dim2=2)
    rel = ((ems.l - exact) / exact).abs().max()
    assert float(rel) < 0.02, float(rel)
    assert float(rel) > 1e-6  # a real Monte-Carlo estimate (the diagonal case above is exact)


def test_central_differences_agree_with_forward_ad(gmm):
    """The derivative-free JVP gives the same statistics as forward-mode AD (float64, delta 1e-4: O(delta^2))."""
    sch = VPLinear()
    x0, y = gmm.sample(128, torch.Generator().manual_seed(0))

    def run(jvp):
        return compute_ems(
            gmm.denoiser(sch), x0, {"y": y}, sch, 0.5, 10 * sch.t_min, 10, torch.Generator().manual_seed(1), jvp=jvp
        )

    ad, cd = run(ForwardAD()), run(CentralDifference(1e-4))
    assert cd.info["jvp"] == "central-difference"
    for k in "lsb":
        ref = getattr(ad, k)
        assert torch.allclose(getattr(cd, k), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max())), k


def test_auto_jvp_uses_forward_ad_when_the_model_supports_it(gmm):
    sch = VPLinear()
    x0, y = gmm.sample(8, torch.Generator().manual_seed(0))
    ems = compute_ems(gmm.denoiser(sch), x0, {"y": y}, sch, 0.9, 0.1, 2, torch.Generator().manual_seed(1))
    assert ems.info["jvp"] == "forward-ad"


@pytest.mark.parametrize("schedule", [VPLinear(), EDM()], ids=lambda s: type(s).__name__)
def test_s_b_equal_a_direct_least_squares_fit_with_f_prime_along_the_ode(gmm, schedule):
    """Per dimension and grid point, (s, b) = argmin sum (f' - s f - b)^2 over the data, where here f' is
    computed independently: f = e^{-lambda} eps - l y and f' = d(e^{-lambda} eps)/dlambda - l' y - l dy/dlambda,
    the first term by a central difference along the PF-ODE (RK4 steps of +-1e-4 in lambda), dy/dlambda =
    -e^{-lambda} eps; l' is the estimator's smoothed central difference of l (spec)."""
    n = 256
    gen = torch.Generator().manual_seed(0)
    x0, y = gmm.sample(n, gen)
    z = torch.randn(x0.shape, generator=gen, dtype=F64)
    v = torch.randint(0, 2, x0.shape, generator=gen).to(F64) * 2 - 1
    cond = {"y": y}
    t0, t1 = schedule.t_for_sigma_ratio(5.0), schedule.t_for_sigma_ratio(0.1)
    ems = compute_ems(gmm.denoiser(schedule), x0, cond, schedule, t0, t1, 16, noise=z, probes=v)
    dl = smooth_derivative(ems.l, ems.lam)
    eps_at = eps_function(gmm.denoiser(schedule), schedule, cond)

    def a_of(x, lam):  # e^{-lambda} eps
        return math.exp(-lam) * eps_at(x, torch.full((n,), lam, dtype=F64))

    def rhs(x, lam):  # dx/dlambda = (dlog alpha/dlambda) x - sigma eps, dlog alpha/dlambda numerically
        la = lambda u: float(schedule.log_alpha(schedule.t_from_log_snr(torch.tensor(2 * u, dtype=F64))))  # noqa: E731
        rate = (la(lam + 1e-6) - la(lam - 1e-6)) / 2e-6
        return rate * x - math.exp(la(lam)) * a_of(x, lam)  # sigma eps = alpha e^{-lambda} eps

    def rk4(x, lam, h):
        k1 = rhs(x, lam)
        k2 = rhs(x + h / 2 * k1, lam + h / 2)
        k3 = rhs(x + h / 2 * k2, lam + h / 2)
        return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + rhs(x + h * k3, lam + h))

    a_all, s_all = coefs(schedule, ems.lam)
    for j in (2, 8, 13):
        lam, alpha, sigma = float(ems.lam[j]), float(a_all[j]), float(s_all[j])
        x = alpha * x0 + sigma * z
        d = 1e-4
        ap = (a_of(rk4(x, lam, d), lam + d) - a_of(rk4(x, lam, -d), lam - d)) / (2 * d)
        a0, yv = a_of(x, lam), x / alpha
        f = a0 - ems.l[j] * yv
        fp = ap - dl[j] * yv + ems.l[j] * a0
        for i in range(gmm.dim):
            design = torch.stack([f[:, i], torch.ones(n, dtype=F64)], 1)
            sol = torch.linalg.lstsq(design, fp[:, i : i + 1]).solution[:, 0]
            assert abs(float(sol[0] - ems.s[j, i])) <= 1e-5 * (1 + abs(float(sol[0]))), (j, i)
            assert abs(float(sol[1] - ems.b[j, i])) <= 1e-5 * (1 + abs(float(sol[1]))), (j, i)


def test_monte_carlo_error_is_smooth_in_lambda_with_common_random_numbers(gmm):
    """The same data, noises and probes at every grid point make the Monte-Carlo error of l a smooth function of
    lambda: between two seeds l differs by up to ~0.3 (32 points), but that difference's second differences on
    the grid are ~50 times smaller (fresh draws per grid point would make them as large as the difference)."""
    sch = VPLinear()
    a, b = (gmm_ems(gmm, sch, n_data=32, n_grid=200, seed=s).l for s in (0, 1))
    diff = a - b
    second = (diff[2:] - 2 * diff[1:-1] + diff[:-2]).abs().max()
    assert float(diff.abs().max()) > 1e-2
    assert float(second) < 0.05 * float(diff.abs().max())


def test_smooth_derivative_is_exact_for_quadratics_inside():
    """Central differences are exact for a quadratic; the moving average of a linear derivative is exact
    away from the ends."""
    lam = torch.linspace(-2, 3, 51, dtype=F64)
    vals = (0.5 * lam**2 - lam)[:, None]
    d = smooth_derivative(vals, lam, window=5)
    assert torch.allclose(d[6:-6, 0], lam[6:-6] - 1, atol=1e-12)


# ---- the object, evaluation and files --------------------------------------------------------------------------


def random_ems(shape=(2, 3), n_grid=7, seed=0, **meta):
    g = torch.Generator().manual_seed(seed)
    lam = torch.sort(torch.rand(n_grid + 1, generator=g, dtype=F64) * 6 - 3).values
    mk = lambda: torch.randn(n_grid + 1, *shape, generator=g, dtype=F64)  # noqa: E731
    return EMS(lam, mk().abs(), mk(), mk(), **meta)


def test_evaluation_is_the_piecewise_linear_interpolant_with_exact_antiderivatives():
    ems = random_ems()
    l, s, b, lant, sant = ems.evaluate(ems.lam)
    assert torch.allclose(l, ems.l.reshape(8, -1), atol=1e-15) and torch.allclose(b, ems.b.reshape(8, -1))
    fine = torch.linspace(float(ems.lam[0]) - 1, float(ems.lam[-1]) + 1, 200_001, dtype=F64)
    lf, sf, _, la, sa = ems.evaluate(fine)
    trap = torch.cumsum(0.5 * (fine[1:] - fine[:-1])[:, None] * (lf[1:] + lf[:-1]), 0)
    assert torch.allclose(la[1:] - la[0], trap, atol=1e-9)  # trapezoid is exact for piecewise linear
    below, above = fine < ems.lam[0], fine > ems.lam[-1]
    assert bool((lf[below] == 1).all()) and bool((sf[below] == 0).all())  # the high-noise limit below
    assert torch.equal(sf[above], s[-1:].expand(int(above.sum()), -1))  # constant above


def test_degenerate_statistics():
    ems = EMS.degenerate((1, 4, 4))
    assert ems.sample_shape == (1, 4, 4) and ems.zero_s and ems.zero_b
    assert bool((ems.l == 1).all()) and EMS.degenerate().sample_shape == ()


def test_save_load_round_trip(tmp_path):
    ems = random_ems(
        model="digits", cfg=3.0, n_data=17, seed=4, schedule={"type": "vp_linear"}, info={"jvp": "forward-ad"}
    )
    path = ems.save(tmp_path / "e.safetensors")
    back = load_ems(path)
    for k in ("lam", "l", "s", "b"):
        assert torch.equal(getattr(back, k), getattr(ems, k))
    assert back.metadata() == ems.metadata()
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]  # atomic: no temporaries left


def _write(path, tensors, meta):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=meta)
    return path


def _good_meta(**over):
    meta = {"format": "condiff-ems-1", "sample_shape": [3], "n_data": 4}
    meta.update(over)
    return {"condiff_ems": json.dumps(meta)}


@pytest.mark.parametrize(
    "case, needle",
    [
        ("garbage", "not a valid safetensors"),
        ("missing", "lacks the tensor"),
        ("no-meta", "no 'condiff_ems' metadata"),
        ("format", "unknown format"),
        ("shape", "shape"),
        ("nan", "non-finite"),
        ("descending", "ascending"),
        ("meta-shape", "disagrees"),
    ],
)
def test_load_refuses_bad_files_with_one_line(tmp_path, case, needle):
    p = tmp_path / "bad.safetensors"
    lam = torch.linspace(-1, 1, 3, dtype=F64)
    good = {
        "lam": lam,
        "l": torch.ones(3, 3, dtype=F64),
        "s": torch.zeros(3, 3, dtype=F64),
        "b": torch.zeros(3, 3, dtype=F64),
    }
    if case == "garbage":
        p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(range(40)))
    elif case == "missing":
        _write(p, {k: v for k, v in good.items() if k != "s"}, _good_meta())
    elif case == "no-meta":
        _write(p, good, {"other": "x"})
    elif case == "format":
        _write(p, good, _good_meta(format="v0"))
    elif case == "shape":
        _write(p, {**good, "b": torch.zeros(4, 3, dtype=F64)}, _good_meta())
    elif case == "nan":
        _write(p, {**good, "l": torch.full((3, 3), math.nan, dtype=F64)}, _good_meta())
    elif case == "descending":
        _write(p, {**good, "lam": lam.flip(0)}, _good_meta())
    elif case == "meta-shape":
        _write(p, good, _good_meta(sample_shape=[4]))
    with pytest.raises(InputFileError) as e:
        load_ems(p)
    msg = str(e.value)
    assert needle in msg and "bad.safetensors" in msg and "\n" not in msg, msg


def test_check_fits_refuses_other_shapes_and_schedules():
    ems = EMS.degenerate((1, 16, 16), model="digits", schedule=VPLinear().to_config())
    check_ems_fits(ems, (1, 16, 16), VPLinear())
    check_ems_fits(EMS.degenerate(), (3, 32, 32), EDM())  # shape () broadcasts, no schedule recorded
    with pytest.raises(ConfigError, match=r"\(1, 16, 16\).*\(3, 32, 32\)"):
        check_ems_fits(ems, (3, 32, 32), VPLinear())
    with pytest.raises(ConfigError, match="another noise schedule"):
        check_ems_fits(ems, (1, 16, 16), VPLinear(beta_max=10.0))
    with pytest.raises(ConfigError, match="another noise schedule"):
        check_ems_fits(ems, (1, 16, 16), EDM())


@pytest.mark.parametrize(
    "kw, needle",
    [({"n_grid": 0}, "n_grid"), ({"batch_size": 0}, "batch_size"), ({"t_start": 0.1, "t_end": 0.5}, "noisier")],
)
def test_estimator_refuses_bad_arguments(gmm, kw, needle):
    sch = VPLinear()
    x0, _ = gmm.sample(4)
    args = {"n_grid": 3, "batch_size": 4, "t_start": 0.9, "t_end": 0.1, **kw}
    with pytest.raises(ConfigError, match=needle):
        compute_ems(
            gmm.denoiser(sch),
            x0,
            None,
            sch,
            args["t_start"],
            args["t_end"],
            args["n_grid"],
            batch_size=args["batch_size"],
        )


def test_statistics_record_the_weights_and_cfg_they_were_computed_for(tmp_path):
    """The weights digest round-trips through the file; check_ems_fits refuses other weights or another cfg
    with one line naming the file, what it was computed for and what the run uses, warns instead with
    allow_mismatch, and warns that a file without the digest (written before it was recorded) cannot be
    checked. cfg None (the model's own output) is scale 1."""
    shape, a, b = (1, 4, 4), "a" * 64, "b" * 64
    path = EMS.degenerate(shape, model="digits", cfg=3.0, weights=a).save(tmp_path / "e.safetensors")
    ems = load_ems(path)
    assert ems.weights == a and ems.metadata()["model_weights"] == a
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fitting run: no warning
        assert check_ems_fits(ems, shape, weights=a, cfg=3.0, model="digits") is ems
        check_ems_fits(EMS.degenerate(shape), shape, cfg=1.0)
    with pytest.raises(ConfigError) as e:
        check_ems_fits(ems, shape, weights=b, model="other", where="--ems 'e.safetensors'")
    assert str(e.value) == (
        "--ems 'e.safetensors' was fitted for model 'digits' (weights aaaaaaaaaaaa), but this run uses model "
        "'other' (weights bbbbbbbbbbbb); refit it for this run, or give --allow-mismatch to use it anyway"
    )
    with pytest.raises(ConfigError, match=r"^the EMS file was fitted for cfg 3, but this run uses cfg 1; "):
        check_ems_fits(ems, shape, cfg=1.0)
    with pytest.warns(FitWarning, match=r"was fitted for cfg 3, but this run uses cfg 1; used anyway"):
        assert check_ems_fits(ems, shape, cfg=1.0, allow_mismatch=True) is ems
    with pytest.raises(ConfigError, match=r"\(1, 4, 4\)"):  # another sample shape stays an error
        check_ems_fits(ems, (1, 8, 8), cfg=1.0, allow_mismatch=True)
    old = EMS.degenerate(shape, model="digits", cfg=3.0).save(tmp_path / "old.safetensors")
    with pytest.warns(FitWarning, match="does not record the weights it was fitted with") as w:
        check_ems_fits(load_ems(old), shape, weights=b, cfg=3.0)
    assert len(w) == 1 and "\n" not in str(w[0].message)
