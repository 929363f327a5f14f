"""``condiff adapt``: SDA test-time adaptation (Guo et al., CVPR 2025; condiff.tasks.sda) of the digits scorer on
digits-C (condiff.data.digits_c), beside the source scorer and plain diffusion purification.

``condiff adapt --corruptions noise,blur,contrast,occlusion --severities 1,2,3,4,5 --t-star 300 --steps 5`` runs
SDA's stage 1 (``--synthetic`` class-conditional samples of the digits model, ``--synthesis-steps`` DDIM steps each,
passed through the test-time projection: diffuse to --t-star, --steps DDIM steps of the unconditional model back,
with DDA's structure guidance when --structure-factor D and --structure-weight w are not 0; with --mix-real the
scorer's real training digits go through the same projection too; a copy of the scorer fine-tuned on them for
--epochs at --lr) and evaluates, on the first --images of the 300 test digits
(condiff.models.sda_digits.split: the 150 validation digits are where t* was chosen), each corruption x severity:
the source scorer, purification (the scorer on the projected image), purification ensembled with the source, SDA
(the fine-tuned copy on the projected image) and SDA ensembled with the source (the paper's prediction). It prints
one table with the average over corruptions and severities.

``--save DIR`` writes the fine-tuned classifier (safetensors + condiff.json with its settings, atomically);
``--classifier DIR`` reuses one and skips stage 1 (its t*, steps, structure guidance and seed are the run's: giving
different ones is an error). ``--json F`` writes the rows and settings; ``--out F.png`` a plot of accuracy
against severity.

Every user error is one ``error:`` line with exit code 2, raised before any weights are read; outputs are written
atomically once everything has been computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from condiff.cli import common
from condiff.cli.options import ThreadsOpt
from condiff.errors import ConfigError, one_of

DEFAULT_CORRUPTIONS = "noise,blur,contrast,occlusion"
DEFAULT_SEVERITIES = "1,2,3,4,5"


def parse_corruptions(text: str) -> tuple[str, ...]:
    from condiff.data.digits_c import CORRUPTIONS

    names = tuple(p.strip() for p in str(text).split(","))
    for name in names:
        if name not in CORRUPTIONS:
            raise one_of("corruption in --corruptions", name, CORRUPTIONS)
    if len(set(names)) != len(names):
        raise ConfigError(f"--corruptions lists a corruption twice: {text!r}; accepted: each of them at most once")
    return names


def parse_severities(text: str) -> tuple[int, ...]:
    from condiff.data.digits_c import SEVERITIES

    accepted = f"a comma-separated list of distinct severities from {', '.join(map(str, SEVERITIES))}"
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.isdigit() and p.isascii() and int(p) in SEVERITIES for p in parts):
        raise ConfigError(f"--severities must be {accepted}, got {text!r}")
    values = tuple(int(p) for p in parts)
    if len(set(values)) != len(values):
        raise ConfigError(f"--severities must be {accepted}, got {text!r}")
    return values


def _t_range(model: str) -> tuple[float, float]:
    from condiff.core.schedules import schedule_from_config
    from condiff.models.base import resolve_model

    schedule = schedule_from_config(resolve_model(model)[1]["schedule"])
    return float(schedule.t_min), float(schedule.t_max)


def _plot(rows, averages, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from condiff.core.files import atomic_write_bytes
    from condiff.models.sda_digits import METHOD_LABELS

    names = list(dict.fromkeys(r["corruption"] for r in rows))
    methods = [k for k in METHOD_LABELS if k in rows[0]]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1.5, 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        sub = [r for r in rows if r["corruption"] == name]
        for k in methods:
            ax.plot([r["severity"] for r in sub], [r[k] for r in sub], marker="o", label=METHOD_LABELS[k])
        ax.set_title(name)
        ax.set_xlabel("severity")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    title = ", ".join(f"{k} {averages[k]:.3f}" for k in methods)
    fig.suptitle(f"digits-C accuracy (average: {title})", fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def adapt_cmd(
    model: str = typer.Option("digits", help="the bundled digits model or a directory of a digits model"),
    corruptions: str = typer.Option(DEFAULT_CORRUPTIONS, help="comma-separated digits-C corruptions"),
    severities: str = typer.Option(DEFAULT_SEVERITIES, help="comma-separated severities (1 to 5)"),
    t_star: Optional[float] = typer.Option(
        None, "--t-star", help="projection time t* (default 300: chosen on validation; model's time)"
    ),
    steps: Optional[int] = typer.Option(
        None, help="DDIM steps of the projection from t* (default 5: chosen on validation)"
    ),
    structure_factor: Optional[int] = typer.Option(
        None, help="DDA structure guidance: low-pass factor D (0: none; divides 16; default: chosen on validation)"
    ),
    structure_weight: Optional[float] = typer.Option(
        None, help="DDA structure guidance weight w (0: none; default: chosen on validation)"
    ),
    synthetic: int = typer.Option(1000, help="class-conditional synthetic images for fine-tuning"),
    synthesis_steps: int = typer.Option(20, help="DDIM steps of each synthetic image"),
    epochs: Optional[int] = typer.Option(None, help="fine-tuning epochs (Adam, cross-entropy; default: validation's)"),
    lr: Optional[float] = typer.Option(None, help="fine-tuning learning rate (default: chosen on validation)"),
    mix_real: Optional[bool] = typer.Option(
        None,
        "--mix-real/--no-mix-real",
        help="also fine-tune on the scorer's real training digits through the projection (default: validation's)",
    ),
    images: Optional[int] = typer.Option(None, help="evaluate on the first N test digits (default all 300)"),
    seed: Optional[int] = typer.Option(None, help="seed of the corruptions, synthesis and projections (default 0)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the table and settings to this file"),
    out: Optional[Path] = typer.Option(None, "--out", help="write a plot of accuracy against severity (.png)"),
    save: Optional[Path] = typer.Option(None, help="write the fine-tuned classifier to this folder"),
    classifier: Optional[Path] = typer.Option(None, help="reuse a classifier written by --save (skips stage 1)"),
    threads: ThreadsOpt = None,
):
    """SDA test-time adaptation of the digits scorer on digits-C (Guo et al., CVPR 2025): the scorer, diffusion
    purification and SDA, per corruption and severity, in one table."""
    import time

    import torch

    from condiff.models import sda_digits as sd

    names = parse_corruptions(corruptions)
    levels = parse_severities(severities)
    n_test = sd.split_sizes()[1]
    if images is not None:
        from condiff.errors import check_int

        check_int("--images", images, 1, n_test)
    if seed is not None:
        common.check_seed(seed)
    for path, option, suffix in ((json_out, "--json", ".json"), (out, "--out", ".png")):
        if path is not None:
            common.check_out(path, option, suffix)
    if json_out is not None and out is not None and json_out.resolve() == out.resolve():
        raise ConfigError(f"--json and --out must be different files, got {str(out)!r} for both")
    if save is not None and classifier is not None:
        raise ConfigError("--save and --classifier exclude each other (--classifier skips the fine-tuning to save)")
    if save is not None:
        common.check_out(save, "--save", kind="dir")
    family = common.family_of(model)
    if family.name != "digits":
        raise ConfigError(f"--model must be a digits model (the scorer classifies digits), got a {family.name} model")
    t_range = _t_range(model)
    given = {
        "t_star": t_star,
        "steps": steps,
        "structure_factor": structure_factor,
        "structure_weight": structure_weight,
        "seed": seed,
    }
    if classifier is not None:
        adapted, settings = sd.load_adapted(classifier)
        for key, value in given.items():
            if value is not None and value != getattr(settings, key):
                flag = "--" + key.replace("_", "-")
                raise ConfigError(
                    f"{flag} {value!r} differs from the {getattr(settings, key)!r} the --classifier "
                    f"{str(classifier)!r} was adapted with; accepted: the same value or none"
                )
        sd.check_settings(settings, t_range, as_options=True)
    else:
        adapted = None
        defaults = sd.Settings()
        settings = sd.Settings(
            t_star=defaults.t_star if t_star is None else t_star,
            steps=defaults.steps if steps is None else steps,
            structure_factor=defaults.structure_factor if structure_factor is None else structure_factor,
            structure_weight=defaults.structure_weight if structure_weight is None else structure_weight,
            synthetic=synthetic,
            synthesis_steps=synthesis_steps,
            epochs=defaults.epochs if epochs is None else epochs,
            lr=defaults.lr if lr is None else lr,
            mix_real=defaults.mix_real if mix_real is None else mix_real,
            seed=defaults.seed if seed is None else seed,
        )
        sd.check_settings(settings, t_range, as_options=True)
    threads = common.use_threads(threads)
    m = common.loaded_model(model)
    source = sd.scorer_net()
    info = None
    t0 = time.process_time()
    if adapted is None:
        typer.echo(
            f"stage 1: {settings.synthetic} synthetic digits"
            + (" + the real training digits" if settings.mix_real else "")
            + f", projected (t*={settings.t_star:g}, {settings.steps} steps, structure D={settings.structure_factor} "
            f"w={settings.structure_weight:g}), fine-tuning {settings.epochs} epochs"
        )
        adapted, info = sd.adapt(m, source, settings, progress=True)
    stage1 = time.process_time() - t0
    split = sd.split()
    x, y = split["x_test"], split["y_test"]
    if images is not None:
        x, y = x[:images], y[:images]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(names) * len(levels), desc="digits-C", leave=False)
    rows = sd.evaluate(m, source, adapted, settings, x, y, names, levels, progress=lambda _row: bar.update())
    bar.close()
    averages = sd.averages(rows)
    typer.echo(sd.format_table(rows, averages))
    result = {
        "format": "condiff.adapt",
        "model": model,
        "settings": settings.as_dict(),
        "corruptions": list(names),
        "severities": list(levels),
        "images": int(x.shape[0]),
        "classifier": None if classifier is None else str(classifier),
        "stage1": info,
        "stage1_cpu_seconds": stage1,
        "cpu_seconds": time.process_time() - t0,
        "rows": rows,
        "average": averages,
    }
    if save is not None:
        sd.save_adapted(adapted, settings, save, {"stage1": info})
        typer.echo(f"wrote {save}")
    if out is not None:
        _plot(rows, averages, out)
        typer.echo(f"wrote {out}")
    if json_out is not None:
        from condiff import __version__
        from condiff.core.files import atomic_write_json

        result.update(
            {
                "threads": threads,
                "condiff_version": __version__,
                "torch_version": torch.__version__,
                "reproduce": common.reproduce(
                    "adapt",
                    [
                        ("--model", model),
                        ("--corruptions", ",".join(names)),
                        ("--severities", ",".join(map(str, levels))),
                        ("--t-star", settings.t_star),
                        ("--steps", settings.steps),
                        ("--structure-factor", settings.structure_factor),
                        ("--structure-weight", settings.structure_weight),
                        ("--synthetic", settings.synthetic),
                        ("--synthesis-steps", settings.synthesis_steps),
                        ("--epochs", settings.epochs),
                        ("--lr", settings.lr),
                        ("--mix-real" if settings.mix_real else "--no-mix-real", True),
                        ("--images", images),
                        ("--seed", settings.seed),
                        ("--classifier", classifier),
                        ("--json", json_out),
                    ],
                ),
            }
        )
        atomic_write_json(json_out, result)
        typer.echo(f"wrote {json_out}")
