"""Classifiers by name, for the edge of the program: a bundled classifier name (clean, noisy, ppap), a
classifier directory written by ``condiff train`` with a shapes_classifier recipe, or a folder of PPAP experts.
Library code takes the loaded networks; only the CLI and scripts resolve names here."""

from __future__ import annotations

from pathlib import Path

from condiff.errors import InputFileError
from condiff.models.base import bundled_dir, load_model
from condiff.models.shapes_classifier import ShapesClassifierFamily
from condiff.nets import AttributeClassifier

BUNDLED_CLASSIFIERS = {"clean": "shapes-clean-classifier", "noisy": "shapes-noisy-classifier", "ppap": "shapes-ppap"}


def classifier_path(name_or_path) -> Path:
    """The directory of a bundled classifier name (clean, noisy, ppap: PPAP experts of the clean one) or a path."""
    key = str(name_or_path)
    return bundled_dir(BUNDLED_CLASSIFIERS[key]) if key in BUNDLED_CLASSIFIERS else Path(key)


def load_classifier(name_or_path) -> AttributeClassifier:
    """A trained shapes classifier: a bundled name (clean, noisy) or a directory written by ``condiff train``
    with a shapes_classifier recipe. Anything else is one InputFileError line."""
    key = str(name_or_path)
    target = classifier_path(key)
    if not key or not target.exists():
        raise InputFileError(
            f"classifier {key!r} is neither a bundled classifier "
            f"({', '.join(BUNDLED_CLASSIFIERS)}) nor an existing directory"
        )
    m = load_model(target, "--classifier")
    if m.family.name != ShapesClassifierFamily.name:
        raise InputFileError(
            f"{key!r} holds a {m.family.name} model, not a classifier (train one with "
            f"condiff train shapes-noisy-classifier)"
        )
    return m.module["classifier"].eval()


def load_guidance_classifier(name_or_path):
    """What ``--classifier`` names: a shapes classifier (a bundled name or a ``condiff train`` directory) or a
    folder of PPAP experts (``condiff guidance train-ppap``), rebuilt on the classifier its ppap.json records."""
    from condiff.guidance.ppap import META_FILE, load_ppap, read_ppap_meta

    target = classifier_path(name_or_path)
    if (target / META_FILE).is_file():
        meta = read_ppap_meta(target)
        if not meta.get("classifier"):
            raise InputFileError(f"{str(target)!r} does not record the classifier its experts were trained on")
        return load_ppap(target, load_classifier(meta["classifier"]))
    return load_classifier(name_or_path)
