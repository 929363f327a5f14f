"""``condiff certify``: certified l2 accuracy on the held-out digits under randomized smoothing
(condiff.tasks.smoothing: Cohen et al.'s CERTIFY, denoised smoothing, DensePure; condiff.tasks.rrcm: rRCM).

``condiff certify --model digits --method plain|denoised|densepure --sigma 0.25`` certifies the first --images
held-out digits (condiff.data.digits.load_split()["x_test"]) with the digits scorer (an MLP on the pixels) as the
base classifier: ``plain`` smooths the scorer itself, ``denoised`` puts one evaluation of the diffusion model
(unconditional: the null label) in front of it (Carlini et al. 2023), ``densepure`` the majority vote over --runs
stochastic DDIM (eta = 1) reverse runs of --steps steps each (Xiao et al. 2023). ``noise`` and ``rrcm`` replace
the scorer with the one-step network of ``--classifier DIR`` (a ``robust_digits`` model: Cohen et al.'s
Gaussian-augmentation classifier, or rRCM of Lei et al. 2025; one network evaluation per noise draw, no diffusion
model: ``condiff train noise-digits-0.25`` / ``rrcm-digits-0.25``). It prints the certified accuracy
at radii 0, 0.25, 0.5 and 0.75 and the network evaluations per certification; ``--json`` writes every
certificate (atomically).

Units: --sigma and the radii are l2 distances in [0, 1] pixel units over the 16x16 = 256 pixels (the convention
of Cohen et al.); the model and the scorer read [-1, 1], so the smoothing functions get ``scale=2, shift=-1``
(a sigma of 0.25 here is a noise level of 0.5 in the model's units).

Every user error is one ``error:`` line with exit code 2, raised before any weights are read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from condiff.cli import common
from condiff.cli.options import ThreadsOpt
from condiff.errors import ConfigError, one_of
from condiff.models.certify_digits import ONE_STEP, SCALE, certify_images

METHODS = ("plain", "denoised", "densepure", "noise", "rrcm")
MAX_SIGMA = 10.0
MAX_DRAWS = 10_000_000


def _check_int(option: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{option} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _check_real(option: str, value, accepted: str, ok) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ConfigError(f"{option} must be {accepted}, got {value!r}")
    return float(value)


def check_options(method, sigma, n, n0, alpha, images, runs, steps, classifier=None) -> tuple[int, int]:
    """Every option checked before any weights are read; returns (runs, steps) for densepure."""
    from condiff.data.digits import load_split

    if method not in METHODS:
        raise one_of("--method", method, METHODS)
    _check_real(
        "--sigma", sigma, f"a finite number in (0, {MAX_SIGMA:g}] ([0, 1] pixel units)", lambda v: 0 < v <= MAX_SIGMA
    )
    _check_int("--n", n, 1, MAX_DRAWS)
    _check_int("--n0", n0, 1, MAX_DRAWS)
    _check_real("--alpha", alpha, "a number in the open interval (0, 0.5)", lambda v: 0 < v < 0.5)
    _check_int("--images", images, 1, int(load_split()["x_test"].shape[0]))
    if method in ONE_STEP and classifier is None:
        raise ConfigError(
            f"--method {method} needs --classifier DIR (a robust_digits model: condiff train {method}-digits-0.25)"
        )
    if method not in ONE_STEP and classifier is not None:
        raise ConfigError(
            f"--classifier applies to --method {' or '.join(ONE_STEP)} only, got it with --method {method}"
        )
    if method != "densepure":
        for option, value in (("--runs", runs), ("--steps", steps)):
            if value is not None:
                raise ConfigError(f"{option} applies to --method densepure only, got it with --method {method}")
        return 0, 0
    runs = _check_int("--runs", 3 if runs is None else runs, 1, 1000)
    steps = _check_int("--steps", 4 if steps is None else steps, 1, 1000)
    return runs, steps


def check_model(model: str, method: str, sigma: float) -> None:
    """The model is a digits model and (denoised, densepure) sigma is within its schedule's noise range."""
    family = common.family_of(model)
    if family.name != "digits":
        raise ConfigError(f"--model must be a digits model (the scorer classifies digits), got a {family.name} model")
    if method == "plain" or method in ONE_STEP:
        return
    from condiff.core.schedules import schedule_from_config
    from condiff.models.base import resolve_model
    from condiff.tasks.smoothing import smoothing_time

    schedule = schedule_from_config(resolve_model(model)[1]["schedule"])
    try:
        t = smoothing_time(schedule, sigma, SCALE)
    except ConfigError as e:
        raise ConfigError(f"--sigma {sigma!r}: {e}") from None
    if method == "densepure" and not t > schedule.t_min:
        raise ConfigError(f"--sigma {sigma!r} puts t* at the schedule's t_min; accepted: a larger --sigma")


def certify_cmd(
    model: str = typer.Option("digits", help="the bundled digits model or a directory of a digits model"),
    method: str = typer.Option(
        "plain",
        help="plain (the scorer under noise), denoised (one-shot), densepure, or a one-step network of --classifier: "
        "noise (Gaussian augmentation) or rrcm",
    ),
    classifier: Optional[Path] = typer.Option(
        None, help="noise, rrcm: a robust_digits model folder (condiff train rrcm-digits-0.25 --out DIR)"
    ),
    sigma: float = typer.Option(0.25, help="smoothing noise level, in [0, 1] pixel units"),
    n: int = typer.Option(1000, help="noise draws for the estimate (Cohen et al.'s n)"),
    n0: int = typer.Option(100, help="noise draws for selecting the class (Cohen et al.'s n0)"),
    alpha: float = typer.Option(0.001, help="failure probability of each certificate"),
    images: int = typer.Option(100, help="the first N held-out digits to certify (at most 450)"),
    runs: Optional[int] = typer.Option(None, help="densepure: reverse runs voted over (K; default 3)"),
    steps: Optional[int] = typer.Option(None, help="densepure: DDIM steps of each run (default 4)"),
    seed: int = typer.Option(0, help="random seed of the smoothing noise"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the certificates and settings to this file"),
    threads: ThreadsOpt = None,
):
    """Certified l2 accuracy of the digits scorer under randomized smoothing (Cohen et al. 2019), plain, behind
    the diffusion model as a one-shot denoiser (Carlini et al. 2023) or DensePure (Xiao et al. 2023)."""
    import torch

    runs_k, steps_s = check_options(method, sigma, n, n0, alpha, images, runs, steps, classifier)
    common.check_seed(seed)
    if json_out is not None:
        common.check_out(json_out, "--json", ".json")
    check_model(model, method, sigma)
    threads = common.use_threads(threads)
    one_step = None
    if method in ONE_STEP:
        from condiff.models.robust_digits import load_robust_model

        one_step = load_robust_model(classifier)
        if one_step.config["kind"] != method:
            raise ConfigError(
                f"--classifier {str(classifier)!r} is a {one_step.config['kind']} model; --method {method} needs a "
                f"{method} one"
            )
    m = common.loaded_model(model) if method in ("denoised", "densepure") else None
    report = certify_images(method, sigma, n, n0, alpha, images, seed, runs_k or 3, steps_s or 4, m, one_step)
    acc = report["certified_accuracy"]
    typer.echo(
        f"certify --method {method} --sigma {sigma:g}: {images} held-out digits, n0={n0}, n={n}, alpha={alpha:g} "
        f"({report['abstained']} abstained, {report['seconds']:.1f}s)"
    )
    typer.echo(
        "certified accuracy at l2 radius ([0, 1] pixel units): " + ", ".join(f"{r}: {a:.3f}" for r, a in acc.items())
    )
    typer.echo(
        f"network evaluations per certification: {report['denoiser_nfe_per_certification']:g} diffusion model, "
        f"{report['classifier_evals_per_certification']} {report['base_classifier']}"
    )
    if json_out is None:
        return
    from condiff import __version__
    from condiff.core.files import atomic_write_json

    report.update(
        {
            "format": "condiff.certify",
            "model": model,
            "threads": threads,
            "condiff_version": __version__,
            "torch_version": torch.__version__,
            "reproduce": common.reproduce(
                "certify",
                [
                    ("--model", model),
                    ("--method", method),
                    ("--classifier", classifier),
                    ("--sigma", sigma),
                    ("--n", n),
                    ("--n0", n0),
                    ("--alpha", alpha),
                    ("--images", images),
                    ("--runs", runs),
                    ("--steps", steps),
                    ("--seed", seed),
                    ("--json", json_out),
                ],
            ),
        }
    )
    atomic_write_json(json_out, report)
    typer.echo(f"wrote {json_out}")
