"""The guidance cases of the contract suite (tests/guidance/test_guidance_contract.py), shared with the
compatibility matrix (scripts/compat_matrix.py, docs/guidance.md "What composes with what").

A case builds a fresh guided denoiser from a ``Kit``: what one model offers a guidance method (its denoiser,
its conditions, and the model-specific pieces a method needs: a classifier of its data, a loss, a measurement,
PAG layer names, LinearAG coefficients fitted on it). ``gmm_kit`` is the exact GMM oracle in R^2 (closed-form
classifier, exact clean logits); ``image_kit`` wraps any image-shaped denoiser (a condiff model, a diffusers
UNet or DiT) with fixed smooth stand-ins for the classifiers, so every case runs on every model.

To cover a new guidance, add a Case to CASES (the contract's test_every_exported_guidance_has_a_case fails
until then); combinations refused by design go to REFUSED with the phrase their ConfigError must contain.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

import condiff.guidance as G
from condiff.core.denoiser import X0, Eps, wrap
from condiff.core.grids import UniformLogSNR, make_grid
from condiff.core.sampling import Gaussian, initial_noise
from condiff.core.schedules import VPLinear
from condiff.data.gmm import GMM
from condiff.guidance.classifier import exact_gmm_classifier, from_logits
from condiff.interop.tiny import tiny_unet as tiny_cross_attention_unet
from condiff.solvers import get_solver

F64, F32 = torch.float64, torch.float32
SCH = VPLinear()
STEPS = 5
GRID = make_grid(SCH, STEPS, UniformLogSNR())


# ---- what a case gets from a model -------------------------------------------------------------------------


@dataclass(eq=False)
class Kit:
    """One model as the cases see it. ``cond(n, seed, extras)`` gives per-row conditions with 'null' (and
    'y' labels / a 'negative' condition when ``extras`` asks for them); ``t(f)`` is the fraction f of the
    schedule's t range (cases name times as fractions); ``drop`` is what ``ClassifierGuidance`` must drop so
    that the denoiser keeps its own condition (nothing when the classifier's label is the model's own)."""

    name: str
    den: Any
    shape: tuple  # one sample
    cond: Callable[[int, int, tuple], dict]
    grid: torch.Tensor  # EluCD's grid (the sampling grid of the suites)
    classifier: Callable[[], Callable]  # log p(y | x_t) for ClassifierGuidance
    clean_logits: Callable  # x0 -> logits (EluCD)
    level_logits: Callable  # (x, t) -> logits over 3 levels (minority guidance)
    experts: Callable[[], Any]  # PPAP's MultiExpert
    loss: Callable  # (x0, cond) -> one value per row (universal guidance)
    inpaint: tuple  # (mask, known)
    sr: tuple  # (operator, y)
    colorize: tuple  # (operator, y)
    pag_layers: dict  # 'down' / 'up' -> layer names of this network
    linear_ag: Callable[[str], Any]  # solver name -> LinearAGCoefficients fitted on this model
    drop: tuple = ("y",)
    t_scale: float = 1.0
    info: dict = field(default_factory=dict)

    def t(self, fraction: float) -> float:
        return fraction * self.t_scale


# ---- the exact GMM oracle ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _gmm():
    """The mixture of tests/conftest.py's ``gmm`` fixture (needed at collection time, hence not the fixture)."""
    return GMM.random(dim=2, components=4, num_classes=2, seed=0, spread=1.5, var_range=(0.1, 1.0))


def gmm_cond(n, seed, extras=()):
    """Labels per row, the null condition (label -1) and a negative condition (the other class)."""
    y = (torch.arange(n) + seed) % 2
    return {"y": y, "null": GMM.null_cond(n), "negative": {"y": 1 - y}}


def clean_logits(gmm):
    """Exact clean-classifier logits z_c(x0) = log sum_{k in c} pi_k N(x0; mu_k, Sigma_k) (for EluCD)."""

    def logits(x0):
        joint = torch.log(gmm.weights)[None] + gmm.component_log_prob(x0.to(F64), 1.0, 0.0)
        return torch.stack([torch.logsumexp(joint[:, gmm.classes == c], 1) for c in range(gmm.num_classes)], 1)

    return logits


def level_logits(x, t):
    """A fixed minority-level classifier for the contract: linear logits over 3 levels (t is ignored)."""
    return x @ torch.tensor([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0]], dtype=x.dtype)


class LinearExpert(nn.Module):
    """A fixed linear 2-class classifier (x, t) -> logits for the PPAP case; ``k`` makes each expert differ."""

    def __init__(self, k):
        super().__init__()
        self.register_buffer("w", torch.tensor([[1.0, -0.5], [0.3, 0.8]], dtype=F64) * (1.0 + 0.5 * k))

    def forward(self, x, t):
        return x @ self.w.to(x.dtype)


def ppap_experts():
    """Three experts routed over VPLinear's t range (PPAP's multi-expert classifier)."""
    return G.MultiExpert([LinearExpert(k) for k in range(3)], SCH.t_min, SCH.t_max)


MU = torch.tensor([[1.5, 0.5], [-1.0, -1.5]], dtype=F64)  # a target point per class for the universal losses


def target_loss(x0, cond):
    """||x0 - MU[y]||^2 per sample (one value per row, to minimise)."""
    return (x0 - MU[cond["y"]].to(x0.dtype)).square().sum(1)


@functools.lru_cache(maxsize=None)
def linear_ag_coefficients(solver: str):
    """LinearAG coefficients fitted (float64, scale 3) on 16 CFG trajectories of this solver on GRID."""
    gmm = _gmm()
    g = torch.Generator().manual_seed(77)
    x = initial_noise(SCH, float(GRID[0]), (16, 2), g, dtype=F64)
    return G.fit_linear_ag(
        gmm.denoiser(SCH),
        get_solver(solver),
        GRID,
        x,
        gmm_cond(16, 0),
        3.0,
        noise=Gaussian(torch.Generator().manual_seed(78)),
    )


@functools.lru_cache(maxsize=None)
def gmm_kit() -> Kit:
    """The exact GMM oracle on VPLinear (no network: PAG has no attention layers to perturb)."""
    den = _gmm().denoiser(SCH)
    return Kit(
        "gmm",
        den,
        (2,),
        gmm_cond,
        GRID,
        lambda: exact_gmm_classifier(den),
        clean_logits(_gmm()),
        level_logits,
        ppap_experts,
        target_loss,
        (torch.tensor([1, 0]), torch.tensor([0.0, 0.7])),
        (G.SuperResolution(2, dims=1), torch.tensor([0.3])),
        (G.Colorize((0.3, 0.7), channel_dim=-1), torch.tensor([-0.4])),
        {"down": "down", "up": "up"},
        linear_ag_coefficients,
        drop=(),
        t_scale=float(SCH.t_max),
    )


# ---- any image-shaped model --------------------------------------------------------------------------------


def halves(x, t=None):
    """A fixed smooth 2-class 'classifier' of images: logits = the means of the top and the bottom half."""
    h = x.shape[-2] // 2
    return torch.stack([x[..., :h, :].mean((1, 2, 3)), x[..., h:, :].mean((1, 2, 3))], 1)


def image_levels(x, t):
    """Logits over 3 minority levels from the image halves (t is ignored)."""
    z = halves(x)
    return torch.cat([z, -z.sum(1, keepdim=True)], 1)


class HalvesExpert(nn.Module):
    """``halves`` scaled per expert (a PPAP expert stand-in)."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x, t):
        return (1.0 + 0.5 * self.k) * halves(x)


def mean_square(x0, cond):
    return x0.square().flatten(1).mean(1)


def image_kit(name, den, shape, cond, grid, pag_layers, negative=None, dtype=F32, fit_rows=4, info=None) -> Kit:
    """A Kit over an image-shaped denoiser. ``cond(n, seed)`` gives the model's own conditions with 'null';
    ``negative(n, seed)`` the negative condition (without 'null'); LinearAG is fitted on ``fit_rows``
    trajectories of ``grid`` per solver, at cfg 3."""
    c, h, w = shape

    def full_cond(n, seed, extras=()):
        out = cond(n, seed)
        if "y" in extras:
            out["y"] = (torch.arange(n) + seed) % 2
        if "negative" in extras:
            out["negative"] = negative(n, seed)
        return out

    def experts():
        return G.MultiExpert([HalvesExpert(k) for k in range(3)], den.schedule.t_min, den.schedule.t_max)

    @functools.lru_cache(maxsize=None)
    def coefficients(solver):
        g = torch.Generator().manual_seed(77)
        x = initial_noise(den.schedule, float(grid[0]), (fit_rows, *shape), g, dtype=dtype)
        with torch.no_grad():
            return G.fit_linear_ag(
                den,
                get_solver(solver),
                grid,
                x,
                cond(fit_rows, 0),
                3.0,
                noise=Gaussian(torch.Generator().manual_seed(78)),
            )

    mask = torch.zeros(shape, dtype=dtype)
    mask[..., : w // 2] = 1.0
    return Kit(
        name,
        den,
        tuple(shape),
        full_cond,
        grid,
        lambda: from_logits(halves),
        lambda x0: halves(x0),
        image_levels,
        experts,
        mean_square,
        (mask, torch.zeros(shape, dtype=dtype)),
        (G.SuperResolution(2), torch.zeros(c, h // 2, w // 2, dtype=dtype)),
        (G.Colorize(tuple([1.0 / c] * c)), torch.zeros(1, h, w, dtype=dtype)),
        pag_layers,
        coefficients,
        drop=("y",),
        t_scale=float(den.schedule.t_max),
        info=dict(info or {}),
    )


CTX, LEN = 8, 3  # cross-attention width and token count of the contract's tiny UNet


@functools.lru_cache(maxsize=None)
def tiny_unet_denoiser(dtype):
    """A tiny random UNet2DConditionModel (two levels, self- and cross-attention in the lower one), eps
    prediction on VPLinear, t fed as 1000 t; weights perturbed so that every path matters."""
    unet = tiny_cross_attention_unet(in_channels=3, cross_attention_dim=CTX, seed=0, perturb=0.1)
    net = nn.ModuleDict({"unet": (unet.double() if dtype == F64 else unet).eval()})

    def call(net, x, t_in, cond):
        return net["unet"](x, t_in, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    return wrap(net, SCH, "eps", time_input=lambda t: 1000 * t, call=call)


@functools.lru_cache(maxsize=None)
def unet_kit(dtype) -> Kit:
    """The contract's tiny UNet on VPLinear (its PAG base), random text embeddings as the condition."""

    def cond(n, seed):
        g = torch.Generator().manual_seed(100 + seed)
        return {
            "encoder_hidden_states": torch.randn(n, LEN, CTX, generator=g, dtype=F64).to(dtype),
            "null": {"encoder_hidden_states": torch.zeros(n, LEN, CTX, dtype=dtype)},
        }

    return image_kit(
        "unet", tiny_unet_denoiser(dtype), (3, 8, 8), cond, GRID, {"down": "down", "up": "up"}, dtype=dtype
    )


# ---- the cases ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """``make(kit, solver_name)`` builds a fresh guided denoiser; ``covers`` the guidance classes it checks;
    ``extras`` the condition entries it reads beyond the model's own ('y', 'negative')."""

    name: str
    make: Callable[[Kit, str], Any]
    covers: tuple = ()
    base: str = "gmm"  # the contract suite's base: "gmm" or "unet" (PAG needs attention layers)
    solver_wrap: Callable | None = None  # wraps the solver (self-recurrence)
    extras: tuple = ()


def _stack(b, solver):  # CFG + AG + classifier guidance, nested
    return G.ClassifierGuidance(
        G.AdaptiveGuidance(b.den, 3.0, gamma_bar=0.98, space=X0()), b.classifier(), 1.5, drop=b.drop
    )


def _pag_ag(b):  # PAG's term over AG, x0_c read through a Tap (what --pag --ag builds)
    tap = G.Tap(b.den)
    return G.PAGTerm(
        G.AdaptiveGuidance(tap, 3.0, gamma_bar=0.98, space=X0()), b.den, 2.0, layers=b.pag_layers["down"], tap=tap
    )


def _linear_ag(b, solver):  # every fitted evaluation predicted: the history is used at every step
    coefficients = b.linear_ag(solver)
    return G.LinearAG(b.den, coefficients, steps=coefficients.steps)


CASES = [
    Case("cfg", lambda b, s: G.CFG(b.den, 3.0), (G.CFG,)),
    Case("cfg-linear-scale", lambda b, s: G.CFG(b.den, G.LinearScale(5.0, 1.0, b.t(1.0), b.t(0.0))), (G.LinearScale,)),
    Case(
        "cfg-cosine-scale",
        lambda b, s: G.CFG(b.den, G.CosineScale(1.0, 4.0, b.t(1.0), b.t(0.0), power=2.0)),
        (G.CosineScale,),
    ),
    Case("cfg-interval-scale", lambda b, s: G.CFG(b.den, G.IntervalScale(3.0, b.t(0.3), b.t(0.8))), (G.IntervalScale,)),
    Case("interval", lambda b, s: G.GuidanceInterval(b.den, 3.0, t_lo=b.t(0.3), t_hi=b.t(0.8)), (G.GuidanceInterval,)),
    Case("rescale-x0", lambda b, s: G.GuidanceRescale(b.den, 3.0, 0.7), (G.GuidanceRescale,)),
    Case(
        "rescale-eps",
        lambda b, s: G.GuidanceRescale(b.den, G.LinearScale(4.0, 1.0, b.t(1.0), b.t(0.0)), 0.5, space=Eps()),
    ),
    Case("negative", lambda b, s: G.NegativeGuidance(b.den, 3.0), (G.NegativeGuidance,), extras=("negative",)),
    Case("negation", lambda b, s: G.Negation(b.den, 3.0, 1.0), (G.Negation,), extras=("negative",)),
    Case("thresholding", lambda b, s: G.DynamicThresholding(G.CFG(b.den, 3.0), ratio=0.9), (G.DynamicThresholding,)),
    Case("ag-eps", lambda b, s: G.AdaptiveGuidance(b.den, 3.0), (G.AdaptiveGuidance,)),
    Case("ag-x0", lambda b, s: G.AdaptiveGuidance(b.den, 3.0, gamma_bar=0.98, space=X0())),
    Case("linear-ag", _linear_ag, (G.LinearAG,)),
    Case(
        "classifier",
        lambda b, s: G.ClassifierGuidance(b.den, b.classifier(), 2.0),
        (G.ClassifierGuidance,),
        extras=("y",),
    ),
    Case("elucd", lambda b, s: G.EluCD(b.den, b.clean_logits, b.grid, scale=0.5), (G.EluCD,), extras=("y",)),
    Case("minority", lambda b, s: G.MinorityGuidance(b.den, b.level_logits, 2.0, levels=3), (G.MinorityGuidance,)),
    Case("ppap", lambda b, s: G.ppap_guidance(b.den, b.experts(), 2.0), extras=("y",)),  # t-routed classifier
    Case("stack-ag-classifier", _stack, extras=("y",)),
    Case("inpaint", lambda b, s: G.inpaint(b.den, *b.inpaint), (G.Projection, G.Inpaint)),
    Case("super-resolution", lambda b, s: G.Projection(b.den, *b.sr), (G.SuperResolution,)),
    Case("colorize", lambda b, s: G.Projection(b.den, *b.colorize), (G.Colorize,)),
    Case(
        "universal-forward",
        lambda b, s: G.UniversalGuidance(b.den, [G.Forward(b.loss, 0.5)]),
        (G.UniversalGuidance, G.Forward),
    ),
    Case(
        "universal-both-recurrence",
        lambda b, s: G.UniversalGuidance(b.den, [G.Forward(b.loss, 0.3), G.Backward(b.loss, steps=2, lr=0.1)]),
        (G.Backward, G.SelfRecurrence),
        solver_wrap=lambda solver: G.SelfRecurrence(solver, k=2),
    ),
    Case("pag-cfg", lambda b, s: G.PAG(b.den, 2.0, layers=b.pag_layers["down"], cfg_scale=3.0), (G.PAG,), base="unet"),
    Case("pag", lambda b, s: G.PAG(b.den, 2.0, layers=b.pag_layers["up"], batched=False), base="unet"),
    Case("pag-term-ag", lambda b, s: _pag_ag(b), (G.PAGTerm, G.Tap), base="unet"),  # --pag with --ag
]
CASE = {c.name: c for c in CASES}

# Exported Denoiser -> Denoiser objects that are not guidance and need no case.
NOT_GUIDANCE = {"CountRows"}

# (case, solver) pairs refused by design, with the phrase their ConfigError must contain. EluCD's x0 shift is
# defined per step of its grid (V_k / c_k), so a solver that evaluates between grid times cannot be guided by it.
REFUSED = {("elucd", "dpmpp-2s"): "grid times", ("elucd", "edm-sde"): "grid times"}


def contract_kit(base: str, dtype) -> Kit:
    """The contract suite's base for a case: the GMM oracle or the tiny UNet."""
    return gmm_kit() if base == "gmm" else unet_kit(dtype)
