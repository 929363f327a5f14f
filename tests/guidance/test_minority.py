"""Minority guidance (Um, Lee, Ye, ICLR 2024) on the spec's imbalanced-GMM oracle (specs/sampling_guidance.md
sec. 7d): two well-separated Gaussians with weights 0.95 / 0.05 and the exact GMM denoiser E[x0 | x_t]."""

import pytest
import torch
from torch import nn

from condiff.core.grids import make_grid
from condiff.core.sampling import initial_noise, sample
from condiff.core.schedules import VPLinear
from condiff.data.gmm import GMM
from condiff.errors import ConfigError, InputFileError
from condiff.guidance.classifier import ClassifierGuidance
from condiff.guidance.minority import (
    MinorityClassifier,
    MinorityGuidance,
    assign_levels,
    minority_score,
    quantile_levels,
)
from condiff.models.minority import load_minority, save_minority
from condiff.nets.classifier import AttributeClassifier, time_features
from condiff.solvers import DPMSolverPP2M
from condiff.training.minority import level_accuracy, train_level_classifier

F64 = torch.float64
LEVELS = 5


@pytest.fixture(scope="module")
def imbalanced():
    """N(0, 0.25 I) with weight 0.95 (class 0) and N((3, 0), 0.25 I) with weight 0.05 (class 1: the minority)."""
    return GMM(
        torch.tensor([[0.0, 0.0], [3.0, 0.0]], dtype=F64),
        torch.full((2, 2), 0.25, dtype=F64),
        torch.tensor([0.95, 0.05], dtype=F64),
        torch.tensor([0, 1]),
    )


class LevelMLP(nn.Module):
    """A small noise-aware level classifier for R^2: logits(x, t) from x and sinusoidal features of t."""

    def __init__(self, levels):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(18, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, levels))

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        return self.f(torch.cat([x.float(), time_features(t, 16)], 1)).to(x.dtype)


@pytest.fixture(scope="module")
def fitted(imbalanced):
    """Scores at sigma/alpha = 1 (n = 16 draws) on 4000 samples, 5 quantile levels, a level classifier."""
    torch.set_num_threads(1)
    sch = VPLinear()
    den = imbalanced.denoiser(sch)
    g = torch.Generator().manual_seed(0)
    x0, y = imbalanced.sample(4000, g)
    t = sch.t_for_sigma_ratio(1.0)
    scores = minority_score(den, x0, t, 16, g)
    thresholds, labels = quantile_levels(scores, LEVELS)
    torch.manual_seed(0)
    net = LevelMLP(LEVELS)
    losses = train_level_classifier(net, sch, x0, labels, steps=1500, batch_size=256, lr=3e-3, generator=g)
    return dict(
        den=den,
        x0=x0,
        y=y,
        t=t,
        scores=scores,
        thresholds=thresholds,
        labels=labels,
        net=net,
        losses=losses,
        mc=MinorityClassifier(net, thresholds, t, 16, t_range=(sch.t_min, sch.t_max)),
    )


def test_score_is_larger_for_the_rare_component(fitted):
    """The Tweedie reconstruction loss of rare-component samples is several times that of common ones, and the
    top quantile level (top 20%) holds essentially every rare sample."""
    s, y, labels = fitted["scores"], fitted["y"], fitted["labels"]
    assert s[y == 1].mean() > 3 * s[y == 0].mean()
    assert (labels[y == 1] == LEVELS - 1).float().mean() > 0.9
    assert (y[labels == 0] == 0).all()


def test_score_matches_its_definition(imbalanced):
    """One draw equals ||x0 - D(alpha x0 + sigma eps)||^2 with the same eps; the mean over n draws is the average
    of n single draws from the same generator stream."""
    sch = VPLinear()
    den = imbalanced.denoiser(sch)
    x0, _ = imbalanced.sample(32, torch.Generator().manual_seed(1))
    t = 0.3
    a, s = sch.alpha(torch.tensor(t, dtype=F64)), sch.sigma(torch.tensor(t, dtype=F64))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    one = minority_score(den, x0, t, 1, torch.Generator().manual_seed(2))
    assert torch.allclose(one, ((x0 - den(a * x0 + s * eps, t)) ** 2).sum(1), rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(3)
    singles = torch.stack([minority_score(den, x0, t, 1, g) for _ in range(4)])
    assert torch.allclose(
        minority_score(den, x0, t, 4, torch.Generator().manual_seed(3)), singles.mean(0), rtol=1e-12, atol=1e-12
    )


def test_quantile_levels_are_the_rank_bins():
    """For distinct scores the level of the k-th smallest of N is floor(k L / N); thresholds are increasing and
    re-labelling the same scores with them gives the same labels."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1000, generator=g, dtype=F64)
    for L in (2, 4, 10):
        thresholds, labels = quantile_levels(scores, L)
        rank = torch.argsort(torch.argsort(scores))
        assert torch.equal(labels, rank * L // scores.numel())
        assert thresholds.shape == (L - 1,) and bool((thresholds[1:] > thresholds[:-1]).all())
        assert torch.equal(assign_levels(scores, thresholds), labels)
        assert torch.equal(torch.bincount(labels, minlength=L), torch.full((L,), 1000 // L))


def test_level_classifier_learns(fitted):
    """Cross-entropy falls well below chance (log L), and almost-clean accuracy on the extreme levels is high."""
    import math

    losses = fitted["losses"]
    assert sum(losses[-100:]) / 100 < math.log(LEVELS) - 0.04
    acc = level_accuracy(
        fitted["net"], VPLinear(), fitted["x0"], fitted["labels"], VPLinear().t_min, torch.Generator().manual_seed(5)
    )
    assert acc["accuracy"] > 1.5 / LEVELS
    assert acc["per_level"][0] > 0.8 and acc["per_level"][LEVELS - 1] > 0.6


def test_guidance_raises_the_rare_fraction_monotonically(imbalanced, fitted):
    """Sampling 2000 points with DPM-Solver++(2M), 25 steps: w = 0 gives the data's 5% (within sampling error);
    guiding toward the top level raises the rare-component fraction strictly with w, above 3x at w = 4."""
    sch = VPLinear()
    grid = make_grid(sch, 25)
    fractions = []
    for w in (0.0, 1.0, 2.0, 4.0, 8.0):
        x = initial_noise(sch, float(grid[0]), (2000, 2), torch.Generator().manual_seed(1), dtype=F64)
        out = sample(MinorityGuidance(fitted["den"], fitted["mc"], w), DPMSolverPP2M(), grid, x)
        rare = imbalanced.class_posterior(out.x, 1.0, 0.0).argmax(1) == 1
        fractions.append(float(rare.float().mean()))
    assert abs(fractions[0] - 0.05) < 0.02, fractions
    assert all(b > a for a, b in zip(fractions, fractions[1:])), fractions
    assert fractions[3] > 0.15 and fractions[4] > 0.5, fractions


def test_guidance_is_classifier_guidance_toward_the_level(fitted):
    """x0 = D(x) + sigma^2/alpha w grad_x log softmax(logits)[level], checked with an independent autograd; the
    default level is L-1; w = 0 is the denoiser exactly."""
    sch = VPLinear()
    den, mc = fitted["den"], fitted["mc"]
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    t, w = 0.4, 2.5
    for level in (None, 0, 2):
        out = MinorityGuidance(den, mc, w, level)(x, t)
        target = LEVELS - 1 if level is None else level
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(torch.log_softmax(mc.net(xg, (t - 1e-3) / (1 - 1e-3)), 1)[:, target].sum(), xg)
        a, s = sch.alpha(torch.tensor(t, dtype=F64)), sch.sigma(torch.tensor(t, dtype=F64))
        assert torch.allclose(out, den(x, t) + s * s / a * w * grad, rtol=1e-10, atol=1e-12)
    assert torch.equal(MinorityGuidance(den, mc, 0.0)(x, t), den(x, t))
    assert isinstance(MinorityGuidance(den, mc, 1.0)._guide, ClassifierGuidance)


def test_bad_settings_are_refused(fitted):
    den, mc = fitted["den"], fitted["mc"]
    with pytest.raises(ConfigError, match="level"):
        MinorityGuidance(den, mc, 1.0, level=LEVELS)
    with pytest.raises(ConfigError, match="levels"):
        MinorityGuidance(den, mc.net, 1.0)
    with pytest.raises(ConfigError, match="L must be"):
        quantile_levels(torch.randn(10), 1)
    with pytest.raises(ConfigError, match="draws"):
        minority_score(den, fitted["x0"][:4], 0.3, 0)
    with pytest.raises(ConfigError, match="time t"):
        minority_score(den, fitted["x0"][:4], 5.0)


def test_save_and_load_round_trip(tmp_path):
    """An AttributeClassifier level net and its thresholds come back identical (safetensors + JSON only)."""
    torch.manual_seed(0)
    net = AttributeClassifier(heads={"level": 3}, noise_aware=True, width=8, hidden=16).eval()
    mc = MinorityClassifier(net, torch.tensor([0.25, 1.5], dtype=F64), 60.0, 5, {"note": "x"}, (0.0, 999.0))
    save_minority(mc, tmp_path / "mc")
    assert not list((tmp_path / "mc").rglob("*.bin")) and not list((tmp_path / "mc").rglob("*.pt"))
    back = load_minority(tmp_path / "mc")
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(back.thresholds, mc.thresholds) and back.t == 60.0 and back.n == 5 and back.levels == 3
    assert back.t_range == (0.0, 999.0)
    assert torch.equal(back(x, 300.0), mc(x, 300.0)) and torch.equal(mc(x, 999.0), net(x, 1.0))
    with pytest.raises(InputFileError, match="minority.json"):
        load_minority(tmp_path)


def test_batching_does_not_change_the_score(imbalanced):
    """Splitting the denoiser calls into chunks (cond rows split along) gives the same scores bit for bit."""
    den = imbalanced.denoiser(VPLinear())
    x0, y = imbalanced.sample(50, torch.Generator().manual_seed(6))
    cond = {"y": y}
    whole = minority_score(den, x0, 0.3, 3, torch.Generator().manual_seed(7), cond=cond)
    parts = minority_score(den, x0, 0.3, 3, torch.Generator().manual_seed(7), cond=cond, batch_size=16)
    assert torch.equal(whole, parts)


def _fit_cmd(out, *extra):
    return [
        "guidance",
        "fit-minority",
        "--model",
        "shapes",
        "--out",
        str(out),
        "--n",
        "40",
        "--levels",
        "2",
        "--draws",
        "1",
        "--steps",
        "2",
        "--batch-size",
        "8",
        *extra,
    ]


@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("--levels", "1", "--levels must be an integer in [2,"),
        ("--levels", "41", "--levels (41) cannot exceed --n (40)"),
        ("--draws", "0", "--draws must be"),
        ("--lr", "nan", "--lr must be a positive finite number"),
        ("--holdout", "1", "--holdout must be a fraction"),
        ("--t", "5000", "--t must be in the schedule's range"),
        ("--seed", "-1", "--seed"),
    ],
)
def test_fit_minority_cli_refuses_bad_options(tmp_path, capsys, option, value, needle):
    """Each bad option is one `error:` line with exit 2, and nothing is written."""
    from clikit import one_line_error, run

    code, _, err = run(_fit_cmd(tmp_path / "mc", option, value), capsys)
    one_line_error(code, err, needle)
    assert not (tmp_path / "mc").exists()


def test_fit_minority_cli_writes_a_loadable_classifier(tmp_path, capsys):
    """A tiny fit on the bundled shapes model writes classifier + thresholds + scores that load back: L levels,
    the score time defaults to 6% of the schedule's range, and the saved labels of the scores are balanced."""
    from clikit import ok
    from condiff.core.files import load_tensors

    out = ok(_fit_cmd(tmp_path / "mc", "--holdout", "0.1"), capsys)
    assert "wrote" in out and "2 levels" in out
    mc = load_minority(tmp_path / "mc")
    assert mc.levels == 2 and abs(mc.t - 0.06 * 999) < 1e-9 and mc.n == 1 and mc.t_range == (0.0, 999.0)
    saved = load_tensors(tmp_path / "mc" / "scores.safetensors")
    assert saved["scores"].shape == (40,) and int(saved["heldout"].sum()) == 4
    assert torch.equal(torch.bincount(mc.label(saved["scores"]), minlength=2), torch.tensor([20, 20]))
    assert mc.info["heldout_samples"] == 4 and "heldout_accuracy" in mc.info
