"""`condiff models`, `solvers`, `sample`, `eval`, `train` and `demo`."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import typer

from condiff.cli import common
from condiff.cli.options import (
    AnalyticSkipOpt,
    BatchOpt,
    CfgOpt,
    DcRatiosOpt,
    EmsOpt,
    SeedOpt,
    SolverOpt,
    SolverOptOpt,
    SpacingOpt,
    StepsOpt,
    ThresholdOpt,
    guidance_options,
)
from condiff.errors import ConfigError


def models_cmd():
    """List the bundled models."""
    from condiff.core.files import load_json
    from condiff.models.base import BUNDLED, bundled_dir

    for name in BUNDLED:
        d = bundled_dir(name)
        if not (d / "condiff.json").is_file():
            typer.echo(f"{name:8s} (weights missing at {d})")
            continue
        meta = load_json(d / "condiff.json")
        metrics = meta.get("metrics", {})
        typer.echo(
            f"{name:8s} family={meta['family']} prediction={meta['prediction']} "
            f"steps={meta.get('trained_steps', '?')} metrics={json.dumps(metrics)}  ({d})"
        )
    from condiff.models.classifiers import BUNDLED_CLASSIFIERS

    for name, folder in BUNDLED_CLASSIFIERS.items():  # for --classifier NAME
        d = bundled_dir(folder)
        if (d / "condiff.json").is_file():
            meta = load_json(d / "condiff.json")
            typer.echo(
                f"{name:8s} shapes attribute classifier, noise_aware={meta['model'].get('noise_aware')} "
                f"steps={meta.get('trained_steps', '?')} (--classifier {name})  ({d})"
            )
        elif (d / "ppap.json").is_file():
            meta = load_json(d / "ppap.json")
            typer.echo(
                f"{name:8s} PPAP: {meta.get('n_experts')} LoRA experts of the clean classifier "
                f"(--classifier {name})  ({d})"
            )


def solvers_cmd():
    """List the solvers and their CLI names."""
    from condiff.solvers import DESCRIPTIONS

    for name, desc in DESCRIPTIONS.items():
        typer.echo(f"{name:10s} {desc}")


@guidance_options
def sample_cmd(
    model: str = typer.Option("shapes", help="bundled model name (shapes, digits) or a model directory"),
    prompt: Optional[str] = typer.Option(
        None,
        help="shapes: a caption such as 'large red circle top-left' "
        "(any attribute may be omitted); digits: a digit 0-9; default: random",
    ),
    solver: SolverOpt = "dpmpp-2m",
    steps: StepsOpt = 20,
    cfg: CfgOpt = 3.0,
    n: int = typer.Option(16, help="number of images"),
    seed: SeedOpt = 0,
    spacing: SpacingOpt = None,
    batch_size: BatchOpt = 256,
    out: Path = typer.Option(Path("grid.png"), help="output PNG; a JSON sidecar is written beside it"),
    analytic_skip: AnalyticSkipOpt = None,
    ems: EmsOpt = None,
    dc_ratios: DcRatiosOpt = None,
    solver_opt: SolverOptOpt = None,
    dynamic_threshold: ThresholdOpt = None,
    guidance: dict = None,  # the guidance options (GUIDANCE_OPTIONS), filled in by @guidance_options
    pipeline: Optional[Path] = typer.Option(
        None,
        "--pipeline",
        help="a local diffusers pipeline folder (Stable Diffusion, DiT) to sample instead of --model; offline only",
    ),
    height: Optional[int] = typer.Option(
        None, help="with --pipeline: image height in pixels (default: the network's size)"
    ),
    width: Optional[int] = typer.Option(None, help="with --pipeline: image width in pixels"),
):
    """Sample a grid of images and write it as a PNG with a JSON sidecar that reproduces it."""
    import torch

    if pipeline is not None:  # a diffusers folder: condiff.cli.pipeline
        from condiff.cli import pipeline as diffusers_cmds

        diffusers_cmds.refuse_model_options(
            {
                "--analytic-skip": analytic_skip,
                "--ems": ems,
                "--dc-ratios": dc_ratios,
                "--dynamic-threshold": dynamic_threshold,
                "--classifier": guidance["classifier"],
                "--linear-ag": guidance["linear_ag"],
                "--minority": guidance["minority"],
            }
        )
        return diffusers_cmds.sample_cmd(
            pipeline,
            prompt,
            guidance["negative_prompt"],
            height,
            width,
            solver,
            solver_opt,
            steps,
            cfg,
            n,
            seed,
            spacing,
            batch_size,
            out,
            {k: guidance[k] for k in ("pag", "pag_layers", "ag", "ag_space", "cfg_rescale", "guidance_interval")},
        )
    if height is not None or width is not None:
        raise ConfigError("--height and --width go with --pipeline (condiff's own models have a fixed size)")

    from condiff import __version__
    from condiff.core.files import atomic_write_json
    from condiff.data.images import grid_image, save_png
    from condiff.evaluation.evaluate import generate_counted

    common.check_common(steps, cfg, n, batch_size, seed, dynamic_threshold)
    common.check_out(out, "--out", ".png")
    common.check_out(out.with_suffix(".json"), "--out (its JSON sidecar)")
    family, sol, spacing, spc, skip = common.sampling_setup(
        model, solver, steps, cfg, spacing, ems, dc_ratios, solver_opt, analytic_skip
    )
    guide = common.guidance_options_of(family, cfg, **guidance)
    one = None if prompt is None else family.parse_prompt(prompt)
    m = common.load_model(model)
    g = torch.Generator().manual_seed(seed)
    if one is None:
        raw, _ = m.family.random_conditions(n, g)
    else:
        raw = one.expand(n, *one.shape[1:])
    t0 = time.perf_counter()
    images, nfe, rows = generate_counted(
        m,
        raw,
        sol,
        steps,
        cfg,
        g,
        spc,
        batch_size,
        progress=True,
        analytic_skip=skip,
        dynamic_threshold=dynamic_threshold,
        guidance=guide.options,
    )
    seconds = time.perf_counter() - t0
    save_png(grid_image(images, ncols=max(1, int(math.ceil(math.sqrt(n))))), out)
    sidecar = {
        "command": "sample",
        "model": model,
        "model_path": str(m.path),
        "prompt": prompt,
        "solver": solver,
        "steps": steps,
        "cfg": cfg,
        "n": n,
        "seed": seed,
        "spacing": spacing,
        "batch_size": batch_size,
        "nfe": nfe,
        "seconds": seconds,
        "condiff_version": __version__,
        "torch_version": torch.__version__,
        "analytic_skip": analytic_skip,
        "ems": None if ems is None else str(ems),
        "dc_ratios": None if dc_ratios is None else str(dc_ratios),
        "solver_opt": solver_opt or [],
        "dynamic_threshold": dynamic_threshold,
        "network_rows_per_sample": rows,
        **guide.describe(),
        "reproduce": common.reproduce(
            "sample",
            [
                ("--model", model),
                ("--prompt", prompt),
                ("--solver", solver),
                ("--steps", steps),
                ("--cfg", cfg),
                ("--n", n),
                ("--seed", seed),
                ("--spacing", spacing),
                ("--batch-size", batch_size),
                ("--out", out),
                ("--analytic-skip", analytic_skip),
                ("--solver-opt", solver_opt or []),
                ("--ems", ems),
                ("--dc-ratios", dc_ratios),
                ("--dynamic-threshold", dynamic_threshold),
            ],
        )
        + guide.flags(),
    }
    atomic_write_json(out.with_suffix(".json"), sidecar)
    typer.echo(f"wrote {out} and {out.with_suffix('.json')} ({n} images, {nfe} NFE, {seconds:.1f}s)")


@guidance_options
def eval_cmd(
    model: str = typer.Option(..., help="bundled model name (shapes, digits) or a model directory"),
    solver: SolverOpt = "dpmpp-2m",
    steps: StepsOpt = 20,
    cfg: CfgOpt = 3.0,
    n: int = typer.Option(512, help="number of samples"),
    seed: SeedOpt = 0,
    spacing: SpacingOpt = None,
    batch_size: BatchOpt = 256,
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the results here as JSON"),
    analytic_skip: AnalyticSkipOpt = None,
    ems: EmsOpt = None,
    dc_ratios: DcRatiosOpt = None,
    solver_opt: SolverOptOpt = None,
    dynamic_threshold: ThresholdOpt = None,
    guidance: dict = None,  # the guidance options (GUIDANCE_OPTIONS), filled in by @guidance_options
):
    """Sample random conditions and score them with the exact labeller (shapes) or the scorer (digits)."""
    from condiff.core.files import atomic_write_json
    from condiff.evaluation.evaluate import evaluate

    common.check_common(steps, cfg, n, batch_size, seed, dynamic_threshold)
    if json_out is not None:
        common.check_out(json_out, "--json", ".json")
    family, sol, spacing, spc, skip = common.sampling_setup(
        model, solver, steps, cfg, spacing, ems, dc_ratios, solver_opt, analytic_skip
    )
    guide = common.guidance_options_of(family, cfg, **guidance)
    m = common.load_model(model)
    res = evaluate(
        m,
        sol,
        steps,
        cfg,
        n,
        seed,
        spc,
        batch_size,
        progress=True,
        analytic_skip=skip,
        dynamic_threshold=dynamic_threshold,
        guidance=guide.options,
    )
    res.update(**guide.describe())
    res.update(
        model=model,
        spacing=spacing,
        ems=None if ems is None else str(ems),
        dc_ratios=None if dc_ratios is None else str(dc_ratios),
        solver_opt=solver_opt or [],
    )
    if m.family.name == "digits":
        from condiff.data.digits import scorer

        res["scorer_heldout_accuracy"] = scorer().heldout_accuracy
    if json_out is not None:
        atomic_write_json(json_out, res)
    typer.echo(json.dumps(res, indent=2))


def train_cmd(
    recipe: Path = typer.Argument(..., help="a TOML recipe, e.g. recipes/digits.toml"),
    steps: Optional[int] = typer.Option(None, help="override the recipe's number of steps"),
    out: Optional[Path] = typer.Option(None, help="output directory (default runs/<recipe name>)"),
    resume: bool = typer.Option(False, help="continue from the newest valid checkpoint in --out"),
    seed: Optional[int] = typer.Option(None, help="override the recipe's seed (data order, noise, init)"),
):
    """Train a recipe; checkpoints go to OUT/checkpoints, the final EMA model to OUT/model."""
    from condiff.cli.train import train_recipe
    from condiff.training.recipe import check_seed, load_recipe

    r = load_recipe(recipe)
    if seed is not None:
        import dataclasses

        r = dataclasses.replace(r, train=dataclasses.replace(r.train, seed=check_seed(seed, "--seed")))
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be a positive integer, got {steps}")
    out = out or Path("runs") / r.name
    common.check_out(out, "--out", kind="dir")
    tr = train_recipe(r, out, steps=steps, resume=resume)
    typer.echo(f"trained {tr.step} steps in {tr.train_seconds / 60:.1f} min; model at {out / 'model'}")


def demo_cmd(
    out: Path = typer.Option(Path("outputs/demo"), help="output directory"),
    n_eval: int = typer.Option(256, help="samples per metric"),
):
    """The main job: grids and metrics from the bundled models, as outputs/demo/index.html."""
    from condiff.cli.demo import run_demo

    path = run_demo(out, n_eval=n_eval)
    typer.echo(f"wrote {path}")
