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

``--method rddm`` (or ``ddpm``) restores with a trained model of the rddm family (``condiff.models.rddm_restore``:
RDDM, Liu et al. CVPR 2024, or its plain conditional-DDPM baseline; recipes rddm-shapes, ddpm-restore-shapes):
``condiff restore --method rddm --model runs/rddm-shapes --task denoise|deblur|inpaint --image in.png --out
out.png [--steps N]``. The image is the degraded one (inpaint: the box filled with mid-gray, as in training; or pass
``--mask`` and its white pixels are set to mid-gray first). Same outputs and sidecar conventions; ``--steps`` (the
network evaluations) defaults to 5. ``--method steered`` (the default) is the behaviour above.
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
METHODS = {
    "steered": "Steered Diffusion with the model as the prior (tasks inpaint, sr, colorize)",
    "rddm": "a trained RDDM model (rddm-shapes; tasks denoise, deblur, inpaint)",
    "ddpm": "a trained conditional-DDPM baseline (ddpm-restore-shapes; tasks denoise, deblur, inpaint)",
}
STEERED_STEPS, STEERED_RECURRENCE, STEERED_SOLVER = 50, 4, "ddpm"


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
        help="steered: inpaint (fill the white pixels of --mask), sr (super-resolution from a "
        "low-resolution image) or colorize (color a grayscale image); rddm, ddpm: denoise, deblur or inpaint",
    ),
    method: str = typer.Option(
        "steered",
        help="steered (Steered Diffusion with --model as the prior), rddm (a trained RDDM model, e.g. "
        "runs/rddm-shapes) or ddpm (its conditional-DDPM baseline, e.g. runs/ddpm-restore-shapes)",
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
    steps: Optional[int] = typer.Option(
        None, help="sampler steps, 1 to 1000 (steered: default 50; rddm, ddpm: network evaluations, default 5)"
    ),
    seed: int = typer.Option(0, help="random seed of the initial noise and the solver's noise"),
    recurrence: Optional[int] = typer.Option(
        None,
        help="steered: self-recurrence: each step is repeated k times, re-noising in between (1 = off), 1 to "
        f"{MAX_RECURRENCE}; default {STEERED_RECURRENCE}",
    ),
    solver: Optional[str] = typer.Option(
        None, help=f"steered: solver name (see `condiff solvers`); default {STEERED_SOLVER}"
    ),
    out: Path = typer.Option(
        ...,
        help="the restored image (.png, at the input's size; sr: the model's); <stem>_compare.png and a "
        "JSON sidecar (<stem>.json) are written beside it",
    ),
    threads: ThreadsOpt = None,
):
    """Restoration: steered inpainting, super-resolution or colorization with the model as the prior, or a
    trained RDDM (or conditional-DDPM) model's denoising, deblurring or inpainting (--method).

    Steered: each clean estimate is projected onto the images that match the input exactly (Steered Diffusion)."""
    from condiff.errors import one_of

    if not isinstance(method, str) or method not in METHODS:
        raise one_of("method", method, METHODS)
    if method != "steered":
        for opt, value in (("--recurrence", recurrence), ("--solver", solver)):
            if value is not None:
                raise ConfigError(f"{opt} is for --method steered; --method {method} takes none, got {value}")
        if prompt:
            raise ConfigError(f"--prompt is for --method steered; --method {method} takes none, got {prompt!r}")
        return restore_trained(method, task, image, mask, model, steps, seed, out, threads)
    steps = STEERED_STEPS if steps is None else steps
    recurrence = STEERED_RECURRENCE if recurrence is None else recurrence
    solver = STEERED_SOLVER if solver is None else solver
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
    compare, sidecar = check_outputs(out, image, mask)
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


def check_outputs(out: Path, image: Path, mask: Optional[Path]) -> tuple[Path, Path]:
    """(compare, sidecar) beside --out, each checked writable and none of them an input."""
    compare, sidecar = out.with_name(out.stem + "_compare.png"), out.with_suffix(".json")
    common.check_out(out, "--out", ".png")
    common.check_out(compare, "--out (its comparison image)")
    common.check_out(sidecar, "--out (its JSON sidecar)")
    for p, opt in [(image, "--image"), (mask, "--mask")]:
        if p is not None and p.exists() and any(p.resolve() == q.resolve() for q in (out, compare, sidecar)):
            raise ConfigError(f"--out {str(out)!r} would overwrite {opt} {str(p)!r}; choose another --out")
    return compare, sidecar


def restore_trained(
    method: str,
    task: str,
    image: Path,
    mask: Optional[Path],
    model: str,
    steps: Optional[int],
    seed: int,
    out: Path,
    threads,
):
    """``--method rddm|ddpm``: restore a degraded image with a trained rddm-family model (checks first, then the
    weights); the outputs and sidecar follow the steered path's conventions."""
    import torch

    from condiff import __version__
    from condiff.core.files import atomic_write_json
    from condiff.data.images import compare_image, save_png
    from condiff.models import rddm_restore as rr

    rr.check_degradation(task)
    steps = rr.DEFAULT_STEPS if steps is None else steps
    common.check_steps(steps)
    common.check_seed(seed)
    threads = common.use_threads(threads)
    if mask is not None and task != "inpaint":
        raise ConfigError(f"--mask is for --task inpaint, got --task {task}")
    compare, sidecar = check_outputs(out, image, mask)
    path = rr.check_model_kind(model, method, "--model")
    family = common.family_of("shapes")  # the image layout the rddm family is trained on (3x32x32)
    c, h, w = family.image_shape
    src = common.read_source(image, family, False)
    x_in = src.tensor
    if mask is not None:
        fill = read_mask(mask, src, h, w)
        x_in = torch.where(fill, torch.full_like(x_in, rr.FILL), x_in)
    m = rr.load_restore_model(path, "--model")
    res = m.restore(x_in, task, steps, seed)
    restored = res.x
    output = common.write_at_input_size(restored, image, src, out, c)
    save_png(compare_image([(f"input ({task})", x_in[0].clamp(-1, 1)), (method, restored[0])]), compare)
    from condiff.data import labeller

    readings = {"output": common.attribute_names(labeller.label(restored)[0].tolist())}
    record = {
        "command": "restore",
        "method": method,
        "task": task,
        "model": model,
        "model_path": str(path.resolve()),
        "steps": steps,
        "seed": seed,
        "nfe": res.nfe,
        "image": str(image),
        "mask": None if mask is None else str(mask),
        "original_size": list(src.original_size),
        "crop": list(src.crop),
        "notice": src.notice,
        "labels": readings,
        "seconds": res.seconds,
        "output": output,
        "outputs": {"image": str(out), "compare": str(compare), "sidecar": str(sidecar), "size": output["size"]},
        "threads": threads,
        "condiff_version": __version__,
        "torch_version": torch.__version__,
        "reproduce": common.reproduce(
            "restore",
            [
                ("--method", method),
                ("--task", task),
                ("--image", image),
                ("--mask", mask),
                ("--model", model),
                ("--steps", steps),
                ("--seed", seed),
                ("--out", out),
            ],
        ),
    }
    atomic_write_json(sidecar, record)
    typer.echo(
        f"restored ({task}, {method}, {res.nfe} network evaluations): wrote {out} ({output['size'][0]}x"
        f"{output['size'][1]}), {compare} and {sidecar} ({res.seconds:.1f}s)"
    )
    typer.echo(f"labeller reads: '{common.caption(readings['output'])}'")
