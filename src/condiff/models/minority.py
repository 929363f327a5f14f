"""Saving and loading the level classifier of minority guidance (an ``AttributeClassifier`` with its level
thresholds) as a folder of safetensors and JSON. The folder records the diffusion model whose scores the
classifier was fitted on (its name and the digest of its weights); ``check_minority_fits`` compares it with the
model of a run (condiff.core.fitted)."""

from __future__ import annotations

from pathlib import Path

import torch

from condiff.core.files import atomic_dir, atomic_write_json, load_json, refuse_pickles, save_tensors
from condiff.core.fitted import FittedFor, check_fitted
from condiff.errors import ConfigError, InputFileError
from condiff.guidance.minority import MinorityClassifier
from condiff.models.family import load_pretrained
from condiff.nets.classifier import AttributeClassifier

META_FILE = "minority.json"


def save_minority(mc: MinorityClassifier, directory, tensors: dict | None = None) -> Path:
    """Write ``directory/classifier`` (the net's safetensors + config, via ``save_pretrained``),
    ``directory/minority.json`` (thresholds, t, n, levels, info) and, if given, ``tensors`` (e.g. the training
    scores) as ``directory/scores.safetensors``, atomically."""
    if not hasattr(mc.net, "save_pretrained"):
        raise ConfigError(f"only a diffusers ModelMixin classifier can be saved, got {type(mc.net).__name__}")
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        mc.net.save_pretrained(tmp / "classifier")
        atomic_write_json(
            tmp / META_FILE,
            {
                "method": "minority guidance (Um, Lee, Ye, ICLR 2024)",
                "levels": mc.levels,
                "thresholds": [float(v) for v in mc.thresholds.double()],
                "t": mc.t,
                "n": mc.n,
                "t_range": [float(v) for v in mc.t_range],
                "distance": "squared_error",
                "model": mc.model,
                "model_weights": mc.weights,
                "info": mc.info,
            },
        )
        if tensors:
            save_tensors(tmp / "scores.safetensors", tensors)
    return directory


def load_minority(directory) -> MinorityClassifier:
    """Read what ``save_minority`` wrote (an AttributeClassifier and its thresholds)."""
    directory = Path(directory)
    refuse_pickles(directory, "--minority")
    if not (directory / META_FILE).is_file():
        raise InputFileError(f"{str(directory)!r} is not a minority classifier directory (no {META_FILE})")
    meta = load_json(directory / META_FILE)
    try:
        thresholds = torch.tensor([float(v) for v in meta["thresholds"]], dtype=torch.float64)
        t, n = float(meta["t"]), int(meta["n"])
        t_range = tuple(float(v) for v in meta.get("t_range", (0.0, 1.0)))
        if len(t_range) != 2 or not t_range[0] < t_range[1]:
            raise ValueError(f"t_range must be [t_min, t_max] with t_min < t_max, got {meta.get('t_range')}")
        fitted = FittedFor.from_json(
            {k: meta.get(k) for k in ("model", "model_weights")}, repr(str(directory / META_FILE))
        )
    except (KeyError, TypeError, ValueError) as e:
        raise InputFileError(f"{str(directory / META_FILE)!r} is malformed ({type(e).__name__}: {e})") from None
    net = load_pretrained(AttributeClassifier, directory / "classifier").eval()
    if net.head_sizes != [thresholds.numel() + 1]:
        raise InputFileError(
            f"{str(directory)!r}: the classifier has heads {net.head_sizes}, but the "
            f"thresholds give {thresholds.numel() + 1} levels"
        )
    return MinorityClassifier(net, thresholds, t, n, meta.get("info", {}), t_range, fitted.model, fitted.weights)


def check_minority_fits(
    mc: MinorityClassifier,
    weights: str | None = None,
    model: str | None = None,
    where: str = "the minority classifier",
    allow_mismatch: bool = False,
) -> MinorityClassifier:
    """A classifier fitted on the scores of another model (``weights``: the digest of the run's model's weights,
    ``model`` its name) is ``check_fitted``'s one-line ConfigError naming ``where`` (a FitWarning with
    ``allow_mismatch``; one that records no weights: a FitWarning that it cannot be checked)."""
    check_fitted(where, FittedFor(mc.model, mc.weights), FittedFor(model, weights), allow_mismatch)
    return mc
