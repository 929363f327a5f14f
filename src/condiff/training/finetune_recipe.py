"""Fine-tuning recipes: a TOML file naming the base model, the adaptation method, the objective and the data,
read into typed dataclasses with one-line ConfigErrors that name the bad key and what it accepts.

    name = "shapes-striped-lora"
    base = "shapes"            # a bundled model name or a model folder (train.init_from)
    method = "lora"            # full | lora | sara
    objective = "denoise"      # denoise | dpo | domainstudio
    data = "striped"           # resolved where the program starts (condiff finetune): the target images or pairs

    [lora]  rank, alpha        [sara]  theta, lambda_rank, reselect_at
    [dpo]   beta               [domainstudio]  lambda_img, lambda_hf, lambda_hfmse
    [loss]  the denoising objective (prediction from the base model; dropout rates)
    [train] the Trainer's settings (steps, batch_size, lr, ...)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from condiff.errors import ConfigError, check_real
from condiff.training.recipe import (
    NAME_RE,
    ObjectiveConfig,
    TrainConfig,
    check_objective_train,
    check_seed,
    read_toml,
    typed_table,
)

METHODS = ("full", "lora", "sara")
OBJECTIVES = ("denoise", "dpo", "domainstudio")


@dataclass
class LoraConfig:
    rank: int = 3
    alpha: float = 3.0


@dataclass
class SaraConfig:
    theta: float = 2e-3
    lambda_rank: float = 5e-4
    reselect_at: int = 0  # K_p: the step at which the mask is recomputed; 0 = never
    min_dim: int = 32  # the penalty's matrices have a smaller side above this (the paper: 64, for SD's widths)


@dataclass
class DPOConfig:
    beta: float = 5000.0
    prompts: int = 2048  # partial prompts sampled twice by the base model for the preference pairs
    margin: float = 20.0  # the reward difference below which a pair is a tie (dropped)
    pair_seed: int = 7  # the pairs' prompts and noise (held-out evaluations use other seeds)
    pairs_file: str = ""  # where the pairs are kept (shared by recipes with the same pairs); "" = OUT/pairs.safetensors


@dataclass
class DomainStudioConfig:
    lambda_img: float = 1.0
    lambda_hf: float = 1.0
    lambda_hfmse: float = 1.0


@dataclass
class FinetuneRecipe:
    name: str
    base: str
    method: str = "lora"
    objective: str = "denoise"
    data: str = "striped"
    lora: LoraConfig = field(default_factory=LoraConfig)
    sara: SaraConfig = field(default_factory=SaraConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    domainstudio: DomainStudioConfig = field(default_factory=DomainStudioConfig)
    loss: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TABLES = {
    "lora": LoraConfig,
    "sara": SaraConfig,
    "dpo": DPOConfig,
    "domainstudio": DomainStudioConfig,
    "loss": ObjectiveConfig,
    "train": TrainConfig,
}
STRINGS = ("name", "base", "method", "objective", "data")


def finetune_recipe_from_dict(data: dict) -> FinetuneRecipe:
    if not isinstance(data, dict):
        raise ConfigError(f"a fine-tuning recipe must be a table, got {type(data).__name__}")
    for key in data:
        if key not in TABLES and key not in STRINGS:
            raise ConfigError(f"unknown fine-tuning recipe key {key!r}; accepted: {', '.join((*STRINGS, *TABLES))}")
    for key in STRINGS:
        if key in data and not isinstance(data[key], str) or key in ("name", "base") and key not in data:
            raise ConfigError(f"fine-tuning recipe needs a string {key!r}, got {data.get(key)!r}")
    tables = {key: typed_table(cls, data.get(key, {}), key) for key, cls in TABLES.items()}
    r = FinetuneRecipe(**{k: data[k] for k in STRINGS if k in data}, **tables)
    return check_finetune_recipe(r)


def check_finetune_recipe(r: FinetuneRecipe) -> FinetuneRecipe:
    """Value checks: names, the method and objective, the ranges of every number."""
    if not NAME_RE.match(r.name) or len(r.name) > 100:
        raise ConfigError(f"recipe name {r.name!r} must be 1-100 letters, digits, '.', '_' or '-'")
    if r.method not in METHODS:
        raise ConfigError(f"method {r.method!r} is not accepted; accepted: {', '.join(METHODS)}")
    if r.objective not in OBJECTIVES:
        raise ConfigError(f"objective {r.objective!r} is not accepted; accepted: {', '.join(OBJECTIVES)}")
    if not r.base.strip():
        raise ConfigError("base must name a bundled model or a model folder, got ''")
    if not r.data.strip():
        raise ConfigError("data must name the fine-tuning data, got ''")
    check_real("lora.rank", r.lora.rank, 1, 4096)
    check_real("lora.alpha", r.lora.alpha, 0, 1e6, lo_open=True)
    check_real("sara.theta", r.sara.theta, 0, 1e3, lo_open=True)
    check_real("sara.lambda_rank", r.sara.lambda_rank, 0, 1e6)
    check_real("sara.reselect_at", r.sara.reselect_at, 0, 2**62)
    check_real("sara.min_dim", r.sara.min_dim, 0, 2**31)
    check_real("dpo.beta", r.dpo.beta, 0, 1e9, lo_open=True)
    check_real("dpo.prompts", r.dpo.prompts, 1, 10**7)
    check_real("dpo.margin", r.dpo.margin, 0, 1e9)
    check_seed(r.dpo.pair_seed, "dpo.pair_seed")
    if r.dpo.pairs_file and not r.dpo.pairs_file.endswith(".safetensors"):
        raise ConfigError(f"dpo.pairs_file must be a .safetensors path (or empty), got {r.dpo.pairs_file!r}")
    for key in ("lambda_img", "lambda_hf", "lambda_hfmse"):
        check_real(f"domainstudio.{key}", getattr(r.domainstudio, key), 0, 1e6)
    check_objective_train(r.loss, r.train, "loss")
    return r


def load_finetune_recipe(path) -> FinetuneRecipe:
    return finetune_recipe_from_dict(read_toml(path))
