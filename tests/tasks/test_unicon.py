"""UniCon (condiff.tasks.unicon): with the given modality's time at the clean point the conditional denoiser is an
ordinary conditional denoiser with the clean data concatenated (an identity, both directions); on a jointly Gaussian
pair with the exact joint denoiser for any (t_a, t_b), the conditional schemes sample the exact Gaussian conditional
and the joint scheme the joint covariance (within 3 standard errors); the guidance, time sampling and loss are
exact."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from condiff.core.denoiser import X0, V, wrap
from condiff.core.grids import UniformLogSNR, make_grid
from condiff.core.sampling import sample
from condiff.core.schedules import VPDiscrete
from condiff.errors import ConfigError
from condiff.guidance.cfg import CFG, contrast
from condiff.solvers import DPMSolverPP2M
from condiff.tasks.unicon import UniCon, given, guidance_null, noised, sample_times, unicon_loss

SCHEDULE = VPDiscrete.from_betas("squaredcos_cap_v2", 1000)
CLEAN = SCHEDULE.t_clean


# the identity: t_given = clean is an ordinary conditional denoiser ---------------------------------------------
def tiny_joint_unet():
    """A random two-modality UNet: channels 0-2 are a, channel 3 is b; b's time enters as timestep_cond."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
        time_cond_proj_dim=8,
    ).eval()
    torch.nn.init.normal_(unet.time_embedding.cond_proj.weight)  # b's time matters
    return unet


CTX = torch.randn(1, 2, 8, generator=torch.Generator().manual_seed(9))


def joint_net(unet):
    def net(x_a, x_b, t_a, t_b):
        n = x_a.shape[0]
        out = unet(
            torch.cat([x_a, x_b], 1),
            t_a,
            encoder_hidden_states=CTX.expand(n, -1, -1),
            timestep_cond=unet.time_proj(t_b),
        ).sample
        return out[:, :3], out[:, 3:]

    return net


def test_clean_given_mask_is_a_plain_conditional_denoiser_on_the_concatenation():
    unet = tiny_joint_unet()
    u = UniCon(joint_net(unet), SCHEDULE, V(), 3, 1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)

    def plain_call(net, x, t_in, cond):  # the image's denoiser with the clean map concatenated, at the map's clean time
        n = x.shape[0]
        t_map = net.time_proj(torch.full((n,), CLEAN))
        h = torch.cat([x, cond["map"]], 1)
        return net(h, t_in, encoder_hidden_states=CTX.expand(n, -1, -1), timestep_cond=t_map).sample[:, :3]

    plain = wrap(unet, SCHEDULE, V(), call=plain_call, channels=3)
    with torch.no_grad():
        for t in (999.0, 500.0, 3.0, torch.tensor([10.0, 400.0, 900.0])):
            got = u.conditional("a")(x, t, {"given": y, "given_t": CLEAN})
            assert torch.equal(got, plain(x, t, {"map": y}))
            assert torch.equal(u.conditional("a")(x, t, {"given": y}), got)  # given_t defaults to clean


def test_clean_given_image_is_a_plain_conditional_denoiser_of_the_mask():
    unet = tiny_joint_unet()
    u = UniCon(joint_net(unet), SCHEDULE, V(), 3, 1)
    g = torch.Generator().manual_seed(2)
    img, y = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)

    def plain_call(net, x, t_in, cond):  # the map's denoiser: the clean image concatenated, its time clean
        n = x.shape[0]
        h = torch.cat([cond["image"], x], 1)
        t_img = torch.full((n,), CLEAN)
        ctx = CTX.expand(n, -1, -1)
        return net(h, t_img, encoder_hidden_states=ctx, timestep_cond=net.time_proj(t_in)).sample[:, 3:]

    plain = wrap(unet, SCHEDULE, V(), call=plain_call, channels=1)
    with torch.no_grad():
        for t in (999.0, 250.0):
            assert torch.equal(u.conditional("b")(y, t, {"given": img}), plain(y, t, {"image": img}))


def test_joint_denoiser_runs_both_branches_at_one_time():
    unet = tiny_joint_unet()
    u = UniCon(joint_net(unet), SCHEDULE, V(), 3, 1)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        a, b = u.x0(x[:, :3], 300.0, x[:, 3:], 300.0)
        assert torch.equal(u.joint()(x, 300.0), torch.cat([a, b], 1))


def test_bad_inputs_are_one_line_errors():
    u = UniCon(joint_net(tiny_joint_unet()), SCHEDULE, V(), 3, 1)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ConfigError, match=r"needs cond\['given'\] \(modality b"):
        u.conditional("a")(x, 10.0, {})
    with pytest.raises(ConfigError, match="'given' has 1 row but x has 2"):
        u.conditional("a")(x, 10.0, {"given": torch.randn(1, 1, 8, 8)})
    with pytest.raises(ConfigError, match="x_b must have 1 channels"):
        u.conditional("a")(x, 10.0, {"given": torch.randn(2, 2, 8, 8)})
    with pytest.raises(ConfigError, match="joint x must have 3 \\+ 1 channels"):
        u.joint()(x, 10.0)
    with pytest.raises(ConfigError, match="accepted: a, b"):
        u.conditional("c")
    with pytest.raises(ConfigError, match="one per sample"):
        u.x0(x, torch.tensor([1.0, 2.0, 3.0]), torch.randn(2, 1, 8, 8), 5.0)


# the Gaussian oracle --------------------------------------------------------------------------------------------
MU = torch.tensor([0.8, -0.5, 0.6], dtype=torch.float64)  # (x1, x2, y)
SIGMA = torch.tensor([[1.0, 0.3, 0.5], [0.3, 0.6, -0.2], [0.5, -0.2, 0.8]], dtype=torch.float64)  # positive definite


def gaussian_net(x_a, x_b, t_a, t_b):
    """The exact x0 = E[(x, y) | x at t_a, y at t_b] of z = (x, y) ~ N(MU, SIGMA): o = A z + S e, E[z | o] =
    MU + SIGMA A (A SIGMA A + S^2)^-1 (o - A MU), per row (a clean modality has s = 0)."""
    a_a, s_a = SCHEDULE.alpha(t_a.double()), SCHEDULE.sigma(t_a.double())
    a_b, s_b = SCHEDULE.alpha(t_b.double()), SCHEDULE.sigma(t_b.double())
    A = torch.stack([a_a, a_a, a_b], 1)  # (n, 3) diagonals
    S2 = torch.stack([s_a, s_a, s_b], 1) ** 2
    o = torch.cat([x_a, x_b], 1)
    M = A[:, :, None] * SIGMA * A[:, None, :] + torch.diag_embed(S2)
    r = torch.linalg.solve(M, (o - A * MU)[:, :, None])
    z = MU + (SIGMA @ (A[:, :, None] * r))[:, :, 0]
    return z[:, :2], z[:, 2:]


ORACLE = UniCon(gaussian_net, SCHEDULE, X0(), 2, 1)
N = 20000


def run(denoiser, dim, cond, seed):
    grid = make_grid(SCHEDULE, 100, UniformLogSNR(), t_start=SCHEDULE.t_max)  # converged: 400 steps agree to 0.3%
    g = torch.Generator().manual_seed(seed)
    x = float(SCHEDULE.sigma(torch.tensor(SCHEDULE.t_max, dtype=torch.float64))) * torch.randn(
        N, dim, generator=g, dtype=torch.float64
    )
    return sample(denoiser, DPMSolverPP2M(), grid, x, cond).x


def assert_gaussian(z, mean, cov):
    """Sample mean and covariance within 3 standard errors of the exact ones (entry by entry)."""
    n = z.shape[0]
    var = torch.diagonal(cov)
    assert ((z.mean(0) - mean).abs() <= 3 * (var / n).sqrt()).all(), (z.mean(0), mean)
    se = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    assert ((torch.cov(z.T).reshape(cov.shape) - cov).abs() <= 3 * se).all(), (torch.cov(z.T), cov)


def test_image_given_map_samples_the_exact_gaussian_conditional():
    y = torch.full((N, 1), 1.3, dtype=torch.float64)
    x = run(ORACLE.conditional("a"), 2, {"given": y}, seed=0)
    k = SIGMA[:2, 2:] / SIGMA[2, 2]
    mean = MU[:2] + k[:, 0] * (1.3 - MU[2])
    cov = SIGMA[:2, :2] - k @ SIGMA[2:, :2]
    assert_gaussian(x, mean, cov)


def test_map_given_image_samples_the_exact_gaussian_conditional():
    given = torch.tensor([[0.2, -1.0]], dtype=torch.float64).expand(N, -1)
    y = run(ORACLE.conditional("b"), 1, {"given": given}, seed=1)
    k = SIGMA[2:, :2] @ torch.linalg.inv(SIGMA[:2, :2])
    mean = MU[2:] + k @ (given[0] - MU[:2])
    cov = SIGMA[2:, 2:] - k @ SIGMA[:2, 2:]
    assert_gaussian(y, mean, cov)


def test_joint_samples_have_the_joint_covariance():
    z = run(ORACLE.joint(), 3, None, seed=2)
    assert_gaussian(z, MU, SIGMA)


def test_the_wrong_conditional_is_detected():
    """The oracle test has power: samples of x given y = 1.3 are not those of x given y = -0.5."""
    y = torch.full((N, 1), -0.5, dtype=torch.float64)
    x = run(ORACLE.conditional("a"), 2, {"given": y}, seed=3)
    k = SIGMA[:2, 2:] / SIGMA[2, 2]
    with pytest.raises(AssertionError):
        assert_gaussian(x, MU[:2] + k[:, 0] * (1.3 - MU[2]), SIGMA[:2, :2] - k @ SIGMA[2:, :2])


# guidance, times, loss ------------------------------------------------------------------------------------------
def test_guidance_contrasts_the_clean_given_against_the_given_at_T():
    den = ORACLE.conditional("a")
    y = torch.randn(4, 1, dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64)
    null = guidance_null(SCHEDULE, y, torch.Generator().manual_seed(5))
    want_null = noised(SCHEDULE, y, SCHEDULE.t_max, torch.Generator().manual_seed(5))
    assert torch.equal(null["given"], want_null) and torch.equal(null["given_t"], torch.full((4,), 999.0).double())
    cond = given(SCHEDULE, y)
    assert torch.equal(cond["given_t"], torch.full((4,), CLEAN).double())
    got = CFG(den, 2.5)(x, 600.0, {**cond, "null": null})
    want = contrast(den(x, 600.0, {"given": y}), den(x, 600.0, null), 2.5)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_sample_times_hold_one_modality_clean_at_the_given_rate():
    t_a, t_b = sample_times(SCHEDULE, 40000, torch.Generator().manual_seed(6), p_clean=0.25)
    ca, cb = t_a == CLEAN, t_b == CLEAN
    se = (0.25 * 0.75 / 40000) ** 0.5
    assert abs(ca.double().mean() - 0.25) <= 3 * se and abs(cb.double().mean() - 0.25) <= 3 * se
    assert not (ca & cb).any()
    noisy = torch.cat([t_a[~ca], t_b[~cb]])
    assert noisy.min() >= SCHEDULE.t_min and noisy.max() <= SCHEDULE.t_max
    t_a, t_b = sample_times(SCHEDULE, 1000, torch.Generator().manual_seed(6))
    assert not ((t_a == CLEAN) | (t_b == CLEAN)).any()
    with pytest.raises(ConfigError, match=r"p_clean must be a finite number in \[0, 0.5\], got 0.6"):
        sample_times(SCHEDULE, 4, p_clean=0.6)


def test_unicon_loss_is_each_branch_mse_and_skips_clean_branches():
    def net(x_a, x_b, t_a, t_b):
        return 0.5 * x_a, 0.25 * x_b

    u = UniCon(net, SCHEDULE, X0(), 2, 1)
    x0_a, x0_b = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
    t_a = torch.tensor([CLEAN, 100.0, 700.0], dtype=torch.float64)
    t_b = torch.tensor([400.0, CLEAN, 50.0], dtype=torch.float64)
    per, metrics = unicon_loss(u, x0_a, x0_b, t_a, t_b, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    ea, eb = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(3, 1, generator=g, dtype=torch.float64)
    aa, sa = SCHEDULE.alpha(t_a)[:, None], SCHEDULE.sigma(t_a)[:, None]
    ab, sb = SCHEDULE.alpha(t_b)[:, None], SCHEDULE.sigma(t_b)[:, None]
    la = (0.5 * (aa * x0_a + sa * ea) - x0_a).pow(2).mean(1)
    lb = (0.25 * (ab * x0_b + sb * eb) - x0_b).pow(2).mean(1)
    want = torch.stack([lb[0], la[1], la[2] + lb[2]])
    assert torch.allclose(per, want, rtol=1e-12)
    assert metrics["loss_a"] == pytest.approx(float(la[1:].mean())) and metrics["loss_b"] == pytest.approx(
        float(lb[[0, 2]].mean())
    )
