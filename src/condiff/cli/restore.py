"""``condiff restore``: steered restoration (Nair et al., ICCV 2023, "Steered Diffusion", sec. 3.2, linear
degradations) from the command line, over condiff.guidance.steered (``Projection`` with ``Inpaint``,
``SuperResolution``, ``Colorize``) and the self-recurrence of condiff.guidance.universal (Bansal et al. 2023,
Algorithm 1).

``condiff restore --task inpaint --image in.png --mask m.png --out out.png`` fills the white pixels of the mask
(diffusers' convention: white = fill, black = known; read as grayscale, thresholded at mid-gray, resized to
the model's size with nearest-neighbour sampling) and keeps the known pixels bit for bit (in the model-size sample).
``--task sr`` takes a low-resolution square image whose side divides the model's (8x8 for x4 on 32x32) and
samples a model-size image whose average pooling equals it. ``--task colorize`` reads the image, keeps its
BT.601 luminance and samples the colors. The prompt defaults to the empty caption (unconditional).

Writes --out at the input's size as `edit` does (inpaint, colorize: the model-size sample resized back, or
resized to the centre-crop box and pasted into the original; sr: the model's size, the input's times the
factor), ``<stem>_compare.png`` (input | output) and ``<stem>.json`` with the task, the options, the time, the
measurement error max|A x - y| of the model-size sample (and of the written 8-bit file as read back for the
model), the labeller's reading of the output (shapes models) and a command that reproduces it. Every user
error is one ``error:`` line with exit code 2, raised before any weights are read.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from condiff.cli import common
from condiff.cli.options import ThreadsOpt
from condiff.errors import ConfigError, InputFileError, check_int

TASKS = {
    "inpaint": "fill the white pixels of --mask",
    "sr": "super-resolve a low-resolution image",
    "colorize": "color a grayscale (luminance) image",
}
MAX_RECURRENCE = 100


def _check_task(task: str) -> str:
    from condiff.errors import one_of

    if not isinstance(task, str) or task not in TASKS:
        raise one_of("task", task, TASKS)
    return task


def file_size(path: Path, channels: int) -> tuple[int, int]:
    """(width, height) of an image file as a viewer shows it (EXIF orientation applied). A file that is not
    a readable image is refused by ``read_image`` with its usual one-line error."""
    from PIL import Image

    from condiff.data.images import FORMATS, read_image

    try:
        with Image.open(path, formats=FORMATS) as im:
            w, h = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
                w, h = h, w
            return w, h
    except Exception:  # noqa: BLE001  read_image names the problem (missing, empty, not an image, ...)
        read_image(path, (channels, 1, 1), resize=False)
        raise InputFileError(f"cannot read image {str(path)!r}") from None


def read_native(path: Path, channels: int, option: str):
    """The file at its own size as a (1, channels, H, W) tensor in [-1, 1], errors prefixed with the option."""
    from condiff.data.images import read_image

    try:
        w, h = file_size(path, channels)
        return read_image(path, (channels, h, w), resize=False).tensor
    except (InputFileError, ConfigError) as e:
        raise type(e)(f"{option}: {e}") from None


def read_mask(path: Path, src, height: int, width: int):
    """The inpainting mask (1, 1, height, width) bool, True = fill: white pixels (above mid-gray) of the
    file. A mask of the input's size is centre-cropped like the input; then it is resized by nearest
    neighbour. A mask of another size is refused."""
    import torch

    m = read_native(path, 1, "--mask")[0, 0] > 0  # gray 128..255 (white) = fill, 0..127 (black) = known
    mh, mw = m.shape
    iw, ih = src.original_size
    if (mh, mw) == (ih, iw):
        left, top, right, bottom = src.crop
        m = m[top:bottom, left:right]
    elif (mh, mw) != (height, width):
        raise InputFileError(
            f"--mask {str(path)!r} is {mw}x{mh} (width x height); accepted: the image's size "
            f"{iw}x{ih} or the model's size {width}x{height}"
        )
    m = torch.nn.functional.interpolate(m[None, None].float(), size=(height, width), mode="nearest-exact")
    return m > 0.5


def sr_factor(size: tuple[int, int], shape) -> int:
    """The super-resolution factor for a low-resolution input of ``size`` (width, height): model side / side,
    which must be a whole number of at least 2; otherwise one error naming the accepted sizes."""
    _, h, w = shape
    accepted = [h // f for f in range(2, h + 1) if h % f == 0 and w % f == 0 and h // f == w // f]
    if h != w or size[0] != size[1] or size[0] not in accepted:
        sizes = ", ".join(f"{s}x{s}" for s in accepted) or "none"
        raise InputFileError(
            f"--task sr needs a square low-resolution image whose side divides the model's "
            f"{w}x{h}, got {size[0]}x{size[1]}; accepted: {sizes}"
        )
    return h // size[0]


def measurement_error(op, x, y) -> float:
    """max |A x - y| (0 when the measurement is empty)."""
    d = (op(x.double()) - y.double()).abs()
    return float(d.max()) if d.numel() else 0.0


def restore_cmd(
    task: str = typer.Option(
        ...,
        help="inpaint (fill the white pixels of --mask), sr (super-resolution from a "
        "low-resolution image) or colorize (color a grayscale image)",
    ),
    image: Path = typer.Option(
        ...,
        help="the input image (PNG, JPEG, ...): for inpaint and colorize at the model's "
        "size (others are centre-cropped and resized, with a note); for sr the "
        "low-resolution image, e.g. 8x8 for x4 on a 32x32 model",
    ),
    mask: Optional[Path] = typer.Option(
        None,
        help="inpaint only: white pixels are filled, black pixels are kept "
        "(diffusers' convention), at the image's or the model's size",
    ),
    model: str = typer.Option("shapes", help="bundled model name (shapes, digits) or a model directory"),
    prompt: str = typer.Option("", help="caption to sample under (default: the empty caption, unconditional)"),
    steps: int = typer.Option(50, help="sampler steps, 1 to 1000"),
    seed: int = typer.Option(0, help="random seed of the initial noise and the solver's noise"),
    recurrence: int = typer.Option(
        4,
        help=f"self-recurrence: each step is repeated k times, re-noising in between (1 = off), 1 to {MAX_RECURRENCE}",
    ),
    solver: str = typer.Option("ddpm", help="solver name (see `condiff solvers`)"),
    out: Path = typer.Option(
        ...,
        help="the restored image (.png, at the input's size; sr: the model's); <stem>_compare.png and a "
        "JSON sidecar (<stem>.json) are written beside it",
    ),
    threads: ThreadsOpt = None,
):
    """Steered restoration: inpainting, super-resolution or colorization with the model as the prior.

    Each clean estimate is projected onto the images that match the input exactly (Steered Diffusion)."""
    import torch

    from condiff import __version__
    from condiff.core.files import atomic_write_json
    from condiff.core.grids import make_grid
    from condiff.core.sampling import Gaussian, sample
    from condiff.data.images import compare_image, read_image, save_png, write_image
    from condiff.guidance.steered import Colorize, Inpaint, Projection, SuperResolution
    from condiff.guidance.universal import SelfRecurrence
    from condiff.solvers import get_solver

    _check_task(task)
    common.check_steps(steps)
    common.check_seed(seed)
    check_int("--recurrence", recurrence, 1, MAX_RECURRENCE)
    threads = common.use_threads(threads)
    sol = SelfRecurrence(get_solver(solver), recurrence)
    if task == "inpaint" and mask is None:
        raise ConfigError("--task inpaint needs --mask (white pixels are filled, black pixels are kept)")
    if task != "inpaint" and mask is not None:
        raise ConfigError(f"--mask is for --task inpaint, got --task {task}")
    compare, sidecar = out.with_name(out.stem + "_compare.png"), out.with_suffix(".json")
    common.check_out(out, "--out", ".png")
    common.check_out(compare, "--out (its comparison image)")
    common.check_out(sidecar, "--out (its JSON sidecar)")
    for p, opt in [(image, "--image"), (mask, "--mask")]:
        if p is not None and p.exists() and any(p.resolve() == q.resolve() for q in (out, compare, sidecar)):
            raise ConfigError(f"--out {str(out)!r} would overwrite {opt} {str(p)!r}; choose another --out")
    family = common.family_of(model)
    c, h, w = family.image_shape
    raw = common.parse_prompt(family, prompt, "--prompt")

    notice, factor, orig, crop = None, None, None, None
    if task == "sr":
        y = read_native(image, c, "--image")
        size = (y.shape[-1], y.shape[-2])
        factor = sr_factor(size, family.image_shape)
        op, orig = SuperResolution(factor), list(size)
        shown = op.pinv(y)
    else:
        src = common.read_source(image, family, False)
        notice, orig, crop = src.notice, list(src.original_size), list(src.crop)
        x_in = src.tensor
        if task == "inpaint":
            fill = read_mask(mask, src, h, w)
            op = Inpaint(fill)
            y = op(x_in)
            n_fill = int(fill.sum())
            if n_fill == 0 or n_fill == h * w:
                typer.echo(f"note: the mask {'fills no pixel' if n_fill == 0 else 'fills every pixel'}", err=True)
            shown = torch.where(fill, torch.zeros_like(x_in), x_in)
        else:
            if c != 3:
                raise ConfigError(
                    f"--task colorize needs a color (3-channel) model; {model!r} is a {c}-channel {family.name} model"
                )
            op = Colorize()
            y = op(x_in)
            shown = y.expand(-1, 3, -1, -1)

    m = common.loaded_model(model)
    cond = {k: v for k, v in m.condition(raw).items() if k != "null"}
    grid = make_grid(m.schedule, steps)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    x = m.prior((1, c, h, w), float(grid[0]), g)
    with torch.no_grad():
        result = sample(Projection(m.denoiser, op, y), sol, grid, x, cond, Gaussian(g), progress=True)
    seconds = time.perf_counter() - t0
    restored = result.x
    err = measurement_error(op, restored, y)
    if task == "sr":
        write_image(restored, out)
        output = {"size": [w, h], "fit": "native"}
    else:
        output = common.write_at_input_size(restored, image, src, out, c)
    written = read_image(out, (c, h, w), resize=output["fit"] != "native").tensor
    err_written = measurement_error(op, written, y)
    save_png(compare_image([(f"input ({task})", shown[0]), ("restored", restored[0].clamp(-1, 1))]), compare)
    readings = common.readings(m.family, {"output": restored})
    record = {
        "command": "restore",
        "task": task,
        "model": model,
        "model_path": common.model_path(model),
        "prompt": prompt,
        "tokens": raw.tolist(),
        "steps": steps,
        "seed": seed,
        "recurrence": recurrence,
        "solver": solver,
        "solver_label": sol.name,
        "nfe": int(result.nfe),
        "image": str(image),
        "mask": None if mask is None else str(mask),
        "original_size": orig,
        "crop": crop,
        "notice": notice,
        "factor": factor,
        "measurement_error": err,
        "measurement_error_written": err_written,
        "labels": readings,
        "seconds": seconds,
        "output": output,
        "outputs": {"image": str(out), "compare": str(compare), "sidecar": str(sidecar), "size": output["size"]},
        "threads": threads,
        "condiff_version": __version__,
        "torch_version": torch.__version__,
        "reproduce": common.reproduce(
            "restore",
            [
                ("--task", task),
                ("--image", image),
                ("--mask", mask),
                ("--model", model),
                ("--prompt", prompt),
                ("--steps", steps),
                ("--seed", seed),
                ("--recurrence", recurrence),
                ("--solver", solver),
                ("--out", out),
            ],
        ),
    }
    atomic_write_json(sidecar, record)
    typer.echo(
        f"restored ({task}, {sol.name}): wrote {out} ({output['size'][0]}x{output['size'][1]}), {compare} and "
        f"{sidecar} (max|A x - y| {err:.2e}, {seconds:.1f}s)"
    )
    if readings is not None:
        typer.echo(f"labeller reads: '{common.caption(readings['output'])}'")
