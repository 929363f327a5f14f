"""Training recipes: TOML files (read with stdlib tomllib) into typed dataclasses.

Unknown keys and wrongly typed values are refused with one-line ConfigErrors that name the key."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, InputFileError


@dataclass
class ObjectiveConfig:
    prediction: str = "eps"
    time_sampler: str = "uniform"
    weighting: str = "constant"
    cond_dropout: float = 0.1
    attr_dropout: float = 0.0
    cep_gamma: float = 0.0
    cep_kind: str = "uniform"


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


def _typed(cls, data: dict, where: str):
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


def recipe_from_dict(data: dict) -> Recipe:
    allowed = {"name", "family", "model", "schedule", "objective", "train"}
    for key in data:
        if key not in allowed:
            raise ConfigError(f"unknown recipe key {key!r}; accepted: {', '.join(sorted(allowed))}")
    for key in ("name", "family"):
        if not isinstance(data.get(key), str):
            raise ConfigError(f"recipe needs a string {key!r}, got {data.get(key)!r}")
    for key in ("model", "schedule"):
        if not isinstance(data.get(key, {}), dict):
            raise ConfigError(f"[{key}] must be a table, got {data.get(key)!r}")
    r = Recipe(data["name"], data["family"], data.get("model", {}), data.get("schedule", {}),
               _typed(ObjectiveConfig, data.get("objective", {}), "objective"),
               _typed(TrainConfig, data.get("train", {}), "train"))
    t = r.train
    for key in ("steps", "batch_size", "ckpt_every", "threads", "keep_checkpoints"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if not 0 <= r.objective.cond_dropout < 1:
        raise ConfigError(f"objective.cond_dropout must be in [0, 1), got {r.objective.cond_dropout}")
    if not t.lr > 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    return r


def load_recipe(path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"recipe not found: {str(path)!r} (expected a .toml file)")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(path)!r} is not valid TOML ({e})") from None
    return recipe_from_dict(data)
