"""``condiff invert``, ``condiff edit`` and ``condiff bench edit``: image inversion and editing from the command
line, over the editing methods of condiff.inversion (``get_method`` / ``METHODS``).

``condiff invert --image in.png --prompt "large red circle top-left" --method ddim --out inv.safetensors``
inverts an image under its caption, samples it back and saves the inversion (``save_inverted``) with its
settings and the reconstruction PSNR in the file's metadata, and the reconstruction as ``inv_reconstruction.png``.

``condiff edit --image in.png --from "large red circle top-left" --to "large blue circle top-left" --method ddim
--out edited.png`` inverts (or, with ``--inversion FILE``, reuses a saved inversion), samples the edit and
writes the edited image at the input's size, ``<stem>_compare.png`` (source | reconstruction | edited) and a
JSON sidecar with the labeller's reading of each image and a command that reproduces it.

``condiff bench edit`` runs condiff.evaluation.editbench (every method on held-out shapes renders, scored by the exact
labeller) and writes its JSON report and a figure.

Every user error is one ``error:`` line with exit code 2, raised before any weights are read where the
inputs allow it. Each random phase (inversion, reconstruction, edit) draws from its own generator seeded with
``--seed``, so an edit from a saved inversion equals the edit made in one go.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from condiff.cli import common
from condiff.cli import pipeline as diffusers_cmds
from condiff.cli.options import AllowMismatchOpt, LoraOpt, LoraScaleOpt, ThreadsOpt
from condiff.errors import ConfigError, InputFileError, check_int

MAX_BENCH_N = 100_000
MAX_EXAMPLES = 64

MethodOpt = typer.Option(
    None,
    "--method-opt",
    help="an option of the editing method KEY=VALUE, repeatable (e.g. "
    "cfg=5, skip=10, inner_steps=1, exact=false); a wrong key lists the accepted ones",
)
NoResizeOpt = typer.Option(
    False,
    "--no-resize",
    help="refuse an image of another size instead of centre-cropping and resizing it to the model's size",
)
ModelOpt = typer.Option("shapes", help="bundled model name (shapes, digits) or a model directory")
ModelOrPipelineOpt = typer.Option(
    None, help="bundled model name (shapes, digits) or a model directory [default: shapes]; not with --pipeline"
)
MethodHelp = "editing method, e.g. ddim or edit-friendly (a wrong name lists them all)"
PipelineOpt = typer.Option(
    None,
    "--pipeline",
    help="a local diffusers pipeline folder (e.g. Stable Diffusion) "
    "instead of --model: the method runs on its VAE latents; offline only",
)


# ---- option parsing (before any model is loaded) ---------------------------------------------------------

# ---- invert ----------------------------------------------------------------------------------------------


def _invert(m, meth, grid, x0, cond, seed: int):
    import torch

    return meth.invert(m.denoiser, grid, x0, cond, torch.Generator().manual_seed(seed), progress=True)


def _sample(fn, m, state, cond, seed: int, what: Optional[str] = None):
    """``fn(denoiser, state, cond, generator)`` without gradients; with ``what`` (a loaded inversion file),
    a state that does not fit the method is an InputFileError naming the file."""
    import torch

    try:
        with torch.no_grad():
            return fn(m.denoiser, state, cond, torch.Generator().manual_seed(seed), progress=True)
    except (KeyError, IndexError, RuntimeError, TypeError) as e:
        if what is None:
            raise
        from condiff.errors import one_line

        raise InputFileError(
            f"{what} does not hold a usable {state.method} inversion for this model "
            f"({type(e).__name__}: {one_line(str(e))[:120]})"
        ) from None


def invert_cmd(
    model: Optional[str] = ModelOrPipelineOpt,
    image: Path = typer.Option(
        ...,
        help="the image to invert (PNG, JPEG, ...); other sizes are centre-cropped "
        "and resized to the model's, with a note",
    ),
    prompt: str = typer.Option(..., help="the image's caption, e.g. 'large red circle top-left' (digits: 0-9)"),
    method: str = typer.Option(..., help=MethodHelp),
    steps: int = typer.Option(50, help=f"sampler steps of the inversion, 1 to {common.MAX_EDIT_STEPS}"),
    seed: int = typer.Option(0, help="random seed (edit-friendly's noise maps, SDEdit's noise)"),
    method_opt: Optional[list[str]] = MethodOpt,
    no_resize: bool = NoResizeOpt,
    out: Path = typer.Option(
        ...,
        help="the inversion file to write (.safetensors), for `condiff edit --inversion`; the reconstruction "
        "(the inversion sampled back, at the model's size) is written beside it as <stem>_reconstruction.png",
    ),
    pipeline: Optional[Path] = PipelineOpt,
    threads: ThreadsOpt = None,
):
    """Invert an image under its caption, sample it back, and save the inversion for `condiff edit` and the
    reconstruction (<stem>_reconstruction.png)."""
    import torch

    threads = common.use_threads(threads)
    if pipeline is not None:  # a diffusers folder: condiff.cli.pipeline
        diffusers_cmds.refuse_model_options({"--model": model})
        return diffusers_cmds.invert_cmd(pipeline, image, prompt, method, steps, seed, method_opt, out)
    model = "shapes" if model is None else model

    from condiff import __version__
    from condiff.core.fitted import weights_digest
    from condiff.core.grids import make_grid
    from condiff.inversion.methods import save_inverted

    common.check_steps(steps)
    common.check_seed(seed)
    common.check_out(out, "--out", ".safetensors")
    recon_path = common.reconstruction_path(out)
    common.check_out(recon_path, "--out (its reconstruction image)")
    family = common.family_of(model)
    raw = common.parse_prompt(family, prompt, "--prompt")
    options = common.method_options(method, method_opt)
    meth = common.make_method(method, options)
    src = common.read_source(image, family, no_resize)
    m = common.loaded_model(model)
    cond, x0 = m.condition(raw), src.tensor
    t0 = time.perf_counter()
    state = _invert(m, meth, make_grid(m.schedule, steps), x0, cond, seed)
    recon = _sample(meth.reconstruct, m, state, cond, seed)
    seconds = time.perf_counter() - t0
    p = common.psnr(recon, x0)
    p_written = common.write_reconstruction(recon, recon_path, x0)
    extra = {
        "format": "condiff.inversion",
        "model": model,
        "model_path": common.model_path(model),
        "model_weights": weights_digest(m.module),
        "family": m.family.name,
        "prompt": prompt,
        "tokens": raw.tolist(),
        "steps": steps,
        "seed": seed,
        "options": meth.options(),
        "label": meth.label,
        "image": str(image),
        "original_size": list(src.original_size),
        "crop": list(src.crop),
        "notice": src.notice,
        "image_sha256": common.image_digest(x0),
        "reconstruction_psnr": p,
        "reconstruction": str(recon_path),
        "reconstruction_psnr_written": p_written,
        "seconds": seconds,
        "threads": threads,
        "condiff_version": __version__,
        "torch_version": torch.__version__,
        "reproduce": common.reproduce(
            "invert",
            [
                ("--model", model),
                ("--image", image),
                ("--prompt", prompt),
                ("--method", method),
                ("--steps", steps),
                ("--seed", seed),
                ("--method-opt", method_opt or []),
                ("--no-resize", no_resize),
                ("--out", out),
            ],
        ),
    }
    save_inverted(state, out, extra)
    nfe = state.info.get("nfe")
    typer.echo(
        f"inverted with {meth.label}: wrote {out} and its reconstruction {recon_path} ("
        + (f"{nfe} NFE, " if nfe is not None else "")
        + f"reconstruction PSNR {p:.2f} dB, {seconds:.1f}s)"
    )


# ---- edit ------------------------------------------------------------------------------------------------


def _check_inversion(
    path: Path,
    state,
    meta: dict,
    method: Optional[str],
    steps: Optional[int],
    model: str,
    tokens: Optional[list],
    fitted: Optional[common.FittedFiles] = None,
) -> None:
    """Refuse an inversion file made with another method, number of steps, model family, time grid or source
    prompt (all before any weights are read). The model's weights are checked through ``fitted`` once it is
    loaded (``check_inversion_fits``); a file that does not record them is checked by the model's name here."""
    import torch

    from condiff.core.fitted import FittedFor, describe, mismatch
    from condiff.inversion.methods import check_inversion_fits

    fitted = common.FittedFiles() if fitted is None else fitted

    where = repr(str(path))
    if method is not None and method != meta.get("method"):
        raise ConfigError(
            f"--inversion {where} was made with --method {meta.get('method')}, not {method}; "
            f"give --method {meta.get('method')} or invert again"
        )
    saved = meta.get("steps")
    if isinstance(saved, bool) or not isinstance(saved, int) or not 1 <= saved <= common.MAX_EDIT_STEPS:
        raise InputFileError(f"--inversion {where} does not record its steps (write it with `condiff invert`)")
    if steps is not None and steps != saved:
        raise ConfigError(
            f"--inversion {where} was made with --steps {saved}, not {steps}; give --steps {saved} or invert again"
        )
    family = common.family_of(model).name
    if meta.get("model") != model and meta.get("model_path") != common.model_path(model):
        if meta.get("family", family) != family or not meta.get("model_weights"):
            text = f"--inversion {where} was made with --model {meta.get('model')!r}, not {model!r}"
            if meta.get("family", family) != family:
                raise ConfigError(f"{text} (a {meta.get('family')} model, not a {family} one)")
            # written before inversions recorded the model's weights: the names are all there is to compare
            named = FittedFor(str(meta.get("model")))
            mismatch(
                f"--inversion {where}",
                describe(named, ["model"]),
                describe(FittedFor(model), ["model"]),
                fitted.allow_mismatch,
                "made",
                "invert the image again",
            )
    allow = fitted.allow_mismatch
    fitted.add(lambda digest, name: check_inversion_fits(meta, digest, name, f"--inversion {where}", allow))
    if tokens is not None and meta.get("tokens") != tokens:
        raise ConfigError(
            f"--from does not match the prompt {meta.get('prompt')!r} that --inversion {where} was "
            f"made under; leave --from out or invert again"
        )
    if not torch.equal(state.grid, _grid(model, saved)):
        raise InputFileError(
            f"--inversion {where} was made on another time grid than --model {model} with "
            f"{saved} steps (write it with `condiff invert`)"
        )


def _grid(model: str, steps: int):
    """The sampling grid of ``model`` (its schedule, read from condiff.json without the weights)."""
    from condiff.core.grids import make_grid
    from condiff.core.schedules import schedule_from_config
    from condiff.models.base import resolve_model

    return make_grid(schedule_from_config(resolve_model(model)[1]["schedule"]), steps)


@common.reports_fit_warnings
def edit_cmd(
    model: Optional[str] = ModelOrPipelineOpt,
    image: Path = typer.Option(
        ...,
        help="the image to edit (PNG, JPEG, ...); other sizes are centre-cropped and "
        "resized to the model's, with a note, and the edit is written at the input's size",
    ),
    from_: Optional[str] = typer.Option(
        None,
        "--from",
        help="the image's caption, e.g. 'large red circle "
        "top-left' (default with --inversion: the prompt it was made under)",
    ),
    to: str = typer.Option(..., "--to", help="the target caption, e.g. 'large blue circle top-left'"),
    method: Optional[str] = typer.Option(None, help=MethodHelp + " (default with --inversion: its method)"),
    steps: Optional[int] = typer.Option(
        None, help=f"sampler steps, 1 to {common.MAX_EDIT_STEPS} (default 50, or the inversion's)"
    ),
    seed: int = typer.Option(0, help="random seed (edit-friendly's noise maps, SDEdit's noise)"),
    method_opt: Optional[list[str]] = MethodOpt,
    inversion: Optional[Path] = typer.Option(
        None,
        help="reuse an inversion from `condiff invert` (same image, "
        "model, method and steps) instead of inverting again",
    ),
    no_resize: bool = NoResizeOpt,
    allow_mismatch: AllowMismatchOpt = False,
    out: Path = typer.Option(
        ..., help="the edited image (.png); <stem>_compare.png and a JSON sidecar (<stem>.json) are written beside it"
    ),
    pipeline: Optional[Path] = PipelineOpt,
    lora: LoraOpt = None,
    lora_scale: LoraScaleOpt = None,
    threads: ThreadsOpt = None,
):
    """Edit an image from one caption to another; writes the edit, a comparison strip and a JSON sidecar.

    Inverts the image under --from (or reuses --inversion), samples the inversion with --to and writes the
    edit at the input's size, <stem>_compare.png (source | reconstruction | edited) and <stem>.json."""
    import torch

    threads = common.use_threads(threads)
    if pipeline is not None:  # a diffusers folder: condiff.cli.pipeline
        diffusers_cmds.refuse_model_options({"--model": model, "--lora": lora or None})
        return diffusers_cmds.edit_cmd(pipeline, image, from_, to, method, steps, seed, method_opt, inversion, out)
    model = "shapes" if model is None else model
    loras = common.lora_scales(lora, lora_scale)

    from condiff import __version__
    from condiff.core.files import atomic_write_json
    from condiff.core.grids import make_grid
    from condiff.data.images import compare_image, save_png

    if steps is not None:
        common.check_steps(steps)
    common.check_seed(seed)
    compare, sidecar = out.with_name(out.stem + "_compare.png"), out.with_suffix(".json")
    common.check_out(out, "--out", ".png")
    common.check_out(compare, "--out (its comparison image)")
    common.check_out(sidecar, "--out (its JSON sidecar)")
    family = common.family_of(model)
    if from_ is None and inversion is None:
        raise ConfigError("give --from, the caption of the source image (or --inversion FILE, which records it)")
    if method is None and inversion is None:
        raise ConfigError("give --method (or --inversion FILE, which records it)")
    src_raw = None if from_ is None else common.parse_prompt(family, from_, "--from")
    tgt_raw = common.parse_prompt(family, to, "--to")
    state = meta = None
    options = {}
    fitted = common.FittedFiles(allow_mismatch)
    if inversion is not None:
        state, meta = common.load_inversion(inversion)
        tokens = None if src_raw is None else src_raw.tolist()
        _check_inversion(inversion, state, meta, method, steps, model, tokens, fitted)
        method, steps = meta["method"], meta["steps"]
        if from_ is None:
            from_ = meta.get("prompt")
            if not isinstance(from_, str):
                raise InputFileError(f"--inversion {str(inversion)!r} does not record its prompt; give --from")
            src_raw = common.parse_prompt(family, from_, "the prompt of --inversion")
        options = dict(meta.get("options", {}))
        common.method_class(method)
        try:
            common.make_method(method, options)
        except ConfigError as e:
            raise InputFileError(f"--inversion {str(inversion)!r} records options its method refuses: {e}") from None
    steps = 50 if steps is None else steps
    given = common.method_options(method, method_opt)
    meth = common.make_method(method, {**options, **given})
    for key, value in given.items():
        if key in options and meth.options()[key] != options[key]:
            typer.echo(
                f"note: --method-opt {key}={value} differs from the inversion's {key}={options[key]}; the "
                "saved inversion is used as it is",
                err=True,
            )
    src = common.read_source(image, family, no_resize)
    x0 = src.tensor
    if meta is not None and meta.get("image_sha256") != common.image_digest(x0):
        raise ConfigError(
            f"--inversion {str(inversion)!r} was made from another image than --image "
            f"{str(image)!r} (as read for the model); give that image or invert again"
        )

    m = common.loaded_model(model)
    fitted.check_model(m, model)
    common.apply_loras(m, lora, loras)
    src_cond, tgt_cond = m.condition(src_raw), m.condition(tgt_raw)
    what = None if inversion is None else f"--inversion {str(inversion)!r}"
    t0 = time.perf_counter()
    if state is None:
        state = _invert(m, meth, make_grid(m.schedule, steps), x0, src_cond, seed)
    recon = _sample(meth.reconstruct, m, state, src_cond, seed, what)
    edited = _sample(meth.sample, m, state, tgt_cond, seed, what)
    seconds = time.perf_counter() - t0
    p = common.psnr(recon, x0)
    output = common.write_at_input_size(edited, image, src, out, family.image_shape[0])
    save_png(
        compare_image(
            [(f"source: {from_}", x0[0]), (f"reconstruction ({p:.1f} dB)", recon[0]), (f"edited: {to}", edited[0])]
        ),
        compare,
    )
    readings = common.readings(m.family, {"source": x0, "reconstruction": recon, "edited": edited})
    record = {
        "command": "edit",
        "model": model,
        "model_path": common.model_path(model),
        "method": method,
        "method_label": meth.label,
        "options": meth.options(),
        "from": from_,
        "to": to,
        "steps": steps,
        "seed": seed,
        "image": str(image),
        "original_size": list(src.original_size),
        "crop": list(src.crop),
        "notice": src.notice,
        "inversion": None if inversion is None else str(inversion),
        "allow_mismatch": allow_mismatch,
        "lora": [str(p) for p in lora or []],
        "lora_scale": list(loras.values()),
        "nfe_inversion": state.info.get("nfe"),
        "reconstruction_psnr": p,
        "labels": readings,
        "seconds": seconds,
        "output": output,
        "outputs": {"image": str(out), "compare": str(compare), "sidecar": str(sidecar)},
        "threads": threads,
        "condiff_version": __version__,
        "torch_version": torch.__version__,
        "reproduce": common.reproduce(
            "edit",
            [
                ("--model", model),
                ("--image", image),
                ("--from", from_),
                ("--to", to),
                ("--method", method),
                ("--steps", steps),
                ("--seed", seed),
                ("--method-opt", method_opt or []),
                ("--inversion", inversion),
                ("--allow-mismatch", allow_mismatch),
                ("--no-resize", no_resize),
                ("--lora", [str(p) for p in lora or []]),
                ("--lora-scale", lora_scale or []),
                ("--out", out),
            ],
        ),
    }
    atomic_write_json(sidecar, record)
    typer.echo(
        f"edited with {meth.label}: wrote {out} ({output['size'][0]}x{output['size'][1]}), {compare} and "
        f"{sidecar} (reconstruction PSNR {p:.2f} dB, {seconds:.1f}s)"
    )
    if readings is not None:
        typer.echo(
            f"labeller reads: source '{common.caption(readings['source'])}', reconstruction "
            f"'{common.caption(readings['reconstruction'])}', edited '{common.caption(readings['edited'])}'"
        )


# ---- bench edit ------------------------------------------------------------------------------------------


def bench_methods(names: str, items: Optional[list[str]]) -> list:
    """--methods and --method-opt NAME.KEY=VALUE -> method objects. 'all' is the benchmark's default set
    (``editbench.default_methods()``, which may hold one method at several settings); a listed name runs at
    the benchmark's setting for it where the default set has one, else at the method's defaults. An option
    applies to every run of its method."""
    from condiff.evaluation.editbench import default_methods

    defaults = default_methods()
    form = f"--methods must be all or a comma-separated list of editing methods, got {names!r}"
    if not isinstance(names, str) or not names.strip():
        raise ConfigError(form)
    if names.strip() == "all":
        runs = list(defaults)
    else:
        listed = [p.strip() for p in names.split(",")]
        runs = []
        for name in listed:
            if not name:
                raise ConfigError(form)
            common.method_class(name)
            if listed.count(name) > 1:
                raise ConfigError(f"--methods repeats {name}, got {names!r}")
            runs.append(next((m for m in defaults if m.name == name), None) or common.make_method(name, {}))
    chosen = [m.name for m in runs]
    per: dict[str, list[str]] = {}
    for item in items or []:
        left, value = common.split_item(item, "--method-opt", "NAME.KEY=VALUE such as null-text.inner_steps=5")
        name, dot, key = left.partition(".")
        if not dot or not key.isidentifier():
            raise ConfigError(f"--method-opt must be NAME.KEY=VALUE such as null-text.inner_steps=5, got {item!r}")
        common.method_class(name)
        if name not in chosen:
            raise ConfigError(
                f"--method-opt {item!r} is for {name}, which --methods does not run "
                f"({', '.join(dict.fromkeys(chosen))})"
            )
        per.setdefault(name, []).append(f"{key}={value}")
    out = []
    for m in runs:
        given = common.method_options(m.name, per.get(m.name), "--method-opt")
        out.append(common.make_method(m.name, {**m.options(), **given}) if given else m)
    labels = [m.label for m in out]
    for label in labels:
        if labels.count(label) > 1:
            raise ConfigError(f"--method-opt makes two runs the same ({label}); give --methods without the repeat")
    return out


def _changed_word(caption: str, kind: str) -> str:
    from condiff.data.shapes import ATTRIBUTES

    words = [w for w in caption.split() if w in ATTRIBUTES[kind]]
    return f"to {words[0]}" if words else caption


def bench_figure(images: dict, labels: list[str], scale: int = 3):
    """One figure of the editing benchmark's examples: a block for reconstructions and one per edit kind,
    each with the sources in the first row and one row per method; the columns are the examples (headed by
    the target value in the edit blocks)."""
    import torch
    from PIL import Image, ImageDraw, ImageFont

    from condiff.data.images import labelled_grid
    from condiff.evaluation.editbench import KINDS

    src = images["source"]
    k = src.shape[0]
    blocks = [
        (
            "reconstruction (source caption)",
            [f"#{i + 1}" for i in range(k)],
            [images[lab]["reconstruction"] for lab in labels],
        )
    ]
    for kind in KINDS:
        blocks.append(
            (
                f"{kind} edit",
                [_changed_word(c, kind) for c in images["targets"][kind]],
                [images[lab][kind] for lab in labels],
            )
        )
    font = ImageFont.load_default()
    parts = []
    for title, cols, rows in blocks:
        grid = labelled_grid(torch.cat([src, *[r[:k] for r in rows]]), ["source", *labels], cols, scale)
        head = Image.new("RGB", (grid.width, 22), "white")
        ImageDraw.Draw(head).text((4, 6), title, fill="black", font=font)
        parts += [head, grid]
    fig = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
    y = 0
    for p in parts:
        fig.paste(p, (0, y))
        y += p.height
    return fig


def bench_edit_cmd(
    model: str = ModelOpt,
    n: int = typer.Option(200, help="held-out renders, each edited three ways (color, shape, position)"),
    seed: int = typer.Option(0, help="seed of the renders, the targets and the methods' noise"),
    steps: int = typer.Option(50, help=f"sampler steps, 1 to {common.MAX_EDIT_STEPS}"),
    methods: str = typer.Option(
        "all",
        help="all (the benchmark's default set), or a comma-separated list of editing "
        "methods, each at the benchmark's setting for it",
    ),
    method_opt: Optional[list[str]] = typer.Option(
        None,
        "--method-opt",
        help="an option of one method, "
        "NAME.KEY=VALUE, repeatable (e.g. null-text.inner_steps=5, "
        "edit-friendly.skip=10)",
    ),
    batch_size: int = typer.Option(50, help="renders inverted at once (bounds memory)"),
    examples: int = typer.Option(
        6, help=f"examples per method in the figure, 1 to {MAX_EXAMPLES} (at most --n are shown)"
    ),
    json_out: Path = typer.Option(..., "--json", help="write {config, results, table} here"),
    grid: Optional[Path] = typer.Option(
        None, "--grid", help="the figure of examples (default: beside --json, <stem>_grid.png)"
    ),
    threads: ThreadsOpt = None,
):
    """Every editing method on the same held-out shapes renders, scored by the exact labeller: reconstruction
    PSNR and color / shape / position edit success."""
    from condiff.core.files import atomic_write_json
    from condiff.data.images import save_png
    from condiff.evaluation.editbench import run_bench

    check_int("--n", n, 1, MAX_BENCH_N)
    common.check_seed(seed)
    common.check_steps(steps)
    check_int("--batch-size", batch_size, 1, MAX_BENCH_N)
    examples = min(check_int("--examples", examples, 1, MAX_EXAMPLES), n)
    common.check_out(json_out, "--json", ".json")
    grid = grid if grid is not None else json_out.with_name(json_out.stem + "_grid.png")
    common.check_out(grid, "--grid", ".png")
    family = common.family_of(model)
    if family.name != "shapes":
        raise ConfigError(
            f"bench edit scores edits with the shapes labeller, so --model must be a shapes model; "
            f"{model!r} is a {family.name} model"
        )
    chosen = bench_methods(methods, method_opt)
    threads = common.use_threads(threads)
    m = common.loaded_model(model)
    report, images = run_bench(
        m, chosen, n=n, seed=seed, steps=steps, batch_size=batch_size, progress=True, examples=examples
    )
    report["config"].update(
        model=model, model_path=common.model_path(model), method_opt=list(method_opt or []), threads=threads
    )
    atomic_write_json(json_out, report)
    save_png(bench_figure(images, report["config"]["methods"]), grid)
    typer.echo(report["table"])
    typer.echo(f"wrote {json_out} and {grid}")
