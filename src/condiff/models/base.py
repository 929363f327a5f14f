"""Model families and loaded models.

A ModelFamily knows one conditional task: its networks (diffusers classes), how a raw condition (token
ids, class labels) is encoded into the ``cond`` mapping the denoiser takes, how to make training batches,
how to draw random evaluation conditions and how to score samples with an exact (or fixed) judge.
A LoadedModel is a family plus trained weights, a schedule and a prediction type.

On disk (diffusers layout): ``unet/`` (``from_pretrained``-loadable), ``text_encoder/`` where the family
has one, ``scheduler/`` (a DDPMScheduler config), and ``condiff.json`` (family, prediction, schedule, and the
noise family: Gaussian, or PFGM++ with its D, whose prior sampling must start from; absent means Gaussian).
"""

from __future__ import annotations

from pathlib import Path

from condiff.core.denoiser import as_prediction
from condiff.core.files import load_json, refuse_pickles
from condiff.core.schedules import schedule_from_config
from condiff.errors import ConfigError, InputFileError, one_of
from condiff.models.family import ModelFamily, load_pretrained  # noqa: F401 (re-exported)
from condiff.models.loaded import LoadedModel
from condiff.solvers.pfgmpp import GaussianNoise, noise_from_config

BUNDLED_ROOT = Path(__file__).resolve().parent.parent / "bundled"


def _families():
    from condiff.models.digits import DigitsFamily
    from condiff.models.dit_moe import DiTShapesFamily
    from condiff.models.shapes import ShapesFamily
    from condiff.models.shapes_classifier import ShapesClassifierFamily
    from condiff.models.shapes_imbalanced import ShapesImbalancedFamily

    return {
        "shapes": ShapesFamily(),
        "digits": DigitsFamily(),
        "shapes_classifier": ShapesClassifierFamily(),
        "shapes_imbalanced": ShapesImbalancedFamily(),
        "dit_moe": DiTShapesFamily(),
    }


def get_family(name: str) -> ModelFamily:
    fams = _families()
    if not isinstance(name, str) or name not in fams:
        raise one_of("model family", name, fams)
    return fams[name]


BUNDLED = ("shapes", "digits")


def bundled_dir(name: str) -> Path:
    return BUNDLED_ROOT / name


def resolve_model(name_or_path: str | Path, what: str = "--model") -> tuple[Path, dict]:
    """The directory of a bundled model name or model directory, and its checked ``condiff.json`` (for a
    ``condiff export`` folder: ``exported_meta``)
    (family, prediction and schedule are validated here, before any weights are read). A directory holding
    pickled weights is refused first (``refuse_pickles``; ``what`` names the option in that refusal)."""
    path = Path(name_or_path)
    if str(name_or_path) in BUNDLED:
        path = bundled_dir(str(name_or_path))
        if not (path / "condiff.json").is_file():
            raise InputFileError(f"bundled model {name_or_path!r} is missing its weights at {str(path)!r}")
    elif not str(name_or_path) or not path.exists():
        raise InputFileError(
            f"model {str(name_or_path)!r} is neither a bundled model ({', '.join(BUNDLED)}) nor an existing directory"
        )
    if not path.is_dir():
        raise InputFileError(f"model path {str(path)!r} must be a directory with condiff.json")
    where = str(path / "condiff.json")
    refuse_pickles(path, what)
    if is_exported(path):
        meta, where = exported_meta(path), str(path / "condiff_export.json")
    elif not (path / "condiff.json").is_file():
        raise InputFileError(f"model directory {str(path)!r} has no condiff.json file (not a condiff model)")
    else:
        meta = load_json(path / "condiff.json")
    if not isinstance(meta, dict):
        raise InputFileError(f"{where!r} must hold a JSON object, got {type(meta).__name__}")
    for key in ("family", "prediction", "schedule", "model"):
        if key not in meta:
            raise InputFileError(f"{where!r} lacks the key {key!r}")
    for key, kind in (("family", str), ("prediction", str), ("schedule", dict), ("model", dict)):
        if not isinstance(meta[key], kind):
            raise InputFileError(
                f"{where!r}: {key!r} must be a JSON {'string' if kind is str else 'object'}, "
                f"got {type(meta[key]).__name__}"
            )
    try:
        get_family(meta["family"]), as_prediction(meta["prediction"]), schedule_from_config(meta["schedule"])
        noise_from_config(meta.get("noise"))
    except ConfigError as e:
        raise InputFileError(f"{where!r}: {e}") from None
    return path, meta


PREDICTIONS_FROM_DIFFUSERS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def is_exported(path) -> bool:
    """A diffusers-format folder written by ``condiff export`` (unet/, scheduler/, condiff_export.json)."""
    path = Path(path)
    return path.is_dir() and not (path / "condiff.json").is_file() and (path / "condiff_export.json").is_file()


def exported_meta(path: Path) -> dict:
    """What condiff.json would say of a ``condiff export`` folder: the family and the call from condiff_export.json,
    the schedule and prediction from diffusers' scheduler config. One-line errors name the file."""
    where = str(path / "condiff_export.json")
    meta = load_json(path / "condiff_export.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("family"), str):
        raise InputFileError(f"{where!r} must be a JSON object naming the model's family")
    sch_file = path / "scheduler" / "scheduler_config.json"
    if not sch_file.is_file():
        raise InputFileError(f"export {str(path)!r} has no scheduler/scheduler_config.json")
    sch = load_json(sch_file)
    ok = isinstance(sch, dict) and sch.get("prediction_type") in PREDICTIONS_FROM_DIFFUSERS
    if not ok or not isinstance(sch.get("beta_schedule"), str):
        raise InputFileError(
            f"{str(sch_file)!r} must give a beta_schedule and a prediction_type (epsilon, v_prediction, sample)"
        )
    schedule = {
        "type": "vp_discrete",
        "beta_schedule": sch["beta_schedule"],
        "num_steps": int(sch.get("num_train_timesteps", 1000)),
    }
    if sch["beta_schedule"] != "squaredcos_cap_v2":
        schedule.update(beta_start=float(sch.get("beta_start", 1e-4)), beta_end=float(sch.get("beta_end", 2e-2)))
    model = {"pixel_unshuffle": int(meta.get("pixel_unshuffle", 1))}
    for part in ("unet", "text_encoder"):  # the networks' constructor arguments, so fine-tuning can rebuild them
        cfg = path / part / "config.json"
        if cfg.is_file():
            data = load_json(cfg)
            if not isinstance(data, dict):
                raise InputFileError(f"{str(cfg)!r} must hold a JSON object")
            model[part] = {k: v for k, v in data.items() if not k.startswith("_")}
    return {
        "family": meta["family"],
        "prediction": PREDICTIONS_FROM_DIFFUSERS[sch["prediction_type"]],
        "schedule": schedule,
        "model": model,
        "exported_from": str(path),
    }


def load_model(name_or_path: str | Path, what: str = "--model") -> LoadedModel:
    """Load a bundled model by name (shapes, digits), a model directory written by condiff, or a diffusers-format
    folder written by ``condiff export`` (``exported_meta``; safetensors and JSON only; ``what`` names the option in
    a refusal)."""
    path, meta = resolve_model(name_or_path, what)
    fam = get_family(meta["family"])
    try:
        module = fam.load_parts(path, meta["model"]).eval()
    except InputFileError:
        raise
    except Exception as e:  # diffusers raises many types for missing, truncated or mismatched weights
        raise InputFileError(
            f"cannot load the {fam.name} networks from {str(path)!r} ({type(e).__name__}: {_first_line(e)})"
        ) from None
    sch = schedule_from_config(meta["schedule"])
    return LoadedModel(
        fam,
        module,
        sch,
        as_prediction(meta["prediction"]),
        meta["model"],
        path,
        {
            "schedule_cfg": meta["schedule"],
            **{k: v for k, v in meta.items() if k not in ("family", "prediction", "schedule", "model", "noise")},
        },
        noise_from_config(meta.get("noise")),
    )


def _first_line(e: Exception, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def build_model(family_name: str, model_cfg: dict, schedule_cfg: dict, prediction: str, noise=None) -> LoadedModel:
    fam = get_family(family_name)
    if not isinstance(model_cfg, dict):
        raise ConfigError(f"[model] must be a table, got {model_cfg!r}")
    sch, pred = schedule_from_config(schedule_cfg), as_prediction(prediction)
    try:
        module = fam.build(model_cfg)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError, OverflowError) as e:
        raise ConfigError(
            f"[model] is not a valid {fam.name} model config ({type(e).__name__}: {_first_line(e)})"
        ) from None
    return LoadedModel(
        fam, module, sch, pred, model_cfg, None, {"schedule_cfg": schedule_cfg}, noise or GaussianNoise()
    )


def silence_diffusers():
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
