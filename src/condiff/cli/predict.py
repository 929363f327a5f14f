"""``condiff predict`` (an image's depth or mask map) and ``condiff unicon`` (UniCon's generation directions).

``condiff predict --task depth|mask --image in.png --model runs/lotus --out map.png [--json F]`` runs a dense
predictor on one image: Lotus (``condiff train lotus``: one network evaluation), the eps-model baseline
(``condiff train dense-eps``: ``--steps`` DPM-Solver++(2M) steps, default 20) or UniCon's image -> mask direction
(``condiff train unicon``: ``--task mask``, the image held clean, ``--steps`` steps). Predicting a map from an
image is one task whichever model does it, so the three share this command, its options and its JSON.

``condiff unicon --model runs/unicon --map mask.png --out image.png`` samples images for a given mask (the mask
held clean) and ``condiff unicon --model runs/unicon --joint --out pairs.png`` samples (image, mask) pairs
together: generation from UniCon's joint model, with options of its own (``--map``, ``--joint``, ``--guidance``:
UniCon's contrast of the clean mask against the mask at T), so ``condiff sample``'s caption and guidance options
stay those of the caption-conditioned families.

--model takes a model folder (``condiff.json`` with a "dense" or "unicon" table) or the run folder that holds it
as ``model/``. Maps are written at the model's size (32x32) as grayscale PNGs: depth d in [0, 1] as d * 255, the
mask as 0 / 255. Every user error is one ``error:`` line with exit code 2, raised before any weights are read, and
outputs are written atomically once everything has been computed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from condiff.cli import common
from condiff.cli.options import ThreadsOpt
from condiff.errors import ConfigError, InputFileError, check_int, one_of

TASKS = ("depth", "mask")
MAX_N = 1024
KINDS = {"dense": "condiff train lotus | dense-eps", "unicon": "condiff train unicon"}


def model_folder(model: Path, option: str = "--model") -> tuple[Path, str, str]:
    """(the model folder, its family: 'dense' or 'unicon', its kind: 'lotus', 'eps' or 'unicon') for --model: a model
    folder or a run folder holding one as model/. Pickled files anywhere in it are refused first; anything else is
    one line naming what is accepted (a malformed table is the loader's to refuse)."""
    from condiff.core.files import refuse_pickles
    from condiff.models.dense import table_of

    accepted = (
        "a model folder (condiff.json with a 'dense' or 'unicon' table) or a run folder holding one as model/, "
        "written by `condiff train lotus`, `dense-eps` or `unicon`"
    )
    if not str(model) or not model.exists():
        raise InputFileError(f"{option} {str(model)!r} does not exist; accepted: {accepted}")
    if not model.is_dir():
        raise InputFileError(f"{option} {str(model)!r} is not a folder; accepted: {accepted}")
    refuse_pickles(model, option)
    for folder in (model, model / "model"):
        for family in KINDS:
            table = table_of(folder, family)
            if table is not None:
                kind = table.get("kind") if family == "dense" and isinstance(table, dict) else family
                return folder, family, kind
    raise InputFileError(f"{option} {str(model)!r} holds no dense or unicon model; accepted: {accepted}")


def load_task_model(folder: Path, family: str, option: str = "--model"):
    from condiff.models.base import silence_diffusers

    silence_diffusers()
    if family == "dense":
        from condiff.models.dense import load_dense_model

        return load_dense_model(folder, option)
    from condiff.models.unicon import load_unicon_model

    return load_unicon_model(folder, option)


def _outputs(out: Path, json_file: Optional[Path], inputs: dict) -> None:
    """--out (a .png) and --json checked before anything is loaded: writable, distinct, not an input."""
    common.check_out(out, "--out", ".png")
    if json_file is not None:
        common.check_out(json_file, "--json", ".json")
        if json_file.resolve() == out.resolve():
            raise ConfigError(f"--json and --out are the same file {str(out)!r}; choose another")
    for option, p in inputs.items():
        if p is None or not p.exists():
            continue
        for target, name in ((out, "--out"), (json_file, "--json")):
            if target is not None and p.resolve() == target.resolve():
                raise ConfigError(f"{name} {str(target)!r} would overwrite {option} {str(p)!r}; choose another")


def _read_input(path: Path, option: str, channels: int):
    """A (1, C, 32, 32) tensor in [-1, 1] (centre-cropped and resized with a note where needed); a pickle is refused
    first, and every other bad file is read_image's one line, prefixed with the option."""
    from condiff.core.files import refuse_pickles
    from condiff.data.images import read_image
    from condiff.data.shapes import SIZE
    from condiff.errors import one_line

    refuse_pickles(path, option)
    try:
        src = read_image(path, (channels, SIZE, SIZE))
    except (InputFileError, ConfigError) as e:
        raise type(e)(f"{option}: {e}") from None
    if src.notice:
        typer.echo(f"note: {one_line(src.notice)}", err=True)
    return src


def predict_cmd(
    task: str = typer.Option(..., help="depth (the object's depth map) or mask (the object's mask)"),
    image: Path = typer.Option(
        ..., help="the input image (PNG, JPEG, ...; 32x32, others are centre-cropped and resized)"
    ),
    model: Path = typer.Option(
        Path("runs/lotus"),
        help="a dense or unicon model folder, or the run folder holding it as model/ (condiff train lotus | "
        "dense-eps | unicon)",
    ),
    out: Path = typer.Option(..., help="the map (.png, grayscale, 32x32: depth x 255, mask 0 / 255)"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="write a JSON report (.json) here"),
    steps: Optional[int] = typer.Option(
        None, help="solver steps of a multi-step model (eps-model, UniCon; default 20); Lotus takes one step"
    ),
    seed: int = typer.Option(0, help="random seed of the initial noise"),
    threshold: Optional[str] = typer.Option(
        None,
        help="the eps-model's x0 estimates while sampling: dynamic (Imagen's dynamic thresholding, the default), "
        "clip (to [-1, 1]) or none",
    ),
    threads: ThreadsOpt = None,
):
    """Predict an image's depth or mask map with a dense model (Lotus: one network evaluation) or UniCon."""
    import torch

    from condiff import __version__
    from condiff.core.files import atomic_write_json
    from condiff.data.images import write_image
    from condiff.models.dense import DEFAULT_STEPS, EPS_THRESHOLD, THRESHOLDS, map_image, read_map

    if task not in TASKS:
        raise one_of("--task", task, TASKS)
    if threshold is not None and threshold not in THRESHOLDS:
        raise one_of("--threshold", threshold, THRESHOLDS)
    if steps is not None:
        common.check_steps(steps)
    common.check_seed(seed)
    threads = common.use_threads(threads)
    _outputs(out, json_file, {"--image": image})
    folder, family, kind = model_folder(model)
    if family == "unicon" and task != "mask":
        raise ConfigError(f"a unicon model predicts --task mask (its map), got --task {task}")
    if kind == "lotus" and steps not in (None, 1):
        raise ConfigError(f"a Lotus model predicts in one network evaluation; --steps must be 1, got {steps}")
    if threshold is not None and kind != "eps":
        raise ConfigError(f"--threshold is for the eps-model's sampling; this is a {kind} model")
    src = _read_input(image, "--image", 3)
    m = load_task_model(folder, family)
    kind = m.kind if family == "dense" else "unicon"
    x = src.tensor
    t0 = time.perf_counter()
    with torch.no_grad():
        if family == "dense":
            p = m.predict(x, task, steps, seed, threshold)
            maps, nfe = p.x, p.nfe
        else:
            maps, nfe = m.image_to_map(x, steps or DEFAULT_STEPS, seed)
    seconds = time.perf_counter() - t0
    result = read_map(maps, task)
    summary = (
        {"object_pixels": int(result.sum())}
        if task == "mask"
        else {"max": float(result.max()), "object_pixels": int((result > 0).sum())}
    )
    write_image(map_image(result)[0], out)
    record = {
        "command": "predict",
        "task": task,
        "model": str(model),
        "model_path": str(folder.resolve()),
        "kind": kind,
        "nfe": int(nfe),
        "steps": None if kind == "lotus" else (steps or DEFAULT_STEPS),
        "threshold": (threshold or EPS_THRESHOLD) if kind == "eps" else None,
        "seed": seed,
        "seconds": seconds,
        "image": str(image),
        "original_size": list(src.original_size),
        "notice": src.notice,
        "out": str(out),
        "size": list(result.shape[-2:]),
        "map": summary,
        "threads": threads,
        "condiff_version": __version__,
        "torch_version": torch.__version__,
        "reproduce": common.reproduce(
            "predict",
            [
                ("--task", task),
                ("--image", image),
                ("--model", model),
                ("--out", out),
                ("--steps", steps),
                ("--seed", seed),
                ("--threshold", threshold),
                ("--json", json_file),
            ],
        ),
    }
    if json_file is not None:
        atomic_write_json(json_file, record)
    what = "one network evaluation" if nfe == 1 else f"{nfe} network evaluations"
    typer.echo(f"{task} map ({kind}, {what}, {seconds:.2f}s): wrote {out}" + (f" and {json_file}" if json_file else ""))


def unicon_cmd(
    model: Path = typer.Option(Path("runs/unicon"), help="a unicon model folder, or the run folder holding it"),
    map_file: Optional[Path] = typer.Option(
        None, "--map", help="mask -> image: the given mask (white = object; 32x32, read as grayscale)"
    ),
    joint: bool = typer.Option(False, "--joint", help="sample (image, mask) pairs together"),
    out: Path = typer.Option(
        ..., help="the image (.png; --n > 1: a grid), or with --joint a grid of image | mask pairs"
    ),
    json_file: Optional[Path] = typer.Option(None, "--json", help="write a JSON report (.json) here"),
    n: int = typer.Option(1, help=f"samples, 1 to {MAX_N}"),
    steps: int = typer.Option(20, help="DPM-Solver++(2M) steps"),
    guidance: float = typer.Option(
        1.0, help="--map only: UniCon's guidance, the clean mask against the mask at T (1 = off)"
    ),
    seed: int = typer.Option(0, help="random seed of the initial noise"),
    threads: ThreadsOpt = None,
):
    """UniCon's generation: images for a given mask (--map) or (image, mask) pairs together (--joint), from the
    joint model that `condiff predict --task mask` runs the other way."""
    import math

    import torch

    from condiff import __version__
    from condiff.core.files import atomic_write_json
    from condiff.data import labeller
    from condiff.data.images import grid_image, save_png, write_image
    from condiff.guidance.schedules import check_scale
    from condiff.tasks.lotus import mask_iou

    if (map_file is None) == (not joint):
        raise ConfigError(
            "condiff unicon needs exactly one of --map FILE (mask -> image) and --joint (image and mask together); "
            "image -> mask is `condiff predict --task mask --model DIR`"
        )
    check_int("--n", n, 1, MAX_N)
    common.check_steps(steps)
    common.check_seed(seed)
    check_scale(guidance, "--guidance")
    if joint and guidance != 1.0:
        raise ConfigError(f"--guidance is for --map (the given mask), got --guidance {guidance} with --joint")
    threads = common.use_threads(threads)
    _outputs(out, json_file, {"--map": map_file})
    folder, family, _ = model_folder(model)
    if family != "unicon":
        raise InputFileError(f"--model {str(model)!r} is a dense model; condiff unicon needs a unicon model")
    given = None
    if map_file is not None:
        src = _read_input(map_file, "--map", 1)
        given = torch.where(src.tensor > 0, 1.0, -1.0)
    m = load_task_model(folder, family)
    t0 = time.perf_counter()
    if joint:
        images, maps, nfe = m.joint(n, steps, seed)
        maps = torch.where(maps > 0, 1.0, -1.0)  # the sampled mask, read as the mask it is (> 0: object)
    else:
        images, nfe = m.map_to_image(given.expand(n, -1, -1, -1), steps, seed, guidance)
        maps = given.expand(n, -1, -1, -1)
    seconds = time.perf_counter() - t0
    rows = labeller.label(images)
    iou = mask_iou(labeller.masks(images), maps[:, 0] > 0)
    samples = [{"labels": common.attribute_names(r.tolist()), "mask_iou": float(v)} for r, v in zip(rows, iou.tolist())]
    if joint:
        tiles = torch.stack([t for i in range(n) for t in (images[i], maps[i].expand(3, -1, -1))])
        save_png(grid_image(tiles, ncols=2 * max(1, int(math.ceil(math.sqrt(n))))), out)
    elif n == 1:
        write_image(images[0], out)
    else:
        save_png(grid_image(images, ncols=max(1, int(math.ceil(math.sqrt(n))))), out)
    record = {
        "command": "unicon",
        "direction": "joint" if joint else "map_to_image",
        "model": str(model),
        "model_path": str(folder.resolve()),
        "map": None if map_file is None else str(map_file),
        "n": n,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "nfe": int(nfe),
        "seconds": seconds,
        "out": str(out),
        "layout": "image | mask pairs, row by row" if joint else ("image" if n == 1 else "grid, row by row"),
        "mask_iou": float(iou.mean()),
        "samples": samples,
        "threads": threads,
        "condiff_version": __version__,
        "torch_version": torch.__version__,
        "reproduce": common.reproduce(
            "unicon",
            [
                ("--model", model),
                ("--map", map_file),
                ("--joint", joint),
                ("--out", out),
                ("--n", n),
                ("--steps", steps),
                ("--guidance", guidance),
                ("--seed", seed),
                ("--json", json_file),
            ],
        ),
    }
    if json_file is not None:
        atomic_write_json(json_file, record)
    what = "joint (image, mask) pairs" if joint else "images for the given mask"
    typer.echo(
        f"{n} {what} ({nfe} network evaluations, {seconds:.1f}s): wrote {out}"
        + (f" and {json_file}" if json_file else "")
        + f"; mask IoU of the labeller's object with the mask {float(iou.mean()):.3f}"
    )
