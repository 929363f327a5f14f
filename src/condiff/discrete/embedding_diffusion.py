"""Continuous diffusion over word embeddings for sequence-to-sequence text (DiffuSeq / SeqDiffuSeq / DiffuSIA).

Tokens y (B, L) are embedded, z_0 = E(y) (B, L, D), and diffused with a condiff VP schedule,
z_t = alpha_t z_0 + sigma_t eps (Li et al. 2022, Diffusion-LM, Sec. 4.1: the embedding step q(z_0 | y) and
the Markov chain above it). The network predicts x0_hat(z_t, src, t) and reads out logits x0_hat E^T through
the tied embedding, which is how the sample is rounded back to words.

The loss (Gong et al., ICLR 2023, DiffuSeq, eq. 3 / Appendix; the same terms as Diffusion-LM's L_e2e_simple):

    L = E_t || x0_hat(z_t, src, t) - z_0 ||^2                      ``mse``: mean over tokens and coordinates
        - w_x0  log p(y | x0_hat)                                    ``round_x0``: CE of the logits of x0_hat
        - w_z0  log p(y | z_0)                                       ``round_z0``: DiffuSeq's L_round (decoder_nll)
        + || alpha_T z_0 ||^2                                        ``prior``: the t = T term (DiffuSeq's tT_loss)

The squared error is DiffuSeq's ``mean_flat``, i.e. ||.||^2 / D per token averaged over tokens. The rounding
terms keep the learned embeddings apart (without them z_0 = E(y) collapses, Diffusion-LM Sec. 4.1); the prior
term is the KL of q(z_T | z_0) to N(0, I) up to constants, ~1e-7 of the rest under the sqrt schedule (kept for
fidelity, off with ``prior=False``). Times are drawn uniformly on the schedule's noisy range.

The ``sqrt`` schedule is Diffusion-LM's (Sec. 4.2): alpha_bar(t) = 1 - sqrt(t / T + s), s = 1e-4, T = 2000 as in
DiffuSeq, built as a condiff ``VPDiscrete`` table (betas capped at 0.999 like their ``betas_for_alpha_bar``); it
adds noise fast near t = 0, where rounding embeddings is otherwise trivial. ``cosine`` is condiff's ``VPCosine``.

Sampling (``sample_embeddings``): z_T ~ N(0, I) (sigma(t_max) ~ 1), then a condiff solver (DDIM by default,
deterministic, Song et al. 2021) over a uniform grid of ``steps`` transitions, run by ``condiff.core.sampling``
with the network as an x0-predicting Denoiser. With ``clamp`` (default, DiffuSeq's ``denoised_fn_round``, from
Diffusion-LM Sec. 4.2 "clamping trick") x0_hat is replaced at every step by its nearest embedding row (L2), which
commits each position to a word. The tokens are the argmax of the network's last logits (the rounding step
-log p(y | x0_hat) was trained for), not a nearest-neighbour lookup of the final x.

The network is duck-typed (nets sit above this layer): ``embed(tokens)``, ``logits(x)``, ``embedding.weight``
(V, D) and ``net(z_t, t_unit, src, encoder_states=None)`` returning ``.x0`` and ``.logits``; ``encode(src)`` where
it can reuse encoder states across steps (a plain encoder-decoder, not DiffuSIA's spiral one, Tan et al. 2023).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from condiff.core.grids import UniformT, make_grid
from condiff.core.sampling import initial_noise, sample
from condiff.core.schedules import NoiseSchedule, VPCosine, VPDiscrete
from condiff.errors import ConfigError, one_of
from condiff.solvers.ddim import DDIM

SCHEDULES = ("sqrt", "cosine")


def sqrt_schedule(num_steps: int = 2000, s: float = 1e-4) -> VPDiscrete:
    """Diffusion-LM's sqrt schedule, alpha_bar(u) = 1 - sqrt(u + s) for u = t / T, as DiffuSeq builds it:
    beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), 0.999), alphas_cumprod = cumprod(1 - beta)."""
    f = lambda u: 1.0 - math.sqrt(u + s)  # noqa: E731
    betas = []
    for i in range(num_steps):
        a, b = f(i / num_steps), f((i + 1) / num_steps)
        betas.append(min(1.0 - b / a, 0.999) if b > 0 else 0.999)
    betas = torch.tensor(betas, dtype=torch.float64)
    return VPDiscrete(alphas_cumprod=torch.cumprod(1.0 - betas, 0))


def make_schedule(name: str, num_steps: int = 2000) -> NoiseSchedule:
    """``sqrt`` (DiffuSeq's, T = ``num_steps``) or ``cosine`` (condiff's VPCosine, continuous time)."""
    if name == "sqrt":
        return sqrt_schedule(num_steps)
    if name == "cosine":
        return VPCosine()
    raise one_of("embedding diffusion schedule", name, SCHEDULES)


def unit_time(schedule: NoiseSchedule, t) -> torch.Tensor:
    """The network's time input in (0, 1]: (t - t_clean) / (t_max - t_clean) as float32."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return ((t - schedule.t_clean) / (schedule.t_max - schedule.t_clean)).float()


def _coefficients(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor):
    a, s = schedule.alpha(t), schedule.sigma(t)
    shape = (-1,) + (1,) * (like.dim() - 1)
    return a.reshape(shape).to(like.dtype), s.reshape(shape).to(like.dtype)


def _check_tokens(tokens, what: str, vocab: int) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        got = f"shape {tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens)
        raise ConfigError(f"{what} must be a 2-D integer token tensor (B, L), got {got}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ConfigError(f"{what} ids must be in [0, {vocab - 1}], got {int(tokens.min())}..{int(tokens.max())}")


@dataclass(frozen=True)
class LossWeights:
    """The loss's optional terms: rounding through x0_hat and z_0, the t = T prior term, z_0's own noise
    (DiffuSeq's q(z_0 | y) = N(E(y), beta_0 I); 0: z_0 = E(y))."""

    round_x0: float = 1.0
    round_z0: float = 1.0
    prior: bool = True
    z0_std: float = 0.0


def embedding_diffusion_loss(
    net, schedule: NoiseSchedule, src: torch.Tensor, tgt: torch.Tensor, generator=None, weights=LossWeights()
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DiffuSeq loss of the module docstring for target tokens ``tgt`` (B, L) given ``src`` (B, Ls): the
    scalar loss (mean over the batch) and its terms as floats."""
    vocab = net.embedding.weight.shape[0]
    _check_tokens(src, "src", vocab)
    _check_tokens(tgt, "tgt", vocab)
    if src.shape[0] != tgt.shape[0]:
        raise ConfigError(f"src and tgt need one row each per pair, got {src.shape[0]} and {tgt.shape[0]} rows")
    b = tgt.shape[0]
    z0 = net.embed(tgt)
    if weights.z0_std > 0:
        z0 = z0 + weights.z0_std * torch.randn(z0.shape, generator=generator).to(z0)
    u = torch.rand(b, generator=generator, dtype=torch.float64)
    t = schedule.t_min + (schedule.t_max - schedule.t_min) * u
    a, s = _coefficients(schedule, t, z0)
    eps = torch.randn(z0.shape, generator=generator).to(z0)
    out = net(a * z0 + s * eps, unit_time(schedule, t).to(z0.device), src)
    mse = (out.x0 - z0).pow(2).mean()
    terms = {"mse": mse}
    loss = mse
    if weights.round_x0:
        terms["round_x0"] = F.cross_entropy(out.logits.flatten(0, 1), tgt.flatten())
        loss = loss + weights.round_x0 * terms["round_x0"]
    if weights.round_z0:
        terms["round_z0"] = F.cross_entropy(net.logits(z0).flatten(0, 1), tgt.flatten())
        loss = loss + weights.round_z0 * terms["round_z0"]
    if weights.prior:
        a_T = float(schedule.alpha(torch.tensor(schedule.t_max, dtype=torch.float64)))
        terms["prior"] = (a_T * z0).pow(2).mean()
        loss = loss + terms["prior"]
    return loss, {k: float(v.detach()) for k, v in terms.items()}


def nearest_embedding(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each vector of ``x`` (..., D) replaced by its nearest row of ``weight`` (V, D) in L2 (Diffusion-LM's
    clamping, DiffuSeq's ``denoised_fn_round``)."""
    w = weight.to(x.dtype)
    score = 2 * x @ w.t() - (w * w).sum(-1)  # -||x - w||^2 + ||x||^2
    return w[score.argmax(-1)]


@dataclass
class EmbeddingDenoiser:
    """The network as a condiff Denoiser (x0 prediction) for ``src`` (given in ``cond["src"]``): x0_hat of z_t at
    t, clamped to the nearest embeddings when ``clamp``; ``last_logits`` holds the latest unclamped logits."""

    net: object
    schedule: NoiseSchedule
    clamp: bool = True
    encoder_states: tuple | None = None
    last_logits: torch.Tensor | None = field(default=None, repr=False)

    def __call__(self, x, t, cond=None):
        src = (cond or {})["src"]
        tt = unit_time(self.schedule, t).to(x.device)
        if tt.dim() == 0:
            tt = tt.expand(x.shape[0])
        if self.encoder_states is not None:
            out = self.net(x, tt, src, encoder_states=self.encoder_states)
        else:
            out = self.net(x, tt, src)
        self.last_logits = out.logits
        return nearest_embedding(out.x0, self.net.embedding.weight) if self.clamp else out.x0


@dataclass(frozen=True)
class EmbeddingSample:
    tokens: torch.Tensor  # (B, L) argmax of the last logits
    x: torch.Tensor  # (B, L, D) the final sample (clamped embeddings when clamping)
    nfe: int


def sample_embeddings(
    net,
    schedule: NoiseSchedule,
    src: torch.Tensor,
    length: int,
    steps: int = 20,
    generator=None,
    clamp: bool = True,
    solver=None,
) -> EmbeddingSample:
    """Targets for ``src`` (B, Ls): z_T ~ N(0, I) of shape (B, ``length``, D), ``steps`` solver steps (DDIM by
    default) from t_max to the clean point with the x0-predicting ``EmbeddingDenoiser`` (clamping when
    ``clamp``), rounded by the argmax of the last logits. Deterministic given ``generator`` (DDIM draws only
    z_T). No gradients are turned off here: wrap it in ``torch.no_grad()``."""
    weight = net.embedding.weight
    _check_tokens(src, "src", weight.shape[0])
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    encoder_states = None
    if not getattr(getattr(net, "config", None), "spiral", True) and callable(getattr(net, "encode", None)):
        encoder_states = net.encode(src)  # the plain encoder does not see z_t: once per sample, not per step
    den = EmbeddingDenoiser(net, schedule, clamp, encoder_states)
    grid = make_grid(schedule, steps, UniformT(), t_start=schedule.t_max)
    x = initial_noise(schedule, schedule.t_max, (src.shape[0], length, weight.shape[1]), generator, weight.dtype)
    out = sample(den, solver or DDIM(), grid, x.to(weight.device), {"src": src})
    return EmbeddingSample(out.denoiser.last_logits.argmax(-1), out.x, out.nfe)
