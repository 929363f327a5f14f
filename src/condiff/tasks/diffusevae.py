"""DiffuseVAE (Pandey, Mukherjee, Rai, Kumar: "DiffuseVAE: Efficient, Controllable and High-Fidelity Generation
from Low-Dimensional Latents", TMLR 2022, arXiv:2201.00308): a VAE, then a DDPM conditioned on the VAE's
reconstruction. The generative model is p(x_0, x_hat, z) = p(z) p(x_hat | z) p_theta(x_0 | x_hat) (§3): z from the
prior N(0, I), x_hat = Dec(z) the VAE's reconstruction, then x_0 from the conditional DDPM that refines x_hat. The
low-dimensional z stays the handle: moving z moves the sample.

Stage 1, the VAE (Kingma & Welling 2014), trained on the negative ELBO with a KL weight beta (beta = 1 is the ELBO)
and a fixed-variance Gaussian decoder N(x; Dec(z), sigma^2 I):

    -ELBO(x) = E_q(z|x)[-log N(x; Dec(z), sigma^2 I)] + beta * KL(N(mu, diag e^logvar) || N(0, I)),
    -log N(x; m, sigma^2 I) = ||x - m||^2 / (2 sigma^2) + D/2 log(2 pi sigma^2),
    KL = 1/2 sum_j (mu_j^2 + e^logvar_j - 1 - logvar_j),

with z = mu + e^(logvar/2) eps (the reparameterisation) and one sample of z per image.

Stage 2, Formulation 1 of the paper (§3.2): the conditional DDPM sees the reconstruction as extra input channels,
eps_theta(cat[x_t, x_hat], t), trained with the DDPM loss (Ho et al. 2020, eq. 14)

    E_{x_0, z ~ q(z|x_0), t, eps} || eps - eps_theta(cat[sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, Dec(z)], t) ||^2

where x_hat = Dec(z) comes from the frozen stage-1 VAE with z drawn from q(z | x_0) (training) or from the prior
p(z) (generation): the generator-refiner split. A model family may train the same network in another
parameterisation of the same regression (condiff.models.diffusevae uses the v-prediction of the shapes UNet it starts
from, Salimans & Ho 2022, v = alpha_t eps - sigma_t x_0, so the widened start computes exactly the pretrained model).
The DDPM here is condiff's (any solver samples it; x_T is plain noise: Formulation 2's shifted forward process
x_t = sqrt(abar) x_0 + x_hat + sqrt(1 - abar) eps is not used).

Sampling z from p(z) = N(0, I) assumes the aggregate posterior q(z) = E_x q(z | x) fills the prior; where it is
clustered, Dec(z) of a prior draw is a condition the refiner never trained on. ``fit_latent_mixture`` is ex-post
density estimation (Ghosh et al., ICLR 2020): a Gaussian mixture fitted to the latents of training images, a prior
that follows q(z).
Model-agnostic: the encoder, decoder and denoiser are callables supplied by a model family
(``condiff.models.diffusevae`` for shapes); here are the losses, the conditioning, the two-stage sampler and the
measures of an interpolation path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from condiff.errors import ConfigError

LOG_2PI = math.log(2 * math.pi)


# stage 1: the VAE ---------------------------------------------------------------------------------------------
def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per row (summed over every dimension but the first), in nats."""
    per = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    return per.flatten(1).sum(1)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """-log N(x; mean, sigma^2 I) per row, in nats: ||x - mean||^2 / (2 sigma^2) + D/2 log(2 pi sigma^2)."""
    if not sigma > 0:
        raise ConfigError(f"the decoder's sigma must be > 0, got {sigma}")
    d = x[0].numel()
    sq = (x - mean).pow(2).flatten(1).sum(1)
    return sq / (2 * sigma**2) + 0.5 * d * (LOG_2PI + 2 * math.log(sigma))


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) from ``generator``."""
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
    return mu + (0.5 * logvar).exp() * eps


@dataclass(frozen=True)
class VAELoss:
    """Per-row pieces of the beta-weighted negative ELBO (nats): the Gaussian reconstruction NLL and the KL."""

    nll: torch.Tensor
    kl: torch.Tensor
    beta: float

    @property
    def loss(self) -> torch.Tensor:
        """The per-row objective nll + beta * kl (beta = 1: the negative ELBO)."""
        return self.nll + self.beta * self.kl

    @property
    def neg_elbo(self) -> torch.Tensor:
        return self.nll + self.kl


def vae_loss(
    encode: Callable,
    decode: Callable,
    x: torch.Tensor,
    sigma: float,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
) -> VAELoss:
    """The VAE's loss on x: ``encode(x) -> (mu, logvar)``, one reparameterised z, ``decode(z) -> mean of x``."""
    mu, logvar = encode(x)
    z = reparameterize(mu, logvar, generator)
    return VAELoss(gaussian_nll(x, decode(z), sigma), gaussian_kl(mu, logvar), beta)


# stage 2: the DDPM conditioned on the reconstruction (Formulation 1) ----------------------------------------------
def condition_input(x_t: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Formulation 1's network input cat[x_t, x_hat] along the channels; the shapes must agree but for channels."""
    if x_t.shape[0] != x_hat.shape[0] or x_t.shape[2:] != x_hat.shape[2:]:
        raise ConfigError(
            f"DiffuseVAE's condition must match x_t but for channels, got x_t {tuple(x_t.shape)} and x_hat "
            f"{tuple(x_hat.shape)}"
        )
    return torch.cat([x_t, x_hat.to(x_t.dtype)], 1)


@torch.no_grad()
def reconstruction(
    encode: Callable, decode: Callable, x: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """x_hat = Dec(z), z ~ q(z | x): the stage-2 training condition (no gradient into the frozen VAE)."""
    mu, logvar = encode(x)
    return decode(reparameterize(mu, logvar, generator))


@torch.no_grad()
def prior_latents(n: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n draws of z ~ p(z) = N(0, I_dim)."""
    return torch.randn((n, dim), generator=generator)


def fit_latent_mixture(z: torch.Tensor, components: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Ex-post density estimation (Ghosh, Sajjadi, Vergari, Black, Schölkopf: "From Variational to Deterministic
    Autoencoders", ICLR 2020, §4): a Gaussian mixture with full covariances fitted by EM (scikit-learn, seeded) to
    latents z (N, d) of training images, a prior q(z) = sum_k w_k N(z; m_k, L_k L_k^T) that follows the VAE's
    aggregate posterior where N(0, I) leaves holes between its clusters. Returns (w (K,), m (K, d), L (K, d, d)),
    float32, L the lower Cholesky factors of the covariances."""
    from sklearn.mixture import GaussianMixture

    if z.ndim != 2 or z.shape[0] < max(2, components):
        raise ConfigError(
            f"a {components}-component mixture needs (N >= {max(2, components)}, d) latents, got {tuple(z.shape)}"
        )
    gm = GaussianMixture(components, covariance_type="full", random_state=seed, max_iter=200, reg_covar=1e-5)
    gm.fit(z.detach().double().cpu().numpy())
    w = torch.from_numpy(gm.weights_).float()
    means = torch.from_numpy(gm.means_).float()
    tril = torch.linalg.cholesky(torch.from_numpy(gm.covariances_)).float()
    return w / w.sum(), means, tril


def product_mixture(blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """The mixture of independent blocks: given per block (weights (K_b,), means (K_b, d_b), scale_tril (K_b, d_b,
    d_b)), the mixture over the concatenated latent with one component per tuple of block components (K = prod K_b,
    the first block's index varying slowest): weight the product, mean the concatenation, scale_tril block-diagonal.
    A draw from it is a draw from each block's mixture, independently."""
    w, means, tril = blocks[0]
    for w2, m2, t2 in blocks[1:]:
        k1, k2 = len(w), len(w2)
        d1, d2 = means.shape[1], m2.shape[1]
        w = (w.view(-1, 1) * w2.view(1, -1)).reshape(-1)
        means = torch.cat([means.repeat_interleave(k2, 0), m2.repeat(k1, 1)], 1)
        t = torch.zeros(k1 * k2, d1 + d2, d1 + d2, dtype=tril.dtype)
        t[:, :d1, :d1] = tril.repeat_interleave(k2, 0)
        t[:, d1:, d1:] = t2.repeat(k1, 1, 1)
        tril = t
    return w, means, tril


@torch.no_grad()
def mixture_latents(
    n: int, weights: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor, generator=None
) -> torch.Tensor:
    """n draws of z ~ sum_k w_k N(m_k, L_k L_k^T): the components k ~ Categorical(w), then z = m_k + L_k eps with
    eps ~ N(0, I) (both from ``generator``, components first)."""
    k = torch.multinomial(weights.double(), n, replacement=True, generator=generator)
    eps = torch.randn((n, means.shape[1]), generator=generator, dtype=means.dtype)
    return means[k] + (scale_tril[k] @ eps.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class TwoStage:
    """A two-stage sample: the latents z, the VAE's x_hat = Dec(z) and the refined x_0, with the refiner's NFE."""

    z: torch.Tensor
    x_hat: torch.Tensor
    x: torch.Tensor
    nfe: int


@torch.no_grad()
def two_stage_sample(decode: Callable, refine: Callable, z: torch.Tensor) -> TwoStage:
    """The generator-refiner: x_hat = ``decode(z)``, then x_0 = ``refine(x_hat) -> (x_0, nfe)`` (the conditional
    DDPM's sampler, its noise fixed by the caller)."""
    x_hat = decode(z)
    x, nfe = refine(x_hat)
    return TwoStage(z, x_hat, x, nfe)


# interpolation ----------------------------------------------------------------------------------------------
def lerp_path(z_a: torch.Tensor, z_b: torch.Tensor, frames: int) -> torch.Tensor:
    """(frames, d) points (1 - s) z_a + s z_b at s = 0, 1/(frames-1), ..., 1: the ends are exactly z_a and z_b."""
    if frames < 2:
        raise ConfigError(f"an interpolation path needs at least 2 frames, got {frames}")
    s = torch.linspace(0, 1, frames, dtype=z_a.dtype).view(-1, 1)
    return torch.where(s == 1, z_b, (1 - s) * z_a + s * z_b)


def path_changes(labels: torch.Tensor) -> tuple[int, int]:
    """(changes, minimum) for one path's labels (frames, attributes): changes = the number of (frame, attribute)
    steps where the label differs from the previous frame; minimum = the number of attributes whose end labels
    differ (a path must change each of them at least once). changes == minimum: every attribute flips at most once,
    the smoothest a path of discrete attributes can be."""
    if labels.ndim != 2 or labels.shape[0] < 2:
        raise ConfigError(f"path_changes needs (frames >= 2, attributes) labels, got {tuple(labels.shape)}")
    changes = int((labels[1:] != labels[:-1]).sum())
    minimum = int((labels[0] != labels[-1]).sum())
    return changes, minimum


def path_reversals(labels: torch.Tensor) -> int:
    """The number of (frame, attribute) changes in one path's labels (frames, attributes) that return an attribute to
    a value it held earlier on the path and left (A -> B -> A): 0 for a monotone path, where every attribute passes
    through each of its values in one run. Unlike ``path_changes``' excess, passing through an intermediate value
    (top-left -> centre -> bottom-right) is not counted; going back is."""
    if labels.ndim != 2 or labels.shape[0] < 2:
        raise ConfigError(f"path_reversals needs (frames >= 2, attributes) labels, got {tuple(labels.shape)}")
    count = 0
    for column in labels.T.tolist():
        seen = [column[0]]
        for value in column[1:]:
            if value != seen[-1]:
                count += value in seen
                seen.append(value)
    return count


def smoothness(paths: list[torch.Tensor]) -> dict:
    """Over paths of labels: the mean changes per path, the mean minimum, the mean excess (changes - minimum), the
    share of paths that are minimal (excess 0), the mean reversals per path and the share of monotone paths
    (reversals 0)."""
    pairs = [path_changes(p) for p in paths]
    back = [path_reversals(p) for p in paths]
    if not pairs:
        raise ConfigError("smoothness needs at least one path")
    n = len(pairs)
    return {
        "paths": n,
        "changes": sum(c for c, _ in pairs) / n,
        "minimum": sum(m for _, m in pairs) / n,
        "excess": sum(c - m for c, m in pairs) / n,
        "minimal_share": sum(c == m for c, m in pairs) / n,
        "reversals": sum(back) / n,
        "monotone_share": sum(r == 0 for r in back) / n,
    }


def paired_smoothness(base_paths: list[torch.Tensor], other_paths: list[torch.Tensor]) -> dict:
    """Two readings of the same paths (labels (frames, attributes) each, as for ``smoothness``): ``base`` (the VAE's
    decodes) and ``other`` (the refined frames), compared path by path through ``path_reversals``. The mean paired
    difference other - base of reversals per path with its standard error (sample standard deviation / sqrt(n)); the
    discordant paths, monotone in one reading only; and McNemar's exact test of equal monotone shares (statsmodels: a
    two-sided binomial test on the discordant counts; p = 1 when there are none)."""
    from statsmodels.stats.contingency_tables import mcnemar

    n = len(base_paths)
    if n < 2 or len(other_paths) != n:
        raise ConfigError(
            f"paired_smoothness needs two equal lists of >= 2 paths, got {len(base_paths)} and {len(other_paths)}"
        )
    base = torch.tensor([path_reversals(p) for p in base_paths], dtype=torch.float64)
    other = torch.tensor([path_reversals(p) for p in other_paths], dtype=torch.float64)
    d = other - base
    mb, mo = base == 0, other == 0  # monotone in each reading
    table = [[int((mb & mo).sum()), int((mb & ~mo).sum())], [int((~mb & mo).sum()), int((~mb & ~mo).sum())]]
    only_base, only_other = table[0][1], table[1][0]
    p = float(mcnemar(table, exact=True).pvalue) if only_base + only_other else 1.0
    return {
        "paths": n,
        "reversals_difference": float(d.mean()),
        "reversals_difference_se": float(d.std() / math.sqrt(n)),
        "monotone_base_only": only_base,
        "monotone_other_only": only_other,
        "mcnemar_p": p,
    }


MEASURES = ("row", "column", "size", "red", "green", "blue")


def object_measures(images: torch.Tensor) -> torch.Tensor:
    """(B, 6) continuous measures of the object in each image (B, 3, H, W) in [-1, 1] on black, with no classifier.
    The intensity of a pixel is w = max over channels of (x + 1) / 2 clipped to [0, 1]; the object is its bright
    pixels, w > 1/2 (the labeller's rule), so a faint background texture does not pull the measures. Over them: the
    w-weighted centroid (row, column, in pixels, pixel centres at 0, 1, ...), the size (the mean of the height and
    width of their bounding box: a square, a circle and a triangle of one extent have one size) and the w-weighted
    mean colour (red, green, blue in [0, 1]). An image with no bright pixel gets size 0 and NaN for the rest."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ConfigError(f"object_measures needs (B, 3, H, W) images, got {tuple(images.shape)}")
    rgb = ((images.double() + 1) / 2).clamp(0, 1)
    w = rgb.amax(1)
    bright = w > 0.5
    w = torch.where(bright, w, torch.zeros_like(w))
    mass = w.flatten(1).sum(1)
    rows = torch.arange(images.shape[2], dtype=w.dtype).view(1, -1, 1)
    cols = torch.arange(images.shape[3], dtype=w.dtype).view(1, 1, -1)
    row = (w * rows).flatten(1).sum(1) / mass
    col = (w * cols).flatten(1).sum(1) / mass
    colour = (rgb * w.unsqueeze(1)).flatten(2).sum(2) / mass.unsqueeze(1)
    size = torch.zeros_like(mass)
    for i, b in enumerate(bright):
        if b.any():
            r, c = b.any(1).nonzero()[:, 0], b.any(0).nonzero()[:, 0]
            size[i] = (r[-1] - r[0] + 1 + c[-1] - c[0] + 1) / 2
    return torch.cat([torch.stack([row, col, size], 1), colour], 1)


def excess_variation(values: torch.Tensor) -> torch.Tensor:
    """(M,) for one path's measures (frames, M): the total variation sum_k |v_k+1 - v_k| minus the net change
    |v_last - v_first|. It is 0 exactly when the measure moves monotonically from its first to its last value, and
    it grows with every move back (a fade-out and fade-in of the object, a size that dips mid-path)."""
    if values.ndim != 2 or values.shape[0] < 2:
        raise ConfigError(f"excess_variation needs (frames >= 2, measures) values, got {tuple(values.shape)}")
    return (values[1:] - values[:-1]).abs().sum(0) - (values[-1] - values[0]).abs()
