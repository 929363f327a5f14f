"""`condiff solvers`, `sample`, `eval`, `train` and `demo` (`models`: cli/catalog.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from condiff.cli import common
from condiff.cli.options import (
    AllowMismatchOpt,
    AnalyticSkipOpt,
    BatchOpt,
    Bf16Opt,
    CentreSubpixelsOpt,
    CfgOpt,
    ChannelsLastOpt,
    CompileOpt,
    DcRatiosOpt,
    EmsOpt,
    GridOpt,
    LoraOpt,
    LoraScaleOpt,
    SeedOpt,
    SolverOpt,
    SolverOptOpt,
    SpacingOpt,
    StepsOpt,
    ThreadsOpt,
    ThresholdOpt,
    TStartOpt,
    guidance_options,
)
from condiff.errors import ConfigError


def solvers_cmd():
    """List the solvers and their CLI names."""
    from condiff.solvers import DESCRIPTIONS

    for name, desc in DESCRIPTIONS.items():
        typer.echo(f"{name:10s} {desc}")


@common.reports_fit_warnings
@guidance_options
def sample_cmd(
    model: Optional[str] = typer.Option(
        None, help="bundled model name (shapes, digits) or a model directory [default: shapes]"
    ),
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
    grid: GridOpt = None,
    batch_size: BatchOpt = 256,
    out: Optional[Path] = typer.Option(
        None,
        help="output PNG: a grid of the samples, or with --n 1 the image itself at its own size; a JSON sidecar "
        "is written beside it [default: grid.png, none with --out-dir alone]",
    ),
    out_dir: Optional[Path] = typer.Option(
        None,
        "--out-dir",
        help="write each sample as its own PNG at its own size (DIR/sample_000.png, ...), with DIR/samples.json "
        "listing each file's index, seed and caption; with --out the grid is written too",
    ),
    analytic_skip: AnalyticSkipOpt = None,
    ems: EmsOpt = None,
    dc_ratios: DcRatiosOpt = None,
    allow_mismatch: AllowMismatchOpt = False,
    solver_opt: SolverOptOpt = None,
    dynamic_threshold: ThresholdOpt = None,
    t_start: TStartOpt = None,
    centre_subpixels: CentreSubpixelsOpt = False,
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
    lora: LoraOpt = None,
    lora_scale: LoraScaleOpt = None,
    compile_net: CompileOpt = False,
    channels_last: ChannelsLastOpt = False,
    bf16: Bf16Opt = False,
    threads: ThreadsOpt = None,
    guide: Optional[str] = typer.Option(
        None,
        "--guide",
        help="token models of captions: steer towards an attribute (e.g. color=red) by discrete classifier guidance "
        "with a noisy bag-of-words classifier (docs/discrete.md)",
    ),
    guide_scale: float = typer.Option(2.0, "--guide-scale", help="with --guide: the tilt's exponent gamma"),
    parallel: Optional[str] = typer.Option(
        None,
        "--parallel",
        help="distrifusion or pcpp: sample each image patch-parallel across the ranks of `torchrun "
        "--nproc_per_node N -m condiff sample --parallel ...` (docs/scale.md); one process: the network runs whole",
    ),
    parallel_opt: Optional[list[str]] = typer.Option(
        None,
        "--parallel-opt",
        help="with --parallel, KEY=VALUE (repeatable): mode (full_sync, sync_gn, corrected_async_gn [default], "
        "stale_gn, no_sync), warmup (synchronous evaluations, default 4), window (PCPP's p, default 0.3), "
        "split_batch (true/false: CFG's two halves on two rank groups, default true)",
    ),
):
    """Sample images and write them as a PNG grid (--n 1: the image itself) and/or one PNG per sample (--out-dir),
    with a JSON sidecar that reproduces them."""
    import torch

    threads = common.use_threads(threads)
    if pipeline is not None:  # a diffusers folder: condiff.cli.pipeline
        from condiff.cli import pipeline as diffusers_cmds

        diffusers_cmds.refuse_model_options(
            {
                "--model": model,
                "--analytic-skip": analytic_skip,
                "--ems": ems,
                "--dc-ratios": dc_ratios,
                "--grid": grid,
                "--dynamic-threshold": dynamic_threshold,
                "--t-start": t_start,
                "--centre-subpixels": centre_subpixels or None,
                "--classifier": guidance["classifier"],
                "--linear-ag": guidance["linear_ag"],
                "--minority": guidance["minority"],
                "--compile": compile_net,
                "--channels-last": channels_last,
                "--bf16": bf16,
                "--lora": lora or None,
                "--parallel": parallel,
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
            out_dir,
            {k: guidance[k] for k in ("pag", "pag_layers", "ag", "ag_space", "cfg_rescale", "guidance_interval")},
        )
    from condiff.cli import tokens as token_cmds

    if token_cmds.is_token_model_arg(model):
        token_cmds.refuse_image_options(
            {
                "--height": height,
                "--width": width,
                "--out-dir": out_dir,
                "--grid": grid,
                "--ems": ems,
                "--dc-ratios": dc_ratios,
                "--analytic-skip": analytic_skip,
                "--spacing": spacing,
                "--lora": lora or None,
                "--compile": compile_net,
                "--channels-last": channels_last,
                "--bf16": bf16,
                "--dynamic-threshold": dynamic_threshold,
                "--t-start": t_start,
                "--parallel": parallel,
            }
        )
        return token_cmds.sample_cmd(model, prompt, n, steps, seed, out, guide, guide_scale, solver)
    if guide is not None:
        raise ConfigError("--guide goes with a token model of captions (condiff train captions-uncond); see --help")
    model = "shapes" if model is None else model
    if height is not None or width is not None:
        raise ConfigError("--height and --width go with --pipeline (condiff's own models have a fixed size)")

    from condiff import __version__
    from condiff.evaluation.evaluate import generate_counted

    common.check_common(steps, cfg, n, batch_size, seed, dynamic_threshold)
    from condiff.cli import psample

    par = psample.config_of(parallel, parallel_opt)
    out = common.check_sample_outputs(out, out_dir)
    fitted = common.FittedFiles(allow_mismatch)
    loras = common.lora_scales(lora, lora_scale)
    family, sol, spacing, spc, skip = common.sampling_setup(
        model, solver, steps, cfg, spacing, ems, dc_ratios, solver_opt, analytic_skip, fitted, grid
    )
    guide = common.guidance_options_of(family, cfg, fitted=fitted, **guidance)
    one = None if prompt is None else family.parse_prompt(prompt)
    m = common.load_model(model)
    fitted.check_model(m, model)
    common.apply_loras(m, lora, loras)
    from condiff.models.runtime import run_faster

    run_faster(m, compile_net, channels_last, bf16)  # after the fitted-file checks have read the weights
    m, engine = psample.attach(m, par)
    t0_grid, factor = common.start_of(m, model, t_start, centre_subpixels)
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
        t_start=t0_grid,
        centre_subpixels=factor,
    )
    seconds = time.perf_counter() - t0
    parallel_record = psample.describe(engine)
    if not psample.writes(engine):
        return
    written = common.write_samples(images, out, out_dir)
    captions = m.family.captions(raw)
    sidecar = {
        "command": "sample",
        "model": model,
        "model_path": str(m.path),
        "prompt": prompt,
        "captions": captions,  # one per sample (grid tiles row by row)
        **written,
        "solver": solver,
        "steps": steps,
        "cfg": cfg,
        "n": n,
        "seed": seed,
        "spacing": spacing,
        "grid": None if grid is None else str(grid),
        "batch_size": batch_size,
        "nfe": nfe,
        "seconds": seconds,
        "condiff_version": __version__,
        "torch_version": torch.__version__,
        "analytic_skip": analytic_skip,
        "ems": None if ems is None else str(ems),
        "dc_ratios": None if dc_ratios is None else str(dc_ratios),
        "solver_fallback": common.solver_fallback(sol),
        "allow_mismatch": allow_mismatch,
        "solver_opt": solver_opt or [],
        "dynamic_threshold": dynamic_threshold,
        "t_start": t0_grid,
        "centre_subpixels": centre_subpixels,
        "network_rows_per_sample": rows,
        "lora": [str(p) for p in lora or []],
        "lora_scale": list(loras.values()),
        "compile": compile_net,
        "channels_last": channels_last,
        "bf16": bf16,
        "threads": threads,
        **parallel_record,
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
                ("--spacing", None if grid is not None else spacing),
                ("--grid", grid),
                ("--batch-size", batch_size),
                ("--out", out),
                ("--out-dir", out_dir),
                ("--analytic-skip", analytic_skip),
                ("--solver-opt", solver_opt or []),
                ("--ems", ems),
                ("--dc-ratios", dc_ratios),
                ("--allow-mismatch", allow_mismatch),
                ("--dynamic-threshold", dynamic_threshold),
                ("--t-start", t_start),
                ("--centre-subpixels", centre_subpixels),
                ("--lora", [str(p) for p in lora or []]),
                ("--lora-scale", lora_scale or []),
                ("--compile", compile_net),
                ("--channels-last", channels_last),
                ("--bf16", bf16),
                ("--parallel", parallel),
                ("--parallel-opt", parallel_opt or []),
            ],
        )
        + guide.flags(),
    }
    wrote = common.write_sample_sidecars(sidecar, out, out_dir, seed, captions)
    typer.echo(f"{wrote} ({n} images, {nfe} NFE, {seconds:.1f}s)")


@common.reports_fit_warnings
@guidance_options
def eval_cmd(
    model: str = typer.Option(..., help="bundled model name (shapes, digits) or a model directory"),
    solver: SolverOpt = "dpmpp-2m",
    steps: StepsOpt = 20,
    cfg: CfgOpt = 3.0,
    n: int = typer.Option(512, help="number of samples"),
    seed: SeedOpt = 0,
    spacing: SpacingOpt = None,
    grid: GridOpt = None,
    batch_size: BatchOpt = 256,
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the results here as JSON"),
    analytic_skip: AnalyticSkipOpt = None,
    ems: EmsOpt = None,
    dc_ratios: DcRatiosOpt = None,
    allow_mismatch: AllowMismatchOpt = False,
    solver_opt: SolverOptOpt = None,
    dynamic_threshold: ThresholdOpt = None,
    t_start: TStartOpt = None,
    centre_subpixels: CentreSubpixelsOpt = False,
    guidance: dict = None,  # the guidance options (GUIDANCE_OPTIONS), filled in by @guidance_options
    lora: LoraOpt = None,
    lora_scale: LoraScaleOpt = None,
    compile_net: CompileOpt = False,
    channels_last: ChannelsLastOpt = False,
    bf16: Bf16Opt = False,
    threads: ThreadsOpt = None,
):
    """Sample random conditions and score them with the exact labeller (shapes) or the scorer (digits).

    Prints a short table (digits add Fréchet distance, precision and recall against held-out digits); --json
    writes every setting and result."""
    from condiff.cli import tokens as token_cmds
    from condiff.core.files import atomic_write_json
    from condiff.evaluation.evaluate import evaluate

    if token_cmds.is_token_model_arg(model):
        token_cmds.refuse_image_options(
            {
                "--grid": grid,
                "--ems": ems,
                "--dc-ratios": dc_ratios,
                "--analytic-skip": analytic_skip,
                "--spacing": spacing,
                "--lora": lora or None,
                "--compile": compile_net,
                "--channels-last": channels_last,
                "--bf16": bf16,
            }
        )
        return token_cmds.eval_cmd(model, n, seed, steps, json_out, solver)
    common.check_common(steps, cfg, n, batch_size, seed, dynamic_threshold)
    if json_out is not None:
        common.check_out(json_out, "--json", ".json")
    fitted = common.FittedFiles(allow_mismatch)
    loras = common.lora_scales(lora, lora_scale)
    family, sol, spacing, spc, skip = common.sampling_setup(
        model, solver, steps, cfg, spacing, ems, dc_ratios, solver_opt, analytic_skip, fitted, grid
    )
    guide = common.guidance_options_of(family, cfg, fitted=fitted, **guidance)
    threads = common.use_threads(threads)
    m = common.load_model(model)
    fitted.check_model(m, model)
    common.apply_loras(m, lora, loras)
    from condiff.models.runtime import run_faster

    run_faster(m, compile_net, channels_last, bf16)  # after the fitted-file checks have read the weights
    t0_grid, factor = common.start_of(m, model, t_start, centre_subpixels)
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
        t_start=t0_grid,
        centre_subpixels=factor,
    )
    res.update(**guide.describe())
    res.update(
        model=model,
        spacing=spacing,
        grid=None if grid is None else str(grid),
        ems=None if ems is None else str(ems),
        dc_ratios=None if dc_ratios is None else str(dc_ratios),
        solver_fallback=common.solver_fallback(sol),
        allow_mismatch=allow_mismatch,
        solver_opt=solver_opt or [],
        lora=[str(p) for p in lora or []],
        lora_scale=list(loras.values()),
        compile=compile_net,
        channels_last=channels_last,
        bf16=bf16,
        threads=threads,
    )
    if m.family.name == "digits":
        from condiff.data.digits import scorer

        res["scorer_heldout_accuracy"] = scorer().heldout_accuracy
    if json_out is not None:
        atomic_write_json(json_out, res)
    typer.echo(eval_table(res))
    typer.echo(
        f"wrote {json_out} (every setting and result)"
        if json_out is not None
        else "(--json FILE writes every setting and result)"
    )


OPTION_KEYS = (
    "grid",
    "lora",
    "lora_scale",
    "analytic_skip",
    "dynamic_threshold",
    "t_start",
    "centre_subpixels",
    "ems",
    "dc_ratios",
    "solver_opt",
    "pag",
    "ag",
    "cfg_rescale",
    "linear_ag",
    "guidance_interval",
    "negative_prompt",
    "classifier",
    "cg_scale",
    "minority",
    "compile",
    "channels_last",
    "bf16",
)


def eval_table(res: dict) -> str:
    """What `condiff eval` prints: the run in one line, then one row per metric (accuracies, the family's
    distribution metrics), NFE, network rows and seconds. The JSON (--json) keeps everything."""
    run = (
        f"{res['model']}: {res['solver']}, {res['steps']} steps {res.get('spacing')}, cfg {res['cfg']:g}, "
        f"n {res['n']}, seed {res['seed']}"
    )
    given = [f"{k}={res[k]}" for k in OPTION_KEYS if res.get(k) not in (None, [], False)]
    rows = [("all attributes right" if k == "all" else f"{k} accuracy", f"{v:.3f}") for k, v in res["accuracy"].items()]
    quality = res.get("quality") or {}
    for key, label, fmt in (
        ("frechet", "Frechet distance", ".2f"),
        ("precision", "precision", ".3f"),
        ("recall", "recall", ".3f"),
    ):
        if key in quality:
            value = "- (too few samples)" if quality[key] is None else format(quality[key], fmt)
            rows.append((label, value + (f"  ({quality['features']})" if key == "frechet" else "")))
    rows += [
        ("NFE", str(res["nfe"])),
        ("network rows", f"{res['network_rows_per_sample']:g} per sample"),
        ("seconds", f"{res['seconds']:.1f}"),
    ]
    lines = [run + (f" ({', '.join(given)})" if given else "")]
    return "\n".join(lines + [f"  {label:<22s}{value}" for label, value in rows])


def train_cmd(
    recipe: str = typer.Argument(
        ...,
        help="a packaged recipe's name (digits, shapes, ...: `condiff recipes` lists them) or a path to a .toml "
        "file (a path ends in .toml or holds a /)",
    ),
    steps: Optional[int] = typer.Option(None, help="override the recipe's number of steps"),
    out: Optional[Path] = typer.Option(None, help="output directory (default runs/<recipe name>)"),
    resume: bool = typer.Option(False, help="continue from the newest valid checkpoint in --out"),
    seed: Optional[int] = typer.Option(None, help="override the recipe's seed (data order, noise, init)"),
    threads: ThreadsOpt = None,
    fast: Optional[bool] = typer.Option(
        None,
        "--fast/--no-fast",
        help="set the recipe's train.fast: the forward in bfloat16 autocast, fused AdamW, multi-tensor EMA "
        "(1.4-1.5x the steps per second on CPUs with bfloat16 instructions; docs/benchmarks.md)",
    ),
    allow_changes: bool = typer.Option(
        False,
        "--allow-changes",
        help="with --resume: go on although the seed or recipe values differ from the checkpoint's (recorded in "
        "trainer.json and the model's condiff.json as recipe_changes); without it such a resume is refused",
    ),
    ddp_backend: str = typer.Option(
        "auto",
        help="under torchrun / accelerate launch: the torch.distributed backend, auto (nccl where each rank has a "
        "GPU, else gloo), gloo or nccl (docs/scale.md)",
    ),
    data_shards: Optional[int] = typer.Option(
        None,
        help="cut each step's global batch (shards x batch_size rows) into this many shards, a multiple of the "
        "number of ranks (default: the number of ranks); one process with --data-shards 2 trains as 2 ranks do",
    ),
):
    """Train a recipe (a packaged recipe's name or a .toml file); checkpoints go to OUT/checkpoints, the final EMA
    model to OUT/model."""
    from condiff.cli.recipes import resolve_recipe
    from condiff.cli.tokens import load_any_recipe
    from condiff.cli.train import train_recipe
    from condiff.training.recipe import check_seed

    r = load_any_recipe(resolve_recipe(recipe))
    if seed is not None:
        import dataclasses

        r = dataclasses.replace(r, train=dataclasses.replace(r.train, seed=check_seed(seed, "--seed")))
    if threads is not None:
        import dataclasses

        r = dataclasses.replace(r, train=dataclasses.replace(r.train, threads=common.thread_count(threads)))
    if fast is not None:
        import dataclasses

        r = dataclasses.replace(r, train=dataclasses.replace(r.train, fast=fast))
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be a positive integer, got {steps}")
    out = out or Path("runs") / r.name
    common.check_out(out, "--out", kind="dir")
    if allow_changes and not resume:
        raise ConfigError("--allow-changes goes with --resume (it lets a resume change the seed or recipe values)")
    tr = train_recipe(
        r,
        out,
        steps=steps,
        resume=resume,
        allow_changes=allow_changes,
        ddp_backend=ddp_backend,
        data_shards=data_shards,
    )
    if not tr.writes:  # a data-parallel job: rank 0 reports
        return
    if tr.start_step >= tr.recipe.train.steps:
        typer.echo(f"finished at step {tr.start_step}: nothing to train; model at {out / 'model'}")
    else:
        typer.echo(f"trained {tr.step} steps in {tr.train_seconds / 60:.1f} min; model at {out / 'model'}")


def demo_cmd(
    out: Path = typer.Option(Path("outputs/demo"), help="output directory"),
    n_eval: int = typer.Option(256, help="samples per metric"),
    threads: ThreadsOpt = None,
):
    """The main job: grids and metrics from the bundled models, as outputs/demo/index.html."""
    from condiff.cli.demo import run_demo

    common.use_threads(threads)
    path = run_demo(out, n_eval=n_eval)
    typer.echo(f"wrote {path}")
