"""Sample random conditions from a model and score them with the family's exact judge
(shapes: the deterministic labeller; digits: the scorer trained on real digits)."""

from __future__ import annotations

import time

import torch

from condiff.core.grids import UniformT, make_grid
from condiff.core.sampling import Gaussian, sample
from condiff.core.start_noise import centre_subpixel_means
from condiff.errors import ConfigError, one_of
from condiff.guidance import CountRows, DynamicThresholding
from condiff.guidance.attribute import TARGET_KEY
from condiff.guidance.build import GuidanceOptions, build_guidance


def generate(
    model,
    raw: torch.Tensor,
    solver,
    steps: int,
    cfg_scale: float,
    generator: torch.Generator,
    spacing=UniformT(),
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "sampling",
    analytic_skip=None,
    dynamic_threshold: float | None = None,
    guidance: GuidanceOptions | None = None,
    t_start: float | None = None,
    centre_subpixels: int = 1,
):
    """Sample one image per raw condition, in batches; returns (images in [-1, 1], nfe per sample).
    ``analytic_skip`` (condiff.solvers.analytic.AnalyticSkip) jumps from the grid's start with the Gaussian flow;
    ``dynamic_threshold``: the quantile ratio of Imagen's dynamic thresholding of the guided x0 (None: off);
    ``guidance``: condiff.guidance.build.GuidanceOptions (its cfg must be ``cfg_scale``; None: plain CFG);
    ``t_start``: the grid's first time (None: the schedule's default); ``centre_subpixels``: a network's
    pixel-unshuffle factor f > 1 makes the f x f sub-pixel means of the starting noise equal
    (condiff.core.start_noise), which removes the f-periodic background texture such networks leave."""
    images, nfe, _ = generate_counted(
        model,
        raw,
        solver,
        steps,
        cfg_scale,
        generator,
        spacing,
        batch_size,
        progress,
        desc,
        analytic_skip,
        dynamic_threshold,
        guidance,
        t_start=t_start,
        centre_subpixels=centre_subpixels,
    )
    return images, nfe


def _check_grid_bound(den, solver, grid):
    """Guidance defined at grid times only (EluCD) refuses a solver that evaluates elsewhere before sampling."""
    d = den
    for _ in range(64):
        if hasattr(d, "check_solver"):
            d.check_solver(solver, grid)
        d = getattr(d, "denoiser", None)
        if d is None:
            return


def classifier_targets(family, raw: torch.Tensor, attribute: str) -> torch.Tensor:
    """The class of ``attribute`` that each raw condition names: classifier guidance's target (one ConfigError
    when the family has no such attribute or a prompt leaves it out)."""
    if attribute not in family.attributes or not hasattr(family, "attribute_targets"):
        raise one_of(f"--cg-attribute for the {family.name} model", attribute, family.attributes)
    y = family.attribute_targets(raw)[:, family.attributes.index(attribute)]
    if bool((y < 0).any()):
        raise ConfigError(
            f"classifier guidance of {attribute} needs prompts that name a {attribute}; give "
            f"--prompt with one (e.g. 'red' for color), or use condiff eval"
        )
    return y


def generate_counted(
    model,
    raw: torch.Tensor,
    solver,
    steps: int,
    cfg_scale: float,
    generator: torch.Generator,
    spacing=UniformT(),
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "sampling",
    analytic_skip=None,
    dynamic_threshold: float | None = None,
    guidance: GuidanceOptions | None = None,
    callbacks=(),
    t_start: float | None = None,
    centre_subpixels: int = 1,
    start_noise: torch.Tensor | None = None,
):
    """``generate`` that also returns the network batch rows per sample (counted by CountRows under the
    guidance): (images, nfe per sample, rows per sample). ``callbacks`` go to the sampling loop of every batch
    (``condiff.core.sampling.sample``: one StepInfo per solver step); they draw no random numbers, so the
    images do not depend on them. ``start_noise``: the unit Gaussian draws z of the starting samples, one row
    per condition (x_T = sigma(t_start) z; Gaussian-noise models only), so that runs on different grids or
    samplers start from the same noise; None: drawn from ``generator``."""
    if start_noise is not None:
        from condiff.solvers.pfgmpp import GaussianNoise

        if not isinstance(model.noise, GaussianNoise):
            raise ConfigError(f"start_noise needs a Gaussian-noise model, got {type(model.noise).__name__}")
        want = (raw.shape[0], *model.family.image_shape)
        if tuple(start_noise.shape) != want:
            raise ConfigError(
                f"start_noise must have shape {want} (one row per condition), got {tuple(start_noise.shape)}"
            )
    opts = GuidanceOptions(cfg=cfg_scale) if guidance is None else guidance
    if opts.cfg != cfg_scale:
        raise ConfigError(f"generate: guidance.cfg {opts.cfg!r} differs from cfg_scale {cfg_scale!r}")
    grid = make_grid(model.schedule, steps, spacing, t_start=t_start)
    skip = None if analytic_skip is None else analytic_skip.prepare(model, grid, spacing)
    counter = CountRows(model.denoiser)
    den = build_guidance(counter, opts, grid if skip is None else skip.grid)
    _check_grid_bound(den, solver, grid if skip is None else skip.grid)
    negative = None if opts.negative_prompt is None else model.family.parse_prompt(opts.negative_prompt)
    if dynamic_threshold is not None:
        den = DynamicThresholding(den, dynamic_threshold)
    out, nfe = [], 0
    chunks = list(torch.split(raw, batch_size))
    it = chunks
    if progress and len(chunks) > 1:
        from tqdm.auto import tqdm

        it = tqdm(chunks, desc=desc, leave=False)
    z_chunks = iter(torch.split(start_noise, batch_size)) if start_noise is not None else None
    with torch.no_grad():
        for chunk in it:
            cond = model.condition(chunk)
            if opts.classifier is not None:
                cond[TARGET_KEY] = classifier_targets(model.family, chunk, opts.cg_attribute)
            if negative is not None:
                cond["negative"] = model.family.encode(
                    model.module, negative.expand(chunk.shape[0], *negative.shape[1:])
                )
            if z_chunks is None:
                x = model.prior((chunk.shape[0], *model.family.image_shape), float(grid[0]), generator)
            else:
                x = float(model.schedule.sigma(grid[0])) * next(z_chunks).to(torch.float32)
            x = centre_subpixel_means(x, centre_subpixels)
            if skip is not None:
                x = skip.teleport(x)
            res = sample(
                den,
                solver,
                grid if skip is None else skip.grid,
                x,
                cond,
                Gaussian(generator),
                callbacks=callbacks,
                progress=progress and len(chunks) == 1,
            )
            out.append(res.x.clamp(-1, 1))
            nfe = res.nfe
    return torch.cat(out), nfe, counter.rows / raw.shape[0]


def evaluate(
    model,
    solver,
    steps: int,
    cfg_scale: float,
    n: int,
    seed: int,
    spacing=UniformT(),
    batch_size: int = 256,
    progress: bool = False,
    analytic_skip=None,
    dynamic_threshold: float | None = None,
    guidance: GuidanceOptions | None = None,
    t_start: float | None = None,
    centre_subpixels: int = 1,
) -> dict:
    """Accuracy of n samples of random conditions, the family's distribution metrics against real data
    (``quality``: digits' Fréchet distance, precision and recall; {} for shapes), nfe (guided-denoiser calls per
    sample, from the loop) and network_rows_per_sample (network batch rows per sample: CFG 2 per call, AG
    fewer, PAG 3)."""
    g = torch.Generator().manual_seed(seed)
    raw, targets = model.family.random_conditions(n, g)
    t0 = time.perf_counter()
    images, nfe, rows = generate_counted(
        model,
        raw,
        solver,
        steps,
        cfg_scale,
        g,
        spacing,
        batch_size,
        progress,
        analytic_skip=analytic_skip,
        dynamic_threshold=dynamic_threshold,
        guidance=guidance,
        t_start=t_start,
        centre_subpixels=centre_subpixels,
    )
    seconds = time.perf_counter() - t0
    return {
        "accuracy": model.family.score(images, targets),
        "quality": model.family.quality(images),
        "nfe": nfe,
        "seconds": seconds,
        "n": n,
        "solver": solver.name,
        "steps": steps,
        "cfg": cfg_scale,
        "seed": seed,
        "analytic_skip": None if analytic_skip is None else analytic_skip.describe(),
        "dynamic_threshold": dynamic_threshold,
        "t_start": t_start,
        "centre_subpixels": centre_subpixels if centre_subpixels > 1 else None,
        "network_rows_per_sample": rows,
        **(guidance or GuidanceOptions(cfg=cfg_scale)).describe(),
    }
