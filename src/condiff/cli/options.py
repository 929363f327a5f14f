"""The typer option types that several commands share, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

# Every command that computes (declared once; condiff.cli.common.thread_count checks it and picks the default).
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--threads",
        help="CPU threads for torch, 1 to the cores (default: OMP_NUM_THREADS, else MKL_NUM_THREADS, else 1; "
        "train: the recipe's train.threads); more threads help only on idle cores",
        show_default=False,
    ),
]

# Options shared by `sample` and `eval`.
SolverOpt = Annotated[str, typer.Option(help="solver name (see `condiff solvers`)")]
StepsOpt = Annotated[int, typer.Option(help="number of solver steps")]
CfgOpt = Annotated[float, typer.Option(help="classifier-free guidance scale (1 = conditional, 0 = unconditional)")]
SeedOpt = Annotated[int, typer.Option(help="random seed")]
SpacingOpt = Annotated[
    Optional[str],
    typer.Option(
        help="time grid: uniform-t, uniform-logsnr, karras, or trailing (diffusers' trailing timesteps; with "
        "--t-start max exactly diffusers' grid) (default: the solver's own, else uniform-t)"
    ),
]
GridOpt = Annotated[
    Optional[Path],
    typer.Option("--grid", help="time grids from `condiff grid search` (instead of --spacing; its start too)"),
]
EmsOpt = Annotated[
    Optional[Path],
    typer.Option("--ems", help="DPM-Solver-v3 statistics from `condiff ems compute` (with --solver dpm-v3)"),
]
SolverOptOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--solver-opt",
        help="a solver option KEY=VALUE, repeatable (e.g. order=1, variant=bh1, corrector=false); "
        "see `condiff solvers`",
    ),
]
ThresholdOpt = Annotated[
    Optional[float],
    typer.Option(
        "--dynamic-threshold",
        help="Imagen's dynamic thresholding of the guided x0 at this quantile (e.g. 0.995); "
        "it greys black backgrounds (shapes: docs/guidance.md)",
    ),
]
DcRatiosOpt = Annotated[
    Optional[Path],
    typer.Option("--dc-ratios", help="DC-Solver ratios from `condiff dc search` (with --solver dc-solver)"),
]
BatchOpt = Annotated[int, typer.Option(help="samples per batch (bounds memory; large --n is streamed)")]
# `sample` and `eval`: opt-in ways to run the denoising network faster (condiff.models.runtime).
LoraOpt = Annotated[
    Optional[list[Path]],
    typer.Option(
        "--lora", help="a LoRA folder (pytorch_lora_weights.safetensors, diffusers' format) to apply; repeatable"
    ),
]
LoraScaleOpt = Annotated[
    Optional[list[float]],
    typer.Option("--lora-scale", help="weight of each --lora, in order (one value: for all) [default: 1]"),
]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the denoising network (inductor; each new batch shape compiles first, which takes "
        "a while on CPU); measured speed and exactness: docs/benchmarks.md",
    ),
]
ChannelsLastOpt = Annotated[
    bool,
    typer.Option(
        "--channels-last",
        help="run the denoising network and its inputs in channels_last memory format (same samples up to "
        "float32 round-off); measured speed: docs/benchmarks.md",
    ),
]
Bf16Opt = Annotated[
    bool,
    typer.Option(
        "--bf16",
        help="run the denoising network in bfloat16 autocast (weights and attention stay float32; samples close "
        "to, not equal to, float32's; 1.4-1.9x faster on a CPU with AVX512-BF16); measured speed and accuracy: "
        "docs/benchmarks.md",
    ),
]
# `sample`, `eval` and `edit`: the check of fitted files against the run (condiff.core.fitted).
TStartOpt = Annotated[
    Optional[str],
    typer.Option(
        "--t-start",
        help="the grid's first time: a number in the schedule's range, or 'max' (the schedule's last time, where "
        "x_T is nearly pure noise; best for v-prediction models) [default: where sigma/alpha = 20]",
    ),
]
CentreSubpixelsOpt = Annotated[
    bool,
    typer.Option(
        "--centre-subpixels",
        help="for a model that pixel-unshuffles its input (shapes): equalize the sub-pixel means of the starting "
        "noise, which removes the faint 2x2 checkerboard and stripes in flat backgrounds "
        "(docs/solvers.md, 'Flat backgrounds')",
    ),
]
AllowMismatchOpt = Annotated[
    bool,
    typer.Option(
        "--allow-mismatch",
        help="use fitted files (--ems, --dc-ratios, --linear-ag, --minority, PPAP experts, --inversion) made for "
        "another model, cfg or grid, with a one-line warning instead of an error",
    ),
]
AnalyticSkipOpt = Annotated[
    Optional[str],
    typer.Option(
        "--analytic-skip",
        help="jump from the start with the Gaussian closed form (0 NFE), then spend all --steps "
        "on the rest: a sigma/alpha to stop at (e.g. 7) or a share of the step budget (recommended: 5%)",
    ),
]

PagOpt = Annotated[
    Optional[float], typer.Option("--pag", help="perturbed-attention guidance scale S on top of --cfg (0: no PAG)")
]
PagLayersOpt = Annotated[
    Optional[str],
    typer.Option(
        "--pag-layers",
        help="with --pag: self-attention layers to perturb, comma list of mid, down, up or UNet "
        "module prefixes such as up_blocks.0 (default: mid)",
    ),
]
AgOpt = Annotated[
    Optional[float],
    typer.Option(
        "--ag",
        help="adaptive guidance: CFG until the cosine of the two branches exceeds GAMMA in [-1, 1], then "
        "conditional only, per sample (1: plain CFG; e.g. 0.9995)",
    ),
]
AgSpaceOpt = Annotated[
    Optional[str],
    typer.Option(
        "--ag-space",
        help="with --ag: x0 or eps, where the cosine is measured (default x0; on shapes the eps "
        "cosine is near 1 from the start)",
    ),
]
CfgRescaleOpt = Annotated[
    Optional[float],
    typer.Option("--cfg-rescale", help="guidance rescale factor PHI in [0, 1] (Lin et al.; x0 space; 0: plain CFG)"),
]
GuidanceIntervalOpt = Annotated[
    Optional[str],
    typer.Option(
        "--guidance-interval",
        help="LO,HI: guidance only for LO < t <= HI, t in the model schedule's own units "
        "(bundled models: 0-999, 999 = noise; HI may be inf); the conditional model elsewhere",
    ),
]
NegativePromptOpt = Annotated[
    Optional[str],
    typer.Option(
        "--negative-prompt",
        help="a condition that replaces the empty one in the guidance (shapes: a caption, digits: a digit)",
    ),
]
LinearAgOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--linear-ag",
        help="LinearAG: a coefficient file from `condiff guidance fit-linear-ag` (same --cfg, --steps, "
        "--spacing); its first evaluations predict the unconditional branch instead of running it",
    ),
]
LinearAgStepsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--linear-ag-steps", help="with --linear-ag: how many evaluations are predicted (default: half the fitted)"
    ),
]
MinorityOpt = Annotated[
    Optional[Path],
    typer.Option("--minority", help="minority guidance: a level classifier from `condiff guidance fit-minority`"),
]
MinorityLevelOpt = Annotated[
    Optional[int],
    typer.Option("--minority-level", help="with --minority: the target level (default: the most minority one)"),
]
MinorityScaleOpt = Annotated[
    Optional[float], typer.Option("--minority-scale", help="with --minority: its scale w (default 1)")
]
ClassifierOpt = Annotated[
    Optional[str],
    typer.Option(
        "--classifier",
        help="classifier guidance: a bundled shapes classifier (clean: EluCD-calibrated; noisy: "
        "noise-aware; ppap: LoRA experts of the clean one), a classifier directory from condiff train, or PPAP "
        "experts from condiff guidance train-ppap",
    ),
]
CgScaleOpt = Annotated[Optional[float], typer.Option("--cg-scale", help="with --classifier: its scale (default 1)")]
CgAttributeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--cg-attribute",
        help="with --classifier: the attribute to guide (default color); the target is the value the prompt names",
    ),
]
CgRawOpt = Annotated[
    bool,
    typer.Option("--cg-raw", help="with a clean --classifier: apply it to x_t as it is, without EluCD's calibration"),
]

# The guidance options of `sample` and `eval`: (parameter name, option type, default), declared once.
GUIDANCE_OPTIONS = (
    ("pag", PagOpt, None),
    ("pag_layers", PagLayersOpt, None),
    ("ag", AgOpt, None),
    ("ag_space", AgSpaceOpt, None),
    ("cfg_rescale", CfgRescaleOpt, None),
    ("guidance_interval", GuidanceIntervalOpt, None),
    ("negative_prompt", NegativePromptOpt, None),
    ("classifier", ClassifierOpt, None),
    ("cg_scale", CgScaleOpt, None),
    ("cg_attribute", CgAttributeOpt, None),
    ("cg_raw", CgRawOpt, False),
    ("linear_ag", LinearAgOpt, None),
    ("linear_ag_steps", LinearAgStepsOpt, None),
    ("minority", MinorityOpt, None),
    ("minority_level", MinorityLevelOpt, None),
    ("minority_scale", MinorityScaleOpt, None),
)


def guidance_options(fn):
    """Give a typer command the GUIDANCE_OPTIONS: they appear in its signature (and --help) after its own
    options, and reach ``fn`` as one dict, its ``guidance`` parameter."""
    import functools
    import inspect

    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "guidance"]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
        for name, kind, default in GUIDANCE_OPTIONS
    ]

    @functools.wraps(fn)
    def command(*args, **kwargs):
        return fn(*args, guidance={name: kwargs.pop(name) for name, _, _ in GUIDANCE_OPTIONS}, **kwargs)

    command.__signature__ = inspect.Signature(own + extra)
    del command.__wrapped__  # typer reads the signature above, not the wrapped function's
    return command
