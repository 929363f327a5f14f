"""``condiff classify``: zero-shot classification of one image by a conditional diffusion model (the Diffusion
Classifier of Li et al., ICCV 2023; condiff.tasks.diffusion_classifier).

``condiff classify --model shapes --image in.png --candidates "red,green,blue"`` scores each candidate caption
by the model's mean eps-prediction error on a shared set of stratified (t, eps) pairs and prints the ranking, best
first. ``--attribute color`` takes every value of a shapes attribute as the candidates (digits: ``class``, the
digits 0-9), or checks that the given candidates are values of it. ``--stages 20,100 --keep 2,1`` prunes
adaptively (keep the 2 best after 20 pairs, then score those on 100 pairs); the default is full evaluation on 100
pairs with the l1 error. ``--json`` writes the ranking, the network evaluations and a command that reproduces
it (atomically).

Every user error is one ``error:`` line with exit code 2, raised before any weights are read.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from condiff.cli import common
from condiff.cli.options import ThreadsOpt
from condiff.errors import ConfigError, one_of

MAX_CANDIDATES = 100


def attribute_values(family, attribute: str) -> tuple[str, ...]:
    """The candidate prompts of one attribute: a shapes attribute's values, or the digits 0-9."""
    if family.name in ("shapes", "shapes_imbalanced"):
        from condiff.data.shapes import ATTRIBUTES

        table = dict(ATTRIBUTES)
    elif family.name == "digits":
        table = {"class": tuple(str(i) for i in range(10))}
    else:
        table = {}
    if attribute not in table:
        raise one_of(f"--attribute for a {family.name} model", attribute, table or ["(none)"])
    return tuple(table[attribute])


def check_family(family) -> None:
    """Only a conditional diffusion model can classify."""
    if family.name not in ("shapes", "shapes_imbalanced", "digits"):
        raise ConfigError(
            f"--model must be a conditional diffusion model (shapes, digits or a directory of one), "
            f"got a {family.name} model"
        )


def parse_candidates(family, text: Optional[str], attribute: Optional[str]):
    """(candidate prompts, raw conditions (1, ...) each) from --candidates and --attribute."""
    values = attribute_values(family, attribute) if attribute is not None else None
    if text is None:
        if values is None:
            raise ConfigError("give --candidates (comma-separated prompts, e.g. 'red,green,blue') or --attribute")
        names = list(values)
    else:
        names = [p.strip() for p in str(text).split(",")]
        if any(not p for p in names):
            raise ConfigError(
                f"--candidates must be comma-separated non-empty prompts such as 'red,green,blue', got {text!r}"
            )
    if not 2 <= len(names) <= MAX_CANDIDATES:
        raise ConfigError(f"--candidates must name 2 to {MAX_CANDIDATES} candidates, got {len(names)} ({text!r})")
    raws, seen = [], {}
    for name in names:
        raw = common.parse_prompt(family, name, "--candidates")
        if values is not None and raw.tolist() not in [family.parse_prompt(v).tolist() for v in values]:
            raise ConfigError(
                f"--candidates {name!r} is not a value of --attribute {attribute}; accepted: {', '.join(values)}"
            )
        key = str(raw.tolist())
        if key in seen:
            raise ConfigError(f"--candidates names one condition twice ({seen[key]!r} and {name!r}), got {text!r}")
        seen[key] = name
        raws.append(raw)
    return names, raws


def parse_counts(text: str, option: str) -> tuple[int, ...]:
    """'20,100' -> (20, 100), refused with the option's name."""
    items = [p.strip() for p in str(text).split(",")]
    if not items or not all(p.isdigit() and p.isascii() for p in items):
        raise ConfigError(f"{option} must be comma-separated positive integers such as 20,100, got {text!r}")
    return tuple(int(p) for p in items)


def make_config(stages: str, keep: Optional[str], error: str, pairs: Optional[int]):
    """The ClassifierConfig of the options, its errors naming the flags."""
    from condiff.tasks.diffusion_classifier import ERRORS, ClassifierConfig

    if error not in ERRORS:
        raise one_of("--error", error, ERRORS)
    st = parse_counts(stages, "--stages")
    if keep is None:
        if len(st) > 1:
            raise ConfigError(f"--stages {stages} has {len(st)} stages: give --keep with one count per stage, e.g. 2,1")
        kp = (1,)
    else:
        kp = parse_counts(keep, "--keep")
    try:
        return ClassifierConfig(stages=st, keep=kp, error=error, pairs=pairs)
    except ConfigError as e:
        text = str(e)
        for name in ("stages", "keep", "pairs"):
            if text.startswith(name):
                text = f"--{name}{text[len(name) :]}"
        raise ConfigError(text) from None


def classify_cmd(
    model: str = typer.Option("shapes", help="bundled model name (shapes, digits) or a model directory"),
    image: Path = typer.Option(
        ..., help="the image to classify (PNG, JPEG, ...); other sizes are centre-cropped and resized, with a note"
    ),
    candidates: Optional[str] = typer.Option(
        None,
        help="comma-separated candidate prompts, e.g. 'red,green,blue' or 'circle,square,triangle' (digits: 0-9); "
        "default: every value of --attribute",
    ),
    attribute: Optional[str] = typer.Option(
        None,
        help="the attribute the candidates are values of: shapes color, shape, size, position; digits class "
        "(alone: all its values)",
    ),
    stages: str = typer.Option(
        "100", help="pairs evaluated after each pruning stage, e.g. 20,100 (one: full evaluation)"
    ),
    keep: Optional[str] = typer.Option(
        None, help="candidates kept after each stage, e.g. 2,1 (needed with several --stages)"
    ),
    pairs: Optional[int] = typer.Option(
        None, help="the size of the stratified (t, eps) grid the stages draw from (default: the last stage)"
    ),
    error: str = typer.Option(
        "l1", help="the per-pair error: l1 (the paper's setting; the more robust on shapes: docs), l2 or huber"
    ),
    seed: int = typer.Option(0, help="random seed of the noise"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the ranking and settings to this JSON file"),
    no_resize: bool = typer.Option(
        False, "--no-resize", help="refuse an image of another size instead of centre-cropping and resizing it"
    ),
    threads: ThreadsOpt = None,
):
    """Zero-shot classification with the diffusion model: rank candidate prompts by how well the model denoises
    the image under each (the Diffusion Classifier, Li et al. 2023)."""
    import torch

    from condiff.tasks.diffusion_classifier import classify, describe_config

    config = make_config(stages, keep, error, pairs)
    common.check_seed(seed)
    if json_out is not None:
        common.check_out(json_out, "--json", ".json")
        if image.exists() and json_out.exists() and image.resolve() == json_out.resolve():
            raise ConfigError(f"--json {str(json_out)!r} would overwrite --image; choose another --json")
    threads = common.use_threads(threads)
    family = common.family_of(model)
    check_family(family)
    names, raws = parse_candidates(family, candidates, attribute)
    src = common.read_source(image, family, no_resize)
    m = common.loaded_model(model)
    conds = []
    for raw in raws:
        cond = m.condition(raw)
        cond.pop("null", None)  # the conditional model alone
        conds.append(cond)
    t0 = time.perf_counter()
    out = classify(m.denoiser, src.tensor, conds, config, torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - t0
    ranking = [
        {"candidate": names[i], "mean_error": float(out.scores[0, i]), "pairs": int(out.evaluated[0, i])}
        for i in out.ranking[0].tolist()
    ]
    width = max(len(n) for n in names)
    typer.echo(
        f"{image}: {ranking[0]['candidate']} ({len(names)} candidates, {out.total_nfe} network evaluations, "
        f"{seconds:.1f}s)"
    )
    for k, r in enumerate(ranking, 1):
        typer.echo(
            f"{k:>3}. {r['candidate']:<{width}}  mean {config.error} error {r['mean_error']:.6f}  ({r['pairs']} pairs)"
        )
    if json_out is None:
        return
    from condiff import __version__
    from condiff.core.files import atomic_write_json

    report = {
        "format": "condiff.classify",
        "model": model,
        "model_path": common.model_path(model),
        "family": family.name,
        "image": str(image),
        "original_size": list(src.original_size),
        "notice": src.notice,
        "candidates": names,
        "attribute": attribute,
        "prediction": ranking[0]["candidate"],
        "ranking": ranking,
        "nfe": out.total_nfe,
        "config": describe_config(config),
        "times": out.times.tolist(),
        "seed": seed,
        "seconds": seconds,
        "threads": threads,
        "condiff_version": __version__,
        "torch_version": torch.__version__,
        "reproduce": common.reproduce(
            "classify",
            [
                ("--model", model),
                ("--image", image),
                ("--candidates", candidates),
                ("--attribute", attribute),
                ("--stages", stages),
                ("--keep", keep),
                ("--pairs", pairs),
                ("--error", error),
                ("--seed", seed),
                ("--no-resize", no_resize),
                ("--json", json_out),
            ],
        ),
    }
    atomic_write_json(json_out, report)
    typer.echo(f"wrote {json_out}")
