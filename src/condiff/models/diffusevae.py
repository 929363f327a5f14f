"""DiffuseVAE on shapes (``condiff.tasks.diffusevae``: Pandey et al., TMLR 2022, Formulation 1): a small conv VAE
(stage 1, recipe ``diffusevae-vae``) and a DDPM conditioned on its reconstruction by channel concatenation (stage 2,
recipe ``diffusevae``), fine-tuned from the bundled shapes UNet with its conv_in widened from 12 to 24 channels with
zero weights (``condiff.models.dense``'s start: the null caption's context, pixel unshuffling by 2), so the start
computes exactly what the pretrained unconditional-caption model did and learns to use x_hat from there.

A recipe (``family = "diffusevae"``) has [model] and [train] (condiff's ``TrainConfig``). ``model.kind`` 'vae': the VAE
with ``latent_dim``, ``width`` (the first conv's channels; 2x and 4x below), the decoder's ``sigma`` and the KL weight
``beta``, and ``decoder``: 'conv' (``ConvVAE``) or 'spatial' (``SpatialVAE``, a what/where VAE whose decoder places a
drawn ``patch``-pixel canvas with a spatial transformer; its where-latent is supervised by the renders' true centre and
size with weight ``where_weight``, and a shape head gives a discrete shape code); [train] takes no init_from.
``model.jitter`` (either kind) is the training renders' whole-pixel position jitter (the shapes world's is 1), and
``model.size_jitter`` draws their sizes uniformly between small and large; ``model.subpixel`` makes the jitter
continuous, so objects sit between pixels as they do along a latent path. ``model.kind`` 'ddpm': ``model.vae`` names
the trained VAE (a model folder or a run folder holding it as model/), [train] ``init_from`` the shapes model that
starts the UNet (default 'shapes'); the VAE keys belong to the VAE and are refused here. ``model.prior`` is the latent
prior samples draw z from: 'normal' (N(0, I), the paper's p(z)), 'gmm', a ``prior_components``-component Gaussian
mixture fitted at build time to posterior samples z ~ q(z | x) of PRIOR_FIT_N training renders, or 'factors', one such
mixture per block of the VAE's ``latent_blocks`` drawn independently (a SpatialVAE's what, where and shape code);
ex-post density estimation, Ghosh et al., ICLR 2020 (``condiff.tasks.diffusevae.fit_latent_mixture``). The refiner
trains on Dec(z) with z ~ q(z | x), so Dec(z) from N(0, I), which falls in the holes between the aggregate posterior's
clusters, is a condition it never saw; the mixture keeps z where it trained. ``model.z_condition`` adds the paper's
optional z-conditioning of the UNet (``LatentEmbedding``, zero at the start); ``model.cond_drop`` trains that share of
rows on the null condition (x_hat = 0, z = 0), so the refiner can be guided by its reconstruction
(``refine(guidance=w)``, classifier-free guidance; ``model.guidance`` the default weight); ``model.code_drop`` instead
zeroes only z's shape code in that share of rows, so the guidance contrasts the code with no code and, at w > 1,
keeps the drawn shape to the code where x_hat is ambiguous (an object between the two sizes, on a latent path).
``model.refiner`` names a trained refiner to go on from (its VAE, prior, UNet and z map) in place of ``model.vae`` and
``train.init_from``. Unknown keys and bad values are one-line ConfigErrors.

A saved model is ``vae/`` (and for 'ddpm' ``unet/``, ``extras/``, with a fitted prior ``prior/`` and with z-conditioning
``zembed/``: diffusers folders, safetensors) with ``condiff.json``'s "diffusevae" table; the DDPM's folder holds its
VAE, so it stands alone. Both train with condiff's Trainer (EMA, atomic checkpoints, exact resume); the VAE is frozen
while the DDPM trains.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from condiff.core.denoiser import V, wrap
from condiff.core.files import atomic_dir, atomic_write_json
from condiff.core.grids import make_grid
from condiff.core.sampling import sample
from condiff.core.schedules import schedule_from_config
from condiff.data import labeller, shapes
from condiff.errors import ConfigError, InputFileError, check_int, one_of
from condiff.guidance.cfg import CFG
from condiff.models.dense import (
    IMAGE_SHAPE,
    PIXEL_UNSHUFFLE,
    heldout_batch,
    load_networks,
    load_start,
    saved_table,
    shuffle,
    start_extras,
    table_of,
    unshuffle,
)
from condiff.models.family import TaskModel, load_pretrained
from condiff.solvers import DPMSolverPP2M
from condiff.tasks.diffusevae import (
    VAELoss,
    condition_input,
    fit_latent_mixture,
    lerp_path,
    mixture_latents,
    prior_latents,
    product_mixture,
    reparameterize,
    two_stage_sample,
    vae_loss,
)
from condiff.tasks.lotus import widen_unet
from condiff.training.objectives import UniformTime, diffusion_loss
from condiff.training.recipe import (
    ObjectiveConfig,
    TaskRecipeDict,
    TrainConfig,
    check_keys,
    check_name,
    check_objective_train,
    typed_table,
)
from condiff.training.trainer import Trainer

FAMILY = "diffusevae"
KINDS = ("vae", "ddpm")
VAE_KEYS = ("latent_dim", "width", "sigma", "beta", "decoder", "patch", "where_weight", "size_in_decoder")
PRIORS = ("normal", "gmm", "factors")
MAX_COMPONENTS = 256
PRIOR_FIT_N = 5000  # training renders whose posterior samples z ~ q(z | x) the mixture prior is fitted to
PRIOR_SEED_OFFSET = 2**40 + 7  # their generator: train.seed + this (apart from the training batches' seeds)
DEFAULT_STEPS = 20  # the refiner's DPM-Solver++(2M) steps
MAX_LATENT = 512
MAX_WIDTH = 256
MAX_JITTER = 8  # whole pixels (the cells' centres are 9 px apart)


# the VAE network ----------------------------------------------------------------------------------------------
def conv_encoder(w: int) -> nn.Sequential:
    """Three stride-2 convs (w, 2 w, 4 w channels; 32 -> 4 pixels) with SiLU, flattened to 4 w * 16 features."""
    act = nn.SiLU
    return nn.Sequential(
        nn.Conv2d(3, w, 4, 2, 1), act(),
        nn.Conv2d(w, 2 * w, 4, 2, 1), act(),
        nn.Conv2d(2 * w, 4 * w, 4, 2, 1), act(),
        nn.Flatten(),
    )  # fmt: skip


def deconv_decoder(w: int) -> nn.Sequential:
    """The mirror of ``conv_encoder``: SiLU, three stride-2 transposed convs (4 w -> 2 w -> w -> 3 channels, x8)."""
    act = nn.SiLU
    return nn.Sequential(
        act(),
        nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), act(),
        nn.ConvTranspose2d(2 * w, w, 4, 2, 1), act(),
        nn.ConvTranspose2d(w, 3, 4, 2, 1),
    )  # fmt: skip


class ConvVAE(ModelMixin, ConfigMixin):
    """A conv VAE for (3, 32, 32) images in [-1, 1]: three stride-2 convs (width, 2 width, 4 width; 32 -> 4) and a
    linear layer to (mu, logvar); the decoder mirrors it with transposed convs and ends in tanh."""

    @register_to_config
    def __init__(self, latent_dim: int = 16, width: int = 32):
        super().__init__()
        w = width
        self.encoder = conv_encoder(w)
        self.to_stats = nn.Linear(4 * w * 16, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, 4 * w * 16)
        self.decoder = deconv_decoder(w)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z | x), each (B, latent_dim); logvar clamped to [-30, 20] against overflow."""
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, 1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's mean Dec(z), (B, 3, 32, 32) in [-1, 1]."""
        h = self.from_latent(z).view(z.shape[0], -1, 4, 4)
        return torch.tanh(self.decoder(h))

    @property
    def latent_size(self) -> int:
        """The length of a full latent z (what ``decode`` takes): latent_dim."""
        return self.config.latent_dim

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic latent mu(x) of each image."""
        return self.encode(x)[0]

    def posterior_sample(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        """z ~ q(z | x), one draw per image."""
        return reparameterize(*self.encode(x), generator)

    @property
    def latent_blocks(self) -> list[tuple[slice, int]]:
        """The latent's independent blocks for a factorised prior, (slice, components or 0 for the default): one."""
        return [(slice(0, self.config.latent_dim), 0)]

    def prior_sample(self, n: int, generator=None) -> torch.Tensor:
        """n draws of z ~ N(0, I)."""
        return prior_latents(n, self.config.latent_dim, generator)

    def path(self, z_a: torch.Tensor, z_b: torch.Tensor, frames: int) -> torch.Tensor:
        """The straight line from z_a to z_b, ``frames`` points."""
        return lerp_path(z_a, z_b, frames)

    def loss(self, batch, sigma: float, beta: float, generator=None) -> tuple[VAELoss, torch.Tensor]:
        """Per image of a ``ShapesBatch``: the beta-weighted negative ELBO, and no supervision (zeros)."""
        parts = vae_loss(self.encode, self.decode, batch.images, sigma, beta, generator)
        return parts, torch.zeros_like(parts.nll)


POSITION_SCALE = 0.6  # a where-latent unit moves the object this far in normalised image units (2 = the image)
SIZE_SCALE = 0.3  # and scales it by exp(this)


def place_patch(patch: torch.Tensor, centre: torch.Tensor, width: torch.Tensor, size: int) -> torch.Tensor:
    """Patches (B, C, p, p) drawn into (B, C, size, size) canvases of zeros with their centres at ``centre`` (B, 2:
    row, column) and their side ``width`` (B,), both in normalised image units ([-1, 1] spans the canvas), by
    bilinear sampling (a spatial transformer, Jaderberg et al. 2015). At width 2 p / size and a centre on the pixel
    grid the patch is pasted exactly."""
    b = patch.shape[0]
    k = 2 / width
    theta = torch.zeros(b, 2, 3, dtype=patch.dtype)
    theta[:, 0, 0] = k
    theta[:, 1, 1] = k
    theta[:, 0, 2] = -k * centre[:, 1]
    theta[:, 1, 2] = -k * centre[:, 0]
    grid = torch.nn.functional.affine_grid(theta, (b, patch.shape[1], size, size), align_corners=False)
    return torch.nn.functional.grid_sample(patch, grid, align_corners=False, padding_mode="zeros")


def where_of(centres: torch.Tensor, sizes: torch.Tensor, extents: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3) the where-latent that places a shapes object with centre ``centres`` (B, 2: row, column in pixel-corner
    units, as ``ShapesBatch.centres``) and size index ``sizes`` (B,), or half extent ``extents`` (B,) in pixels where
    given: the centre in latent units and the log size relative to a large object."""
    half = shapes.SIZE / 2
    pos = (centres.float() / half - 1) / POSITION_SCALE
    table = torch.tensor(shapes.HALF_EXTENT)
    extent = table[sizes] if extents is None else extents.float()
    return torch.cat([pos, (torch.log(extent / table[-1]) / SIZE_SCALE).unsqueeze(1)], 1)


class SpatialVAE(ModelMixin, ConfigMixin):
    """A what/where VAE for shapes (Eslami et al. 2016, AIR; Bepler et al. 2019, spatial-VAE). The Gaussian latent
    (latent_dim) is (what: latent_dim - 3 dims, where: row, column, log size); a discrete shape code (one-hot over
    ``codes`` shapes) completes it. The decoder draws a ``patch``-pixel canvas from (what, code) and places it with
    ``place_patch``, so a straight line in the where-latent moves and scales the object continuously. With
    ``size_in_decoder`` the log size is the decoder's input instead and the canvas is only moved: a scaled canvas is
    resampled without antialiasing, which blurs small objects. The encoder shares ConvVAE's conv stack, with an MLP
    head for the shape's logits. ``where_weight`` weighs the where-latent's supervision in ``loss``."""

    @register_to_config
    def __init__(
        self,
        latent_dim: int = 11,
        width: int = 32,
        patch: int = 16,
        codes: int = 3,
        size_in_decoder: bool = False,
        where_weight: float = 1.0,
    ):
        super().__init__()
        w, q = width, patch // 8
        self.encoder = conv_encoder(w)
        self.to_stats = nn.Linear(4 * w * 16, 2 * latent_dim)
        self.head = nn.Sequential(nn.Linear(4 * w * 16, 128), nn.SiLU(), nn.Linear(128, codes))
        self.from_latent = nn.Linear(latent_dim - 3 + codes + int(size_in_decoder), 4 * w * q * q)
        self.decoder = deconv_decoder(w)

    @property
    def latent_size(self) -> int:
        """The length of a full latent z: the Gaussian dims, then the shape code."""
        return self.config.latent_dim + self.config.codes

    def encode_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mu, logvar) of the Gaussian latent, each (B, latent_dim), and the shape logits (B, codes)."""
        h = self.encoder(x)
        mu, logvar = self.to_stats(h).chunk(2, 1)
        return mu, logvar.clamp(-30.0, 20.0), self.head(h)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar, _ = self.encode_all(x)
        return mu, logvar

    def code(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(logits.argmax(1), self.config.codes).to(logits.dtype)

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        mu, _, logits = self.encode_all(x)
        return torch.cat([mu, self.code(logits)], 1)

    def posterior_sample(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        mu, logvar, logits = self.encode_all(x)
        return torch.cat([reparameterize(mu, logvar, generator), self.code(logits)], 1)

    @property
    def latent_blocks(self) -> list[tuple[slice, int]]:
        """What, where and the shape code (one component per code): the shapes world draws an object's shape, its
        colour and its place independently."""
        d, c = self.config.latent_dim, self.config.codes
        return [(slice(0, d - 3), 0), (slice(d - 3, d), 0), (slice(d, d + c), c)]

    def prior_sample(self, n: int, generator=None) -> torch.Tensor:
        """z ~ N(0, I) and a uniformly random shape code (the shapes world draws shapes uniformly)."""
        z = prior_latents(n, self.config.latent_dim, generator)
        k = torch.randint(self.config.codes, (n,), generator=generator)
        return torch.cat([z, torch.nn.functional.one_hot(k, self.config.codes).to(z.dtype)], 1)

    def path(self, z_a: torch.Tensor, z_b: torch.Tensor, frames: int) -> torch.Tensor:
        """A straight line in the Gaussian latent; the discrete code is z_a's for s < 1/2 and z_b's from s = 1/2 on
        (the nearest end: a code has no points between two shapes)."""
        z = lerp_path(z_a, z_b, frames)
        d = self.config.latent_dim
        s = torch.linspace(0, 1, frames, dtype=z.dtype).view(-1, 1)
        z[:, d:] = torch.where(s < 0.5, z_a[d:], z_b[d:])
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        d = self.config.latent_dim
        what, where, code = z[:, : d - 3], z[:, d - 3 : d], z[:, d:]
        q = self.config.patch // 8
        width = torch.full((z.shape[0],), 2 * self.config.patch / shapes.SIZE, dtype=z.dtype)
        if self.config.size_in_decoder:  # the decoder draws the size; the canvas is only moved
            h = self.from_latent(torch.cat([what, code, where[:, 2:]], 1))
        else:  # the canvas is scaled
            h = self.from_latent(torch.cat([what, code], 1))
            width = width * torch.exp(SIZE_SCALE * where[:, 2])
        patch = torch.sigmoid(self.decoder(h.view(z.shape[0], -1, q, q)))
        placed = place_patch(patch, POSITION_SCALE * where[:, :2], width, shapes.SIZE)
        return placed * 2 - 1

    def loss(self, batch, sigma: float, beta: float, generator=None) -> tuple[VAELoss, torch.Tensor]:
        """Per image of a ``ShapesBatch``: the beta-weighted negative ELBO with the decoder given the true shape's
        code, and the supervision, ``where_weight`` * |mu_where - where_of(centres, sizes)|^2 * (pixel dims) plus
        the shape head's cross-entropy * (pixel dims): the where-latent and the code learn the renders' truth."""
        x, attrs = batch.images, batch.attrs
        mu, logvar, logits = self.encode_all(x)
        code = torch.nn.functional.one_hot(attrs[:, 0], self.config.codes).to(x.dtype)
        parts = vae_loss(lambda _: (mu, logvar), lambda z: self.decode(torch.cat([z, code], 1)), x, sigma, beta,
                         generator)  # fmt: skip
        dims = x[0].numel()
        d = self.config.latent_dim
        where = (mu[:, d - 3 :] - where_of(batch.centres, attrs[:, 2], batch.extents)).pow(2).sum(1)
        ce = torch.nn.functional.cross_entropy(logits, attrs[:, 0], reduction="none")
        return parts, dims * (self.config.where_weight * where + ce)


VAES = {"conv": ConvVAE, "spatial": SpatialVAE}


class LatentMixture(ModelMixin, ConfigMixin):
    """A Gaussian-mixture prior over the VAE's latent (``condiff.tasks.diffusevae.fit_latent_mixture``): weights
    (K,), means (K, d) and the covariances' lower Cholesky factors (K, d, d), frozen parameters."""

    @register_to_config
    def __init__(self, latent_dim: int = 16, components: int = 1):
        super().__init__()
        k, d = components, latent_dim
        self.weights = nn.Parameter(torch.full((k,), 1.0 / k), requires_grad=False)
        self.means = nn.Parameter(torch.zeros(k, d), requires_grad=False)
        self.scale_tril = nn.Parameter(torch.eye(d).repeat(k, 1, 1), requires_grad=False)

    def sample(self, n: int, generator=None) -> torch.Tensor:
        return mixture_latents(n, self.weights, self.means, self.scale_tril, generator)


@torch.no_grad()
def fit_prior(vae, components: int, seed: int, factors: bool = False) -> LatentMixture:
    """The mixture prior fitted to posterior samples z ~ q(z | x) of PRIOR_FIT_N training renders (seed + offset):
    one mixture of ``components`` over the whole latent, or with ``factors`` one per block of ``vae.latent_blocks``
    (``components`` each; a block of ``codes`` one-hot dimensions gets one component per code), independent, as
    their ``product_mixture``."""
    g = torch.Generator().manual_seed(seed + PRIOR_SEED_OFFSET)
    x = shapes.sample_batch(PRIOR_FIT_N, g).images
    z = torch.cat([vae.posterior_sample(x[i : i + 500], g) for i in range(0, len(x), 500)])
    if factors:
        blocks = [fit_latent_mixture(z[:, b], k or components, seed) for b, k in vae.latent_blocks]
        w, means, tril = product_mixture(blocks)
    else:
        w, means, tril = fit_latent_mixture(z, components, seed)
    prior = LatentMixture(z.shape[1], len(w))
    for p, v in zip((prior.weights, prior.means, prior.scale_tril), (w, means, tril)):
        p.copy_(v)
    return prior.eval().requires_grad_(False)


# recipes ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffuseVAENetConfig:
    kind: str = "vae"  # vae: stage 1 | ddpm: stage 2, the DDPM conditioned on the VAE's reconstruction
    latent_dim: int = 16
    width: int = 32
    sigma: float = 0.5  # the decoder's fixed standard deviation (images in [-1, 1])
    beta: float = 1.0  # the KL weight (1: the ELBO)
    decoder: str = "conv"  # the VAE's kind: conv (ConvVAE) | spatial (SpatialVAE, what/where with a shape code)
    patch: int = 16  # decoder spatial: the drawn canvas's side (a multiple of 8)
    where_weight: float = 1.0  # decoder spatial: the weight of the where-latent's supervision
    size_in_decoder: bool = False  # decoder spatial: the decoder draws the size (else the canvas is scaled)
    jitter: int = shapes.JITTER  # the training renders' position jitter in pixels (whole unless subpixel), both kinds
    size_jitter: bool = False  # the training renders' sizes: uniform between small and large (else the two sizes)
    subpixel: bool = False  # the training renders' position jitter: continuous (else whole pixels)
    vae: str = ""  # kind ddpm: the trained VAE (a model folder or a run folder holding model/)
    prior: str = "normal"  # kind ddpm: N(0, I), a mixture fitted ex post ("gmm"), or one per latent block ("factors")
    prior_components: int = 10  # prior "gmm": the mixture's components; "factors": each block's
    z_condition: bool = False  # kind ddpm: the UNet also sees z (a zero-initialised projection added to its embedding)
    cond_drop: float = 0.0  # kind ddpm: the share of training rows whose condition is the null one (x_hat = 0, z = 0)
    code_drop: float = 0.0  # kind ddpm with z_condition: the share of rows whose z has its shape code zeroed
    guidance: float = 1.0  # kind ddpm: the refiner's default guidance weight (1: none; else cond_drop or code_drop > 0)
    refiner: str = ""  # kind ddpm: a trained refiner to go on from (its VAE, prior, UNet, z map), not model.vae


@dataclass(frozen=True)
class DiffuseVAERecipe(TaskRecipeDict):
    name: str
    family: str = FAMILY
    model: DiffuseVAENetConfig = field(default_factory=DiffuseVAENetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # unused: the Trainer's field


def diffusevae_recipe_from_dict(data: dict) -> DiffuseVAERecipe:
    """A recipe from its TOML table; unknown keys and bad values are one-line ConfigErrors naming them."""
    check_keys(data, {"name", "family", "model", "train"}, what=f"{FAMILY} recipe")
    if data["family"] != FAMILY:
        raise one_of(f"{FAMILY} recipe family", data["family"], [FAMILY])
    model = typed_table(DiffuseVAENetConfig, data.get("model", {}), "model")
    if model.kind not in KINDS:
        raise one_of("model.kind", model.kind, KINDS)
    check_int("model.jitter", model.jitter, 0, MAX_JITTER)
    train = data.get("train", {})
    if model.kind == "ddpm" and isinstance(train, dict):
        train = {"init_from": "shapes", **train}
    r = DiffuseVAERecipe(data["name"], data["family"], model, typed_table(TrainConfig, train, "train"))
    check_name(r.name)
    check_objective_train(ObjectiveConfig(), r.train)
    m = r.model
    if m.kind == "vae":
        check_int("model.latent_dim", m.latent_dim, 1, MAX_LATENT)
        check_int("model.width", m.width, 1, MAX_WIDTH)
        if not (m.sigma > 0 and m.sigma < float("inf")):
            raise ConfigError(f"model.sigma must be a positive finite number, got {m.sigma}")
        if not (m.beta >= 0 and m.beta < float("inf")):
            raise ConfigError(f"model.beta must be a finite number >= 0, got {m.beta}")
        if m.decoder not in VAES:
            raise one_of("model.decoder", m.decoder, VAES)
        if m.decoder == "spatial":
            check_int("model.latent_dim", m.latent_dim, 4, MAX_LATENT)
            check_int("model.patch", m.patch, 8, shapes.SIZE)
            if m.patch % 8:
                raise ConfigError(f"model.patch must be a multiple of 8, got {m.patch}")
            if not (m.where_weight >= 0 and m.where_weight < float("inf")):
                raise ConfigError(f"model.where_weight must be a finite number >= 0, got {m.where_weight}")
        else:
            for key, default in (("patch", 16), ("where_weight", 1.0), ("size_in_decoder", False)):
                if getattr(m, key) != default:
                    raise ConfigError(
                        f"model.{key} belongs to decoder 'spatial'; decoder 'conv' takes none, got {getattr(m, key)!r}"
                    )
        for key, default in (
            ("prior", "normal"),
            ("prior_components", 10),
            ("z_condition", False),
            ("cond_drop", 0.0),
            ("code_drop", 0.0),
            ("guidance", 1.0),
            ("refiner", ""),
        ):
            if getattr(m, key) != default:
                raise ConfigError(
                    f"model.{key} belongs to a kind 'ddpm' recipe (the refiner's folder holds it); kind 'vae' takes "
                    f"none, got {getattr(m, key)!r}"
                )
        if m.vae:
            raise ConfigError(f"model.vae names the VAE of a kind 'ddpm' recipe; kind 'vae' takes none, got {m.vae!r}")
        if r.train.init_from:
            raise ConfigError(
                f"train.init_from starts a kind 'ddpm' recipe's UNet; kind 'vae' takes none, got {r.train.init_from!r}"
            )
    else:
        given = [k for k in VAE_KEYS if k in data.get("model", {})]
        if given:
            raise ConfigError(
                f"model.{given[0]} belongs to the VAE's recipe (kind 'vae'); a kind 'ddpm' recipe reads it from "
                f"model.vae"
            )
        if m.prior not in PRIORS:
            raise one_of("model.prior", m.prior, PRIORS)
        check_cond_drop(m.cond_drop, "model.cond_drop")
        check_cond_drop(m.code_drop, "model.code_drop")
        if m.cond_drop and m.code_drop:
            raise ConfigError(
                f"model.cond_drop ({m.cond_drop}) and model.code_drop ({m.code_drop}) pick the guidance's null "
                "condition; give one of them"
            )
        try:
            check_guidance(m.guidance, guided_share(dataclasses.asdict(m)))
        except ConfigError as e:
            raise ConfigError(f"model.guidance: {e}") from None
        check_int("model.prior_components", m.prior_components, 1, MAX_COMPONENTS)
        if m.refiner.strip():
            given = [f"model.{k}" for k in (*REFINER_KEYS, "vae") if k in data.get("model", {})]
            if "init_from" in data.get("train", {}):
                given.append("train.init_from")
            if given:
                raise ConfigError(
                    f"{given[0]} comes from model.refiner {m.refiner!r} (the refiner this recipe goes on from); "
                    "give one or the other"
                )
            return r
        if m.code_drop and not m.z_condition:
            raise ConfigError(
                f"model.code_drop ({m.code_drop}) drops the shape code of z, which only a refiner with "
                "model.z_condition = true sees"
            )
        if not m.vae.strip():
            raise ConfigError(
                "model.vae must name the trained VAE (a model folder or run folder, e.g. 'runs/diffusevae-vae'), got ''"
            )
        if not r.train.init_from.strip():
            raise ConfigError(
                "train.init_from must name the shapes model that starts the UNet (the bundled 'shapes' or a "
                "shapes model folder), got ''"
            )
    return r


# the model ----------------------------------------------------------------------------------------------------
class LatentEmbedding(ModelMixin, ConfigMixin):
    """The UNet's view of z (DiffuseVAE's optional z-conditioning): a linear map from the full latent (a SpatialVAE's
    with its shape code) to the pooled embedding the UNet adds to its time embedding, zero at the start, so the
    widened start still computes the pretrained model."""

    @register_to_config
    def __init__(self, latent_size: int = 16, dim: int = 64):
        super().__init__()
        self.proj = nn.Linear(latent_size, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z)


def null_condition(cond: dict) -> dict:
    """The null condition of classifier-free guidance on the reconstruction (DiffuseVAE's guidance weight
    contrasts cond = x_hat against cond = 0): every tensor of ``cond`` (x_hat and, if given, z) zeroed."""
    return {k: torch.zeros_like(v) for k, v in cond.items()}


def without_code(z: torch.Tensor, latent_dim: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """z (B, latent_dim + codes) with the shape code (the entries after the Gaussian latent) zeroed: in every row, or
    where ``keep`` (B,) is 0 (a row of 1 keeps its code)."""
    code = torch.zeros_like(z[:, latent_dim:]) if keep is None else z[:, latent_dim:] * keep.view(-1, 1)
    return torch.cat([z[:, :latent_dim], code], 1)


def code_null_condition(cond: dict, latent_dim: int) -> dict:
    """The null condition of guidance on the shape code alone (a refiner trained with model.code_drop): x_hat and
    the Gaussian part of z kept, z's shape code zeroed, so w > 1 strengthens what the code says about the shape."""
    return {**cond, "z": without_code(cond["z"], latent_dim)}


def check_guidance(w, cond_drop: float) -> float:
    """A guidance weight: a finite number; w != 1 needs a refiner trained on a null condition (``cond_drop``: the
    share ``guided_share`` gives, > 0)."""
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not abs(w) < float("inf"):
        raise ConfigError(f"the guidance weight must be a finite number (1: no guidance), got {w!r}")
    if w != 1.0 and not cond_drop:
        raise ConfigError(
            f"guidance {w} needs a refiner trained with model.cond_drop > 0 or model.code_drop > 0 (it never saw a "
            "null condition); this one has neither, so only guidance 1 is accepted"
        )
    return float(w)


REFINER_KEYS = ("prior", "prior_components", "z_condition", "jitter", "size_jitter", "subpixel")  # model.refiner's


def guided_share(cfg: dict) -> float:
    """The share of training rows a refiner saw on a null condition (model.cond_drop or model.code_drop): 0 means
    it cannot be guided."""
    return cfg.get("cond_drop", 0.0) or cfg.get("code_drop", 0.0)


def check_cond_drop(v, what: str = "cond_drop") -> float:
    """The share of training rows on the null condition: a number in [0, 1)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise ConfigError(f"{what} must be a number in [0, 1), got {v!r}")
    return float(v)


def ddpm_forward(module: nn.ModuleDict, x_t, x_hat, t_in, z: torch.Tensor | None = None) -> torch.Tensor:
    """Formulation 1: UNet(unshuffle(cat[x_t, x_hat]), t, null context, null pooled) shuffled back (x_t's 3
    channels first, so the widened conv_in's first 12 inputs are the pretrained model's). A module with a
    "zembed" part (``LatentEmbedding``) also adds its map of ``z`` to the pooled vector; it needs z."""
    n = x_t.shape[0]
    hidden, pooled = module["extras"].conditioning(n)
    if "zembed" in module:
        if z is None:
            raise ConfigError("this DiffuseVAE is conditioned on z as well as x_hat; pass the latents z")
        pooled = pooled + module["zembed"](z.to(pooled.dtype))
    h = condition_input(unshuffle(x_t), unshuffle(x_hat))
    return shuffle(module["unet"](h, t_in, encoder_hidden_states=hidden, class_labels=pooled).sample)


@dataclass
class DiffuseVAEModel(TaskModel):
    """A saved or trained DiffuseVAEModel: module {"vae"} or {"vae", "unet", "extras"}; config {"kind", "latent_dim",
    "width", "sigma", "beta"} (+ "schedule", "pixel_unshuffle", ...)."""

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def latent_dim(self) -> int:
        return self.config["latent_dim"]

    @property
    def vae(self):
        """The VAE: a ConvVAE or a SpatialVAE (``VAES``)."""
        return self.module["vae"]

    @property
    def prior(self) -> str:
        """'gmm' (the folder's fitted mixture) or 'normal' (N(0, I); a VAE, or a DiffuseVAE saved without one)."""
        return self.config.get("prior", "normal")

    def latents(self, n: int, generator: torch.Generator, prior: str | None = None) -> torch.Tensor:
        """n latents from ``prior`` (default: the model's own; 'normal' is N(0, I) for any model)."""
        prior = self.prior if prior is None else prior
        if prior not in PRIORS:
            raise one_of("prior", prior, PRIORS)
        if prior != "normal":
            if prior != self.prior:
                raise ConfigError(
                    f"this model has no fitted latent prior {prior!r}; it samples prior 'normal'"
                    + (f" or {self.prior!r}" if self.prior != "normal" else "")
                )
            return self.module["prior"].sample(n, generator)
        return self.vae.prior_sample(n, generator)

    def null_of(self, cond: dict) -> dict:
        """The null condition of this refiner's guidance: z's shape code zeroed (trained with model.code_drop), else
        x_hat = 0 and z = 0 (model.cond_drop)."""
        if self.config.get("code_drop", 0.0):
            if "z" not in cond:
                raise ConfigError("this refiner is guided on the shape code of z; pass the latents z")
            return code_null_condition(cond, self.latent_dim)
        return null_condition(cond)

    @property
    def guidance(self) -> float:
        """The refiner's default guidance weight (1: none; the recipe's ``model.guidance``)."""
        return self.config.get("guidance", 1.0)

    @property
    def schedule(self):
        return schedule_from_config(self.config["schedule"])

    @property
    def denoiser(self):
        """v of the image given x_t, t and cond {'x_hat'} (and 'z' for a z-conditioned model; the bundled shapes
        model's v-prediction)."""
        return wrap(
            self.module,
            self.schedule,
            V(),
            call=lambda net, x, t_in, cond: ddpm_forward(net, x, cond["x_hat"], t_in, cond.get("z")),
            channels=IMAGE_SHAPE[0],
        )

    @torch.no_grad()
    def encode_mean(self, images: torch.Tensor) -> torch.Tensor:
        """The posterior means mu(x) (the deterministic latent of an image; with a SpatialVAE, and its shape code)."""
        return self.vae.encode_mean(images)

    @torch.no_grad()
    def refine(
        self,
        x_hat: torch.Tensor,
        noise: torch.Tensor,
        steps: int = DEFAULT_STEPS,
        z: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> tuple[torch.Tensor, int]:
        """x_0 from the conditional DDPM given x_hat (and its latents z, which a z-conditioned model needs), started
        from ``noise`` (unit Gaussian, x_hat's shape), with ``steps`` DPM-Solver++(2M) steps; (x_0 clipped to
        [-1, 1], network evaluations). ``guidance`` w contrasts the condition with the null one the refiner trained
        on (``null_of``) by classifier-free guidance, x0_null + w (x0_cond - x0_null); w = 1 is the refiner alone,
        and w != 1 needs a refiner trained with ``cond_drop`` or ``code_drop`` > 0."""
        if self.kind != "ddpm":
            raise ConfigError("this is a VAE (stage 1); refining needs a DiffuseVAE model (kind 'ddpm')")
        check_guidance(guidance, guided_share(self.config))
        grid = make_grid(self.schedule, steps)
        sig = float(self.schedule.sigma(torch.tensor(float(grid[0]), dtype=torch.float64)))
        cond = {"x_hat": x_hat} if z is None else {"x_hat": x_hat, "z": z}
        den = self.denoiser
        if guidance != 1.0:
            den = CFG(den, guidance, null=self.null_of(cond))
        res = sample(den, DPMSolverPP2M(), grid, sig * noise, cond)
        return res.x.clamp(-1, 1), res.nfe

    @torch.no_grad()
    def generate(
        self,
        z: torch.Tensor,
        seed: int,
        steps: int = DEFAULT_STEPS,
        batch: int = 256,
        refine: bool = True,
        guidance: float = 1.0,
    ):
        """The two-stage sample of latents z: (x_hat, x_0 or None for a VAE or ``refine`` False, nfe). The refiner's
        noise is drawn for all rows from ``seed`` before batching, so each row's noise does not depend on ``batch``;
        ``guidance`` as in ``refine``."""
        noise = torch.randn((z.shape[0], *IMAGE_SHAPE), generator=torch.Generator().manual_seed(seed))
        xh, xs, nfe = [], [], 0
        for i in range(0, z.shape[0], batch):
            if self.kind == "vae" or not refine:
                xh.append(self.vae.decode(z[i : i + batch]).clamp(-1, 1))
                continue
            zb = z[i : i + batch]
            out = two_stage_sample(
                self.vae.decode, lambda x_hat: self.refine(x_hat, noise[i : i + batch], steps, zb, guidance), zb
            )
            xh.append(out.x_hat)
            xs.append(out.x)
            nfe = out.nfe
        return torch.cat(xh), (torch.cat(xs) if xs else None), nfe

    @torch.no_grad()
    def sample(
        self, n: int, seed: int = 0, steps: int = DEFAULT_STEPS, refine: bool = True, prior=None, guidance: float = 1.0
    ):
        """n samples from z ~ the model's prior (or ``prior``: 'normal' N(0, I), 'gmm' the fitted mixture) (seed),
        then Dec(z) and (a DiffuseVAE, ``refine``) the refiner (noise from seed + 1, ``guidance`` as in ``refine``):
        (x_hat, x_0 or None, nfe)."""
        z = self.latents(n, torch.Generator().manual_seed(seed), prior)
        return self.generate(z, seed + 1, steps, refine=refine, guidance=guidance)

    @torch.no_grad()
    def interpolate(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        frames: int,
        seed: int = 0,
        steps: int = DEFAULT_STEPS,
        refine=True,
        guidance: float = 1.0,
    ):
        """Paths between the latent means of image pairs a[i], b[i] ((P, 3, 32, 32) each): (x_hat, x_0 or None,
        nfe), each (P * frames, 3, 32, 32) row by row. Every frame of a row shares one refiner noise (from seed + i),
        so what changes along a row comes from z alone; ``guidance`` as in ``refine``."""
        za, zb = self.encode_mean(a), self.encode_mean(b)
        z = torch.cat([self.vae.path(za[i], zb[i], frames) for i in range(a.shape[0])])
        if self.kind == "vae" or not refine:
            return self.vae.decode(z).clamp(-1, 1), None, 0
        x_hat = self.vae.decode(z)
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(a))]
        rows = [torch.randn((1, *IMAGE_SHAPE), generator=g) for g in gens]
        noise = torch.cat([r.expand(frames, -1, -1, -1) for r in rows])
        x, nfe = self.refine(x_hat, noise, steps, z, guidance)
        return x_hat, x, nfe

    def save(self, directory, extra: dict | None = None):
        with atomic_dir(Path(directory)) as tmp:
            for name, part in self.module.items():
                part.save_pretrained(tmp / name)
            atomic_write_json(tmp / "condiff.json", {FAMILY: self.config, **(extra or {})})


def vae_config(r: DiffuseVAERecipe) -> dict:
    m = r.model
    cfg = {"kind": "vae", "latent_dim": m.latent_dim, "width": m.width, "sigma": m.sigma, "beta": m.beta}
    if m.decoder == "spatial":  # a conv VAE's table stays as it was
        cfg.update(decoder=m.decoder, patch=m.patch, where_weight=m.where_weight, size_in_decoder=m.size_in_decoder)
    return {**cfg, **renders_config(m)}


def renders_config(m: DiffuseVAENetConfig) -> dict:
    """The training renders' keys of a model's table, written only where they differ from the shapes world's."""
    cfg = {"jitter": m.jitter} if m.jitter != shapes.JITTER else {}
    flags = {"size_jitter": m.size_jitter, "subpixel": m.subpixel}
    return {**cfg, **{k: True for k, on in flags.items() if on}}


def build_diffusevae_model(r: DiffuseVAERecipe) -> DiffuseVAEModel:
    if r.model.kind == "vae":
        m = r.model
        if m.decoder == "spatial":
            vae = SpatialVAE(
                m.latent_dim, m.width, m.patch, size_in_decoder=m.size_in_decoder, where_weight=m.where_weight
            )
        else:
            vae = ConvVAE(m.latent_dim, m.width)
        return DiffuseVAEModel(nn.ModuleDict({"vae": vae}), vae_config(r))
    if r.model.refiner.strip():
        return continued_refiner(r)
    folder = find_model(Path(r.model.vae), "model.vae")
    stage1 = load_diffusevae_model(folder, "model.vae")
    if stage1.kind != "vae":
        raise ConfigError(f"model.vae {r.model.vae!r} is a DiffuseVAE (kind 'ddpm'); it must be a VAE (kind 'vae')")
    start = load_start(r.train.init_from)
    unet = widen_unet(start.unet, 2 * start.unet.config.in_channels)
    extras = start_extras(start, 0)
    vae = stage1.vae
    vae.requires_grad_(False)
    cfg = {
        **{k: stage1.config[k] for k in VAE_KEYS if k in stage1.config},
        "kind": "ddpm",
        "schedule": start.schedule_cfg,
        "pixel_unshuffle": start.pixel_unshuffle,
        "init_from": r.train.init_from,
        "vae_from": str(r.model.vae),
        "prior": r.model.prior,
    }
    parts = {"vae": vae, "unet": unet, "extras": extras}
    if r.model.prior != "normal":
        parts["prior"] = fit_prior(vae, r.model.prior_components, r.train.seed, factors=r.model.prior == "factors")
        cfg["prior_components"] = r.model.prior_components
        cfg["prior_mixture_components"] = parts["prior"].config.components
    cfg.update(renders_config(r.model))
    if r.model.z_condition:
        parts["zembed"] = LatentEmbedding(vae.latent_size, extras.config.dim)
        cfg["z_condition"] = True
    if r.model.code_drop and not isinstance(vae, SpatialVAE):
        raise ConfigError(f"model.code_drop drops z's shape code; model.vae {r.model.vae!r} is a VAE without one")
    return DiffuseVAEModel(nn.ModuleDict(parts), {**cfg, **guidance_config(r.model)})


def guidance_config(m: DiffuseVAENetConfig) -> dict:
    """The guidance keys of a refiner's table: the null share it trains on and its default weight, if any."""
    for key in ("cond_drop", "code_drop"):
        if getattr(m, key):
            return {key: getattr(m, key), "guidance": m.guidance}
    return {}


def continued_refiner(r: DiffuseVAERecipe) -> DiffuseVAEModel:
    """The refiner model.refiner names, to train on: its VAE and prior frozen, its UNet, extras and z map trainable;
    its table with this recipe's guidance keys in place of its own."""
    base = load_diffusevae_model(find_model(Path(r.model.refiner), "model.refiner"), "model.refiner")
    if base.kind != "ddpm":
        raise ConfigError(
            f"model.refiner {r.model.refiner!r} is a VAE (kind 'vae'); it must be a refiner (kind 'ddpm')"
        )
    if r.model.code_drop and not (base.config.get("z_condition") and isinstance(base.vae, SpatialVAE)):
        raise ConfigError(
            f"model.code_drop drops z's shape code; model.refiner {r.model.refiner!r} does not see one "
            "(it needs z_condition and a spatial VAE)"
        )
    for name in ("unet", "extras", "zembed"):
        if name in base.module:
            base.module[name].train().requires_grad_(True)
    cfg = {k: v for k, v in base.config.items() if k not in ("cond_drop", "code_drop", "guidance")}
    cfg["refiner_from"] = r.model.refiner
    return DiffuseVAEModel(base.module, {**cfg, **guidance_config(r.model)})


# loading ------------------------------------------------------------------------------------------------------
ACCEPTED = (
    "a DiffuseVAE model folder (condiff.json with a 'diffusevae' table) or a run folder holding one as model/, "
    "written by `condiff train diffusevae-vae` or `condiff train diffusevae`"
)


def find_model(path: Path, option: str = "--model") -> Path:
    """The model folder ``path`` names (itself or its model/); a missing path, a file or a folder without a
    'diffusevae' table is one InputFileError naming what is accepted. Pickled files are refused first."""
    from condiff.core.files import refuse_pickles

    if not str(path) or not path.exists():
        raise InputFileError(f"{option} {str(path)!r} does not exist; accepted: {ACCEPTED}")
    if not path.is_dir():
        raise InputFileError(f"{option} {str(path)!r} is not a folder; accepted: {ACCEPTED}")
    refuse_pickles(path, option)
    for folder in (path, path / "model"):
        if table_of(folder, FAMILY) is not None:
            return folder
    raise InputFileError(f"{option} {str(path)!r} holds no DiffuseVAE model; accepted: {ACCEPTED}")


_VAE_TYPES = {"kind": str, "latent_dim": int, "width": int, "sigma": float, "beta": float}
_DDPM_TYPES = {**_VAE_TYPES, "schedule": dict, "pixel_unshuffle": int}


def load_diffusevae_model(directory, what: str = "--model") -> DiffuseVAEModel:
    """A saved VAE or DiffuseVAE (frozen, eval mode) from its model folder or a run folder holding it as model/
    (``find_model``); pickled weights are refused (``load_pretrained``), and so is a condiff.json whose "diffusevae"
    table lacks a key, has one of the wrong type or names another kind."""
    from condiff.models.base import silence_diffusers

    silence_diffusers()
    directory = find_model(Path(directory), what)  # a missing path or a run folder: one line, or its model/
    table = table_of(directory, FAMILY)
    kind = table.get("kind") if isinstance(table, dict) else None
    if kind not in KINDS:
        raise InputFileError(
            f"{what} {str(directory)!r}: condiff.json's {FAMILY!r} table needs kind one of {', '.join(KINDS)}"
        )
    if kind == "vae":
        from condiff.core.files import load_json

        info = load_json(directory / "condiff.json")
        cfg = info[FAMILY]
        bad = [k for k, t in _VAE_TYPES.items() if not isinstance(cfg.get(k), t) or isinstance(cfg.get(k), bool)]
        if bad:
            raise InputFileError(
                f"{what} {str(directory)!r}: condiff.json's {FAMILY!r} table needs {', '.join(_VAE_TYPES)}; "
                f"{bad[0]!r} is missing or wrong"
            )
        module = nn.ModuleDict({})
    else:
        info, cfg = saved_table(directory, FAMILY, _DDPM_TYPES, what)
        if cfg["pixel_unshuffle"] != PIXEL_UNSHUFFLE:
            raise InputFileError(f"{what} {str(directory)!r}: pixel_unshuffle must be {PIXEL_UNSHUFFLE}")
        module = load_networks(directory, what)
        unet = module["unet"].config
        if unet.in_channels != 24 or unet.out_channels != 12:
            raise InputFileError(
                f"{what} {str(directory)!r}: the UNet does not have a DiffuseVAE's channels (24 in, 12 out)"
            )
    decoder = cfg.get("decoder", "conv")
    if decoder not in VAES:
        raise InputFileError(f"{what} {str(directory)!r}: condiff.json's decoder must be one of {', '.join(VAES)}")
    vae = load_pretrained(VAES[decoder], directory / "vae", what)
    if vae.config.latent_dim != cfg["latent_dim"] or vae.config.width != cfg["width"]:
        raise InputFileError(f"{what} {str(directory)!r}: the VAE's latent_dim or width differs from condiff.json's")
    vae.eval().requires_grad_(False)
    module["vae"] = vae
    prior = cfg.get("prior", "normal")
    if kind == "ddpm" and prior not in PRIORS:
        raise InputFileError(f"{what} {str(directory)!r}: condiff.json's prior must be one of {', '.join(PRIORS)}")
    if kind == "ddpm" and prior != "normal":
        mix = load_pretrained(LatentMixture, directory / "prior", what)
        want = cfg.get("prior_components") if prior == "gmm" else cfg.get("prior_mixture_components")
        if mix.config.latent_dim != vae.latent_size or mix.config.components != want:
            raise InputFileError(
                f"{what} {str(directory)!r}: the prior's latent_dim or components differ from condiff.json's"
            )
        module["prior"] = mix.eval().requires_grad_(False)
    if kind == "ddpm":
        try:
            check_cond_drop(cfg.get("cond_drop", 0.0))
            check_cond_drop(cfg.get("code_drop", 0.0), "code_drop")
            check_guidance(cfg.get("guidance", 1.0), guided_share(cfg))
            if cfg.get("code_drop", 0.0) and (
                cfg.get("cond_drop", 0.0) or cfg.get("z_condition") is not True or cfg.get("decoder") != "spatial"
            ):
                raise ConfigError("code_drop needs z_condition true, decoder 'spatial' and no cond_drop")
        except ConfigError as e:
            raise InputFileError(f"{what} {str(directory)!r}: condiff.json's guidance or cond_drop: {e}") from None
    if kind == "ddpm" and cfg.get("z_condition", False) is not False:
        if cfg["z_condition"] is not True:
            raise InputFileError(f"{what} {str(directory)!r}: condiff.json's z_condition must be true or false")
        emb = load_pretrained(LatentEmbedding, directory / "zembed", what)
        if emb.config.latent_size != vae.latent_size:
            raise InputFileError(f"{what} {str(directory)!r}: the z embedding's latent_size differs from the VAE's")
        module["zembed"] = emb.eval().requires_grad_(False)
    return DiffuseVAEModel(module, cfg, directory, info)


# training and evaluation --------------------------------------------------------------------------------------
def training_batch(
    n: int, jitter: int, generator, size_jitter: bool = False, subpixel: bool = False
) -> shapes.ShapesBatch:
    """n training renders with whole-pixel position jitter up to ``jitter`` (shapes.JITTER: ``shapes.sample_batch``).
    With ``size_jitter`` each object's half extent is uniform between the small and the large one (the size index
    then names the nearer of the two), so a refiner trained on them has seen the sizes a latent path passes. With
    ``subpixel`` the jitter is continuous, so it has seen the positions between pixels that a path passes."""
    attrs = shapes.random_attrs(n, generator)
    if not size_jitter:
        return shapes.render_batch(attrs, generator, jitter=jitter, subpixel=subpixel)
    lo, hi = shapes.HALF_EXTENT
    extents = lo + (hi - lo) * torch.rand(n, generator=generator)
    attrs[:, 2] = (extents >= (lo + hi) / 2).long()
    return shapes.render_batch(attrs, generator, jitter=jitter, extents=extents, subpixel=subpixel)


def diffusevae_loss_fn(model: DiffuseVAEModel, r: DiffuseVAERecipe):
    """The Trainer's loss on a fresh batch of renders per step (the step's generator). VAE: the beta-weighted
    negative ELBO per pixel dimension (nats / 3072), with the NLL and KL per image as metrics. DDPM: the MSE of the
    start's v-prediction at uniform t (v = alpha eps - sigma x_0: the DDPM loss of Ho et al. reparameterised, as the
    bundled shapes model was trained), the condition x_hat = Dec(z), z ~ q(z | x_0) from the frozen VAE."""
    dims = float(torch.tensor(IMAGE_SHAPE).prod())

    def fn(step, g):
        c = model.config
        batch = training_batch(
            r.train.batch_size, c.get("jitter", shapes.JITTER), g, c.get("size_jitter", False), c.get("subpixel", False)
        )
        x = batch.images
        vae = model.module["vae"]
        if model.kind == "vae":
            parts, extra = vae.loss(batch, model.config["sigma"], model.config["beta"], g)
            metrics = {"nll": float(parts.nll.detach().mean()), "kl": float(parts.kl.detach().mean())}
            return (parts.loss + extra).mean() / dims, metrics
        with torch.no_grad():
            z = vae.posterior_sample(x, g)
            x_hat = vae.decode(z)
            if c.get("cond_drop", 0.0):  # the null condition for classifier-free guidance
                keep = (torch.rand(x.shape[0], generator=g) >= c["cond_drop"]).to(x.dtype)
                x_hat, z = x_hat * keep.view(-1, 1, 1, 1), z * keep.view(-1, 1)
            if c.get("code_drop", 0.0):  # the null condition of guidance on the shape code
                keep = (torch.rand(x.shape[0], generator=g) >= c["code_drop"]).to(x.dtype)
                z = without_code(z, c["latent_dim"], keep)
        t = UniformTime().sample(model.schedule, x.shape[0], g)
        eps = torch.randn(x.shape, generator=g)
        call = lambda x_t, t_in, c: ddpm_forward(model.module, x_t, c["x_hat"], t_in.to(x_t.dtype), c["z"])  # noqa: E731
        return diffusion_loss(call, x, {"x_hat": x_hat, "z": z}, t, eps, model.schedule, V()).mean(), {}

    return fn


@torch.no_grad()
def evaluate_vae(model: DiffuseVAEModel, n: int, seed: int = 0) -> dict:
    """On n held-out renders: the reconstruction RMSE (posterior means) and the labeller's accuracy on the
    reconstructions; on n prior samples, the share the labeller reads as an object."""
    b = heldout_batch(n, seed)
    rec = model.vae.decode(model.encode_mean(b.images)).clamp(-1, 1)
    acc = labeller.accuracy(labeller.label(rec), b.attrs)
    x_hat, _, _ = model.generate(model.vae.prior_sample(n, torch.Generator().manual_seed(seed)), seed)
    return {
        "recon_rmse": float((rec - b.images).pow(2).mean().sqrt()),
        "recon_accuracy": acc["all"],
        "prior_object_share": float((labeller.label(x_hat)[:, 0] >= 0).float().mean()),
    }


def _eval_fn(r: DiffuseVAERecipe):
    def run(model: DiffuseVAEModel, ema_module):
        if model.kind != "vae":
            return {}
        return evaluate_vae(dataclasses.replace(model, module=ema_module), r.train.eval_n)

    return run


def make_diffusevae_trainer(r: DiffuseVAERecipe, out_dir, progress: bool = True) -> Trainer:
    """The Trainer for ``r`` (train.threads threads): the VAE from scratch, or the DDPM from train.init_from with
    the frozen VAE of model.vae; the VAE's held-out scores every train.eval_every steps."""
    torch.set_num_threads(r.train.threads)
    torch.manual_seed(r.train.seed)
    model = build_diffusevae_model(r)
    return Trainer(
        model, r, Path(out_dir), progress=progress, evaluate=_eval_fn(r), loss_fn=diffusevae_loss_fn(model, r)
    )
