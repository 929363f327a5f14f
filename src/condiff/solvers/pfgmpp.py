"""PFGM++ noise: the perturbation kernel and prior of Poisson flow generative models with D augmented
dimensions (Xu, Liu, Tian, Tong, Tegmark, Jaakkola, "PFGM++: Unlocking the potential of physics-inspired
generative models", ICML 2023).

For data y in R^N the kernel is p_r(x | y) ∝ 1 / (||x - y||^2 + r^2)^((N + D)/2) (Xu et al. 2023, eq. 4).
Its radius is R = ||x - y|| = r sqrt(B / (1 - B)) with B ~ Beta(N/2, D/2), and its direction is uniform on
the sphere (sec. 3.2, the "change of variables" sampling of the kernel). With the alignment r = sigma sqrt(D)
(Prop. 3.1/3.2) the kernel tends to N(y, sigma^2 I) as D -> inf, so EDM (Karras et al. 2022) is the
D = inf member and training, preconditioning and the Heun sampler carry over unchanged; only the noise
(training perturbation and sampling prior, at r_max = sigma_max sqrt(D)) changes.

How a draw is made here. Write B = G_N / (G_N + G_D) with independent G_N ~ Gamma(N/2), G_D ~ Gamma(D/2).
For a standard Gaussian z in R^N, ||z||^2 / 2 ~ Gamma(N/2) and z / ||z|| is uniform and independent of
||z||, so z gives both the direction and G_N; only G_D needs its own (seeded) Gamma draw. Unclipped, the
noise is n = sigma z sqrt(D / (2 G_D)): a multivariate Student-t with D degrees of freedom and scale sigma.
Hence E||n||^2 = sigma^2 N D / (D - 2) for D > 2.

In training B is clipped to [1e-3, 1 - 1e-3] (as in the official training code); for the prior it is not.
The clip is inactive unless N/(N + D) is near 1e-3 or 1 (for 16x16 digits, N = 256 and D = 128 give
B = 0.67 +- 0.03). For D = inf use ``GaussianNoise``.

``noise_from_config`` / ``to_config`` give the JSON form saved in a model's condiff.json.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from condiff.errors import ConfigError

TRAIN_CLIP = (1e-3, 1.0 - 1e-3)
MAX_D = 1e12


def _per_sample(sigma, n: int, dtype) -> torch.Tensor:
    """sigma as an (n,) tensor (a number or an (n,) tensor)."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if s.dim() == 0:
        s = s.expand(n)
    if s.shape != (n,):
        raise ConfigError(f"sigma must be a number or a tensor of shape ({n},), got shape {tuple(s.shape)}")
    return s.to(dtype)


def _broadcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (ndim - 1))


@dataclass(frozen=True)
class GaussianNoise:
    """N(0, sigma^2 I): diffusion / EDM noise, the D = inf member of PFGM++."""

    name = "gaussian"

    def unit(self, shape, generator=None, dtype=torch.float32) -> torch.Tensor:
        """The noise at sigma = 1 (exactly ``torch.randn(shape, generator=generator)`` in float32)."""
        return torch.randn(shape, generator=generator, dtype=dtype)

    def perturbation(self, shape, sigma, generator=None, dtype=torch.float32) -> torch.Tensor:
        """Training noise n with x = y + n at noise level sigma (a number or one per sample)."""
        return _broadcast(_per_sample(sigma, shape[0], dtype), len(shape)) * self.unit(shape, generator, dtype)

    def prior(self, shape, sigma_max, generator=None, dtype=torch.float32) -> torch.Tensor:
        """x_T = sigma_max * N(0, I) (the same draw as condiff.core.sampling.initial_noise)."""
        return float(sigma_max) * torch.randn(shape, generator=generator, dtype=dtype)

    def to_config(self) -> dict:
        return {"type": "gaussian"}


@dataclass(frozen=True)
class PFGMPPNoise:
    """The PFGM++ kernel with D augmented dimensions at r = sigma sqrt(D) (Xu et al. 2023, sec. 3-4)."""

    D: float = 128.0
    name = "pfgmpp"

    def __post_init__(self):
        d = self.D
        if not isinstance(d, numbers.Real) or isinstance(d, bool) or not math.isfinite(d) or not 0 < d <= MAX_D:
            raise ConfigError(
                f"PFGM++ D must be a finite number in (0, {MAX_D:g}] (use GaussianNoise() for D = inf), got {d!r}"
            )

    def _radius_ratio(self, z: torch.Tensor, generator, clip) -> torch.Tensor:
        """sqrt(D B / (1 - B)) / ||z|| per sample, with B = G_N / (G_N + G_D) and G_N = ||z||^2 / 2, so that
        ratio * z has norm r sqrt(B / (1 - B)) / sigma; B is clipped to ``clip`` when given."""
        n = z.shape[0]
        flat = z.reshape(n, -1).to(torch.float64)
        g_n = 0.5 * flat.square().sum(1)
        g_d = torch._standard_gamma(torch.full((n,), 0.5 * float(self.D), dtype=torch.float64), generator=generator)
        if clip is None:
            odds = g_n / g_d  # B / (1 - B), without the round-off of forming B first
        else:
            b = (g_n / (g_n + g_d)).clamp(*clip)
            odds = b / (1.0 - b)
        return torch.sqrt(float(self.D) * odds) / flat.norm(dim=1)

    def _draw(self, shape, scale, generator, dtype, clip) -> torch.Tensor:
        """scale * (kernel noise at sigma = 1); z is drawn in ``dtype`` first, as GaussianNoise draws it, so
        with the same generator state the two share z (PFGM++ only rescales each sample), then the radius
        is computed in float64."""
        z = torch.randn(shape, generator=generator, dtype=dtype)
        ratio = self._radius_ratio(z, generator, clip)
        return (_broadcast(scale * ratio, len(shape)) * z.to(torch.float64)).to(dtype)

    def unit(self, shape, generator=None, dtype=torch.float32, clip=TRAIN_CLIP) -> torch.Tensor:
        """The kernel's noise at sigma = 1 (r = sqrt(D)); B clipped as in training unless clip=None."""
        return self._draw(shape, 1.0, generator, dtype, clip)

    def perturbation(self, shape, sigma, generator=None, dtype=torch.float32) -> torch.Tensor:
        """Training noise n with x = y + n at noise level sigma: ||n|| = sigma sqrt(D) sqrt(B/(1-B)), B ~
        Beta(N/2, D/2) clipped to [1e-3, 1 - 1e-3], direction uniform."""
        return self._draw(shape, _per_sample(sigma, shape[0], torch.float64), generator, dtype, TRAIN_CLIP)

    def prior(self, shape, sigma_max, generator=None, dtype=torch.float32) -> torch.Tensor:
        """x_T drawn from the kernel around 0 at r_max = sigma_max sqrt(D) (B not clipped)."""
        return self._draw(shape, float(sigma_max), generator, dtype, None)

    def to_config(self) -> dict:
        return {"type": "pfgmpp", "D": self.D}


def noise_from_config(cfg: dict | None):
    """Inverse of ``to_config``; None (a model saved before noise was recorded) is Gaussian."""
    if cfg is None:
        return GaussianNoise()
    if not isinstance(cfg, dict) or cfg.get("type") not in ("gaussian", "pfgmpp"):
        raise ConfigError(f"noise must be {{'type': 'gaussian'}} or {{'type': 'pfgmpp', 'D': ...}}, got {cfg!r}")
    keys = {"gaussian": {"type"}, "pfgmpp": {"type", "D"}}[cfg["type"]]
    if set(cfg) != keys:
        raise ConfigError(f"noise of type {cfg['type']!r} takes exactly the keys {sorted(keys)}, got {sorted(cfg)}")
    return GaussianNoise() if cfg["type"] == "gaussian" else PFGMPPNoise(cfg["D"])


def noise_for_D(D) -> GaussianNoise | PFGMPPNoise:
    """The recipe option ``objective.pfgmpp_D``: 0 means Gaussian (D = inf), a number in (0, 1e12] PFGM++."""
    if isinstance(D, numbers.Real) and not isinstance(D, bool) and D == 0:
        return GaussianNoise()
    if isinstance(D, numbers.Real) and not isinstance(D, bool) and math.isinf(D) and D > 0:
        raise ConfigError(
            "objective.pfgmpp_D must be 0 for Gaussian noise (D = inf) or a finite number in "
            f"(0, {MAX_D:g}], got inf (write 0 for the D = inf member)"
        )
    try:
        return PFGMPPNoise(D)
    except ConfigError:
        raise ConfigError(
            f"objective.pfgmpp_D must be 0 (Gaussian noise, D = inf) or a finite number in (0, {MAX_D:g}], got {D!r}"
        ) from None
