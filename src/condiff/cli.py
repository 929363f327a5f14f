"""The condiff command line (typer). User errors print one line on stderr and exit with code 2."""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import typer  # noqa: E402

from .errors import CondiffError, ConfigError, OutputFileError, one_of, one_line  # noqa: E402

MAX_SAMPLES = 1_000_000  # --n and --batch-size

# Options shared by `sample` and `eval`.
SolverOpt = Annotated[str, typer.Option(help="solver name (see `condiff solvers`)")]
StepsOpt = Annotated[int, typer.Option(help="number of solver steps")]
CfgOpt = Annotated[float, typer.Option(help="classifier-free guidance scale (1 = conditional, 0 = unconditional)")]
SeedOpt = Annotated[int, typer.Option(help="random seed")]
SpacingOpt = Annotated[Optional[str], typer.Option(
    help="time grid: uniform-t, uniform-logsnr, karras (default: the solver's own, else uniform-t)")]
EmsOpt = Annotated[Optional[Path], typer.Option(
    "--ems", help="DPM-Solver-v3 statistics from `condiff ems compute` (with --solver dpm-v3)")]
SolverOptOpt = Annotated[Optional[list[str]], typer.Option(
    "--solver-opt", help="a solver option KEY=VALUE, repeatable (e.g. order=1, variant=bh1, corrector=false); "
    "see `condiff solvers`")]
ThresholdOpt = Annotated[Optional[float], typer.Option(
    "--dynamic-threshold", help="Imagen's dynamic thresholding of the guided x0 at this quantile (e.g. 0.995)")]
DcRatiosOpt = Annotated[Optional[Path], typer.Option(
    "--dc-ratios", help="DC-Solver ratios from `condiff dc search` (with --solver dc-solver)")]
BatchOpt = Annotated[int, typer.Option(help="samples per batch (bounds memory; large --n is streamed)")]
AnalyticSkipOpt = Annotated[Optional[str], typer.Option(
    "--analytic-skip", help="jump from the start with the Gaussian closed form (0 NFE), then spend all --steps "
    "on the rest: a sigma/alpha to stop at (e.g. 7) or a share of the step budget (recommended: 5%)")]

PagOpt = Annotated[Optional[float], typer.Option(
    "--pag", help="perturbed-attention guidance scale S on top of --cfg (0: no PAG)")]
PagLayersOpt = Annotated[Optional[str], typer.Option(
    "--pag-layers", help="with --pag: self-attention layers to perturb, comma list of mid, down, up or UNet "
    "module prefixes such as up_blocks.0 (default: mid)")]
AgOpt = Annotated[Optional[float], typer.Option(
    "--ag", help="adaptive guidance: CFG until the cosine of the two branches exceeds GAMMA in [-1, 1], then "
    "conditional only, per sample (1: plain CFG; e.g. 0.9995)")]
AgSpaceOpt = Annotated[Optional[str], typer.Option(
    "--ag-space", help="with --ag: x0 or eps, where the cosine is measured (default x0; on shapes the eps "
    "cosine is near 1 from the start)")]
CfgRescaleOpt = Annotated[Optional[float], typer.Option(
    "--cfg-rescale", help="guidance rescale factor PHI in [0, 1] (Lin et al.; x0 space; 0: plain CFG)")]
GuidanceIntervalOpt = Annotated[Optional[str], typer.Option(
    "--guidance-interval", help="LO,HI: guidance only for LO < t <= HI, t in the model schedule's own units "
    "(bundled models: 0-999, 999 = noise; HI may be inf); the conditional model elsewhere")]
NegativePromptOpt = Annotated[Optional[str], typer.Option(
    "--negative-prompt", help="a condition that replaces the empty one in the guidance (shapes: a caption, "
    "digits: a digit)")]
LinearAgOpt = Annotated[Optional[Path], typer.Option(
    "--linear-ag", help="LinearAG: a coefficient file from `condiff guidance fit-linear-ag` (same --cfg, --steps, "
    "--spacing); its first evaluations predict the unconditional branch instead of running it")]
LinearAgStepsOpt = Annotated[Optional[int], typer.Option(
    "--linear-ag-steps", help="with --linear-ag: how many evaluations are predicted (default: half the fitted)")]
MinorityOpt = Annotated[Optional[Path], typer.Option(
    "--minority", help="minority guidance: a level classifier from `condiff guidance fit-minority`")]
MinorityLevelOpt = Annotated[Optional[int], typer.Option(
    "--minority-level", help="with --minority: the target level (default: the most minority one)")]
MinorityScaleOpt = Annotated[Optional[float], typer.Option(
    "--minority-scale", help="with --minority: its scale w (default 1)")]
ClassifierOpt = Annotated[Optional[str], typer.Option(
    "--classifier", help="classifier guidance: a bundled shapes classifier (clean: EluCD-calibrated; noisy: "
    "noise-aware; ppap: LoRA experts of the clean one), a classifier directory from condiff train, or PPAP "
    "experts from condiff guidance train-ppap")]
CgScaleOpt = Annotated[Optional[float], typer.Option("--cg-scale", help="with --classifier: its scale (default 1)")]
CgAttributeOpt = Annotated[Optional[str], typer.Option(
    "--cg-attribute", help="with --classifier: the attribute to guide (default color); the target is the "
    "value the prompt names")]
CgRawOpt = Annotated[bool, typer.Option(
    "--cg-raw", help="with a clean --classifier: apply it to x_t as it is, without EluCD's calibration")]

# The guidance options of `sample` and `eval`: (parameter name, option type, default), declared once.
GUIDANCE_OPTIONS = (
    ("pag", PagOpt, None), ("pag_layers", PagLayersOpt, None), ("ag", AgOpt, None), ("ag_space", AgSpaceOpt, None),
    ("cfg_rescale", CfgRescaleOpt, None), ("guidance_interval", GuidanceIntervalOpt, None),
    ("negative_prompt", NegativePromptOpt, None), ("classifier", ClassifierOpt, None),
    ("cg_scale", CgScaleOpt, None), ("cg_attribute", CgAttributeOpt, None), ("cg_raw", CgRawOpt, False),
    ("linear_ag", LinearAgOpt, None), ("linear_ag_steps", LinearAgStepsOpt, None),
    ("minority", MinorityOpt, None), ("minority_level", MinorityLevelOpt, None),
    ("minority_scale", MinorityScaleOpt, None),
)


def guidance_options(fn):
    """Give a typer command the GUIDANCE_OPTIONS: they appear in its signature (and --help) after its own
    options, and reach ``fn`` as one dict, its ``guidance`` parameter."""
    import functools
    import inspect

    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "guidance"]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
             for name, kind, default in GUIDANCE_OPTIONS]

    @functools.wraps(fn)
    def command(*args, **kwargs):
        return fn(*args, guidance={name: kwargs.pop(name) for name, _, _ in GUIDANCE_OPTIONS}, **kwargs)

    command.__signature__ = inspect.Signature(own + extra)
    del command.__wrapped__  # typer reads the signature above, not the wrapped function's
    return command

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="condiff: conditional diffusion - sample, evaluate, train, demo.")


def _solver(name: str, options: Optional[list[str]] = None):
    from .solvers import get_solver

    return get_solver(name, **_solver_options(options))


def _solver_options(options: Optional[list[str]]) -> dict:
    """['order=1', 'corrector=false'] -> {'order': 1, 'corrector': False}: JSON values (true/false, numbers),
    anything else a string; the solver refuses unknown keys and bad values itself."""
    out = {}
    for item in options or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"--solver-opt must be KEY=VALUE such as order=1, got {item!r}")
        try:
            parsed = json.loads(value.strip())
        except ValueError:
            parsed = value.strip()
        if isinstance(parsed, (dict, list)) or parsed is None:
            raise ConfigError(f"--solver-opt {key.strip()} must be a number, true/false or a name, got {value!r}")
        out[key.strip()] = parsed
    return out


def _spacing(name: Optional[str], solver=None) -> tuple[str, object]:
    """(name, spacing object); None picks the solver's default spacing, else uniform-t."""
    from .grids import SPACINGS

    if name is None:
        default = getattr(solver, "default_spacing", None)
        name = default.name if default is not None else "uniform-t"
    if name not in SPACINGS:
        raise one_of("spacing", name, SPACINGS)
    return name, SPACINGS[name]


def _configured_solver(name: str, steps: int, cfg: float, spacing: Optional[str], ems: Optional[Path],
                       dc_ratios: Optional[Path], model: str, options: Optional[list[str]] = None):
    """The solver for --solver with its --solver-opt options and --ems / --dc-ratios files, and the spacing
    (name, object)."""
    sol = _solver(name, options)
    if ems is not None and name != "dpm-v3":
        raise ConfigError(f"--ems is for --solver dpm-v3, got --solver {name}")
    if dc_ratios is not None and name != "dc-solver":
        raise ConfigError(f"--dc-ratios is for --solver dc-solver, got --solver {name}")
    spacing_name, spc = _spacing(spacing, sol)
    if ems is not None:
        from .ems import check_ems_fits, load_ems
        from .models.base import resolve_model
        from .schedules import schedule_from_config
        from .solvers import get_solver

        family = _family(model)
        statistics = check_ems_fits(load_ems(ems), family.image_shape,
                                    schedule_from_config(resolve_model(model)[1]["schedule"]), what=repr(model))
        sol = get_solver("dpm-v3", ems=statistics, **_solver_options(options))
    if dc_ratios is not None:
        from .dc import dc_solver_for

        if options:
            raise ConfigError("--solver-opt does not combine with --dc-ratios (the ratios file sets the solver)")
        sol = dc_solver_for(dc_ratios, steps, cfg, spacing_name)
    return sol, spacing_name, spc


def _sampling_setup(model, solver, steps, cfg, spacing, ems, dc_ratios, solver_opt, analytic_skip):
    """What `sample` and `eval` share, checked before any weights are read: the model's family, the configured
    solver, the spacing (name, object) and the analytic skip."""
    family = _family(model)
    sol, spacing_name, spc = _configured_solver(solver, steps, cfg, spacing, ems, dc_ratios, model, solver_opt)
    return family, sol, spacing_name, spc, _analytic_skip(analytic_skip, model, steps, spc)


def _solver_flags(ems: Optional[Path], dc_ratios: Optional[Path], options: Optional[list[str]] = None) -> str:
    return ("".join(f" --solver-opt {shlex.quote(o)}" for o in options or [])
            + (f" --ems {shlex.quote(str(ems))}" if ems is not None else "")
            + (f" --dc-ratios {shlex.quote(str(dc_ratios))}" if dc_ratios is not None else ""))


def _check_common(steps: int, cfg: float, n: int, batch_size: int, seed: int,
                  dynamic_threshold: Optional[float] = None):
    from .grids import MAX_STEPS
    from .training.recipe import check_seed

    if not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"--steps must be an integer in [1, {MAX_STEPS}], got {steps}")
    if not math.isfinite(cfg) or abs(cfg) > 1e4:
        raise ConfigError(f"--cfg must be a finite number with |cfg| <= 10000, got {cfg}")
    if not 1 <= n <= MAX_SAMPLES:
        raise ConfigError(f"--n must be an integer in [1, {MAX_SAMPLES}], got {n}")
    if not 1 <= batch_size <= MAX_SAMPLES:
        raise ConfigError(f"--batch-size must be an integer in [1, {MAX_SAMPLES}], got {batch_size}")
    check_seed(seed, "--seed")
    if dynamic_threshold is not None and not 0 < dynamic_threshold <= 1:  # NaN fails too
        raise ConfigError(f"--dynamic-threshold must be a quantile ratio in (0, 1] such as 0.995, "
                          f"got {dynamic_threshold}")


def _guidance(family, cfg: float, pag=None, pag_layers=None, ag=None, ag_space=None, cfg_rescale=None,
              guidance_interval=None, negative_prompt=None, classifier=None, cg_scale=None, cg_attribute=None,
              cg_raw=False, linear_ag=None,
              linear_ag_steps=None, minority=None, minority_level=None, minority_scale=None):
    """The checked GuidanceOptions of the guidance flags, before any weights are read (PAG layer names are
    checked against the network once it is loaded)."""
    from .guidance.build import GuidanceOptions, parse_interval, parse_layers

    if pag_layers is not None and pag is None:
        raise ConfigError("--pag-layers needs --pag")
    if ag_space is not None and ag is None:
        raise ConfigError("--ag-space needs --ag")
    opts = GuidanceOptions(cfg=cfg, pag=pag, pag_layers=("mid",) if pag_layers is None else parse_layers(pag_layers),
                           ag=ag, ag_space="x0" if ag_space is None else ag_space, cfg_rescale=cfg_rescale,
                           interval=None if guidance_interval is None else parse_interval(guidance_interval),
                           negative_prompt=negative_prompt, classifier=classifier,
                           cg_scale=1.0 if cg_scale is None else cg_scale,
                           cg_attribute="color" if cg_attribute is None else cg_attribute, cg_raw=cg_raw,
                           linear_ag=None if linear_ag is None else str(linear_ag), linear_ag_steps=linear_ag_steps,
                           minority=None if minority is None else str(minority), minority_level=minority_level,
                           minority_scale=1.0 if minority_scale is None else minority_scale)
    if classifier is not None and cg_attribute is not None and cg_attribute not in family.attributes:
        from .errors import one_of

        raise one_of(f"--cg-attribute for the {family.name} model", cg_attribute, family.attributes)
    if negative_prompt is not None:
        try:
            family.parse_prompt(negative_prompt)
        except ConfigError as e:
            raise ConfigError(f"--negative-prompt: {e}") from None
    return opts


def _check_out(path: Path, option: str, suffix: str | None = None, kind: str = "file"):
    """Refuse an output path before any model is loaded: wrong suffix, wrong kind, not writable."""
    from .io import check_writable

    if suffix is not None and path.suffix.lower() != suffix:
        raise ConfigError(f"{option} must end in {suffix}, got {str(path)!r}")
    try:
        check_writable(path, kind)
    except OutputFileError as e:
        raise OutputFileError(f"{option}: {e}") from None


def _analytic_skip(value: Optional[str], model: str, steps: int, spacing):
    """--analytic-skip parsed and checked against the model's grid, before any weights are read."""
    if value is None:
        return None
    from .analytic import AnalyticSkip
    from .grids import make_grid
    from .models.base import resolve_model
    from .schedules import schedule_from_config

    skip = AnalyticSkip.parse(value, "--analytic-skip")
    sch = schedule_from_config(resolve_model(model)[1]["schedule"])
    skip.plan(sch, make_grid(sch, steps, spacing), spacing, name="--analytic-skip")
    return skip


def _family(model: str):
    """The model's family, from its checked condiff.json: a bad model path or metadata fails here, before
    any weights are read."""
    from .models.base import get_family, resolve_model

    _, meta = resolve_model(model)
    return get_family(meta["family"])


def _threads() -> int:
    value = os.environ.get("CONDIFF_THREADS", "2")
    if not value.strip().isdigit() or int(value) < 1:
        raise ConfigError(f"CONDIFF_THREADS must be a positive integer, got {value!r}")
    return max(1, min(os.cpu_count() or 1, int(value)))


def _load(model: str):
    import torch

    from .models.base import load_model, silence_diffusers

    silence_diffusers()
    torch.set_num_threads(_threads())
    return load_model(model)


@app.command()
def models():
    """List the bundled models."""
    from .io import load_json
    from .models.base import BUNDLED, bundled_dir

    for name in BUNDLED:
        d = bundled_dir(name)
        if not (d / "condiff.json").is_file():
            typer.echo(f"{name:8s} (weights missing at {d})")
            continue
        meta = load_json(d / "condiff.json")
        metrics = meta.get("metrics", {})
        typer.echo(f"{name:8s} family={meta['family']} prediction={meta['prediction']} "
                   f"steps={meta.get('trained_steps', '?')} metrics={json.dumps(metrics)}  ({d})")
    from .models.shapes_classifier import BUNDLED_CLASSIFIERS

    for name, folder in BUNDLED_CLASSIFIERS.items():  # for --classifier NAME
        d = bundled_dir(folder)
        if (d / "condiff.json").is_file():
            meta = load_json(d / "condiff.json")
            typer.echo(f"{name:8s} shapes attribute classifier, noise_aware={meta['model'].get('noise_aware')} "
                       f"steps={meta.get('trained_steps', '?')} (--classifier {name})  ({d})")
        elif (d / "ppap.json").is_file():
            meta = load_json(d / "ppap.json")
            typer.echo(f"{name:8s} PPAP: {meta.get('n_experts')} LoRA experts of the clean classifier "
                       f"(--classifier {name})  ({d})")


@app.command()
def solvers():
    """List the solvers and their CLI names."""
    from .solvers import DESCRIPTIONS

    for name, desc in DESCRIPTIONS.items():
        typer.echo(f"{name:10s} {desc}")


@app.command("sample")
@guidance_options
def sample_cmd(
    model: str = typer.Option("shapes", help="bundled model name (shapes, digits) or a model directory"),
    prompt: Optional[str] = typer.Option(None, help="shapes: a caption such as 'large red circle top-left' "
                                         "(any attribute may be omitted); digits: a digit 0-9; default: random"),
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
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", help="a local diffusers pipeline folder (Stable "
                                            "Diffusion, DiT) to sample instead of --model; offline only"),
    height: Optional[int] = typer.Option(None, help="with --pipeline: image height in pixels (default: the "
                                         "network's size)"),
    width: Optional[int] = typer.Option(None, help="with --pipeline: image width in pixels"),
):
    """Sample a grid of images and write it as a PNG with a JSON sidecar that reproduces it."""
    import torch

    if pipeline is not None:  # a diffusers folder: condiff.interop.commands
        from .interop import commands as _interop

        _interop.refuse_model_options({"--analytic-skip": analytic_skip, "--ems": ems, "--dc-ratios": dc_ratios,
                                       "--dynamic-threshold": dynamic_threshold, "--classifier": guidance["classifier"],
                                       "--linear-ag": guidance["linear_ag"], "--minority": guidance["minority"]})
        return _interop.sample_cmd(pipeline, prompt, guidance["negative_prompt"], height, width, solver, solver_opt,
                                   steps, cfg, n, seed, spacing, batch_size, out,
                                   {k: guidance[k] for k in ("pag", "pag_layers", "ag", "ag_space", "cfg_rescale",
                                                             "guidance_interval")})
    if height is not None or width is not None:
        raise ConfigError("--height and --width go with --pipeline (condiff's own models have a fixed size)")

    from . import __version__
    from .evaluate import generate_counted
    from .images import grid_image, save_png
    from .io import atomic_write_json

    _check_common(steps, cfg, n, batch_size, seed, dynamic_threshold)
    _check_out(out, "--out", ".png")
    _check_out(out.with_suffix(".json"), "--out (its JSON sidecar)")
    family, sol, spacing, spc, skip = _sampling_setup(model, solver, steps, cfg, spacing, ems, dc_ratios,
                                                      solver_opt, analytic_skip)
    guide = _guidance(family, cfg, **guidance)
    one = None if prompt is None else family.parse_prompt(prompt)
    m = _load(model)
    g = torch.Generator().manual_seed(seed)
    if one is None:
        raw, _ = m.family.random_conditions(n, g)
    else:
        raw = one.expand(n, *one.shape[1:])
    t0 = time.perf_counter()
    images, nfe, rows = generate_counted(m, raw, sol, steps, cfg, g, spc, batch_size, progress=True,
                                         analytic_skip=skip, dynamic_threshold=dynamic_threshold, guidance=guide)
    seconds = time.perf_counter() - t0
    save_png(grid_image(images, ncols=max(1, int(math.ceil(math.sqrt(n))))), out)
    sidecar = {"command": "sample", "model": model, "model_path": str(m.path), "prompt": prompt,
               "solver": solver, "steps": steps, "cfg": cfg, "n": n, "seed": seed, "spacing": spacing,
               "batch_size": batch_size, "nfe": nfe, "seconds": seconds, "condiff_version": __version__,
               "torch_version": torch.__version__, "analytic_skip": analytic_skip,
               "ems": None if ems is None else str(ems), "dc_ratios": None if dc_ratios is None else str(dc_ratios),
               "solver_opt": solver_opt or [], "dynamic_threshold": dynamic_threshold,
               "network_rows_per_sample": rows, **guide.describe(),
               "reproduce": f"condiff sample --model {shlex.quote(model)} "
               + (f"--prompt {shlex.quote(prompt)} " if prompt is not None else "")
               + f"--solver {solver} --steps {steps} --cfg {cfg} --n {n} --seed {seed} --spacing {spacing} "
               f"--batch-size {batch_size} --out {shlex.quote(str(out))}"
               + (f" --analytic-skip {shlex.quote(analytic_skip)}" if analytic_skip is not None else "")
               + _solver_flags(ems, dc_ratios, solver_opt)
               + (f" --dynamic-threshold {dynamic_threshold}" if dynamic_threshold is not None else "")
               + guide.flags()}
    atomic_write_json(out.with_suffix(".json"), sidecar)
    typer.echo(f"wrote {out} and {out.with_suffix('.json')} ({n} images, {nfe} NFE, {seconds:.1f}s)")


@app.command("eval")
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
    from .evaluate import evaluate
    from .io import atomic_write_json

    _check_common(steps, cfg, n, batch_size, seed, dynamic_threshold)
    if json_out is not None:
        _check_out(json_out, "--json", ".json")
    family, sol, spacing, spc, skip = _sampling_setup(model, solver, steps, cfg, spacing, ems, dc_ratios,
                                                      solver_opt, analytic_skip)
    guide = _guidance(family, cfg, **guidance)
    m = _load(model)
    res = evaluate(m, sol, steps, cfg, n, seed, spc, batch_size, progress=True, analytic_skip=skip,
                   dynamic_threshold=dynamic_threshold, guidance=guide)
    res.update(model=model, spacing=spacing, ems=None if ems is None else str(ems),
               dc_ratios=None if dc_ratios is None else str(dc_ratios), solver_opt=solver_opt or [])
    if m.family.name == "digits":
        from .data.digits import scorer

        res["scorer_heldout_accuracy"] = scorer().heldout_accuracy
    if json_out is not None:
        atomic_write_json(json_out, res)
    typer.echo(json.dumps(res, indent=2))


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="a TOML recipe, e.g. recipes/digits.toml"),
    steps: Optional[int] = typer.Option(None, help="override the recipe's number of steps"),
    out: Optional[Path] = typer.Option(None, help="output directory (default runs/<recipe name>)"),
    resume: bool = typer.Option(False, help="continue from the newest valid checkpoint in --out"),
    seed: Optional[int] = typer.Option(None, help="override the recipe's seed (data order, noise, init)"),
):
    """Train a recipe; checkpoints go to OUT/checkpoints, the final EMA model to OUT/model."""
    from .training.recipe import check_seed, load_recipe
    from .training.run import train_recipe

    r = load_recipe(recipe)
    if seed is not None:
        import dataclasses

        r = dataclasses.replace(r, train=dataclasses.replace(r.train, seed=check_seed(seed, "--seed")))
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be a positive integer, got {steps}")
    out = out or Path("runs") / r.name
    _check_out(out, "--out", kind="dir")
    tr = train_recipe(r, out, steps=steps, resume=resume)
    typer.echo(f"trained {tr.step} steps in {tr.train_seconds / 60:.1f} min; model at {out / 'model'}")


@app.command()
def demo(out: Path = typer.Option(Path("outputs/demo"), help="output directory"),
         n_eval: int = typer.Option(256, help="samples per metric")):
    """The main job: grids and metrics from the bundled models, as outputs/demo/index.html."""
    from .demo import run_demo

    path = run_demo(out, n_eval=n_eval)
    typer.echo(f"wrote {path}")


# Sub-apps (condiff/commands/*.py) are registered here, one add_typer line each.
# -- sub-apps --
from .commands import export as _export_cmd  # noqa: E402

app.add_typer(_export_cmd.app, name="export")
from .commands import guidance as _guidance_cmd  # noqa: E402

app.add_typer(_guidance_cmd.app, name="guidance")
from .commands import restore as _restore_cmd  # noqa: E402
app.command("restore")(_restore_cmd.restore_cmd)
from .commands import ems as _ems_cmd  # noqa: E402

app.add_typer(_ems_cmd.app, name="ems")
from .commands import dc as _dc_cmd  # noqa: E402

app.add_typer(_dc_cmd.app, name="dc")
from .commands import bench as _bench_cmd  # noqa: E402

app.add_typer(_bench_cmd.app, name="bench")
from .commands import edit as _edit_cmd  # noqa: E402

app.command("invert")(_edit_cmd.invert_cmd)
app.command("edit")(_edit_cmd.edit_cmd)


def _fail(message: str):
    """Print the one-line error and exit with code 2."""
    typer.echo(f"error: {one_line(message)}", err=True)
    sys.exit(2)


def _bad_input(e: Exception) -> str:
    """', got VALUE' for a value typer could not convert (its message does not name the value)."""
    errors = getattr(e.__cause__, "errors", None)
    try:
        items = errors() if callable(errors) else []
    except Exception:  # pragma: no cover
        items = []
    if items and isinstance(items[0], dict) and "input" in items[0]:
        return f", got {items[0]['input']!r}"
    return ""


def main(argv=None):
    try:
        from typer._click import exceptions as click_exc  # typer >= 0.25 vendors click
    except ImportError:  # pragma: no cover
        from click import exceptions as click_exc

    try:
        app(args=argv, standalone_mode=False)
    except CondiffError as e:
        _fail(str(e))
    except click_exc.NoArgsIsHelpError as e:
        typer.echo(e.format_message())
        sys.exit(2)
    except click_exc.UsageError as e:
        msg = e.format_message().replace("\n", " ") + _bad_input(e)
        _fail(msg + (f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""))
    except click_exc.ClickException as e:
        _fail(e.format_message())
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
