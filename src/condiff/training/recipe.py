"""Training recipes: TOML files (read with stdlib tomllib) into typed dataclasses.

Unknown keys and wrongly typed values are refused with one-line ConfigErrors that name the key."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from condiff.errors import ConfigError, InputFileError, check_real
from condiff.guidance.schedules import MAX_SCALE


@dataclass
class ObjectiveConfig:
    prediction: str = "eps"
    time_sampler: str = "uniform"
    weighting: str = "constant"
    cond_dropout: float = 0.1
    attr_dropout: float = 0.0
    cep_gamma: float = 0.0
    cep_kind: str = "uniform"
    pfgmpp_D: float = 0.0  # PFGM++ noise with D augmented dimensions (Xu et al. 2023); 0 = Gaussian (D = inf)
    context_weight: float = 0.0  # ConPreDiff's context-prediction loss weight (Yang et al. 2023); 0 = off


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    lr_decay: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_n: int = 256
    eval_steps: int = 20
    eval_cfg: float = 3.0
    seed: int = 0
    threads: int = 1
    init_from: str = ""  # a bundled model name or model directory whose weights start the run
    fast: bool = False  # bfloat16 autocast forward, fused AdamW, multi-tensor EMA (docs/benchmarks.md)


@dataclass
class Recipe:
    name: str
    family: str
    model: dict = field(default_factory=dict)
    schedule: dict = field(default_factory=dict)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class TaskRecipeDict:
    """``to_dict`` for a recipe dataclass whose ``objective`` field only satisfies the Trainer (a family with its own
    loss): the recipe's tables without it, as the model's condiff.json records them."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("objective")
        return d


FAMILIES = ("shapes", "digits", "shapes_classifier", "shapes_imbalanced")
SEED_MIN, SEED_MAX = 0, 2**63 - 1
MAX_THREADS = 1024
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def typed_table(cls, data: dict, where: str):
    """``cls(**data)`` once every key is a field of ``cls`` and every value has its default's type; else ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown key {where}.{key}; accepted: {', '.join(fields)}")
        want = type(fields[key].default)
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(f"{where}.{key} must be {want.__name__}, got {value!r}")
    return cls(**data)


def check_seed(seed, where: str = "train.seed") -> int:
    """Refuse a seed torch cannot take (and that would overflow the per-step seeds)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not SEED_MIN <= seed <= SEED_MAX:
        raise ConfigError(f"{where} must be an integer in [{SEED_MIN}, 2**63 - 1], got {seed!r}")
    return seed


def _one_of(where: str, value, accepted):
    if value not in accepted:
        raise ConfigError(f"{where} {value!r} is not accepted; accepted: {', '.join(accepted)}")


def check_recipe(r: Recipe) -> Recipe:
    """Value checks beyond types: names, families, ranges, finiteness, and the schedule table."""
    from condiff.core.schedules import schedule_from_config

    check_name(r.name)
    _one_of("family", r.family, FAMILIES)
    check_objective_train(r.objective, r.train)
    schedule_from_config(r.schedule)
    return r


def check_objective_train(o: ObjectiveConfig, t: TrainConfig, where: str = "objective") -> None:
    """The value checks of an [objective] table (named ``where``: a fine-tuning recipe's [loss]) and a [train] one."""
    from condiff.core.denoiser import PREDICTIONS
    from condiff.solvers.pfgmpp import noise_for_D
    from condiff.training.objectives import TIME_SAMPLERS, WEIGHTINGS

    _one_of(f"{where}.prediction", o.prediction, PREDICTIONS)
    _one_of(f"{where}.time_sampler", o.time_sampler, TIME_SAMPLERS)
    _one_of(f"{where}.weighting", o.weighting, WEIGHTINGS)
    _one_of(f"{where}.cep_kind", o.cep_kind, ("uniform", "gaussian"))
    _one_of("train.lr_decay", t.lr_decay, ("cosine", "constant"))
    check_real(f"{where}.cond_dropout", o.cond_dropout, 0, 1, hi_open=True)
    check_real(f"{where}.attr_dropout", o.attr_dropout, 0, 1, hi_open=True)
    check_real(f"{where}.cep_gamma", o.cep_gamma, 0, 1e3)
    check_real(f"{where}.context_weight", o.context_weight, 0, 1e6)
    noise_for_D(o.pfgmpp_D)
    for key in ("steps", "batch_size", "ckpt_every", "keep_checkpoints", "eval_n", "eval_steps"):
        check_real(f"train.{key}", getattr(t, key), 1, 2**62)
    for key in ("warmup", "eval_every"):
        check_real(f"train.{key}", getattr(t, key), 0, 2**62)
    check_real("train.threads", t.threads, 1, MAX_THREADS)
    check_real("train.lr", t.lr, 0, 10, lo_open=True)
    check_real("train.min_lr_ratio", t.min_lr_ratio, 0, 1)
    check_real("train.weight_decay", t.weight_decay, 0, 1e3)
    check_real("train.ema_decay", t.ema_decay, 0, 1)
    check_real("train.grad_clip", t.grad_clip, 0, 1e9)
    check_real("train.eval_cfg", t.eval_cfg, -MAX_SCALE, MAX_SCALE)
    check_seed(t.seed)


def check_keys(data, allowed, strings=("name", "family"), what: str = "recipe") -> dict:
    """A recipe's top-level table: a dict whose keys are all ``allowed`` and whose ``strings`` keys are strings;
    one-line ConfigErrors otherwise."""
    if not isinstance(data, dict):
        raise ConfigError(f"a {what} must be a table, got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            raise ConfigError(f"unknown {what} key {key!r}; accepted: {', '.join(sorted(allowed))}")
    for key in strings:
        if not isinstance(data.get(key), str):
            raise ConfigError(f"recipe needs a string {key!r}, got {data.get(key)!r}")
    return data


def check_name(name: str) -> str:
    """A recipe name: 1-100 letters, digits, '.', '_' or '-' (it names the default output directory runs/<name>)."""
    if not NAME_RE.match(name) or len(name) > 100:
        raise ConfigError(
            f"recipe name {name!r} must be 1-100 letters, digits, '.', '_' or '-' "
            f"(it names the default output directory runs/<name>)"
        )
    return name


def recipe_from_dict(data: dict) -> Recipe:
    check_keys(data, {"name", "family", "model", "schedule", "objective", "train"})
    for key in ("model", "schedule"):
        if not isinstance(data.get(key, {}), dict):
            raise ConfigError(f"[{key}] must be a table, got {data.get(key)!r}")
    r = Recipe(
        data["name"],
        data["family"],
        data.get("model", {}),
        data.get("schedule", {}),
        typed_table(ObjectiveConfig, data.get("objective", {}), "objective"),
        typed_table(TrainConfig, data.get("train", {}), "train"),
    )
    return check_recipe(r)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_changes(old, new: dict) -> dict[str, tuple]:
    """``{dotted key: (old value, new value)}`` for every value that differs between a recorded recipe (a
    checkpoint's ``Recipe.to_dict()``, read back from JSON) and ``new``, in ``new``'s key order; a key one side lacks
    reads as None. The recorded recipe is first filled in with the defaults of keys added since it was written."""
    old = old if isinstance(old, dict) else {}
    try:
        old = recipe_from_dict(old).to_dict()
    except (ValueError, TypeError):  # keys or values this version no longer takes: compare as recorded
        pass
    a, b = _flat(json.loads(json.dumps(old))), _flat(json.loads(json.dumps(new)))
    keys = list(b) + [k for k in a if k not in b]
    return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}


def read_toml(path) -> dict:
    """A recipe file's table; one-line errors for a folder, a missing file, unreadable bytes or bad TOML."""
    path = Path(path)
    if path.is_dir():
        raise InputFileError(f"recipe {str(path)!r} is a directory; expected a .toml file")
    if not path.is_file():
        raise InputFileError(f"recipe not found: {str(path)!r} (expected a .toml file)")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(path)!r} is not valid TOML ({e})") from None
    except OSError as e:
        raise InputFileError(f"cannot read recipe {str(path)!r}: {e.strerror or e}") from None
    return data


def load_recipe(path) -> Recipe:
    return recipe_from_dict(read_toml(path))
