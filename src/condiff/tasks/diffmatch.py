"""DiffMatch: conditional diffusion over a dense flow field (Nam, Lee, Kim, Kim, Cho, Kim and Kim, "Diffusion Model
for Dense Matching", ICLR 2024).

Dense matching estimates, for every pixel q of the target image, the source point q + F(q) it shows (the
target-to-source flow of GLU-Net and DiffMatch; channel 0 along x, channel 1 along y, in pixels). DiffMatch writes
the posterior as a data term and a prior term, p(F | I_src, I_tgt) ∝ p(I_src, I_tgt | F) p(F), and instead of
hand-designing the prior learns the whole conditional with a conditional denoising diffusion model:
F_0 = F, F_t = alpha_t F_0 + sigma_t eps, and a network F_theta(F_t, t; C) trained with the x0-prediction
(``predict_xstart``) objective

    L = E_{F_0, t, eps} || F_theta(alpha_t F_0 + sigma_t eps, t; C) - F_0 ||^2,

where the condition C holds what the paper's cost injection supplies: the initial flow F_init, the soft-argmax of
the global matching cost C(q, p) = <f_tgt(q), f_src(p)> between the two images' (L2-normalised) features, the
local cost volume C_l(q, d) = C(q, q + F_init(q) + d) in a (2r+1)^2 window around it (the "local correlation" of
the official code), and the images (the target, and the source warped by F_init so it is aligned with the
target).

Sampling runs a condiff solver (DDIM, as the official code) from noise, or from F_init diffused to an
intermediate time ``t_start`` (the abstract's inference technique "finds a better path to the accurate matching
field"; starting from the initialisation is our reading of it, not a reproduction); several hypotheses drawn with
different noise are averaged (the official sampler draws a batch of them per pair). The paper's second stage
(flow upsampling from 64x64 to 256x256, trained stage-wise) has no counterpart here: the flow is estimated at the
images' own resolution.

Here the features are raw pixels: ``patch_features`` stacks each pixel's (2 k + 1)^2 RGB neighbourhood,
mean-subtracted and L2-normalised, so C is the normalised cross-correlation (NCC) of patches, which is exactly 1
for a pixel and its exact copy. The network (``FlowDenoiserNet``) is a small U-Net with a global-context branch;
its output is a residual on the initial flow (x0_hat = F_init / scale + net output), and the flow is diffused in
units of ``flow_scale`` pixels. ``end_point_error`` is the average end-point error (AEPE) over valid pixels.

Library code: tensors and ``nn.Module`` objects only (the recipe family is ``condiff.models.diffmatch``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from condiff.core.denoiser import X0, diffuse, wrap
from condiff.core.grids import make_grid
from condiff.core.sampling import Gaussian, sample
from condiff.errors import ConfigError, check_int, check_real

COND_KEY = "matching"  # the condition's key in a Denoiser's cond mapping


# ---- the data term: features, cost volumes, the initial flow --------------------------------------------------
def pixel_coords(b: int, h: int, w: int, dtype=torch.float32) -> torch.Tensor:
    """(b, 2, h, w): the x and y coordinate of every pixel centre (pixel (i, j) is at x = j, y = i)."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    return torch.stack([xs, ys])[None].expand(b, -1, -1, -1)


def _check_images(image: torch.Tensor, what: str) -> None:
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or not image.is_floating_point():
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ConfigError(f"{what} must be a floating (B, C, H, W) tensor, got {got}")


def patch_features(image: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """(B, C (2r+1)^2, H, W): every pixel's (2 ``radius`` + 1)^2 neighbourhood (zero padded), minus its mean and
    divided by its L2 norm, so the dot product of two features is their normalised cross-correlation (0 for a
    constant patch)."""
    _check_images(image, "image")
    r = check_int("radius", radius, 0, 8)
    b, c, h, w = image.shape
    k = 2 * r + 1
    f = F.unfold(image, k, padding=r).view(b, c * k * k, h, w)
    f = f - f.mean(1, keepdim=True)
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-6)


def global_cost(feat_target: torch.Tensor, feat_source: torch.Tensor) -> torch.Tensor:
    """The global matching cost (B, H W, H, W): ``cost[b, i, y, x]`` = <f_tgt(target pixel i), f_src(x, y)>, with
    i = row * W + column of the target pixel."""
    _check_images(feat_target, "feat_target")
    if feat_source.shape != feat_target.shape:
        raise ConfigError(
            f"feat_source {tuple(feat_source.shape)} and feat_target {tuple(feat_target.shape)} must have one shape"
        )
    b, d, h, w = feat_target.shape
    cost = torch.bmm(feat_target.flatten(2).transpose(1, 2), feat_source.flatten(2))
    return cost.view(b, h * w, h, w)


def soft_argmax_flow(cost: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """The initial flow (B, 2, H, W): for each target pixel q, the softmax(cost(q, .) / temperature)-weighted mean
    of the source coordinates, minus q (a differentiable argmax; the official code takes the hard argmax)."""
    check_real("temperature", temperature, 0, 100, lo_open=True)
    b, n, h, w = cost.shape
    if n != h * w:
        raise ConfigError(f"cost must be (B, H W, H, W), got {tuple(cost.shape)}")
    p = torch.softmax(cost.flatten(2) / temperature, dim=2)  # (B, target pixels, source pixels)
    src = pixel_coords(1, h, w, cost.dtype)[0].flatten(1)  # (2, H W)
    expected = torch.einsum("bqp,cp->bcq", p, src).view(b, 2, h, w)
    return expected - pixel_coords(b, h, w, cost.dtype)


def sample_at(image: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``image`` (N, C, H, W) sampled bilinearly at pixel coordinates ``coords`` (N, h, w, 2) (x, y; zero outside):
    (N, C, h, w). ``grid_sample`` with align_corners=True, whose -1 and 1 are the first and last pixel centres."""
    _, _, h, w = image.shape
    scale = torch.tensor([2 / max(w - 1, 1), 2 / max(h - 1, 1)], dtype=coords.dtype)
    return F.grid_sample(image, coords * scale - 1, mode="bilinear", padding_mode="zeros", align_corners=True)


def warp(source: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """The source resampled at q + flow[q] for every target pixel q: aligned with the target where the flow is
    right (B, C, H, W)."""
    b, _, h, w = flow.shape
    return sample_at(source, (pixel_coords(b, h, w, flow.dtype) + flow).permute(0, 2, 3, 1))


def local_cost(cost: torch.Tensor, flow: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """The local cost volume (B, (2r+1)^2, H, W): ``cost`` of each target pixel q at the source points
    q + flow[q] + (dx, dy), dx and dy in [-radius, radius] (dy major), bilinearly interpolated, zero outside."""
    r = check_int("radius", radius, 0, 16)
    b, n, h, w = cost.shape
    k = 2 * r + 1
    d = torch.arange(-r, r + 1, dtype=flow.dtype)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    centre = (pixel_coords(b, h, w, flow.dtype) + flow).permute(0, 2, 3, 1).reshape(b * n, 1, 1, 2)
    pts = centre + torch.stack([dx, dy], -1).reshape(1, 1, k * k, 2)
    out = sample_at(cost.reshape(b * n, 1, h, w), pts)  # (B n, 1, 1, k k)
    return out.view(b, h, w, k * k).permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class MatchingCondition:
    """What the denoiser is conditioned on (cost injection): ``init_flow`` (B, 2, H, W) in pixels, ``local_cost``
    (B, (2r+1)^2, H, W), ``target`` and ``warped_source`` (B, 3, H, W) (the source warped by the initial flow)."""

    init_flow: torch.Tensor
    local_cost: torch.Tensor
    target: torch.Tensor
    warped_source: torch.Tensor

    def tensor(self, flow_scale: float) -> torch.Tensor:
        """The network's condition channels: init_flow / flow_scale first (the residual's base), then the local
        cost, the target and the warped source: (B, 2 + (2r+1)^2 + 6, H, W)."""
        return torch.cat([self.init_flow / flow_scale, self.local_cost, self.target, self.warped_source], 1)


def cond_channels(local_radius: int, image_channels: int = 3) -> int:
    return 2 + (2 * local_radius + 1) ** 2 + 2 * image_channels


@torch.no_grad()
def matching_condition(
    source: torch.Tensor,
    target: torch.Tensor,
    feature_radius: int = 2,
    temperature: float = 0.05,
    local_radius: int = 3,
) -> MatchingCondition:
    """The initial flow (soft-argmax of the global NCC cost of ``patch_features``), the local cost around it and
    the images, for image pairs (B, C, H, W)."""
    _check_images(source, "source")
    _check_images(target, "target")
    if source.shape != target.shape:
        raise ConfigError(f"source {tuple(source.shape)} and target {tuple(target.shape)} must have one shape")
    cost = global_cost(patch_features(target, feature_radius), patch_features(source, feature_radius))
    init = soft_argmax_flow(cost, temperature)
    return MatchingCondition(init, local_cost(cost, init, local_radius), target, warp(source, init))


def end_point_error(flow: torch.Tensor, true_flow: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The average end-point error of each pair (B,): the mean over valid pixels of ||flow - true_flow||_2
    (every pixel when ``valid`` is None; NaN for a pair without a valid pixel)."""
    if flow.shape != true_flow.shape or flow.dim() != 4 or flow.shape[1] != 2:
        raise ConfigError(f"flow {tuple(flow.shape)} and true_flow {tuple(true_flow.shape)} must both be (B, 2, H, W)")
    epe = (flow.double() - true_flow.double()).norm(dim=1)
    if valid is None:
        return epe.flatten(1).mean(1)
    if valid.shape != epe.shape:
        raise ConfigError(f"valid must be (B, H, W) = {tuple(epe.shape)}, got {tuple(valid.shape)}")
    v = valid.to(epe.dtype)
    return (epe * v).flatten(1).sum(1) / v.flatten(1).sum(1)


# ---- the conditional denoiser ---------------------------------------------------------------------------------
def _time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32) / half)
    args = 1000 * t.float().reshape(-1, 1) * freqs
    return torch.cat([torch.sin(args), torch.cos(args)], 1)


class _Block(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding as a FiLM scale and shift in between, and a skip."""

    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(min(8, cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(tdim, 2 * cout)
        self.n2, self.c2 = nn.GroupNorm(min(8, cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.c1(F.silu(self.n1(x)))
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, 1)
        h = self.c2(F.silu(self.n2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class FlowDenoiserNet(nn.Module):
    """F_theta(F_t, t; C): a two-level U-Net (``channels`` at full resolution, twice that at 1/2 and 1/4) over the
    noisy flow (2 channels, in units of flow_scale) and the condition channels, with the time embedding in every
    block and a global-context branch at 1/4 resolution (the mean of the features through a linear layer, added
    back everywhere: a global warp is a global property). Output: the clean flow as a residual on the condition's
    first two channels (the initial flow / flow_scale); the last convolution starts at zero, so an untrained net
    returns the initial flow."""

    def __init__(self, cond_channels: int, channels: int = 32, time_dim: int = 64):
        super().__init__()
        c, td = channels, time_dim
        self.cond_channels = cond_channels
        self.time = nn.Sequential(nn.Linear(td, td), nn.SiLU(), nn.Linear(td, td))
        self.inp = nn.Conv2d(2 + cond_channels, c, 3, padding=1)
        self.b1 = _Block(c, c, td)
        self.down1 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.b2 = _Block(2 * c, 2 * c, td)
        self.down2 = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)
        self.b3 = _Block(2 * c, 2 * c, td)
        self.glob = nn.Linear(2 * c, 2 * c)
        self.b4 = _Block(2 * c, 2 * c, td)
        self.b5 = _Block(4 * c, 2 * c, td)
        self.b6 = _Block(3 * c, c, td)
        self.out_norm = nn.GroupNorm(min(8, c), c)
        self.out = nn.Conv2d(c, 2, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.time_dim = td

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        temb = self.time(_time_embedding(t.expand(x.shape[0]) if t.dim() == 0 else t, self.time_dim))
        h1 = self.b1(self.inp(torch.cat([x, cond], 1)), temb)
        h2 = self.b2(self.down1(h1), temb)
        h3 = self.b3(self.down2(h2), temb)
        h3 = h3 + self.glob(h3.mean((2, 3)))[:, :, None, None]
        h = self.b4(h3, temb)
        h = self.b5(torch.cat([F.interpolate(h, size=h2.shape[-2:], mode="nearest"), h2], 1), temb)
        h = self.b6(torch.cat([F.interpolate(h, size=h1.shape[-2:], mode="nearest"), h1], 1), temb)
        return cond[:, :2] + self.out(F.silu(self.out_norm(h)))


def _call(net, x, t_in, cond):
    return net(x, t_in, cond[COND_KEY])


def flow_denoiser(net: nn.Module, schedule):
    """The Denoiser D(F_t, t, {"matching": C}) -> F_0 estimate (x0 prediction), in units of flow_scale; C is
    ``MatchingCondition.tensor(flow_scale)``."""
    return wrap(net, schedule, X0(), call=_call, channels=2)


def diffmatch_loss(
    net: nn.Module, schedule, true_flow: torch.Tensor, cond: torch.Tensor, generator, flow_scale: float
) -> torch.Tensor:
    """DiffMatch's objective: the mean over the batch of || F_theta(F_t, t; C) - F_0 ||^2 per element, with
    F_0 = true_flow / flow_scale, t uniform in [t_min, t_max] and eps ~ N(0, I) from ``generator``."""
    x0 = true_flow / flow_scale
    b = x0.shape[0]
    t = schedule.t_min + (schedule.t_max - schedule.t_min) * torch.rand(b, generator=generator, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    x_t = diffuse(schedule, x0, t, eps)
    x0_hat = flow_denoiser(net, schedule)(x_t, t, {COND_KEY: cond})
    return (x0_hat - x0).pow(2).mean()


def regression_loss(net: nn.Module, schedule, true_flow: torch.Tensor, cond: torch.Tensor, flow_scale: float):
    """The direct-regression baseline with the same network: x = 0 and t = t_max (no noisy flow), trained with
    the same squared error to true_flow / flow_scale."""
    return (regress_flow(net, schedule, cond, flow_scale) / flow_scale - true_flow / flow_scale).pow(2).mean()


def regress_flow(net: nn.Module, schedule, cond: torch.Tensor, flow_scale: float) -> torch.Tensor:
    """The regression baseline's flow (pixels): the network at t = t_max with a zero flow input."""
    b, _, h, w = cond.shape
    x = torch.zeros(b, 2, h, w, dtype=cond.dtype)
    t = torch.full((b,), float(schedule.t_max), dtype=torch.float64)
    return net(x, t.to(cond.dtype), cond) * flow_scale


def sample_flow(
    denoiser,
    solver,
    cond: torch.Tensor,
    flow_scale: float,
    steps: int = 10,
    generator: torch.Generator | None = None,
    hypotheses: int = 1,
    t_start: float | None = None,
) -> torch.Tensor:
    """DiffMatch's estimate (B, 2, H, W) in pixels: ``hypotheses`` samples per pair, each by ``solver`` over
    ``steps`` steps, averaged. From noise at the schedule's start (``t_start`` None), or from the initial flow
    (the condition's first two channels) diffused to ``t_start``, F_t = alpha F_init + sigma eps."""
    check_int("steps", steps, 1, 1000)
    n = check_int("hypotheses", hypotheses, 1, 256)
    schedule = denoiser.schedule
    b, _, h, w = cond.shape
    c = cond.repeat_interleave(n, 0)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    if t_start is None:
        grid = make_grid(schedule, steps)
        x = float(schedule.sigma(torch.tensor(float(grid[0]), dtype=torch.float64))) * torch.randn(
            b * n, 2, h, w, generator=g, dtype=cond.dtype
        )
    else:
        t0 = check_real("t_start", t_start, schedule.t_min, schedule.t_max, lo_open=True)
        grid = make_grid(schedule, steps, t_start=t0)
        eps = torch.randn(b * n, 2, h, w, generator=g, dtype=cond.dtype)
        x = diffuse(schedule, c[:, :2], float(grid[0]), eps)
    out = sample(denoiser, solver, grid, x, {COND_KEY: c}, Gaussian(g)).x
    return out.view(b, n, 2, h, w).mean(1) * flow_scale
