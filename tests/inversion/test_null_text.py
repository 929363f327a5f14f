"""condiff.inversion.null_text: null-text inversion (specs/training_discrete_tasks.md A2).

Oracles on the toy conditional MLP (16-d latent, 8-d condition, N = 20; the NTI setting of invkit.py):
per-step nulls cut the w = 7.5 reconstruction error at least tenfold; at w = 1 the loss does not depend on
the null, so its gradient is exactly zero and nothing changes; the loss meets its early-stop threshold in
most steps; the learning-rate schedule is exact; StepwiseNull picks the null of each grid time; a batch is a
set of independent inversions.
"""

import pytest
import torch
from invkit import NTI_COND_SCALE, NTI_X_GAIN

from condiff.core.grids import make_grid
from condiff.core.sampling import sample
from condiff.errors import ConfigError
from condiff.guidance.cfg import CFG, contrast
from condiff.inversion import StepwiseNull, invert, learning_rate, null_text_inversion
from condiff.solvers import DDIM

F64 = torch.float64
N = 20


@pytest.fixture(scope="module")
def setting(toy):
    """The NTI toy in float64, a batch of 32 and its condition, the 20-step grid, and NTI at w = 7.5."""
    m = toy(F64, NTI_X_GAIN)
    x0, cond = m.x0(32), m.cond(32, scale=NTI_COND_SCALE)
    grid = make_grid(m.schedule, N)
    return m, x0, cond, grid, null_text_inversion(m.denoiser, grid, x0, cond, 7.5)


def rms(x, ref):
    return (x - ref).pow(2).mean(1).sqrt()


def test_per_step_nulls_cut_the_guided_reconstruction_error_tenfold(setting):
    """A2: sampling at w = 7.5 from the pivot's noise with the per-step nulls errs <= 0.1x as much as with
    the fixed null (the pivot's own condition), for every sample (measured: <= 0.077x per sample, 0.044x
    over the batch; max abs error 0.057 against 1.91)."""
    m, x0, cond, grid, nt = setting
    fixed = sample(CFG(m.denoiser, 7.5), DDIM(), grid, nt.pivot.latent, cond).x
    tuned = sample(StepwiseNull(CFG(m.denoiser, 7.5), grid, nt.nulls), DDIM(), grid, nt.pivot.latent, cond).x
    ratio = rms(tuned, x0) / rms(fixed, x0)
    batch = rms(tuned, x0).norm() / rms(fixed, x0).norm()
    print(
        f"\n[null-text] per-sample error ratio max {ratio.max():.3g}, batch {batch:.3g}; "
        f"max abs {(tuned - x0).abs().max():.3g} vs fixed {(fixed - x0).abs().max():.3g}"
    )
    assert bool((ratio <= 0.1).all())


def test_loss_meets_the_early_stop_threshold_in_most_steps(setting):
    """A2: the per-step loss is <= early_stop + i 2e-5 in >= 80% of the (step, sample) pairs (measured
    89%; the worst sample meets it in 50% of its steps: an 8-d null cannot always catch up once the
    guided path has left the pivot)."""
    *_, nt = setting
    threshold = 1e-5 + torch.arange(N, dtype=F64)[:, None] * 2e-5
    met = (nt.losses.double() <= threshold).float()
    print(
        f"\n[null-text] threshold met in {met.mean():.3f} of steps (worst sample {met.mean(0).min():.2f}); "
        f"mean Adam iterations {nt.iterations.float().mean():.2f}"
    )
    assert nt.losses.shape == nt.iterations.shape == (N, 32)
    assert met.mean().item() >= 0.8
    # a step stops early exactly when its recorded loss meets the threshold
    assert torch.equal(nt.iterations < 10, nt.losses.double() < threshold)


def test_at_guidance_1_the_gradient_is_zero_and_nothing_changes(toy):
    """A2 invariance: at w = 1 the guided estimate x0_u + 1 (x0_c - x0_u) has derivative 1 - w = 0 in the
    null, so every Adam step is zero: all stored nulls equal the initial null bit for bit, the pivot is DDIM
    inversion's, and sampling with the stored nulls reconstructs exactly as DDIM inversion does."""
    m = toy(F64, NTI_X_GAIN)
    x0, cond = m.x0(8), m.cond(8, scale=NTI_COND_SCALE)
    grid = make_grid(m.schedule, N)
    nt = null_text_inversion(m.denoiser, grid, x0, cond, 1.0)
    assert all(torch.equal(n["c"], cond["null"]["c"]) for n in nt.nulls)
    ddim = invert(CFG(m.denoiser, 1.0), DDIM(), grid, x0, cond)
    assert all(torch.equal(a, b) for a, b in zip(nt.pivot.trajectory, ddim.trajectory))
    rec = sample(StepwiseNull(CFG(m.denoiser, 1.0), grid, nt.nulls), DDIM(), grid, nt.pivot.latent, cond).x
    assert torch.equal(rec, sample(CFG(m.denoiser, 1.0), DDIM(), grid, ddim.latent, cond).x)
    null = cond["null"]["c"].clone().requires_grad_(True)
    x0_c = m.denoiser(x0, 500.0, {"c": cond["c"]})
    guided = contrast(x0_c, m.denoiser(x0, 500.0, {"c": null}), 1.0)
    (grad,) = torch.autograd.grad(guided.square().sum(), [null])
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("steps", [1, 20, 50])
def test_learning_rate_schedule_is_exact(steps):
    """A2: lr_i = 0.01 (1 - i/100) for every step i of an N <= 50 inversion."""
    assert [learning_rate(0.01, i, steps) for i in range(steps)] == [0.01 * (1 - i / 100) for i in range(steps)]


def test_learning_rate_stays_positive_beyond_50_steps():
    """For N > 50 the decay is over 2N instead of 100 (the paper's 1 - i/100 would reach 0 and go
    negative): lr_i = lr (1 - i/(2N)), so the last step keeps more than half of lr."""
    assert [learning_rate(0.01, i, 200) for i in range(200)] == [0.01 * (1 - i / 400) for i in range(200)]


def test_each_step_uses_a_fresh_adam_at_the_scheduled_rate(toy, monkeypatch):
    """The inversion builds one fresh Adam per step, at lr_i = 0.01 (1 - i/100), in step order."""
    seen = []

    class Recording(torch.optim.Adam):
        def __init__(self, params, lr, **kw):
            seen.append(lr)
            super().__init__(params, lr=lr, **kw)

    monkeypatch.setattr(torch.optim, "Adam", Recording)
    m = toy(F64, NTI_X_GAIN)
    null_text_inversion(m.denoiser, make_grid(m.schedule, N), m.x0(2), m.cond(2, scale=NTI_COND_SCALE), 7.5)
    assert seen == [0.01 * (1 - i / 100) for i in range(N)]


class Recorder:
    schedule = None

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond=None):
        self.calls.append((float(t), cond))
        return x


def test_stepwise_null_uses_the_null_of_each_grid_time_and_refuses_others(toy):
    """StepwiseNull at grid[k] passes nulls[k] as cond['null'] (other entries untouched); a time off the
    grid, or the final clean point (no step starts there), is a ConfigError."""
    grid = make_grid(toy().schedule, 5)
    nulls = tuple({"c": torch.full((1, 8), float(k))} for k in range(5))
    rec = Recorder()
    wrapped = StepwiseNull(rec, grid, nulls)
    x = torch.zeros(1, 16)
    for k in (3, 0, 4, 1):
        wrapped(x, float(grid[k]), {"c": torch.ones(1, 8)})
        t, cond = rec.calls[-1]
        assert t == float(grid[k]) and cond["null"] is nulls[k] and torch.equal(cond["c"], torch.ones(1, 8))
    for t in (float(grid[1]) + 0.5, float(grid[-1])):
        with pytest.raises(ConfigError, match="not on the grid"):
            wrapped(x, t, {"c": torch.ones(1, 8)})


def test_a_batch_is_a_set_of_independent_inversions(toy):
    """Inverting a batch of 4 gives each sample the nulls, losses and iteration counts of inverting it
    alone (to 1e-10 in float64; iteration counts equal)."""
    m = toy(F64, NTI_X_GAIN)
    x0, cond = m.x0(4), m.cond(4, scale=NTI_COND_SCALE)
    grid = make_grid(m.schedule, N)
    batch = null_text_inversion(m.denoiser, grid, x0, cond, 7.5)
    for b in range(4):
        one = {"c": cond["c"][b : b + 1], "null": {"c": cond["null"]["c"][b : b + 1]}}
        alone = null_text_inversion(m.denoiser, grid, x0[b : b + 1], one, 7.5)
        assert torch.equal(alone.iterations[:, 0], batch.iterations[:, b])
        assert torch.allclose(alone.losses[:, 0], batch.losses[:, b], rtol=1e-10, atol=0)
        for k in range(N):
            assert torch.allclose(alone.nulls[k]["c"][0], batch.nulls[k]["c"][b], rtol=0, atol=1e-10)


def test_bad_arguments_are_refused(toy):
    """A condition without 'null', a negative or non-integer inner_steps, and a null with no floating
    tensor are ConfigErrors that name the problem."""
    m = toy(F64, NTI_X_GAIN)
    x0, cond = m.x0(2), m.cond(2)
    grid = make_grid(m.schedule, 3)
    with pytest.raises(ConfigError, match="null"):
        null_text_inversion(m.denoiser, grid, x0, {"c": cond["c"]})
    for bad in (-1, 2.0, True):
        with pytest.raises(ConfigError, match="inner_steps"):
            null_text_inversion(m.denoiser, grid, x0, cond, inner_steps=bad)
    with pytest.raises(ConfigError, match="floating"):
        null_text_inversion(m.denoiser, grid, x0, {"c": cond["c"], "null": {"ids": torch.zeros(2, dtype=torch.long)}})
