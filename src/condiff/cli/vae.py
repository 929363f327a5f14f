"""``condiff vae``: sample and interpolate with a DiffuseVAE (``condiff train diffusevae``) or its VAE alone
(``condiff train diffusevae-vae``); the method is ``condiff.tasks.diffusevae`` (Pandey et al., TMLR 2022).

``condiff vae sample --model runs/diffusevae --n 16 --out grid.png`` draws z from the model's latent prior (the
mixture fitted to the VAE's posterior for a recipe with ``prior = "gmm"``, else N(0, I)), decodes x_hat = Dec(z) and
refines it with the conditional DDPM (``--steps`` DPM-Solver++(2M) steps); ``--stage vae`` writes the VAE's x_hat,
``--stage both`` x_hat | x_0 pairs. A VAE model samples ``--stage vae`` only.

``condiff vae interpolate --model runs/diffusevae --pairs 4 --frames 8 --out interp.png`` takes ``--pairs`` pairs of
held-out shapes renders (from ``--seed``), walks the straight line between their latent means in ``--frames``
steps and writes one row per pair (with ``--stage both``: the VAE's row above the refined one); every frame of a row
shares its refiner noise, so what changes along a row comes from z. The labeller's reading of each frame and the
path's smoothness (attribute changes against the minimum, ``condiff.tasks.diffusevae.path_changes``, and returns to a
value left earlier, ``path_reversals``) go to stdout
and --json.

--model takes a model folder or the run folder holding it as model/. Every user error is one ``error:`` line with
exit code 2, raised before any weights are read, and outputs are written atomically once everything is computed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from condiff.cli import common
from condiff.cli.options import ThreadsOpt
from condiff.errors import ConfigError, check_int, one_of

app = typer.Typer(
    help="DiffuseVAE: samples (z -> VAE decode -> diffusion refine) and latent interpolation grids.",
    no_args_is_help=True,
    add_completion=False,
)

STAGES = ("refined", "vae", "both")
MAX_N = 1024
MAX_PAIRS = 32
MAX_FRAMES = 32
GUIDANCE_HELP = (
    "the refiner's guidance weight w: x0_null + w (x0_cond - x0_null), the null condition the refiner trained on "
    "(model.cond_drop: x_hat = 0; model.code_drop: z's shape code zeroed) (default: the model's own, 1 = none; "
    "w != 1 needs a refiner trained with one of them > 0)"
)


def _outputs(out: Path, json_file: Optional[Path]) -> None:
    common.check_out(out, "--out", ".png")
    if json_file is not None:
        common.check_out(json_file, "--json", ".json")
        if json_file.resolve() == out.resolve():
            raise ConfigError(f"--json and --out are the same file {str(out)!r}; choose another")


def _model(model: Path, stage: Optional[str], guidance: Optional[float] = None) -> tuple[Path, str, str, float]:
    """(the model folder, its kind, the stage to write, the refiner's guidance weight: --guidance, else the model's
    own) once --model, --stage and --guidance agree; no weights are read."""
    from condiff.models.dense import table_of
    from condiff.models.diffusevae import FAMILY, KINDS, check_guidance, find_model, guided_share

    if stage is not None and stage not in STAGES:
        raise one_of("--stage", stage, STAGES)
    if guidance is not None and not abs(guidance) < float("inf"):
        raise ConfigError(f"--guidance must be a finite number (1: no guidance), got {guidance}")
    folder = find_model(model)
    table = table_of(folder, FAMILY)
    kind = table.get("kind") if isinstance(table, dict) else None
    if kind not in KINDS:
        raise ConfigError(
            f"--model {str(model)!r}: condiff.json's {FAMILY!r} table has kind {kind!r}; accepted: {', '.join(KINDS)}"
        )
    stage = stage or ("refined" if kind == "ddpm" else "vae")
    if kind == "vae" and stage != "vae":
        raise ConfigError(
            f"--model {str(model)!r} is a VAE alone (condiff train diffusevae-vae); it samples --stage vae, got "
            f"--stage {stage}"
        )
    if kind == "vae" and guidance is not None:
        raise ConfigError(f"--model {str(model)!r} is a VAE alone; it has no refiner to guide (--guidance {guidance})")
    cond_drop = guided_share(table) if kind == "ddpm" else 0.0
    own = table.get("guidance", 1.0) if kind == "ddpm" else 1.0
    try:
        w = check_guidance(own if guidance is None else guidance, cond_drop)
    except ConfigError as e:
        raise ConfigError(f"--model {str(model)!r}: {e}") from None
    return folder, kind, stage, w


def _load(folder: Path):
    from condiff.models.diffusevae import load_diffusevae_model

    return load_diffusevae_model(folder, "--model")


def _record(command: str, model: Path, folder: Path, threads: int, seconds: float, **kw) -> dict:
    import torch

    from condiff import __version__

    return {
        "command": command,
        "model": str(model),
        "model_path": str(folder.resolve()),
        **kw,
        "seconds": seconds,
        "threads": threads,
        "condiff_version": __version__,
        "torch_version": torch.__version__,
    }


@app.command("sample")
def sample_cmd(
    model: Path = typer.Option(Path("runs/diffusevae"), help="a DiffuseVAE or VAE model folder, or its run folder"),
    out: Path = typer.Option(..., help="the samples as a grid (.png)"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="write a JSON report (.json) here"),
    n: int = typer.Option(16, help=f"samples, 1 to {MAX_N}"),
    stage: Optional[str] = typer.Option(
        None, help="refined (the DDPM's x_0; a DiffuseVAE's default), vae (Dec(z); a VAE's only), both (pairs)"
    ),
    steps: int = typer.Option(20, help="the refiner's DPM-Solver++(2M) steps"),
    guidance: Optional[float] = typer.Option(None, help=GUIDANCE_HELP),
    seed: int = typer.Option(0, help="random seed of z (and, + 1, of the refiner's noise)"),
    threads: ThreadsOpt = None,
):
    """Samples z ~ the model's prior -> x_hat = Dec(z) -> the conditional DDPM's x_0."""
    import math

    import torch

    from condiff.core.files import atomic_write_json
    from condiff.data import labeller
    from condiff.data.images import grid_image, save_png

    check_int("--n", n, 1, MAX_N)
    common.check_steps(steps)
    common.check_seed(seed)
    threads = common.use_threads(threads)
    _outputs(out, json_file)
    folder, kind, stage, guidance = _model(model, stage, guidance)
    m = _load(folder)
    t0 = time.perf_counter()
    x_hat, x, nfe = m.sample(n, seed, steps, refine=stage != "vae", guidance=guidance)
    seconds = time.perf_counter() - t0
    shown = {"vae": x_hat, "refined": x}.get(stage)
    cols = max(1, int(math.ceil(math.sqrt(n))))
    if stage == "both":
        tiles, cols = torch.stack([t for i in range(n) for t in (x_hat[i], x[i])]), 2 * cols
    else:
        tiles = shown
    labels = labeller.label(x if stage != "vae" else x_hat)
    objects = float((labels[:, 0] >= 0).float().mean())
    save_png(grid_image(tiles, ncols=cols), out)
    if json_file is not None:
        rec = _record(
            "vae sample",
            model,
            folder,
            threads,
            seconds,
            kind=kind,
            prior=m.prior,
            stage=stage,
            n=n,
            steps=steps if stage != "vae" else None,
            guidance=guidance if stage != "vae" else None,
            seed=seed,
            nfe=int(nfe),
            out=str(out),
            layout="x_hat | x_0 pairs, row by row" if stage == "both" else "grid, row by row",
            object_share=objects,
            samples=[common.attribute_names(r.tolist()) for r in labels],
            reproduce=common.reproduce(
                "vae sample",
                [
                    ("--model", model),
                    ("--out", out),
                    ("--n", n),
                    ("--stage", stage),
                    ("--steps", steps),
                    ("--guidance", guidance if kind == "ddpm" else None),
                    ("--seed", seed),
                    ("--json", json_file),
                ],
            ),  # fmt: skip
        )
        atomic_write_json(json_file, rec)
    typer.echo(
        f"{n} samples ({stage}, {nfe} network evaluations, {seconds:.1f}s): wrote {out}"
        + (f" and {json_file}" if json_file else "")
        + f"; the labeller reads an object in {objects:.1%}"
    )


@app.command("interpolate")
def interpolate_cmd(
    model: Path = typer.Option(Path("runs/diffusevae"), help="a DiffuseVAE or VAE model folder, or its run folder"),
    out: Path = typer.Option(..., help="the grid (.png): one row per pair, one column per frame"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="write a JSON report (.json) here"),
    pairs: int = typer.Option(4, help=f"pairs of held-out shapes renders, 1 to {MAX_PAIRS}"),
    frames: int = typer.Option(8, help=f"frames per path (its ends included), 2 to {MAX_FRAMES}"),
    stage: Optional[str] = typer.Option(
        None, help="refined (a DiffuseVAE's default), vae (Dec(z) only; a VAE's only), both (two rows per pair)"
    ),
    steps: int = typer.Option(20, help="the refiner's DPM-Solver++(2M) steps"),
    guidance: Optional[float] = typer.Option(None, help=GUIDANCE_HELP),
    seed: int = typer.Option(0, help="random seed of the pairs and of each row's refiner noise"),
    threads: ThreadsOpt = None,
):
    """Straight paths between the latents of pairs of real shapes images, decoded (and refined) frame by frame."""
    import torch

    from condiff.core.files import atomic_write_json
    from condiff.data import labeller, shapes
    from condiff.data.images import grid_image, save_png
    from condiff.tasks.diffusevae import path_changes, path_reversals, smoothness

    check_int("--pairs", pairs, 1, MAX_PAIRS)
    check_int("--frames", frames, 2, MAX_FRAMES)
    common.check_steps(steps)
    common.check_seed(seed)
    threads = common.use_threads(threads)
    _outputs(out, json_file)
    folder, kind, stage, guidance = _model(model, stage, guidance)
    m = _load(folder)
    real = shapes.sample_batch(2 * pairs, torch.Generator().manual_seed(seed)).images
    t0 = time.perf_counter()
    x_hat, x, nfe = m.interpolate(
        real[:pairs], real[pairs:], frames, seed, steps, refine=stage != "vae", guidance=guidance
    )
    seconds = time.perf_counter() - t0
    read = x if stage != "vae" else x_hat
    labels = labeller.label(read).view(pairs, frames, -1)
    if stage == "both":
        shape = (pairs, frames, *x.shape[1:])
        tiles = torch.stack([x_hat.clamp(-1, 1).view(shape), x.view(shape)], 1).flatten(0, 2)
    else:
        tiles = read
    save_png(grid_image(tiles, ncols=frames), out)
    score = smoothness(list(labels))
    paths = []
    for i in range(pairs):
        c, mn = path_changes(labels[i])
        paths.append(
            {
                "changes": c,
                "minimum": mn,
                "reversals": path_reversals(labels[i]),
                "frames": [common.attribute_names(r.tolist()) for r in labels[i]],
            }
        )
    if json_file is not None:
        rec = _record(
            "vae interpolate",
            model,
            folder,
            threads,
            seconds,
            kind=kind,
            stage=stage,
            pairs=pairs,
            frames=frames,
            steps=steps if stage != "vae" else None,
            guidance=guidance if stage != "vae" else None,
            seed=seed,
            nfe=int(nfe),
            out=str(out),
            layout=("per pair: the VAE's row, then the refined row" if stage == "both" else "one row per pair"),
            read_from=("refined" if stage != "vae" else "vae"),
            smoothness=score,
            paths=paths,
            reproduce=common.reproduce(
                "vae interpolate",
                [
                    ("--model", model),
                    ("--out", out),
                    ("--pairs", pairs),
                    ("--frames", frames),
                    ("--stage", stage),
                    ("--steps", steps),
                    ("--guidance", guidance if kind == "ddpm" else None),
                    ("--seed", seed),
                    ("--json", json_file),
                ],
            ),  # fmt: skip
        )
        atomic_write_json(json_file, rec)
    typer.echo(
        f"{pairs} paths x {frames} frames ({stage}, {seconds:.1f}s): wrote {out}"
        + (f" and {json_file}" if json_file else "")
        + f"; attribute changes per path {score['changes']:.2f} (minimum {score['minimum']:.2f}), "
        f"minimal paths {score['minimal_share']:.0%}, reversals per path {score['reversals']:.2f} (monotone paths "
        f"{score['monotone_share']:.0%})"
    )
