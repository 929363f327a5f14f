"""What the commands share: loaders and validators at the edge of the program, where names (a bundled model,
a folder, a solver name) become objects. User errors are one-line ConfigErrors."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from pathlib import Path
from typing import Optional

import typer

from condiff.errors import ConfigError, InputFileError, OutputFileError, check_real, one_of
from condiff.guidance.schedules import MAX_SCALE

MAX_SAMPLES = 1_000_000  # --n and --batch-size
MAX_EDIT_STEPS = 1000  # the inversion stores tensors per step (edit-friendly: two per step)


def make_solver(name: str, options: Optional[list[str]] = None):
    from condiff.solvers import get_solver

    return get_solver(name, **solver_options(options))


def solver_options(options: Optional[list[str]]) -> dict:
    """['order=1', 'corrector=false'] -> {'order': 1, 'corrector': False}: JSON values (true/false, numbers),
    anything else a string; the solver refuses unknown keys and bad values itself."""
    out = {}
    for item in options or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"--solver-opt must be KEY=VALUE such as order=1, got {item!r}")
        try:
            parsed = json.loads(value.strip())
        except ValueError:
            parsed = value.strip()
        if isinstance(parsed, (dict, list)) or parsed is None:
            raise ConfigError(f"--solver-opt {key.strip()} must be a number, true/false or a name, got {value!r}")
        out[key.strip()] = parsed
    return out


def spacing_of(name: Optional[str], solver=None, accepted: Optional[dict] = None) -> tuple[str, object]:
    """(name, spacing object) from ``accepted`` (default: condiff.core.grids.SPACINGS); None picks the solver's
    default spacing, else uniform-t."""
    from condiff.core.grids import SPACINGS

    accepted = SPACINGS if accepted is None else accepted
    if name is None:
        default = getattr(solver, "default_spacing", None)
        name = default.name if default is not None else "uniform-t"
    if name not in accepted:
        raise one_of("spacing", name, accepted)
    return name, accepted[name]


class FittedFiles:
    """The fitted files one run reads (--ems, --dc-ratios, --linear-ag, --minority, PPAP experts as --classifier,
    --inversion). Each is checked against the run's cfg and grid when it is read, before any weights are;
    the check against the model's weights waits here until the model is loaded (``check_model``).
    ``allow_mismatch`` (--allow-mismatch) turns every mismatch into a one-line warning."""

    def __init__(self, allow_mismatch: bool = False):
        self.allow_mismatch = bool(allow_mismatch)
        self.pending = []  # check(weights digest, model name) for each file read

    def add(self, check) -> None:
        self.pending.append(check)

    def check_model(self, loaded, model: str) -> Optional[str]:
        """Run the pending checks against the loaded model's weights digest (condiff.core.fitted); returns the
        digest (None when no file waits for it)."""
        if not self.pending:
            return None
        from condiff.core.fitted import weights_digest

        digest = weights_digest(loaded.module)
        for check in self.pending:
            check(digest, model)
        return digest


def reports_fit_warnings(command):
    """The command with every ``condiff.core.fitted.FitWarning`` (a fitted file used with --allow-mismatch, or
    one too old to check) printed once on stderr as one ``warning: `` line."""
    import functools

    @functools.wraps(command)
    def run(*args, **kwargs):
        import warnings

        from condiff.core.fitted import FitWarning
        from condiff.errors import one_line

        seen = set()
        with warnings.catch_warnings():
            show = warnings.showwarning

            def echo(message, category, filename, lineno, file=None, line=None):
                if not issubclass(category, FitWarning):
                    return show(message, category, filename, lineno, file, line)
                text = one_line(str(message))
                if text not in seen:
                    seen.add(text)
                    typer.echo(f"warning: {text}", err=True)

            warnings.showwarning = echo
            warnings.simplefilter("always", FitWarning)
            return command(*args, **kwargs)

    return run


def solver_fallback(solver) -> Optional[str]:
    """What a solver that needs a fitted file runs as without one (dpm-v3 without --ems, dc-solver without
    --dc-ratios), else None."""
    from condiff.solvers import DCSolver, DPMSolverV3

    if isinstance(solver, DPMSolverV3) and solver.ems is None:
        as_ = "DDIM (DPM-Solver++(1))" if solver.order == 1 else f"DPM-Solver++({solver.order}M) in Taylor form"
        return (
            f"dpm-v3 without --ems runs as {as_}{' with its pseudo-order corrector' if solver.corrector else ''}: "
            f"the statistics l = 1, s = b = 0; compute the model's with `condiff ems compute`"
        )
    if isinstance(solver, DCSolver) and solver.ratios is None:
        return (
            f"dc-solver without --dc-ratios runs as its base {solver.base.name} (every compensation ratio 1); "
            f"search the model's ratios with `condiff dc search`"
        )
    return None


def note_fallback(solver) -> Optional[str]:
    """Print ``solver_fallback``'s note, if any, as one ``note: `` line on stderr, and return it."""
    note = solver_fallback(solver)
    if note is not None:
        typer.echo(f"note: {note}", err=True)
    return note


def configured_solver(
    name: str,
    steps: int,
    cfg: float,
    spacing: Optional[str],
    ems: Optional[Path],
    dc_ratios: Optional[Path],
    model: str,
    options: Optional[list[str]] = None,
    fitted: Optional[FittedFiles] = None,
    grid: Optional[Path] = None,
):
    """The solver for --solver with its --solver-opt options and --ems / --dc-ratios files, and the spacing
    (name, object): --spacing's, or the searched grids of --grid. The files are checked against --cfg and the
    spacing here and, through ``fitted``, against the model's weights once it is loaded; a solver without the
    file it needs prints what it runs as."""
    fitted = FittedFiles() if fitted is None else fitted
    allow = fitted.allow_mismatch
    refuse_pickled_inputs({"--ems": ems, "--dc-ratios": dc_ratios, "--grid": grid})
    sol = make_solver(name, options)
    if ems is not None and name != "dpm-v3":
        raise ConfigError(f"--ems is for --solver dpm-v3, got --solver {name}")
    if dc_ratios is not None and name != "dc-solver":
        raise ConfigError(f"--dc-ratios is for --solver dc-solver, got --solver {name}")
    if grid is None:
        from condiff.core.grids import SAMPLING_SPACINGS

        spacing_name, spc = spacing_of(spacing, sol, SAMPLING_SPACINGS)
    else:
        spacing_name, spc, searched_for = grid_file_spacing(grid, model, steps, cfg, spacing, fitted)
        if searched_for != name:  # allowed (any solver runs on any grid), but not what the grid was fitted to
            typer.echo(
                f"note: --grid {str(grid)!r} was searched for --solver {searched_for}; running {name} on it", err=True
            )
    if ems is not None:
        from condiff.core.schedules import schedule_from_config
        from condiff.models.base import resolve_model
        from condiff.solvers import get_solver
        from condiff.solvers.ems import check_ems_fits, load_ems

        family = family_of(model)
        where = f"--ems {str(ems)!r}"
        statistics = check_ems_fits(
            load_ems(ems),
            family.image_shape,
            schedule_from_config(resolve_model(model)[1]["schedule"]),
            what=repr(model),
            cfg=cfg,
            where=where,
            allow_mismatch=allow,
        )
        fitted.add(
            lambda digest, name, where=where: check_ems_fits(
                statistics, family.image_shape, weights=digest, model=name, where=where, allow_mismatch=allow
            )
        )
        sol = get_solver("dpm-v3", ems=statistics, **solver_options(options))
    if dc_ratios is not None:
        from condiff.solvers.dc_search import check_ratios_fit, dc_solver_for, load_ratios

        if options:
            raise ConfigError("--solver-opt does not combine with --dc-ratios (the ratios file sets the solver)")
        where = f"--dc-ratios {str(dc_ratios)!r}"
        ratios = load_ratios(dc_ratios)
        sol = dc_solver_for(ratios, steps, cfg, spacing_name, where=where, allow_mismatch=allow)
        fitted.add(
            lambda digest, name, where=where: check_ratios_fit(
                ratios, digest, model=name, where=where, allow_mismatch=allow
            )
        )
    note_fallback(sol)
    return sol, spacing_name, spc


def grid_file_spacing(grid: Path, model: str, steps: int, cfg: float, spacing: Optional[str], fitted: FittedFiles):
    """('searched', the Tabulated spacing, the solver it was searched for) of a --grid file (`condiff grid
    search`), checked against the model's schedule, --steps and --cfg here and, through ``fitted``, against its
    weights once it is loaded."""
    from condiff.core.schedules import schedule_from_config
    from condiff.models.base import resolve_model
    from condiff.solvers.grid_search import check_grids_fit, load_grids

    if spacing is not None:
        raise ConfigError("--grid and --spacing both set the time grid; give one of them")
    where = f"--grid {str(grid)!r}"
    grids = load_grids(grid)
    sch = schedule_from_config(resolve_model(model)[1]["schedule"])
    allow = fitted.allow_mismatch
    spc = check_grids_fit(grids, sch, cfg=cfg, where=where, allow_mismatch=allow)
    if steps not in spc.grids:
        have = ", ".join(str(k) for k in sorted(spc.grids))
        raise ConfigError(f"{where} has no grid of {steps} steps (it has {have}); give one of those as --steps")
    fitted.add(
        lambda digest, name: check_grids_fit(grids, sch, weights=digest, model=name, where=where, allow_mismatch=allow)
    )
    return spc.name, spc, grids.solver


def check_solver_files(loaded, model: str, cfg: float, ems, dc_ratios, allow_mismatch: bool = False, grids=()) -> None:
    """--ems, --dc-ratios and --grid files of a command that builds its solvers itself (`bench solvers`), checked
    against the loaded model's weights and --cfg (the spacing and NFE are checked per solver it builds)."""
    refuse_pickled_inputs({"--ems": ems, "--dc-ratios": dc_ratios, **{f"--grid {p}": p for p in grids}})
    if ems is None and dc_ratios is None and not grids:
        return
    from condiff.core.fitted import weights_digest

    digest = weights_digest(loaded.module)
    for path in grids:
        from condiff.solvers.grid_search import check_grids_fit, load_grids

        where = f"--grid {str(path)!r}"
        check_grids_fit(load_grids(path), loaded.schedule, digest, cfg, model, where, allow_mismatch)
    if ems is not None:
        from condiff.solvers.ems import check_ems_fits, load_ems

        where = f"--ems {str(ems)!r}"
        check_ems_fits(
            load_ems(ems),
            loaded.family.image_shape,
            loaded.schedule,
            repr(model),
            weights=digest,
            cfg=cfg,
            model=model,
            where=where,
            allow_mismatch=allow_mismatch,
        )
    if dc_ratios is not None:
        from condiff.solvers.dc_search import check_ratios_fit, load_ratios

        where = f"--dc-ratios {str(dc_ratios)!r}"
        check_ratios_fit(load_ratios(dc_ratios), digest, model=model, where=where, allow_mismatch=allow_mismatch)


def sampling_setup(
    model, solver, steps, cfg, spacing, ems, dc_ratios, solver_opt, analytic_skip, fitted=None, grid=None
):
    """What `sample` and `eval` share, checked before any weights are read: the model's family, the configured
    solver, the spacing (name, object; --grid's searched grids) and the analytic skip (``fitted``: see
    ``configured_solver``)."""
    family = family_of(model)
    sol, spacing_name, spc = configured_solver(
        solver, steps, cfg, spacing, ems, dc_ratios, model, solver_opt, fitted, grid
    )
    return family, sol, spacing_name, spc, analytic_skip_of(analytic_skip, model, steps, spc)


def start_of(m, model: str, t_start: Optional[str], centre_subpixels: bool) -> tuple[Optional[float], int]:
    """(t_start, centre_subpixels factor) for generate/evaluate from --t-start (None, 'max' or a number in the
    loaded model's schedule range) and --centre-subpixels (the model's pixel-unshuffle factor, or an error for a
    model that has none)."""
    factor = 1
    if centre_subpixels:
        factor = int(m.model_cfg.get("pixel_unshuffle", 1))
        if factor < 2:
            raise ConfigError(
                f"--centre-subpixels needs a model that pixel-unshuffles its input (shapes does); {model} does not"
            )
    if t_start is None:
        return None, factor
    sch = m.schedule
    lo, hi = min(sch.t_clean, sch.t_min), sch.t_max
    if t_start.strip().lower() == "max":
        return float(hi), factor
    try:
        t = float(t_start)
    except ValueError:
        raise ConfigError(f"--t-start must be 'max' or a number in ({lo:g}, {hi:g}], got {t_start!r}") from None
    if not lo < t <= hi:  # NaN fails too
        raise ConfigError(f"--t-start must be 'max' or a number in ({lo:g}, {hi:g}], got {t_start!r}")
    return t, factor


def check_common(steps: int, cfg: float, n: int, batch_size: int, seed: int, dynamic_threshold: Optional[float] = None):
    from condiff.core.grids import MAX_STEPS
    from condiff.training.recipe import check_seed

    if not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"--steps must be an integer in [1, {MAX_STEPS}], got {steps}")
    check_real("--cfg", cfg, -MAX_SCALE, MAX_SCALE, f"a finite number with |cfg| <= {MAX_SCALE:g}")
    if not 1 <= n <= MAX_SAMPLES:
        raise ConfigError(f"--n must be an integer in [1, {MAX_SAMPLES}], got {n}")
    if not 1 <= batch_size <= MAX_SAMPLES:
        raise ConfigError(f"--batch-size must be an integer in [1, {MAX_SAMPLES}], got {batch_size}")
    check_seed(seed, "--seed")
    if dynamic_threshold is not None and not 0 < dynamic_threshold <= 1:  # NaN fails too
        raise ConfigError(
            f"--dynamic-threshold must be a quantile ratio in (0, 1] such as 0.995, got {dynamic_threshold}"
        )


def argv_text(options) -> str:
    """The command-line text of (flag, value) pairs, each with a leading space: None and False are left out,
    True is the bare flag, a list repeats the flag, anything else is quoted for the shell."""
    out = ""
    for flag, value in options:
        if value is None or value is False:
            continue
        if value is True:
            out += f" {flag}"
        elif isinstance(value, (list, tuple)):
            out += "".join(f" {flag} {shlex.quote(str(v))}" for v in value)
        else:
            out += f" {flag} {shlex.quote(str(value))}"
    return out


def reproduce(command: str, options, *positional) -> str:
    """The `condiff COMMAND [POSITIONAL...] [OPTIONS]` line that repeats a run (for JSON sidecars). It ends with
    ``--threads N``, the count the run used (``use_threads`` set it), unless ``options`` give --threads."""
    import torch

    options = list(options)
    if not any(flag == "--threads" for flag, _ in options):
        options.append(("--threads", torch.get_num_threads()))
    return f"condiff {command}" + "".join(f" {shlex.quote(str(p))}" for p in positional) + argv_text(options)


# The CLI flag of each GuidanceOptions field: library errors name the flags through GuidanceOptions.labels.
GUIDANCE_FLAGS = {
    "cfg": "--cfg",
    "pag": "--pag",
    "pag_layers": "--pag-layers",
    "ag": "--ag",
    "ag_space": "--ag-space",
    "cfg_rescale": "--cfg-rescale",
    "interval": "--guidance-interval",
    "negative_prompt": "--negative-prompt",
    "linear_ag": "--linear-ag",
    "linear_ag_steps": "--linear-ag-steps",
    "classifier": "--classifier",
    "cg_scale": "--cg-scale",
    "cg_attribute": "--cg-attribute",
    "cg_raw": "--cg-raw",
    "minority": "--minority",
    "minority_level": "--minority-level",
    "minority_scale": "--minority-scale",
    "allow_mismatch": "--allow-mismatch",
}


def parse_pag_layers(text: str) -> tuple[str, ...]:
    """--pag-layers 'mid, up_blocks.0' -> ('mid', 'up_blocks.0'); names are checked against the network later."""
    from condiff.inversion.injection import parse_layers

    names = parse_layers(str(text))
    if not names:
        raise ConfigError(
            f"--pag-layers must be a comma-separated list of layer names such as mid or down,mid,up, got {text!r}"
        )
    return names


class GuidanceFlags:
    """The guidance flags of one run: the library's ``GuidanceOptions`` (with the classifier, minority
    classifier and LinearAG coefficients loaded from what the flags name), and the flags as given, for the JSON
    sidecar and the command that reproduces the run."""

    def __init__(self, options, flags: dict):
        self.options = options
        self.given = flags

    def describe(self) -> dict:
        """JSON-ready values keyed like the CLI options (files and folders as given)."""
        out = self.options.describe()
        for key in ("classifier", "minority", "linear_ag"):
            out[key] = None if self.given.get(key) is None else str(self.given[key])
        return out

    def flags(self) -> str:
        """The CLI flags that reproduce these options (without --cfg), each with a leading space."""
        o, g = self.options, self.given
        return argv_text(
            [
                ("--pag", o.pag),
                ("--pag-layers", ",".join(o.pag_layers) if o.pag is not None else None),
                ("--ag", o.ag),
                ("--ag-space", o.ag_space if o.ag is not None else None),
                ("--cfg-rescale", o.cfg_rescale),
                ("--linear-ag", g.get("linear_ag")),
                ("--linear-ag-steps", o.linear_ag_steps),
                ("--guidance-interval", None if o.interval is None else f"{o.interval[0]!r},{o.interval[1]!r}"),
                ("--negative-prompt", o.negative_prompt),
                ("--classifier", g.get("classifier")),
                ("--cg-scale", o.cg_scale if o.classifier is not None else None),
                ("--cg-attribute", o.cg_attribute if o.classifier is not None else None),
                ("--cg-raw", o.cg_raw),
                ("--minority", g.get("minority")),
                ("--minority-scale", o.minority_scale if o.minority is not None else None),
                ("--minority-level", o.minority_level),
            ]
        )


def guidance_options_of(
    family,
    cfg: float,
    pag=None,
    pag_layers=None,
    ag=None,
    ag_space=None,
    cfg_rescale=None,
    guidance_interval=None,
    negative_prompt=None,
    classifier=None,
    cg_scale=None,
    cg_attribute=None,
    cg_raw=False,
    linear_ag=None,
    linear_ag_steps=None,
    minority=None,
    minority_level=None,
    minority_scale=None,
    fitted: Optional[FittedFiles] = None,
) -> GuidanceFlags:
    """The checked guidance of the flags, before the model's weights are read (PAG layer names are checked
    against the network once it is loaded; files and folders holding pickles are refused first). The names
    --classifier, --minority and --linear-ag give are loaded here: this is where names become objects. The
    fitted ones (a minority classifier, LinearAG coefficients, PPAP experts) are checked against the model's
    weights through ``fitted`` (``FittedFiles``) once it is loaded; LinearAG's cfg and grid when the guidance
    is built."""
    from condiff.guidance.build import GuidanceOptions, parse_interval

    refuse_pickled_inputs({"--classifier": classifier, "--minority": minority, "--linear-ag": linear_ag})
    if pag_layers is not None and pag is None:
        raise ConfigError("--pag-layers needs --pag")
    if ag_space is not None and ag is None:
        raise ConfigError("--ag-space needs --ag")
    values = dict(
        cfg=cfg,
        pag=pag,
        pag_layers=("mid",) if pag_layers is None else parse_pag_layers(pag_layers),
        ag=ag,
        ag_space="x0" if ag_space is None else ag_space,
        cfg_rescale=cfg_rescale,
        interval=None if guidance_interval is None else parse_interval(guidance_interval, "--guidance-interval"),
        negative_prompt=negative_prompt,
        cg_scale=1.0 if cg_scale is None else cg_scale,
        cg_attribute="color" if cg_attribute is None else cg_attribute,
        cg_raw=cg_raw,
        linear_ag_steps=linear_ag_steps,
        minority_level=minority_level,
        minority_scale=1.0 if minority_scale is None else minority_scale,
        allow_mismatch=False if fitted is None else fitted.allow_mismatch,
    )
    pending = {
        key: None if value is None else _PENDING
        for key, value in (("classifier", classifier), ("minority", minority), ("linear_ag", linear_ag))
    }
    GuidanceOptions(**values, **pending, labels=GUIDANCE_FLAGS)  # every combination checked before any file is read
    if classifier is not None and cg_attribute is not None and cg_attribute not in family.attributes:
        raise one_of(f"--cg-attribute for the {family.name} model", cg_attribute, family.attributes)
    if negative_prompt is not None:
        try:
            family.parse_prompt(negative_prompt)
        except ConfigError as e:
            raise ConfigError(f"--negative-prompt: {e}") from None
    objects = {}
    fitted = FittedFiles() if fitted is None else fitted
    allow = fitted.allow_mismatch
    if classifier is not None:
        from condiff.guidance.ppap import META_FILE, check_ppap_fits, read_ppap_meta
        from condiff.models.classifiers import classifier_path, load_guidance_classifier

        objects["classifier"] = load_guidance_classifier(classifier)
        folder = classifier_path(classifier)
        if (folder / META_FILE).is_file():  # PPAP experts, distilled on the samples of one model
            meta, where = read_ppap_meta(folder), f"--classifier {str(classifier)!r}"
            fitted.add(lambda digest, name, where=where: check_ppap_fits(meta, digest, name, where, allow))
    if minority is not None:
        from condiff.models.minority import check_minority_fits, load_minority

        objects["minority"] = mc = load_minority(minority)
        where = f"--minority {str(minority)!r}"
        fitted.add(lambda digest, name, where=where: check_minority_fits(mc, digest, name, where, allow))
    if linear_ag is not None:
        from condiff.guidance.linear_ag import check_linear_ag_fits, load_linear_ag

        objects["linear_ag"] = coeffs = load_linear_ag(linear_ag)
        where = f"--linear-ag {str(linear_ag)!r}"
        fitted.add(
            lambda digest, name, where=where: check_linear_ag_fits(
                coeffs, weights=digest, model=name, where=where, allow_mismatch=allow
            )
        )
    options = GuidanceOptions(**values, **objects, labels=GUIDANCE_FLAGS)
    return GuidanceFlags(options, {"classifier": classifier, "minority": minority, "linear_ag": linear_ag})


class _Pending:
    """Stands for a classifier, minority classifier or LinearAG file not read yet, so that every option
    combination is checked first."""

    def __call__(self, *args):  # pragma: no cover - never called
        raise AssertionError("a pending guidance object was used")

    predict = __call__


_PENDING = _Pending()


def refuse_pickled_inputs(paths: dict) -> None:
    """Refuse, before anything is loaded, each given input file or folder (option -> path, None when not given)
    that holds pickled data (``condiff.core.files.refuse_pickles``); --classifier's bundled names resolve first."""
    from condiff.core.files import refuse_pickles

    for option, value in paths.items():
        if value is None or not str(value):
            continue
        if option == "--classifier":
            from condiff.models.classifiers import classifier_path

            value = classifier_path(value)
        refuse_pickles(value, option)


def check_out(path: Path, option: str, suffix: str | None = None, kind: str = "file"):
    """Refuse an output path before any model is loaded: wrong suffix, wrong kind, not writable."""
    from condiff.core.files import check_writable

    if suffix is not None and path.suffix.lower() != suffix:
        raise ConfigError(f"{option} must end in {suffix}, got {str(path)!r}")
    try:
        check_writable(path, kind)
    except OutputFileError as e:
        raise OutputFileError(f"{option}: {e}") from None


SAMPLES_SIDECAR = "samples.json"  # `sample --out-dir DIR`: DIR/samples.json lists each sample's file


def check_sample_outputs(out: Optional[Path], out_dir: Optional[Path]) -> Optional[Path]:
    """`sample`'s --out and --out-dir, checked before any model is loaded; returns --out, which is grid.png when
    neither is given (with --out-dir alone no grid is written)."""
    if out is None and out_dir is None:
        out = Path("grid.png")
    if out is not None:
        check_out(out, "--out", ".png")
        check_out(out.with_suffix(".json"), "--out (its JSON sidecar)")
    if out_dir is not None:
        check_out(out_dir, "--out-dir", kind="dir")
        check_out(out_dir / SAMPLES_SIDECAR, "--out-dir (its JSON sidecar)")
    return out


def sample_file_names(n: int) -> list[str]:
    """sample_000.png, sample_001.png, ... (more digits from 1000 samples on)."""
    width = max(3, len(str(n - 1)))
    return [f"sample_{i:0{width}d}.png" for i in range(n)]


def write_samples(images, out: Optional[Path], out_dir: Optional[Path], grid_scale: int = 4) -> dict:
    """Write `sample`'s images: --out holds the image itself at its own size when there is one sample, else the
    grid (``grid_scale`` times enlarged, 2-pixel frames); --out-dir holds every sample as its own PNG at its own
    size. Returns what the sidecar records: the layout of --out and the files written to --out-dir."""
    import math

    from condiff.data.images import grid_image, save_png, write_image

    n = int(images.shape[0])
    layout = None
    if out is not None and n == 1:
        write_image(images[0], out)
        layout = "image (one sample, at its own size)"
    elif out is not None:
        ncols = max(1, int(math.ceil(math.sqrt(n))))
        save_png(grid_image(images, ncols=ncols, scale=grid_scale), out)
        layout = f"grid of {ncols} columns, row by row, {grid_scale}x enlarged, 2-pixel frames"
    files = []
    if out_dir is not None:
        for i, name in enumerate(sample_file_names(n)):
            write_image(images[i], out_dir / name)
            files.append(name)
    return {"out_layout": layout, "files": files}


def write_sample_sidecars(sidecar: dict, out: Optional[Path], out_dir: Optional[Path], seed: int, captions) -> str:
    """Write the sidecar beside --out (``<out>.json``) and, with --out-dir, ``DIR/samples.json``, which lists each
    file with its index, seed and caption (sample ``index`` of the run with that seed: the ``reproduce`` command
    regenerates it). Returns the 'wrote ...' line."""
    from condiff.core.files import atomic_write_json

    names = sidecar.get("files") or []
    if out_dir is not None:
        sidecar = dict(sidecar, out_dir=str(out_dir))
        sidecar["files"] = [
            {"file": name, "index": i, "seed": seed, "caption": captions[i] if i < len(captions) else None}
            for i, name in enumerate(names)
        ]
    else:
        sidecar.pop("files", None)
    wrote = []
    if out is not None:
        atomic_write_json(out.with_suffix(".json"), sidecar)
        wrote += [str(out), str(out.with_suffix(".json"))]
    if out_dir is not None:
        atomic_write_json(out_dir / SAMPLES_SIDECAR, sidecar)
        if names:
            span = names[0] if len(names) == 1 else f"{names[0]} ... {names[-1]}"
            wrote.append(f"{out_dir / span}")
        wrote.append(str(out_dir / SAMPLES_SIDECAR))
    return "wrote " + (" and ".join(wrote) if len(wrote) <= 2 else ", ".join(wrote[:-1]) + " and " + wrote[-1])


def analytic_skip_of(value: Optional[str], model: str, steps: int, spacing):
    """--analytic-skip parsed and checked against the model's grid, before any weights are read."""
    if value is None:
        return None
    from condiff.core.grids import make_grid
    from condiff.core.schedules import schedule_from_config
    from condiff.models.base import resolve_model
    from condiff.solvers.analytic import AnalyticSkip

    skip = AnalyticSkip.parse(value, "--analytic-skip")
    sch = schedule_from_config(resolve_model(model)[1]["schedule"])
    skip.plan(sch, make_grid(sch, steps, spacing), spacing, name="--analytic-skip")
    return skip


def family_of(model: str):
    """The model's family, from its checked condiff.json: a bad model path or metadata fails here, before
    any weights are read."""
    from condiff.models.base import get_family, resolve_model

    _, meta = resolve_model(model)
    return get_family(meta["family"])


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read in this order, as torch reads them


def thread_count(threads: Optional[int] = None) -> int:
    """A command's intra-op thread count. ``--threads N`` must be an integer from 1 to ``cores()``. Without it:
    OMP_NUM_THREADS (else MKL_NUM_THREADS) where set, else 1; never more than the cores, nor than torch's own
    setting in this process (a caller's ``torch.set_num_threads``). One thread is the default because CPU
    sampling of these small networks gains little from a second thread on an idle machine and loses many times
    over on a busy one (OpenMP's threads wait for each other at every op: docs/reliability.md)."""
    import torch

    n = cores()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= n:
            raise ConfigError(
                f"--threads must be an integer in [1, {n}] (the CPU cores this process may use), got {threads!r}"
            )
        return threads
    wanted = 1
    for variable in THREAD_VARIABLES:
        value = os.environ.get(variable, "").strip()
        if value:
            first = value.split(",")[0].strip()  # OpenMP also takes a list, one count per nesting level
            if not re.fullmatch(r"[0-9]+", first) or int(first) < 1:
                raise ConfigError(f"{variable} must be a positive integer, got {value!r} (unset it or give --threads)")
            wanted = int(first)
            break
    return max(1, min(wanted, n, torch.get_num_threads()))


def use_threads(threads: Optional[int] = None) -> int:
    """Set torch's intra-op thread count for this command (``thread_count``) and return it; every command that
    computes calls it before its heavy work, and records the count in its JSON and ``reproduce`` line."""
    import torch

    count = thread_count(threads)
    torch.set_num_threads(count)
    return count


def load_model(model: str):
    """The model (thread count left as ``use_threads`` set it)."""
    from condiff.models.base import load_model, silence_diffusers

    silence_diffusers()
    return load_model(model)


def lora_scales(lora, scales) -> dict:
    """{adapter name: scale} for --lora folders and --lora-scale values (none: 1 each; one: for all), checked
    before any weights are read."""
    import math

    lora, scales = list(lora or []), list(scales or [])
    if not lora:
        if scales:
            raise ConfigError("--lora-scale goes with --lora")
        return {}
    if len(scales) not in (0, 1, len(lora)):
        raise ConfigError(f"give one --lora-scale for all or one per --lora ({len(lora)}), got {len(scales)}")
    if any(not math.isfinite(v) for v in scales):
        raise ConfigError(f"--lora-scale must be finite numbers, got {scales}")
    refuse_pickled_inputs({f"--lora {p}": p for p in lora})
    from condiff.training.lora import check_lora

    for path in lora:
        check_lora(path)
    values = scales * len(lora) if len(scales) == 1 else scales or [1.0] * len(lora)
    return {f"lora{i}": float(v) for i, v in enumerate(values)}


def apply_loras(m, lora, scales: dict) -> None:
    """Load each --lora folder into the loaded model's network and weight it (condiff.training.lora)."""
    if not scales:
        return
    from condiff.models.runtime import network
    from condiff.training.lora import load_lora, set_scales

    net = network(m, "--lora")
    for name, path in zip(scales, lora):
        load_lora(net, path, name)
    set_scales(net, scales)


def method_class(name: str):
    from condiff.errors import one_of
    from condiff.inversion.methods import METHODS

    if not isinstance(name, str) or name not in METHODS:
        raise one_of("editing method", name, METHODS)
    return METHODS[name]


def option_defaults(cls) -> dict:
    """A method class's options and their defaults (string options take their values verbatim)."""
    from dataclasses import fields, is_dataclass

    return {f.name: f.default for f in fields(cls)} if is_dataclass(cls) else {}


def parse_value(key: str, text: str, verbatim: bool, option: str):
    """One option value: verbatim for string options, else JSON (true/false, numbers), else a name."""
    text = text.strip()
    if verbatim:
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, (dict, list)) or value is None:
        raise ConfigError(f"{option} {key} must be a number, true/false or a name, got {text!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{option} {key} must be a finite number, got {text!r}")
    return value


def split_item(item: str, option: str, form: str) -> tuple[str, str]:
    key, sep, value = str(item).partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{option} must be {form}, got {item!r}")
    return key.strip(), value


def method_options(method: str, items: Optional[list[str]], option: str = "--method-opt") -> dict:
    """['cfg=5', 'exact=false'] -> {'cfg': 5, 'exact': False} for ``method``; the method refuses unknown keys
    and values of the wrong type itself (``get_method``)."""
    from condiff.inversion.methods import get_method

    defaults, out = option_defaults(method_class(method)), {}
    for item in items or []:
        key, value = split_item(item, option, "KEY=VALUE such as cfg=5")
        if not key.isidentifier():
            raise ConfigError(f"{option} must be KEY=VALUE such as cfg=5, got {item!r}")
        if key in out:
            raise ConfigError(f"{option} gives {key} twice, got {item!r}")
        if key not in defaults:
            get_method(method, **{key: value})  # refuses the unknown key, listing the accepted ones
        out[key] = parse_value(key, value, isinstance(defaults.get(key), str), option)
    return out


def make_method(method: str, options: dict, what: str = "--method-opt"):
    """``get_method(method, **options)``, with the options named in a refusal that does not name them."""
    from condiff.inversion.methods import get_method

    method_class(method)
    try:
        return get_method(method, **dict(options))
    except ConfigError as e:
        if not options or "unknown option" in str(e):
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in options.items())
        raise ConfigError(f"{what} for {method} ({given}): {e}") from None


def check_steps(steps: int, option: str = "--steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_EDIT_STEPS:
        raise ConfigError(f"{option} must be an integer in [1, {MAX_EDIT_STEPS}], got {steps!r}")
    return steps


def check_seed(seed: int) -> int:
    from condiff.training.recipe import check_seed

    return check_seed(seed, "--seed")


def parse_prompt(family, text: str, option: str):
    """The raw condition (1, ...) of a prompt, refused with the option's name."""
    try:
        return family.parse_prompt(text)
    except ConfigError as e:
        raise ConfigError(f"{option}: {e}") from None


def read_source(image: Path, family, no_resize: bool):
    """The input image for the model (ImageInput); a resize notice is printed as one 'note: ' line."""
    from condiff.data.images import read_image
    from condiff.errors import one_line

    src = read_image(image, family.image_shape, resize=not no_resize)
    if src.notice:
        typer.echo(f"note: {one_line(src.notice)}", err=True)
    return src


def image_digest(x) -> str:
    """SHA-256 of the model-size input tensor: an inversion file remembers which image it inverted."""
    import hashlib

    return hashlib.sha256(x.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def model_path(model: str) -> str:
    from condiff.models.base import resolve_model

    return str(resolve_model(model)[0].resolve())


def attribute_names(labels) -> dict:
    """A labeller row (shape, color, size, position ints) -> {'shape': 'circle', ...}; None where no object."""
    from condiff.data.shapes import ATTRIBUTES

    return {
        attr: (names[int(v)] if 0 <= int(v) < len(names) else None)
        for (attr, names), v in zip(ATTRIBUTES.items(), labels)
    }


def readings(family, images: dict) -> Optional[dict]:
    """The labeller's reading of each (1, 3, 32, 32) image (shapes family only, else None)."""
    if family.name != "shapes":
        return None
    import torch

    from condiff.data import labeller

    names = list(images)
    rows = labeller.label(torch.cat([images[k].clamp(-1, 1) for k in names]))
    return {k: attribute_names(r.tolist()) for k, r in zip(names, rows)}


def caption(reading: dict) -> str:
    words = [reading.get(a) for a in ("size", "color", "shape", "position")]
    return " ".join(w for w in words if w) or "(no object)"


def psnr(a, b) -> float:
    from condiff.evaluation.editbench import psnr

    return float(psnr(a, b).mean())


def loaded_model(model: str):
    """The model, loaded after every check has passed, with its weights frozen (the methods that optimise
    take gradients with respect to their own variables only)."""

    m = load_model(model)
    m.module.requires_grad_(False)
    return m


def load_inversion(path: Path):
    from condiff.inversion.methods import load_inverted

    try:
        state, meta = load_inverted(path)
    except InputFileError as e:
        raise InputFileError(f"--inversion: {e}") from None
    if (
        not isinstance(meta.get("options", {}), dict)
        or not isinstance(meta.get("prompt", ""), str)
        or not isinstance(state.info, dict)
    ):
        raise InputFileError(f"--inversion {str(path)!r} has malformed metadata (write it with `condiff invert`)")
    return state, meta


def reconstruction_path(out: Path) -> Path:
    """Where `invert` writes the reconstruction of an inversion written to ``out``: <stem>_reconstruction.png."""
    return out.with_name(out.stem + "_reconstruction.png")


def write_reconstruction(recon, path: Path, x0) -> float:
    """Write the reconstruction (1, C, H, W) at its own size (the model's, where its PSNR is measured) and return
    the PSNR of the written 8-bit file, read back, against ``x0`` (the input as the model read it)."""
    from condiff.data.images import read_image, write_image

    write_image(recon, path)
    return psnr(read_image(path, tuple(recon.shape[1:]), resize=False).tensor, x0)


def write_at_input_size(edited, image: Path, src, out: Path, channels: int) -> dict:
    """An output image (`edit`'s edit, `restore`'s restoration; (1, C, H, W) at the model's size) written at
    the input's size: resized back, or, when the input was centre-cropped, resized to the crop box and pasted
    into the original so the borders survive. Returns what was done."""
    import torch

    from condiff.data.images import from_uint8, read_image, resize_pixels, write_image

    w, h = src.original_size
    box = tuple(src.crop)
    if box == (0, 0, w, h):
        write_image(edited, out, size=(w, h))
        return {"size": [w, h], "fit": "native" if (h, w) == tuple(edited.shape[-2:]) else "resized"}
    full = read_image(image, (3, h, w), resize=False).tensor[0]
    left, top, right, bottom = box
    pixels = ((edited[0].clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    patch = from_uint8(torch.from_numpy(resize_pixels(pixels, (right - left, bottom - top)))).permute(2, 0, 1)
    full[:, top:bottom, left:right] = patch.expand(3, -1, -1) if channels == 1 else patch
    write_image(full, out)
    return {
        "size": [w, h],
        "fit": "pasted",
        "crop": list(box),
        "detail": "the output was resized to the centre-crop box and pasted into the original; the borders "
        "outside the box are the original's",
    }
