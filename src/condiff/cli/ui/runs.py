"""What the web app runs: sampling, editing and restoration as `condiff sample`, `edit` and `restore` run them
(the same checks, the same library calls, the same seeds), with a callback per solver step, the judge's
reading of every image and the ``condiff ...`` command that repeats each run. No gradio here: the tabs
(``sample_tab``, ``compare_tab``, ``edit_tab``, ``restore_tab``) call these functions, and so do the tests.

Every user error is a one-line ``CondiffError`` raised before any weights are read where the inputs allow it
(``prepare_sample`` does all of `condiff sample`'s checks)."""

from __future__ import annotations

import contextlib
import shlex
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from condiff.cli import common
from condiff.cli.options import GUIDANCE_OPTIONS
from condiff.errors import ConfigError, InputFileError, check_int, one_of

MAX_IMAGES = 16  # images per run: one batch, so one preview frame per solver step
MAX_ROWS = 8  # settings in one comparison
BATCH = MAX_IMAGES  # every run is one batch (`condiff sample`'s default --batch-size 256 is one batch too)
GUIDANCE_DEFAULTS = {name: default for name, _, default in GUIDANCE_OPTIONS}
EXAMPLE_PROMPT = "large red circle top-left"
PROMPT_HINT = "a caption such as 'large red circle top-left' (shapes) or a digit 0-9 (digits)"

# step(i, total, x0_hat, nfe) after solver step i (1-based) of ``total``; phase(name, index, count) for runs
# made of phases (an edit: inversion, reconstruction, edit)
StepFn = Callable[[int, int, object, int], None]
PhaseFn = Callable[[str, int, int], None]


class Stopped(Exception):
    """The run was stopped (the page's Stop button) at a solver step or network call."""


@contextlib.contextmanager
def stoppable(module, stop: Optional[threading.Event]):
    """While the block runs, every call of ``module``'s networks (its direct children: the UNet, the text
    encoder) first checks ``stop`` and raises ``Stopped`` once it is set: a run stops at its next network call
    whatever the method (a solver step, an inversion, null-text's optimisation)."""
    if stop is None:
        yield
        return

    def check(*_):
        if stop.is_set():
            raise Stopped()

    parts = list(module.children()) or [module]
    handles = [part.register_forward_pre_hook(check) for part in parts]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Models:
    """Loaded models by their resolved folder, the ``size`` most recently used ones kept (bounded memory).
    Weights are frozen (``common.loaded_model``): editing methods that optimise take gradients with respect
    to their own variables only, and sampling does not need them."""

    def __init__(self, size: int = 2):
        self.size = max(1, int(size))
        self.items: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, model: str):
        key = common.model_path(model)
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            m = common.loaded_model(model)
            self.items[key] = m
            while len(self.items) > self.size:
                self.items.popitem(last=False)
            return m


def integer(value):
    """A number from a form field as an int when it is a whole number (gradio's numbers arrive as floats);
    anything else unchanged, for the option's own check to refuse with its one line."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def optional_text(value) -> Optional[str]:
    """A text field: None when empty (an option not given)."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def optional_number(value, option: str):
    """A number field given as text (empty: the option is not given): a float, or one ConfigError."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    text = str(value).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{option} must be a number, got {text!r}") from None


def check_prompt(text, option: str = "--prompt") -> str:
    """A non-empty prompt (the UI has no random-condition mode: an empty box is a mistake)."""
    text = "" if text is None else str(text).strip()
    if not text:
        raise ConfigError(f"{option} is empty: give {PROMPT_HINT}")
    return text


# ---- the judge's reading ------------------------------------------------------------------------------------


def read_images(family, images, raw) -> Optional[dict]:
    """The family's exact judge on each image, as `condiff eval` scores it: shapes' labeller (shape, color,
    size, position) or digits' scorer (class), and whether each attribute the prompt names was read back.
    ``accuracy`` is the share of images right per named attribute and on all of them (for a full caption
    exactly ``family.score(images, targets)``, `condiff eval`'s numbers). None for another family."""
    import torch

    if family.name == "shapes":
        from condiff.data import labeller

        judge = "labeller"
        pred = labeller.label(images.clamp(-1, 1))
        targets = family.attribute_targets(raw)
    elif family.name == "digits":
        from condiff.data.digits import scorer

        judge = "scorer"
        pred = scorer().predict(images.clamp(-1, 1)).reshape(-1, 1)
        targets = raw.reshape(-1, 1)
    else:
        return None
    attrs = list(family.attributes)
    named = [i for i in range(len(attrs)) if bool((targets[:, i] >= 0).all())]
    rows = []
    for k in range(pred.shape[0]):
        labels = [int(v) for v in pred[k]]
        read = common.attribute_names(labels) if family.name == "shapes" else {"class": str(labels[0])}
        match = {attrs[i]: labels[i] == int(targets[k, i]) for i in named}
        rows.append({"read": read, "labels": labels, "match": match, "all": all(match.values())})
    ok = (pred[:, named] == targets[:, named]).float() if named else torch.ones(pred.shape[0], 0)
    accuracy = {attrs[i]: float(ok[:, j].mean()) for j, i in enumerate(named)}
    accuracy["all"] = float(ok.all(1).float().mean()) if named else 1.0
    return {"judge": judge, "named": [attrs[i] for i in named], "images": rows, "accuracy": accuracy}


def reading_caption(row: dict) -> str:
    """One image's reading as words ('large red circle top-left'; digits: the digit)."""
    read = row["read"]
    if "class" in read:
        return f"digit {read['class']}"
    return common.caption(read)


# ---- sample -------------------------------------------------------------------------------------------------


@dataclass
class SampleSettings:
    """The options of one `condiff sample` run, by their parameter names (``guidance``: GUIDANCE_OPTIONS)."""

    model: str = "shapes"
    prompt: str = ""
    solver: str = "dpmpp-2m"
    steps: int = 20
    cfg: float = 3.0
    n: int = 4
    seed: int = 0
    spacing: Optional[str] = None
    solver_opt: list = field(default_factory=list)
    analytic_skip: Optional[str] = None
    ems: Optional[Path] = None
    dc_ratios: Optional[Path] = None
    allow_mismatch: bool = False
    dynamic_threshold: Optional[float] = None
    t_start: Optional[str] = None
    centre_subpixels: bool = False
    guidance: dict = field(default_factory=lambda: dict(GUIDANCE_DEFAULTS))
    pipeline: Optional[str] = None  # a diffusers pipeline folder instead of ``model``


@dataclass
class Prepared:
    """A sample run checked before any weights are read."""

    settings: SampleSettings
    family: object
    solver: object
    spacing_name: str
    spacing: object
    skip: object
    guide: common.GuidanceFlags
    fitted: common.FittedFiles
    raw: object  # the prompt's raw condition (1, ...)


@dataclass
class SampleResult:
    images: object  # (n, C, H, W) in [-1, 1]
    record: dict  # JSON-ready: settings, nfe, seconds, preview frames, readings, command


def check_sample_numbers(s: SampleSettings) -> SampleSettings:
    """steps, n and seed as integers (form fields give floats), refused in one line like the CLI's."""
    from condiff.core.grids import MAX_STEPS

    s = replace(s, steps=integer(s.steps), n=integer(s.n), seed=integer(s.seed))
    check_int("--steps", s.steps, 1, MAX_STEPS)
    check_int("--n", s.n, 1, MAX_IMAGES, f"an integer in [1, {MAX_IMAGES}] (the images of one run in the app)")
    common.check_seed(s.seed)
    return s


def prepare_sample(s: SampleSettings) -> Prepared:
    """Every check `condiff sample` makes before reading weights, in its order; a pipeline folder is checked by
    ``sample_pipeline_images`` itself."""
    s = check_sample_numbers(replace(s, prompt=check_prompt(s.prompt)))
    common.check_common(s.steps, s.cfg, s.n, BATCH, s.seed, s.dynamic_threshold)
    fitted = common.FittedFiles(s.allow_mismatch)
    family, sol, spacing_name, spc, skip = common.sampling_setup(
        s.model,
        s.solver,
        s.steps,
        s.cfg,
        s.spacing,
        s.ems,
        s.dc_ratios,
        list(s.solver_opt) or None,
        s.analytic_skip,
        fitted,
    )
    guide = common.guidance_options_of(family, s.cfg, fitted=fitted, **{**GUIDANCE_DEFAULTS, **s.guidance})
    raw = common.parse_prompt(family, s.prompt, "--prompt")
    return Prepared(s, family, sol, spacing_name, spc, skip, guide, fitted, raw)


def sample_command(s: SampleSettings, guide: Optional[common.GuidanceFlags] = None) -> str:
    """The `condiff sample` line that makes the same images: a PNG grid (grid.png), or with one image the image
    itself (sample.png)."""
    out = "grid.png" if s.n != 1 else "sample.png"
    text = common.reproduce(
        "sample",
        [
            ("--pipeline", s.pipeline),
            ("--model", None if s.pipeline else s.model),
            ("--prompt", s.prompt),
            ("--solver", s.solver),
            ("--steps", s.steps),
            ("--cfg", s.cfg),
            ("--n", s.n),
            ("--seed", s.seed),
            ("--spacing", s.spacing),
            ("--out", out),
            ("--analytic-skip", s.analytic_skip),
            ("--solver-opt", list(s.solver_opt)),
            ("--ems", s.ems),
            ("--dc-ratios", s.dc_ratios),
            ("--allow-mismatch", s.allow_mismatch),
            ("--dynamic-threshold", s.dynamic_threshold),
            ("--t-start", s.t_start),
            ("--centre-subpixels", s.centre_subpixels),
        ],
    )
    return text + (guide.flags() if guide is not None else "")


def sample_images(
    s: SampleSettings,
    models: Models,
    step: Optional[StepFn] = None,
    stop: Optional[threading.Event] = None,
    workdir: Optional[Path] = None,
) -> SampleResult:
    """Sample ``s.n`` images of one prompt as `condiff sample` does (the same generator draws, so the same
    pixels), calling ``step`` after every solver step with the guided x0 estimate of the batch."""
    import torch

    from condiff.evaluation.evaluate import generate_counted

    if optional_text(s.pipeline) is not None:
        return sample_pipeline_images(replace(s, pipeline=optional_text(s.pipeline)), workdir)
    p = prepare_sample(s)
    s = p.settings
    m = models.get(s.model)
    p.fitted.check_model(m, s.model)
    t_start, factor = common.start_of(m, s.model, s.t_start, s.centre_subpixels)
    g = torch.Generator().manual_seed(s.seed)
    raw = p.raw.expand(s.n, *p.raw.shape[1:])
    frames = 0

    def callback(info):
        nonlocal frames
        frames += 1
        if stop is not None and stop.is_set():
            raise Stopped()
        if step is not None:
            step(info.i + 1, s.steps, info.x0_hat, info.nfe)

    t0 = time.perf_counter()
    with stoppable(m.module, stop):
        images, nfe, rows = generate_counted(
            m,
            raw,
            p.solver,
            s.steps,
            s.cfg,
            g,
            p.spacing,
            BATCH,
            analytic_skip=p.skip,
            dynamic_threshold=s.dynamic_threshold,
            guidance=p.guide.options,
            callbacks=[callback],
            t_start=t_start,
            centre_subpixels=factor,
        )
    seconds = time.perf_counter() - t0
    record = {
        "model": s.model,
        "prompt": s.prompt,
        "captions": m.family.captions(raw),
        "solver": s.solver,
        "steps": s.steps,
        "cfg": s.cfg,
        "n": s.n,
        "seed": s.seed,
        "spacing": p.spacing_name,
        "t_start": t_start,
        "centre_subpixels": s.centre_subpixels,
        "nfe": nfe,
        "network_rows_per_sample": rows,
        "seconds": seconds,
        "preview_frames": frames,
        "solver_fallback": common.solver_fallback(p.solver),
        **p.guide.describe(),
        "readings": read_images(m.family, images, raw),
        "command": sample_command(s, p.guide),
    }
    return SampleResult(images, record)


def sample_pipeline_images(s: SampleSettings, workdir: Optional[Path]) -> SampleResult:
    """`condiff sample --pipeline DIR` itself (its checks, its PNG grid and sidecar, written in ``workdir``):
    one grid image, no per-step preview."""
    import json
    import tempfile

    from PIL import Image

    from condiff.cli import pipeline as diffusers_cmds
    from condiff.data.images import read_image

    s = check_sample_numbers(replace(s, prompt=check_prompt(s.prompt)))
    g = {**GUIDANCE_DEFAULTS, **s.guidance}
    diffusers_cmds.refuse_model_options(
        {
            "--analytic-skip": s.analytic_skip,
            "--ems": s.ems,
            "--dc-ratios": s.dc_ratios,
            "--dynamic-threshold": s.dynamic_threshold,
            "--t-start": s.t_start,
            "--centre-subpixels": s.centre_subpixels or None,
            "--classifier": g["classifier"],
            "--linear-ag": g["linear_ag"],
            "--minority": g["minority"],
        }
    )
    folder = Path(s.pipeline)
    if not folder.is_dir() or not (folder / "model_index.json").is_file():
        raise InputFileError(
            f"--pipeline {str(folder)!r} is not a diffusers pipeline folder (a folder with model_index.json)"
        )
    workdir = Path(tempfile.mkdtemp(prefix="condiff-ui-")) if workdir is None else workdir
    out = workdir / "grid.png"
    keys = ("pag", "pag_layers", "ag", "ag_space", "cfg_rescale", "guidance_interval")
    diffusers_cmds.sample_cmd(
        pipeline=folder,
        prompt=s.prompt,
        negative_prompt=g["negative_prompt"],
        height=None,
        width=None,
        solver=s.solver,
        solver_opt=list(s.solver_opt) or None,
        steps=s.steps,
        cfg=s.cfg,
        n=s.n,
        seed=s.seed,
        spacing=s.spacing,
        batch_size=BATCH,
        out=out,
        out_dir=None,
        guidance={k: g[k] for k in keys},
    )
    sidecar = json.loads(out.with_suffix(".json").read_text())
    with Image.open(out) as im:
        w, h = out_size = im.size
    grid = read_image(out, (3, h, w), resize=False).tensor
    words = shlex.split(sidecar["reproduce"])
    words = [
        ((out.name if s.n != 1 else "sample.png") if i and words[i - 1] == "--out" else word)
        for i, word in enumerate(words)
    ]
    record = {
        "pipeline": str(folder),
        "prompt": s.prompt,
        "solver": s.solver,
        "steps": s.steps,
        "cfg": s.cfg,
        "n": s.n,
        "seed": s.seed,
        "nfe": sidecar["nfe"],
        "seconds": sidecar["seconds"],
        "preview_frames": 0,
        "grid_size": list(out_size),
        "readings": None,
        "command": shlex.join(words),
    }
    return SampleResult(grid, record)


# ---- compare ------------------------------------------------------------------------------------------------

# `condiff sample` options a comparison sets once, above its rows
ROW_FIXED = {
    "model": "--model",
    "prompt": "--prompt",
    "seed": "--seed",
    "n": "--n",
    "out": "--out",
    "pipeline": "--pipeline",
    "height": "--height",
    "width": "--width",
    "batch_size": "--batch-size",
    "threads": "--threads",
}


def sample_parser():
    """`condiff sample` as a click command, to read a comparison row exactly as the CLI reads its options."""
    import typer
    import typer.main

    from condiff.cli import sample

    one = typer.Typer(add_completion=False)
    one.command("sample")(sample.sample_cmd)
    return typer.main.get_command(one)


def got_value(e: Exception) -> str:
    """', got VALUE' for a value click could not convert (its message does not name it), as `condiff` adds."""
    errors = getattr(e.__cause__, "errors", None)
    try:
        items = errors() if callable(errors) else []
    except Exception:  # noqa: BLE001
        items = []
    if items and isinstance(items[0], dict) and "input" in items[0]:
        return f", got {items[0]['input']!r}"
    return ""


def parse_row(text: str, base: SampleSettings) -> SampleSettings:
    """One comparison row, written as `condiff sample` options (``--solver ddim --steps 8 --ag 0.995``), on top
    of ``base`` (model, prompt, seed and n, set once for every row); options it leaves out take the CLI's
    defaults. A bad row is one ConfigError that quotes it."""
    try:
        args = shlex.split(text)
    except ValueError as e:
        raise ConfigError(f"setting {text!r}: {e}") from None
    if any(a in ("--help", "-h") for a in args):
        raise ConfigError(f"setting {text!r}: --help lists the options at the command line (condiff sample --help)")
    try:
        ctx = sample_parser().make_context("sample", list(args))
    except Exception as e:  # noqa: BLE001  click's usage errors (vendored by typer) carry format_message
        if not hasattr(e, "format_message"):
            raise
        raise ConfigError(f"setting {text!r}: {' '.join(e.format_message().split())}{got_value(e)}") from None
    given = [name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"]
    fixed = [ROW_FIXED[name] for name in given if name in ROW_FIXED]
    if fixed:
        raise ConfigError(
            f"setting {text!r}: {', '.join(fixed)} {'is' if len(fixed) == 1 else 'are'} set above the settings, "
            "once for all of them"
        )
    p = ctx.params
    return replace(
        base,
        solver=p["solver"],
        steps=p["steps"],
        cfg=p["cfg"],
        spacing=p["spacing"],
        solver_opt=list(p["solver_opt"] or []),
        analytic_skip=p["analytic_skip"],
        ems=p["ems"],
        dc_ratios=p["dc_ratios"],
        allow_mismatch=p["allow_mismatch"],
        dynamic_threshold=p["dynamic_threshold"],
        t_start=p.get("t_start"),
        centre_subpixels=bool(p.get("centre_subpixels")),
        guidance={name: p[name] for name in GUIDANCE_DEFAULTS},
    )


def parse_rows(text: str, base: SampleSettings) -> list[tuple[str, SampleSettings]]:
    """Every non-empty, non-comment line of ``text`` as (line, settings), all checked before any weights are
    read: a comparison needs two to MAX_ROWS settings."""
    lines = [ln.strip() for ln in str(text or "").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not 2 <= len(lines) <= MAX_ROWS:
        raise ConfigError(
            f"a comparison needs 2 to {MAX_ROWS} settings, one per line (such as --solver ddim --steps 8), "
            f"got {len(lines)}"
        )
    rows = [(ln, parse_row(ln, base)) for ln in lines]
    for ln, s in rows:
        try:
            prepare_sample(s)
        except ConfigError as e:
            raise type(e)(f"setting {ln!r}: {e}") from None
    return rows


# ---- edit ---------------------------------------------------------------------------------------------------


@dataclass
class EditSettings:
    image: Optional[str] = None  # a file path
    source: str = ""
    target: str = ""
    method: str = "edit-friendly"
    steps: int = 50
    seed: int = 0
    method_opt: list = field(default_factory=list)
    model: str = "shapes"


@dataclass
class EditResult:
    source: object  # (1, C, H, W) as the model reads the input
    reconstruction: object
    edited: object
    output: Path  # the edit at the input's size
    record: dict


def method_items(text) -> list[str]:
    """KEY=VALUE method options, one per line or comma-separated."""
    parts = [p.strip() for line in str(text or "").splitlines() for p in line.split(",")]
    return [p for p in parts if p]


def image_name(path) -> str:
    """The name the command shows for an uploaded file (the upload's own name, where the user has it)."""
    return Path(str(path)).name


def edit_image(
    s: EditSettings,
    models: Models,
    workdir: Path,
    phase: Optional[PhaseFn] = None,
    stop: Optional[threading.Event] = None,
) -> EditResult:
    """`condiff edit` without --inversion: invert under the source prompt, sample the reconstruction and the
    edit (each phase from its own generator seeded with ``seed``), PSNR of the reconstruction, the labeller's
    reading of each image, and the edit written at the input's size in ``workdir``."""
    import torch

    from condiff.core.grids import make_grid
    from condiff.data.images import read_image

    if not s.image:
        raise InputFileError("--image: no image was given; upload the image to edit")
    steps, seed = integer(s.steps), integer(s.seed)
    common.check_steps(steps)
    common.check_seed(seed)
    family = common.family_of(s.model)
    source, target = check_prompt(s.source, "--from"), check_prompt(s.target, "--to")
    src_raw = common.parse_prompt(family, source, "--from")
    tgt_raw = common.parse_prompt(family, target, "--to")
    options = common.method_options(s.method, s.method_opt)
    meth = common.make_method(s.method, options)
    image = Path(s.image)
    try:
        src = read_image(image, family.image_shape, resize=True)
    except (InputFileError, ConfigError) as e:
        raise type(e)(f"--image: {e}") from None
    x0 = src.tensor
    m = models.get(s.model)
    src_cond, tgt_cond = m.condition(src_raw), m.condition(tgt_raw)
    phases = ("inverting", "reconstructing", "editing")

    def at(k: int):
        if stop is not None and stop.is_set():
            raise Stopped()
        if phase is not None:
            phase(phases[k], k, len(phases))

    t0 = time.perf_counter()
    with stoppable(m.module, stop):
        at(0)
        state = meth.invert(m.denoiser, make_grid(m.schedule, steps), x0, src_cond, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            at(1)
            recon = meth.reconstruct(m.denoiser, state, src_cond, torch.Generator().manual_seed(seed))
            at(2)
            edited = meth.sample(m.denoiser, state, tgt_cond, torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - t0
    psnr = common.psnr(recon, x0)
    out = workdir / "edited.png"
    output = common.write_at_input_size(edited, image, src, out, family.image_shape[0])
    readings = common.readings(m.family, {"source": x0, "reconstruction": recon, "edited": edited})
    record = {
        "model": s.model,
        "method": s.method,
        "method_label": meth.label,
        "options": meth.options(),
        "from": source,
        "to": target,
        "steps": steps,
        "seed": seed,
        "image": image_name(image),
        "original_size": list(src.original_size),
        "notice": src.notice,
        "nfe_inversion": state.info.get("nfe"),
        "reconstruction_psnr": psnr,
        "labels": readings,
        "seconds": seconds,
        "output": output,
        "command": common.reproduce(
            "edit",
            [
                ("--model", s.model),
                ("--image", image_name(image)),
                ("--from", source),
                ("--to", target),
                ("--method", s.method),
                ("--steps", steps),
                ("--seed", seed),
                ("--method-opt", list(s.method_opt)),
                ("--out", "edited.png"),
            ],
        ),
    }
    return EditResult(x0, recon, edited, out, record)


# ---- restore ------------------------------------------------------------------------------------------------


@dataclass
class RestoreSettings:
    task: str = "inpaint"
    image: Optional[str] = None
    mask: Optional[str] = None  # inpaint: a mask file (white = fill), as `condiff restore --mask` reads it
    model: str = "shapes"
    prompt: str = ""
    steps: int = 50
    seed: int = 0
    recurrence: int = 4
    solver: str = "ddpm"


@dataclass
class RestoreResult:
    shown: object  # the input as the task sees it (inpaint: the holes black; sr: upsampled; colorize: gray)
    restored: object  # (1, C, H, W) at the model's size
    output: Path
    record: dict


def mask_from_strokes(layers, size: tuple[int, int], coverage: float = 0.25):
    """The inpainting mask (white = fill) at ``size`` (width, height) from the painted layers of an image
    editor (RGBA arrays, any size): a pixel is filled where at least ``coverage`` of its area is painted.
    Returns a PIL 'L' image, or None when nothing was painted."""
    import numpy as np
    from PIL import Image

    painted = None
    for layer in layers or []:
        a = np.asarray(layer)
        if a.ndim != 3 or a.shape[2] != 4:
            continue
        alpha = a[..., 3] > 0
        painted = alpha if painted is None else painted | alpha
    if painted is None or not painted.any():
        return None
    area = Image.fromarray((painted * 255).astype(np.uint8), "L").resize(size, Image.Resampling.BOX)
    fill = np.asarray(area) >= coverage * 255
    return Image.fromarray((fill * 255).astype(np.uint8), "L")


def restore_image(
    s: RestoreSettings,
    models: Models,
    workdir: Path,
    step: Optional[StepFn] = None,
    stop: Optional[threading.Event] = None,
) -> RestoreResult:
    """`condiff restore`: steered inpainting, super-resolution or colorization, with ``step`` called after
    every solver step."""
    import torch

    from condiff.cli import restore
    from condiff.core.grids import make_grid
    from condiff.core.sampling import Gaussian, sample
    from condiff.data.images import read_image, write_image
    from condiff.guidance.steered import Colorize, Inpaint, Projection, SuperResolution
    from condiff.guidance.universal import SelfRecurrence
    from condiff.solvers import get_solver

    if not isinstance(s.task, str) or s.task not in restore.TASKS:
        raise one_of("task", s.task, restore.TASKS)
    if not s.image:
        raise InputFileError("--image: no image was given; upload the image to restore")
    steps, seed = integer(s.steps), integer(s.seed)
    recurrence = integer(s.recurrence)
    common.check_steps(steps)
    common.check_seed(seed)
    check_int("--recurrence", recurrence, 1, restore.MAX_RECURRENCE)
    sol = SelfRecurrence(get_solver(s.solver), recurrence)
    if s.task == "inpaint" and s.mask is None:
        raise ConfigError("--task inpaint needs a mask: paint the area to fill on the image")
    family = common.family_of(s.model)
    c, h, w = family.image_shape
    prompt = "" if s.prompt is None else str(s.prompt).strip()
    raw = common.parse_prompt(family, prompt, "--prompt")
    image = Path(s.image)
    notice, src = None, None
    if s.task == "sr":
        y = restore.read_native(image, c, "--image")
        size = (y.shape[-1], y.shape[-2])
        op = SuperResolution(restore.sr_factor(size, family.image_shape))
        shown = op.pinv(y)
    else:
        try:
            src = read_image(image, family.image_shape, resize=True)
        except (InputFileError, ConfigError) as e:
            raise type(e)(f"--image: {e}") from None
        notice, x_in = src.notice, src.tensor
        if s.task == "inpaint":
            fill = restore.read_mask(Path(s.mask), src, h, w)
            op = Inpaint(fill)
            y = op(x_in)
            shown = torch.where(fill, torch.zeros_like(x_in), x_in)
        else:
            if c != 3:
                raise ConfigError(
                    f"--task colorize needs a color (3-channel) model; {s.model!r} is a {c}-channel {family.name} model"
                )
            op = Colorize()
            y = op(x_in)
            shown = y.expand(-1, 3, -1, -1)
    m = models.get(s.model)
    cond = {k: v for k, v in m.condition(raw).items() if k != "null"}
    grid = make_grid(m.schedule, steps)
    g = torch.Generator().manual_seed(seed)
    frames = 0

    def callback(info):
        nonlocal frames
        frames += 1
        if stop is not None and stop.is_set():
            raise Stopped()
        if step is not None:
            step(info.i + 1, steps, info.x0_hat, info.nfe)

    t0 = time.perf_counter()
    x = m.prior((1, c, h, w), float(grid[0]), g)
    with stoppable(m.module, stop), torch.no_grad():
        result = sample(Projection(m.denoiser, op, y), sol, grid, x, cond, Gaussian(g), callbacks=[callback])
    seconds = time.perf_counter() - t0
    restored = result.x
    out = workdir / "restored.png"
    if s.task == "sr":
        write_image(restored, out)
        output = {"size": [w, h], "fit": "native"}
    else:
        output = common.write_at_input_size(restored, image, src, out, c)
    readings = common.readings(m.family, {"output": restored})
    record = {
        "task": s.task,
        "model": s.model,
        "prompt": prompt,
        "steps": steps,
        "seed": seed,
        "recurrence": recurrence,
        "solver": s.solver,
        "solver_label": sol.name,
        "nfe": int(result.nfe),
        "preview_frames": frames,
        "image": image_name(image),
        "notice": notice,
        "measurement_error": restore.measurement_error(op, restored, y),
        "labels": readings,
        "seconds": seconds,
        "output": output,
        "command": common.reproduce(
            "restore",
            [
                ("--task", s.task),
                ("--image", image_name(image)),
                ("--mask", None if s.mask is None else "mask.png"),
                ("--model", s.model),
                ("--prompt", prompt),
                ("--steps", steps),
                ("--seed", seed),
                ("--recurrence", recurrence),
                ("--solver", s.solver),
                ("--out", "restored.png"),
            ],
        ),
    }
    return RestoreResult(shown, restored, out, record)
