"""``condiff sr``: x4 super-resolution of shapes with a shared, searched start noise (Ma et al., ICLR 2024;
condiff.tasks.boundary, condiff.models.sr).

``condiff sr search --model runs/sr-shapes --out xT.safetensors`` runs the deterministic solver from
``--candidates`` prior draws on ``--n-val`` validation renders and keeps the draw of highest mean PSNR: the x_T is
written as safetensors (its solver and steps in the metadata) and a JSON sidecar beside it (xT.json: the scores).
``condiff sr apply --model runs/sr-shapes --image low.png --xT xT.safetensors --out hi.png`` upscales an 8x8 image
to 32x32 from that x_T (without --xT: from a random start drawn from --seed).

--model takes an SR model folder (condiff.json with an "sr" table) or the run folder holding it as model/. Every user
error is one ``error:`` line with exit code 2, raised before any weights are read, and outputs are written
atomically once everything has been computed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from condiff.cli import common
from condiff.cli.options import ThreadsOpt
from condiff.errors import ConfigError, InputFileError, check_int, one_of

app = typer.Typer(
    help="x4 super-resolution with a searched shared start noise (Ma et al. 2024).",
    no_args_is_help=True,
    add_completion=False,
)

MAX_CANDIDATES = 4096
MAX_VAL = 4096
ACCEPTED = (
    "an SR model folder (condiff.json with an 'sr' table) or a run folder holding one as model/ "
    "(condiff train sr-shapes)"
)


def sr_folder(model: Path, option: str = "--model") -> Path:
    """The SR model folder of --model (itself or its model/); pickles refused first; else one line."""
    from condiff.core.files import refuse_pickles
    from condiff.models.dense import table_of

    if not str(model) or not model.exists():
        raise InputFileError(f"{option} {str(model)!r} does not exist; accepted: {ACCEPTED}")
    if not model.is_dir():
        raise InputFileError(f"{option} {str(model)!r} is not a folder; accepted: {ACCEPTED}")
    refuse_pickles(model, option)
    for folder in (model, model / "model"):
        if table_of(folder, "sr") is not None:
            return folder
    raise InputFileError(f"{option} {str(model)!r} holds no SR model; accepted: {ACCEPTED}")


def load(folder: Path):
    from condiff.models.base import silence_diffusers
    from condiff.models.sr import load_sr_model

    silence_diffusers()
    return load_sr_model(folder)


def sidecar_of(out: Path) -> Path:
    return out.with_suffix(".json")


@app.command("search")
def search_cmd(
    model: Path = typer.Option(Path("runs/sr-shapes"), help="an SR model folder, or the run folder holding it"),
    out: Path = typer.Option(..., help="the searched x_T (.safetensors); its report goes beside it as .json"),
    candidates: int = typer.Option(64, help=f"candidate start noises drawn from the prior, 1 to {MAX_CANDIDATES}"),
    n_val: int = typer.Option(64, help=f"validation renders each candidate is scored on (mean PSNR), 1 to {MAX_VAL}"),
    steps: int = typer.Option(10, help="steps of the deterministic solver"),
    solver: str = typer.Option("dpmpp2m", help="deterministic solver: dpmpp2m (DPM-Solver++(2M)) or ddim (eta 0)"),
    seed: int = typer.Option(0, help="seed of the candidates and of the validation renders"),
    threads: ThreadsOpt = None,
):
    """Search the shared x_T of highest mean PSNR on validation renders (Ma et al. 2024)."""
    import torch
    from tqdm import tqdm

    from condiff import __version__
    from condiff.core.files import atomic_write_json
    from condiff.models.sr import SOLVERS, save_start, search_start

    check_int("--candidates", candidates, 1, MAX_CANDIDATES)
    check_int("--n-val", n_val, 1, MAX_VAL)
    common.check_steps(steps)
    if solver not in SOLVERS:
        raise one_of("--solver", solver, SOLVERS)
    common.check_seed(seed)
    threads = common.use_threads(threads)
    common.check_out(out, "--out", ".safetensors")
    side = sidecar_of(out)
    common.check_out(side, "--out's report")
    folder = sr_folder(model)
    m = load(folder)
    t0 = time.perf_counter()
    with tqdm(total=candidates * n_val, desc="sr search", unit="run", leave=False) as bar:
        res = search_start(m, candidates, n_val, steps, solver, seed, progress=bar.update)
    seconds = time.perf_counter() - t0
    scores = res.scores.tolist()
    record = {
        "command": "sr search",
        "method": "shared boundary condition (Ma et al., ICLR 2024): best of K prior draws by mean validation PSNR",
        "model": str(model),
        "model_path": str(folder.resolve()),
        "out": str(out),
        "candidates": candidates,
        "n_val": n_val,
        "steps": steps,
        "solver": solver,
        "seed": seed,
        "index": res.index,
        "best_psnr": scores[res.index],
        "mean_candidate_psnr": float(res.scores.mean()),
        "worst_psnr": min(scores),
        "scores": scores,
        "runs": candidates * n_val,
        "batched_network_calls": res.nfe,
        "seconds": seconds,
        "threads": threads,
        "condiff_version": __version__,
        "torch_version": torch.__version__,
        "reproduce": common.reproduce(
            "sr search",
            [
                ("--model", model),
                ("--out", out),
                ("--candidates", candidates),
                ("--n-val", n_val),
                ("--steps", steps),
                ("--solver", solver),
                ("--seed", seed),
            ],
        ),
    }
    save_start(out, res.x_T, steps, solver, m.config["upsample"])
    atomic_write_json(side, record)
    typer.echo(
        f"searched x_T: candidate {res.index} of {candidates}, validation PSNR {scores[res.index]:.2f} dB "
        f"(candidates' mean {float(res.scores.mean()):.2f}; {candidates * n_val} runs of {steps} {solver} steps, "
        f"{seconds:.0f}s): "
        f"wrote {out} and {side}"
    )


@app.command("apply")
def apply_cmd(
    model: Path = typer.Option(Path("runs/sr-shapes"), help="an SR model folder, or the run folder holding it"),
    image: Path = typer.Option(..., help="the low-resolution image (8x8; others are centre-cropped and resized)"),
    xt: Optional[Path] = typer.Option(
        None, "--xT", help="the shared x_T from `condiff sr search` (.safetensors); default: a random start"
    ),
    out: Path = typer.Option(..., help="the 32x32 image (.png)"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="write a JSON report (.json) here"),
    seed: int = typer.Option(0, help="seed of the random start (without --xT)"),
    threads: ThreadsOpt = None,
):
    """Upscale an 8x8 image x4 with an SR model, from the searched shared x_T (or a random start)."""
    import torch

    from condiff import __version__
    from condiff.core.files import atomic_write_json, refuse_pickles
    from condiff.data.images import read_image, write_image
    from condiff.errors import one_line
    from condiff.models.sr import CHANNELS, DEFAULT_SOLVER, DEFAULT_STEPS, LOW, load_start_file

    common.check_seed(seed)
    threads = common.use_threads(threads)
    common.check_out(out, "--out", ".png")
    if json_file is not None:
        common.check_out(json_file, "--json", ".json")
        if json_file.resolve() == out.resolve():
            raise ConfigError(f"--json and --out are the same file {str(out)!r}; choose another")
    for option, p in (("--image", image), ("--xT", xt)):
        for target, name in ((out, "--out"), (json_file, "--json")):
            if p is not None and target is not None and p.exists() and p.resolve() == target.resolve():
                raise ConfigError(f"{name} {str(target)!r} would overwrite {option} {str(p)!r}; choose another")
    refuse_pickles(image, "--image")
    try:
        src = read_image(image, (CHANNELS, LOW, LOW))
    except (InputFileError, ConfigError) as e:
        raise type(e)(f"--image: {e}") from None
    if src.notice:
        typer.echo(f"note: {one_line(src.notice)}", err=True)
    x_T, steps, solver = (None, DEFAULT_STEPS, DEFAULT_SOLVER) if xt is None else load_start_file(xt)
    folder = sr_folder(model)
    m = load(folder)
    t0 = time.perf_counter()
    hi = m.upscale(src.tensor, x_T, steps, solver, seed)
    seconds = time.perf_counter() - t0
    write_image(hi[0], out)
    record = {
        "command": "sr apply",
        "model": str(model),
        "model_path": str(folder.resolve()),
        "image": str(image),
        "original_size": list(src.original_size),
        "notice": src.notice,
        "xT": None if xt is None else str(xt),
        "start": "random" if xt is None else "searched",
        "steps": steps,
        "solver": solver,
        "seed": seed if xt is None else None,
        "seconds": seconds,
        "out": str(out),
        "size": list(hi.shape[-2:]),
        "threads": threads,
        "condiff_version": __version__,
        "torch_version": torch.__version__,
        "reproduce": common.reproduce(
            "sr apply",
            [
                ("--model", model),
                ("--image", image),
                ("--xT", xt),
                ("--out", out),
                ("--seed", seed if xt is None else None),
                ("--json", json_file),
            ],
        ),
    }
    if json_file is not None:
        atomic_write_json(json_file, record)
    start = "a random start" if xt is None else f"the searched x_T {xt}"
    typer.echo(
        f"x4 upscaled from {start} ({steps} {solver} steps, {seconds:.2f}s): wrote {out}"
        + (f" and {json_file}" if json_file else "")
    )
