"""Every condiff solver and every guidance method runs on real diffusers pipelines (issue 6, acceptance 2): the
tiny Stable Diffusion pipeline (text cross-attention UNet) and the tiny DiT pipeline (class-conditional
transformer with learned sigma), both loaded through ``condiff.interop.load_pipeline``.

Each run (4 steps, 2 samples, 16x16 images) must give latents of the right shape that are finite, and be
batch independent: sample 1 of the batch equals the same start and condition run alone (with the same noise
rows), to float32 round-off. Guidance runs use DPM-Solver++(2M) (self-recurrence wraps it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch import nn

import condiff.guidance as G
from condiff.core.denoiser import X0
from condiff.core.grids import UniformT, make_grid
from condiff.core.sampling import sample
from condiff.guidance.classifier import from_logits
from condiff.interop import initial_latents
from condiff.solvers import SOLVERS, get_solver
from noisekit import SlicedNoise

STEPS, N, SIZE = 4, 2, 16
TOL = 1e-4  # sample 1 alone vs in the batch: max |diff| <= TOL * max(1, max |x|) (float32 kernels per batch size)
PAG_LAYERS = {"sd": "mid", "dit": "transformer.transformer_blocks.1"}
LATENT = (4, 8, 8)


def _grid(p, solver):
    return make_grid(p.schedule, STEPS, solver.default_spacing or UniformT())


def _cond(p, kind, extras):
    cond = p.condition(["red cat", "blue dog"] if kind == "sd" else ["circle", "square"])
    if "negative" in extras:
        neg = p.condition(["photo"] * 2 if kind == "sd" else ["star"] * 2)
        cond["negative"] = {k: v for k, v in neg.items() if k != "null"}
    if "y" in extras:
        cond["y"] = torch.tensor([0, 1])
    return cond


def _run(p, guided, solver, cond, seed=0):
    """(batch of N, sample 1 alone), the same start rows and noise rows."""
    grid = _grid(p, solver)
    x = initial_latents(p, N, SIZE, SIZE, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    draws = [torch.randn(x.shape, generator=g) for _ in range(4 * STEPS + 2)]

    def take(c, rows):
        if isinstance(c, dict):
            return {k: take(v, rows) for k, v in c.items()}
        return c[rows] if isinstance(c, torch.Tensor) and c.dim() > 0 else c

    with torch.no_grad():
        full = sample(guided, solver, grid, x, cond, SlicedNoise(draws, slice(None))).x
        one = sample(guided, solver, grid, x[1:], take(cond, slice(1, 2)), SlicedNoise(draws, slice(1, 2))).x
    return full, one


def _check(full, one):
    assert full.shape == (N, *LATENT) and full.dtype == torch.float32
    assert bool(torch.isfinite(full).all())
    assert float((full[1:] - one).abs().max()) <= TOL * max(1.0, float(full.abs().max()))


@pytest.mark.parametrize("kind", ["sd", "dit"])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_runs_with_cfg(request, kind, name):
    """Every solver of the SOLVERS registry samples both pipelines with CFG 3 (shape, finite, batch independent)."""
    p = request.getfixturevalue(kind)
    full, one = _run(p, G.CFG(p.denoiser, 3.0), get_solver(name), _cond(p, kind, ()))
    _check(full, one)


def _latent_classifier(x, t):
    """A fixed smooth 2-class 'classifier' on latents: logits from the mean of two channel groups."""
    return torch.stack([x[:, :2].mean((1, 2, 3)), x[:, 2:].mean((1, 2, 3))], 1)


def _universal_loss(x0, cond):
    return x0.square().flatten(1).mean(1)


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Any, str, Any], Any]  # (denoiser, pipeline kind, pipeline) -> guided denoiser
    covers: tuple = ()  # the guidance classes this case runs
    extras: tuple = ()
    solver_wrap: Callable | None = None


def _linear_ag(d, kind, p):
    solver = get_solver("dpmpp-2m")
    x = initial_latents(p, 4, SIZE, SIZE, torch.Generator().manual_seed(9))
    cond = p.condition(["red cat", "blue dog"] if kind == "sd" else ["circle", "square"], 2)
    with torch.no_grad():
        coef = G.fit_linear_ag(d, solver, _grid(p, solver), x, cond, 3.0)
    return G.LinearAG(d, coef, steps=coef.steps)


def _mask():
    m = torch.zeros(LATENT)
    m[:, :, :4] = 1.0
    return m


class _Expert(nn.Module):
    """A fixed 2-class latent classifier with its own sign (a PPAP expert stand-in)."""

    def __init__(self, sign: float):
        super().__init__()
        self.sign = sign

    def forward(self, x, t):
        return self.sign * _latent_classifier(x, t)


def _pag_term_ag(den, layers):
    """PAG's term over AG, reading the conditional branch through a Tap (what --pag with --ag builds)."""
    tap = G.Tap(den)
    return G.PAGTerm(G.AdaptiveGuidance(tap, 3.0, gamma_bar=0.98, space=X0()), den, 2.0, layers, tap=tap)


CASES = [
    Case("cfg", lambda d, k, p: G.CFG(d, 3.0), (G.CFG,)),
    Case("cfg-linear-scale", lambda d, k, p: G.CFG(d, G.LinearScale(5.0, 1.0, 999.0, 0.0))),
    Case("cfg-cosine-scale", lambda d, k, p: G.CFG(d, G.CosineScale(1.0, 4.0, 999.0, 0.0, power=2.0))),
    Case("cfg-interval-scale", lambda d, k, p: G.CFG(d, G.IntervalScale(3.0, 200.0, 800.0))),
    Case("interval", lambda d, k, p: G.GuidanceInterval(d, 3.0, t_lo=200.0, t_hi=800.0), (G.GuidanceInterval,)),
    Case("rescale", lambda d, k, p: G.GuidanceRescale(d, 3.0, 0.7), (G.GuidanceRescale,)),
    Case("negative", lambda d, k, p: G.NegativeGuidance(d, 3.0), (G.NegativeGuidance,), extras=("negative",)),
    Case("negation", lambda d, k, p: G.Negation(d, 3.0, 1.0), (G.Negation,), extras=("negative",)),
    Case("thresholding", lambda d, k, p: G.DynamicThresholding(G.CFG(d, 3.0), ratio=0.9), (G.DynamicThresholding,)),
    Case("ag", lambda d, k, p: G.AdaptiveGuidance(d, 3.0, gamma_bar=0.98, space=X0()), (G.AdaptiveGuidance,)),
    Case("linear-ag", _linear_ag, (G.LinearAG,)),
    Case(
        "classifier",
        lambda d, k, p: G.ClassifierGuidance(G.CFG(d, 3.0), from_logits(_latent_classifier), 1.0),
        (G.ClassifierGuidance,),
        extras=("y",),
    ),
    Case(
        "ppap",
        lambda d, k, p: G.ClassifierGuidance(
            G.CFG(d, 3.0), from_logits(G.MultiExpert([_Expert(1.0), _Expert(-1.0)], 0.0, 999.0)), 1.0
        ),
        extras=("y",),
    ),
    Case(
        "minority",
        lambda d, k, p: G.MinorityGuidance(G.CFG(d, 3.0), _latent_classifier, 1.0, levels=2),
        (G.MinorityGuidance,),
    ),
    Case(
        "elucd",
        lambda d, k, p: G.EluCD(
            G.CFG(d, 3.0), lambda x0: _latent_classifier(x0, None), _grid(p, get_solver("dpmpp-2m")), scale=0.5
        ),
        (G.EluCD,),
        extras=("y",),
    ),
    Case("inpaint", lambda d, k, p: G.inpaint(G.CFG(d, 3.0), _mask(), torch.zeros(LATENT)), (G.Projection,)),
    Case("super-resolution", lambda d, k, p: G.Projection(G.CFG(d, 3.0), G.SuperResolution(2), torch.zeros(4, 4, 4))),
    Case(
        "colorize",
        lambda d, k, p: G.Projection(G.CFG(d, 3.0), G.Colorize((0.25, 0.25, 0.25, 0.25)), torch.zeros(1, 8, 8)),
    ),
    Case(
        "universal",
        lambda d, k, p: G.UniversalGuidance(G.CFG(d, 3.0), [G.Forward(_universal_loss, 0.3)]),
        (G.UniversalGuidance,),
    ),
    Case(
        "universal-recurrence",
        lambda d, k, p: G.UniversalGuidance(
            G.CFG(d, 3.0), [G.Forward(_universal_loss, 0.3), G.Backward(_universal_loss, steps=1, lr=0.1)]
        ),
        solver_wrap=lambda s: G.SelfRecurrence(s, k=2),
    ),
    Case("pag-cfg", lambda d, k, p: G.PAG(d, 2.0, PAG_LAYERS[k], cfg_scale=3.0), (G.PAG,)),
    Case("pag", lambda d, k, p: G.PAG(d, 2.0, PAG_LAYERS[k], batched=False)),
    Case("pag-term-ag", lambda d, k, p: _pag_term_ag(d, PAG_LAYERS[k]), (G.PAGTerm, G.Tap)),
]


def test_cases_cover_every_guidance_class():
    """Every guidance class exported by condiff.guidance (a dataclass with a 'denoiser' field) has a case."""
    covered = {cls for c in CASES for cls in c.covers}
    exported = {
        getattr(G, n)
        for n in G.__all__
        if isinstance(getattr(G, n), type) and "denoiser" in getattr(getattr(G, n), "__dataclass_fields__", {})
    } - {G.CountRows}
    assert exported <= covered, sorted(c.__name__ for c in exported - covered)


@pytest.mark.parametrize("kind", ["sd", "dit"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_guidance_runs(request, kind, case):
    """Every guidance method samples both pipelines with DPM-Solver++(2M) (shape, finite, batch independent)."""
    p = request.getfixturevalue(kind)
    solver = get_solver("dpmpp-2m")
    if case.solver_wrap is not None:
        solver = case.solver_wrap(solver)
    full, one = _run(p, case.make(p.denoiser, kind, p), solver, _cond(p, kind, case.extras))
    _check(full, one)
