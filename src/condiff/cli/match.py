"""``condiff match``: dense matching with a DiffMatch model (``condiff.tasks.diffmatch``; Nam et al., ICLR 2024).

``condiff match --model runs/diffmatch --source a.png --target b.png --out flow.png [--json F] [--steps N]
[--seed S] [--hypotheses K]`` estimates the target-to-source flow (target pixel q shows source point q + F(q)) of
two images at the model's size (32x32) and writes it colour coded (hue: direction, saturation: magnitude relative
to the largest, white: no motion) as --out, at the images' size. --json writes the flow itself (pixels, [x, y]
channels of H x W lists), the initial flow (the correlation volume's soft-argmax) and the options, so a run can be
reproduced. --model takes a model folder or a training run's folder (its ``model/``).

Every user error is one ``error:`` line with exit code 2, raised before any weights are read or anything is
written; files that hold pickled data are refused.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from condiff.cli import common
from condiff.cli.options import ThreadsOpt
from condiff.errors import ConfigError, InputFileError, check_int

MAX_HYPOTHESES = 256
MAX_STEPS = 1000


def read_pair_image(path: Path, option: str, size: int):
    """The image at ``path`` as a (1, 3, size, size) tensor in [-1, 1]; any other size is refused (the flow is
    in the model's pixels), and so is anything ``read_image`` refuses, each prefixed with the option."""
    from condiff.data.images import read_image

    try:
        got = read_image(path, (3, size, size), resize=True)
    except (InputFileError, ConfigError) as e:
        raise type(e)(f"{option}: {e}") from None
    if got.notice is not None:
        w, h = got.original_size
        raise InputFileError(
            f"{option} {str(path)!r} is {w}x{h} (width x height); accepted: {size}x{size} images (the model's size)"
        )
    return got.tensor


def match_cmd(
    model: Path = typer.Option(..., help="a diffmatch model folder, or the training run's folder (its model/)"),
    source: Path = typer.Option(..., help="the source image (PNG, JPEG, ...; 32x32)"),
    target: Path = typer.Option(..., help="the target image, same size: the flow maps its pixels into the source"),
    out: Path = typer.Option(..., help="the colour-coded flow (.png, at the images' size)"),
    json_out: Optional[Path] = typer.Option(
        None, "--json", help="also write the flow, the initial flow and the options as JSON (.json)"
    ),
    steps: Optional[int] = typer.Option(None, help=f"solver steps, 1 to {MAX_STEPS} [default: the recipe's]"),
    seed: int = typer.Option(0, help="random seed of the noise"),
    hypotheses: Optional[int] = typer.Option(
        None, help=f"samples averaged per pair, 1 to {MAX_HYPOTHESES} [default: the recipe's]"
    ),
    threads: ThreadsOpt = None,
):
    """Dense matching: the flow from the target's pixels to the source's, sampled by DiffMatch."""
    import torch

    from condiff import __version__
    from condiff.core.files import atomic_write_json
    from condiff.data.images import write_image
    from condiff.data.matching import SIZE, flow_to_rgb
    from condiff.models import diffmatch as dm

    if steps is not None:
        check_int("--steps", steps, 1, MAX_STEPS)
    if hypotheses is not None:
        check_int("--hypotheses", hypotheses, 1, MAX_HYPOTHESES)
    common.check_seed(seed)
    threads = common.use_threads(threads)
    common.check_out(out, "--out", ".png")
    if json_out is not None:
        common.check_out(json_out, "--json", ".json")
    for p, opt in [(source, "--source"), (target, "--target")]:
        if p.exists() and any(p.resolve() == q.resolve() for q in (out, json_out) if q is not None):
            raise ConfigError(f"--out/--json would overwrite {opt} {str(p)!r}; choose another output path")
    common.refuse_pickled_inputs({"--model": model, "--source": source, "--target": target})
    src = read_pair_image(source, "--source", SIZE)
    tgt = read_pair_image(target, "--target", SIZE)

    m = dm.load_diffmatch_model(model, "--model")
    s = m.sampling
    steps = s.steps if steps is None else steps
    hypotheses = s.hypotheses if hypotheses is None else hypotheses
    t0 = time.perf_counter()
    flow, cond = m.match(src, tgt, steps=steps, seed=seed, hypotheses=hypotheses)
    seconds = time.perf_counter() - t0
    top = float(flow.norm(dim=1).max())
    record = {
        "command": "match",
        "model": str(model),
        "model_path": str(m.path),
        "source": str(source),
        "target": str(target),
        "steps": steps,
        "seed": seed,
        "hypotheses": hypotheses,
        "solver": s.solver,
        "t_start": s.t_start or None,
        "convention": "target pixel (row y, column x) shows source point (x + flow[0][y][x], y + flow[1][y][x])",
        "max_magnitude": top,
        "flow": flow[0].tolist(),
        "init_flow": cond.init_flow[0].tolist(),
        "seconds": seconds,
        "threads": threads,
        "condiff": __version__,
        "reproduce": common.reproduce(
            "match",
            [
                ("--model", model),
                ("--source", source),
                ("--target", target),
                ("--out", out),
                ("--json", json_out),
                ("--steps", steps),
                ("--seed", seed),
                ("--hypotheses", hypotheses),
                ("--threads", threads),
            ],
        ),
    }
    with torch.no_grad():
        write_image(flow_to_rgb(flow, top)[0], out)
    if json_out is not None:
        atomic_write_json(json_out, record)
    typer.echo(f"wrote {out}" + (f" and {json_out}" if json_out is not None else "") + f" ({seconds:.2f} s)")
