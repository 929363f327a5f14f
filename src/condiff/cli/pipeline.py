"""The CLI's ``--pipeline`` paths: ``condiff sample / invert / edit --pipeline DIR`` on a local diffusers folder.

Every check that needs no weights runs first; user errors are one-line CondiffErrors (exit 2 in ``cli.main``).
Nothing here names a hub id, so with HF_HUB_OFFLINE=1 nothing reaches for the network.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from condiff.cli import common
from condiff.errors import ConfigError


def refuse_model_options(options: dict) -> None:
    """Options of condiff's own models that --pipeline does not take: a one-line error naming them."""
    given = [name for name, value in options.items() if value not in (None, False, [], ())]
    if given:
        raise ConfigError(
            f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not combine with --pipeline "
            f"(condiff's own models only)"
        )


def _open_pipeline(pipeline: Path):
    """The pipeline (at the thread count the command set with ``common.use_threads``)."""
    from condiff.interop.pipeline import load_pipeline

    return load_pipeline(pipeline)


def sample_cmd(
    pipeline: Path,
    prompt: Optional[str],
    negative_prompt: Optional[str],
    height: Optional[int],
    width: Optional[int],
    solver: str,
    solver_opt,
    steps: int,
    cfg: float,
    n: int,
    seed: int,
    spacing: Optional[str],
    batch_size: int,
    out: Optional[Path],
    out_dir: Optional[Path],
    guidance: dict,
) -> None:
    """``condiff sample --pipeline DIR``: a PNG grid of the decoded samples (--n 1: the image itself) and/or one
    PNG per sample (--out-dir), with a JSON sidecar."""
    import torch
    import typer

    from condiff import __version__
    from condiff.core.grids import SPACINGS
    from condiff.guidance.build import GuidanceOptions, parse_interval
    from condiff.interop.latents import default_size, latent_shape
    from condiff.interop.pipeline import size_multiple
    from condiff.interop.run import sample_pipeline

    common.check_common(steps, cfg, n, batch_size, seed)
    out = common.check_sample_outputs(out, out_dir)
    if prompt is None:
        raise ConfigError("--pipeline needs --prompt (a text prompt; DiT pipelines: a class name or index)")
    sol = common.make_solver(solver, solver_opt)
    spc = None
    if spacing is not None:
        if spacing not in SPACINGS:
            from condiff.errors import one_of

            raise one_of("spacing", spacing, SPACINGS)
        spc = SPACINGS[spacing]
    g = dict(guidance)
    if g.get("pag_layers") is not None and g.get("pag") is None:
        raise ConfigError("--pag-layers needs --pag")
    if g.get("ag_space") is not None and g.get("ag") is None:
        raise ConfigError("--ag-space needs --ag")
    options = GuidanceOptions(
        cfg=cfg,
        pag=g.get("pag"),
        pag_layers=("mid",) if g.get("pag_layers") is None else common.parse_pag_layers(g["pag_layers"]),
        ag=g.get("ag"),
        ag_space=g.get("ag_space") or "x0",
        cfg_rescale=g.get("cfg_rescale"),
        interval=None
        if g.get("guidance_interval") is None
        else parse_interval(g["guidance_interval"], "--guidance-interval"),
        labels=common.GUIDANCE_FLAGS,
    )
    step = size_multiple(pipeline)
    for name, v in (("--height", height), ("--width", width)):
        if v is not None and (v < step or v % step):
            raise ConfigError(f"{name} must be a positive multiple of {step} for this pipeline, got {v}")
    pipe = _open_pipeline(pipeline)
    if dict(pipe.scheduler.config).get("clip_sample") and spacing is None:
        typer.echo(
            "note: the folder's scheduler config sets clip_sample=True; condiff does not clip x0, so results "
            "differ from diffusers' (see docs/diffusers.md)",
            err=True,
        )
    h = default_size(pipe) if height is None else height
    w = default_size(pipe) if width is None else width
    latent_shape(pipe, 1, h, w)  # checks the size before any sampling
    t0 = time.perf_counter()
    result = sample_pipeline(pipe, [prompt], n, sol, steps, options, seed, h, w, negative_prompt, spc, batch_size)
    seconds = time.perf_counter() - t0
    written = common.write_samples(result.images, out, out_dir, grid_scale=1)
    guide = common.GuidanceFlags(options, {})
    flags = guide.flags()
    sidecar = {
        **guide.describe(),
        "command": "sample",
        "pipeline": str(pipeline),
        "pipeline_class": pipe.kind,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "height": h,
        "width": w,
        "solver": solver,
        "solver_opt": solver_opt or [],
        "steps": steps,
        "cfg": cfg,
        "n": n,
        "seed": seed,
        "spacing": spacing,
        "captions": [prompt] * n,
        **written,
        "grid": result.grid.tolist(),
        "nfe": result.nfe,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "condiff_version": __version__,
        "torch_version": torch.__version__,
        "reproduce": common.reproduce(
            "sample",
            [
                ("--pipeline", pipeline),
                ("--prompt", prompt),
                ("--negative-prompt", negative_prompt),
                ("--height", h),
                ("--width", w),
                ("--solver", solver),
                ("--steps", steps),
                ("--cfg", cfg),
                ("--n", n),
                ("--seed", seed),
                ("--spacing", spacing),
                ("--solver-opt", solver_opt or []),
                ("--batch-size", batch_size),
            ],
        )
        + flags
        + common.argv_text([("--out", out), ("--out-dir", out_dir)]),
    }
    wrote = common.write_sample_sidecars(sidecar, out, out_dir, seed, [prompt] * n)
    typer.echo(f"{wrote} ({n} images, {result.nfe} NFE, {seconds:.1f}s)")


def _image(pipe, path: Path):
    from condiff.data.images import read_image
    from condiff.interop.latents import default_size

    size = default_size(pipe)
    return read_image(path, (3, size, size)).tensor


def invert_cmd(
    pipeline: Path, image: Path, prompt: str, method: str, steps: int, seed: int, method_opt, out: Path
) -> None:
    """``condiff invert --pipeline DIR``: invert an image's VAE latents; save the inversion (safetensors) and the
    decoded reconstruction (<stem>_reconstruction.png)."""
    import torch
    import typer

    from condiff.interop.run import invert_pipeline
    from condiff.inversion.methods import save_inverted

    common.check_steps(steps)
    common.check_seed(seed)
    common.check_out(out, "--out", ".safetensors")
    recon_path = common.reconstruction_path(out)
    common.check_out(recon_path, "--out (its reconstruction image)")
    meth = common.make_method(method, common.method_options(method, method_opt))
    pipe = _open_pipeline(pipeline)
    x = _image(pipe, image)
    t0 = time.perf_counter()
    state, recon = invert_pipeline(pipe, meth, x, prompt, steps, seed)
    seconds = time.perf_counter() - t0
    p = common.psnr(recon, x)
    p_written = common.write_reconstruction(recon, recon_path, x)
    save_inverted(
        state,
        out,
        {
            "format": "condiff.inversion",
            "pipeline": str(Path(pipeline).resolve()),
            "prompt": prompt,
            "steps": steps,
            "seed": seed,
            "options": meth.options(),
            "label": meth.label,
            "image": str(image),
            "image_sha256": common.image_digest(x),
            "reconstruction_psnr": p,
            "reconstruction": str(recon_path),
            "reconstruction_psnr_written": p_written,
            "seconds": seconds,
            "threads": torch.get_num_threads(),
            "space": "latent",
        },
    )
    typer.echo(
        f"inverted with {meth.label}: wrote {out} and its reconstruction {recon_path} (reconstruction PSNR "
        f"{p:.2f} dB through the VAE, {seconds:.1f}s)"
    )


def _saved_inversion(path: Path, pipeline: Path, method: Optional[str], steps: Optional[int]):
    """(state, metadata) of an inversion written by ``invert --pipeline`` for this folder; a file made for
    another pipeline, method or step count is a one-line error."""
    from condiff.errors import InputFileError

    state, meta = common.load_inversion(path)
    where = repr(str(path))
    if meta.get("pipeline") != str(Path(pipeline).resolve()):
        raise ConfigError(
            f"--inversion {where} was made for --pipeline {meta.get('pipeline')!r}, not "
            f"{str(pipeline)!r}; invert again with this pipeline"
        )
    if method is not None and method != meta.get("method"):
        raise ConfigError(f"--inversion {where} was made with --method {meta.get('method')}, not {method}")
    if steps is not None and steps != meta.get("steps"):
        raise ConfigError(f"--inversion {where} was made with --steps {meta.get('steps')}, not {steps}")
    if not isinstance(meta.get("prompt"), str) or not isinstance(meta.get("options", {}), dict):
        raise InputFileError(
            f"--inversion {where} lacks its prompt or options (write it with `condiff invert --pipeline`)"
        )
    return state, meta


def edit_cmd(
    pipeline: Path,
    image: Path,
    from_: Optional[str],
    to: str,
    method: Optional[str],
    steps: Optional[int],
    seed: int,
    method_opt,
    inversion: Optional[Path],
    out: Path,
) -> None:
    """``condiff edit --pipeline DIR``: invert under --from (or reuse --inversion from ``invert --pipeline``),
    sample under --to, write the edit, a comparison strip and a JSON sidecar (as `edit` does)."""
    import torch
    import typer

    from condiff import __version__
    from condiff.core.files import atomic_write_json
    from condiff.data.images import compare_image, save_png, write_image
    from condiff.interop.run import edit_pipeline, invert_pipeline

    if steps is not None:
        common.check_steps(steps)
    common.check_seed(seed)
    compare, sidecar = out.with_name(out.stem + "_compare.png"), out.with_suffix(".json")
    common.check_out(out, "--out", ".png")
    common.check_out(compare, "--out (its comparison image)")
    common.check_out(sidecar, "--out (its JSON sidecar)")
    state = None
    options = {}
    if inversion is not None:
        state, meta = _saved_inversion(inversion, pipeline, method, steps)
        method, steps, options = meta["method"], meta["steps"], dict(meta.get("options", {}))
        from_ = meta["prompt"] if from_ is None else from_
    if from_ is None or method is None:
        raise ConfigError("with --pipeline, give --from (the source prompt) and --method, or --inversion FILE")
    steps = 50 if steps is None else steps
    meth = common.make_method(method, {**options, **common.method_options(method, method_opt)})
    pipe = _open_pipeline(pipeline)
    x = _image(pipe, image)
    t0 = time.perf_counter()
    if state is None:
        state, recon = invert_pipeline(pipe, meth, x, from_, steps, seed)
    else:
        if meta.get("image_sha256") != common.image_digest(x):
            raise ConfigError(
                f"--inversion {str(inversion)!r} was made from another image than --image "
                f"{str(image)!r}; give that image or invert again"
            )
        recon = edit_pipeline(pipe, meth, state, from_, seed, reconstruct=True)
    edited = edit_pipeline(pipe, meth, state, to, seed)
    seconds = time.perf_counter() - t0
    p = common.psnr(recon, x)
    write_image(edited, out)
    save_png(
        compare_image(
            [(f"source: {from_}", x[0]), (f"reconstruction ({p:.1f} dB)", recon[0]), (f"edited: {to}", edited[0])]
        ),
        compare,
    )
    record = {
        "command": "edit",
        "pipeline": str(Path(pipeline).resolve()),
        "pipeline_class": pipe.kind,
        "method": method,
        "method_label": meth.label,
        "options": meth.options(),
        "from": from_,
        "to": to,
        "steps": steps,
        "seed": seed,
        "image": str(image),
        "inversion": None if inversion is None else str(inversion),
        "nfe_inversion": state.info.get("nfe"),
        "reconstruction_psnr": p,
        "seconds": seconds,
        "output": {"size": [int(edited.shape[-1]), int(edited.shape[-2])], "space": "latent, decoded by the VAE"},
        "outputs": {"image": str(out), "compare": str(compare), "sidecar": str(sidecar)},
        "threads": torch.get_num_threads(),
        "condiff_version": __version__,
        "torch_version": torch.__version__,
        "reproduce": common.reproduce(
            "edit",
            [
                ("--pipeline", pipeline),
                ("--image", image),
                ("--from", from_),
                ("--to", to),
                ("--method", method),
                ("--steps", steps),
                ("--seed", seed),
                ("--method-opt", method_opt or []),
                ("--inversion", inversion),
                ("--out", out),
            ],
        ),
    }
    atomic_write_json(sidecar, record)
    typer.echo(
        f"edited with {meth.label}: wrote {out}, {compare} and {sidecar} (reconstruction PSNR {p:.2f} dB, "
        f"{seconds:.1f}s)"
    )
