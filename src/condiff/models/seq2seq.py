"""Sequence-to-sequence text diffusion on the shapes caption language: translate a caption written in one template
into the same attributes in another (``condiff.data.captions``), with DiffuSIA (Tan et al. 2023, spiral
interaction) or its plain encoder-decoder baseline (``spiral = false``), trained by continuous diffusion over word
embeddings (DiffuSeq, Gong et al. ICLR 2023; ``condiff.discrete.embedding_diffusion``).

The task: attributes from ``shapes.random_attrs``; the source is their caption in ``data.src_template`` (each
attribute left out with ``data.p_drop``, synonyms drawn at random unless ``src_synonyms = false``); the target names
the same attributes in ``data.dst_template`` with canonical words (``synonyms=False``), so the target is a
function of the source and exact match is a fair score.

A recipe (``family = "seq2seq"``) has the tables [model] (dim, layers, heads, spiral, embed_dim), [diffusion]
(schedule, num_steps, loss weights, clamping), [data] and [train] (condiff's ``TrainConfig``); unknown keys and bad
values are one-line ConfigErrors. A saved model is the network as safetensors (``net/``) plus ``condiff.json``
with a "seq2seq" table; ``make_seq2seq_trainer`` trains one with condiff's Trainer (EMA, checkpoints, exact resume).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from condiff.core.files import atomic_dir, atomic_write_json, load_json
from condiff.data import captions, shapes
from condiff.discrete.embedding_diffusion import (
    SCHEDULES,
    LossWeights,
    embedding_diffusion_loss,
    make_schedule,
    sample_embeddings,
)
from condiff.errors import ConfigError, InputFileError, check_real, one_of
from condiff.models.family import TaskModel, load_pretrained
from condiff.nets.diffusia import DiffuSIANet
from condiff.training.recipe import (
    ObjectiveConfig,
    TaskRecipeDict,
    TrainConfig,
    check_keys,
    check_name,
    check_objective_train,
    typed_table,
)
from condiff.training.trainer import Trainer

FAMILY = "seq2seq"
EVAL_SEED_OFFSET = 2**40  # evaluation attributes come from generators the Trainer's (seed, step) ones never reach


# recipes --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Seq2SeqNetConfig:
    dim: int = 128
    layers: int = 3
    heads: int = 4
    spiral: bool = True
    embed_dim: int = 32


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: str = "sqrt"  # DiffuSeq's sqrt schedule (T = num_steps) or condiff's VP cosine
    num_steps: int = 2000
    round_x0: float = 1.0  # weight of -log p(y | x0_hat)
    round_z0: float = 1.0  # weight of -log p(y | z_0), DiffuSeq's L_round
    prior: bool = True  # the t = T term ||alpha_T z_0||^2
    z0_std: float = 0.0  # noise of q(z_0 | y) around E(y)
    clamp: bool = True  # sampling: x0_hat clamped to the nearest embedding at every step


@dataclass(frozen=True)
class Seq2SeqDataConfig:
    src_template: int = 3
    dst_template: int = 0
    p_drop: float = 0.0  # each attribute left out of source and target
    src_synonyms: bool = True  # the source's synonyms are random; the target's are always canonical


@dataclass(frozen=True)
class Seq2SeqRecipe(TaskRecipeDict):
    name: str
    family: str = FAMILY
    model: Seq2SeqNetConfig = field(default_factory=Seq2SeqNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: Seq2SeqDataConfig = field(default_factory=Seq2SeqDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # unused: the Trainer's field


def _check_template(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in range(captions.TEMPLATES):
        raise ConfigError(f"{key} must be an integer in [0, {captions.TEMPLATES - 1}], got {value!r}")


def seq2seq_recipe_from_dict(data: dict) -> Seq2SeqRecipe:
    """A recipe from its TOML table; unknown keys and bad values are one-line ConfigErrors naming them."""
    check_keys(data, {"name", "family", "model", "diffusion", "data", "train"}, what="seq2seq recipe")
    if data["family"] != FAMILY:
        raise one_of("seq2seq recipe family", data["family"], [FAMILY])
    r = Seq2SeqRecipe(
        data["name"],
        data["family"],
        typed_table(Seq2SeqNetConfig, data.get("model", {}), "model"),
        typed_table(DiffusionConfig, data.get("diffusion", {}), "diffusion"),
        typed_table(Seq2SeqDataConfig, data.get("data", {}), "data"),
        typed_table(TrainConfig, data.get("train", {}), "train"),
    )
    check_name(r.name)
    for key in ("dim", "layers", "heads", "embed_dim"):
        check_real(f"model.{key}", getattr(r.model, key), 1, 4096)
    if r.model.dim % r.model.heads:
        raise ConfigError(f"model.dim {r.model.dim} must be a multiple of model.heads {r.model.heads}")
    if r.diffusion.schedule not in SCHEDULES:
        raise one_of("diffusion.schedule", r.diffusion.schedule, SCHEDULES)
    check_real("diffusion.num_steps", r.diffusion.num_steps, 2, 100_000)
    for key in ("round_x0", "round_z0"):
        check_real(f"diffusion.{key}", getattr(r.diffusion, key), 0, 1e3)
    check_real("diffusion.z0_std", r.diffusion.z0_std, 0, 10)
    _check_template("data.src_template", r.data.src_template)
    _check_template("data.dst_template", r.data.dst_template)
    check_real("data.p_drop", r.data.p_drop, 0, 1)
    check_objective_train(ObjectiveConfig(), r.train)
    return r


# data -----------------------------------------------------------------------------------------------------------
def translation_batch(n: int, generator, data: Seq2SeqDataConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(src, dst, attrs): n attribute sets, the source caption in ``data.src_template`` (synonyms random unless
    ``src_synonyms`` is false) and the target naming the same attributes in ``data.dst_template`` with canonical
    words, each (n, SEQ_LEN); attrs (n, 4) with -1 where an attribute is left out of both."""
    attrs = shapes.random_attrs(n, generator)
    src, keep = captions.generate(attrs, generator, data.p_drop, data.src_template, synonyms=data.src_synonyms)
    dst, _ = captions.generate(attrs, generator, 0.0, data.dst_template, keep=keep, synonyms=False)
    return src, dst, torch.where(keep, attrs, torch.full_like(attrs, -1))


# the model ------------------------------------------------------------------------------------------------------
@dataclass
class Seq2SeqModel(TaskModel):
    """A saved or trained Seq2SeqModel: config {"length", "schedule", "num_steps", "clamp", "src_template",
    "dst_template", ...}."""

    @property
    def net(self) -> DiffuSIANet:
        return self.module["net"]

    @property
    def length(self) -> int:
        return self.config["length"]

    @property
    def schedule(self):
        return make_schedule(self.config["schedule"], self.config["num_steps"])

    @property
    def data(self) -> Seq2SeqDataConfig:
        return Seq2SeqDataConfig(**{f.name: self.config[f.name] for f in dataclasses.fields(Seq2SeqDataConfig)})

    def save(self, directory, extra: dict | None = None):
        with atomic_dir(Path(directory)) as tmp:
            self.net.save_pretrained(tmp / "net")
            atomic_write_json(tmp / "condiff.json", {FAMILY: self.config, **(extra or {})})

    @torch.no_grad()
    def translate(self, src: torch.Tensor, steps: int = 20, seed: int = 0, clamp: bool | None = None) -> torch.Tensor:
        """Target tokens (B, SEQ_LEN) for source tokens ``src`` (B, SEQ_LEN)."""
        g = torch.Generator().manual_seed(seed)
        clamp = self.config["clamp"] if clamp is None else clamp
        return sample_embeddings(self.net, self.schedule, src, self.length, steps, g, clamp).tokens


def build_seq2seq_model(r: Seq2SeqRecipe) -> Seq2SeqModel:
    net = DiffuSIANet(
        vocab_size=captions.VOCAB.V,
        length=captions.SEQ_LEN,
        dim=r.model.dim,
        layers=r.model.layers,
        heads=r.model.heads,
        spiral=r.model.spiral,
        embed_dim=r.model.embed_dim,
    )
    cfg = {
        "length": captions.SEQ_LEN,
        "schedule": r.diffusion.schedule,
        "num_steps": r.diffusion.num_steps,
        "clamp": r.diffusion.clamp,
        **dataclasses.asdict(r.data),
    }
    return Seq2SeqModel(nn.ModuleDict({"net": net}), cfg)


def is_seq2seq_model(directory) -> bool:
    """Whether ``directory`` holds a seq2seq model (its condiff.json has a "seq2seq" table)."""
    f = Path(directory) / "condiff.json"
    try:
        info = load_json(f) if f.is_file() else None
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and FAMILY in info


_CONFIG_TYPES = {
    "length": int,
    "schedule": str,
    "num_steps": int,
    "clamp": bool,
    "src_template": int,
    "dst_template": int,
    "p_drop": (int, float),
    "src_synonyms": bool,
}


def load_seq2seq_model(directory, what: str = "--model") -> Seq2SeqModel:
    """A saved model; pickled weights are refused (``load_pretrained``), and so is a condiff.json whose "seq2seq"
    table lacks a key or has one of the wrong type."""
    directory = Path(directory)
    if not is_seq2seq_model(directory):
        raise InputFileError(
            f"{what} {str(directory)!r} is not a seq2seq model folder (no condiff.json with 'seq2seq')"
        )
    info = load_json(directory / "condiff.json")
    cfg = info[FAMILY]
    bad = [
        k
        for k, kind in _CONFIG_TYPES.items()
        if not isinstance(cfg, dict) or not isinstance(cfg.get(k), kind) or (kind is int and isinstance(cfg[k], bool))
    ]
    if bad or cfg["schedule"] not in SCHEDULES:
        raise InputFileError(
            f"{what} {str(directory)!r}: condiff.json's 'seq2seq' table needs {', '.join(_CONFIG_TYPES)} "
            f"(schedule one of {', '.join(SCHEDULES)}); {bad[0] if bad else 'schedule'!r} is missing or wrong"
        )
    net = load_pretrained(DiffuSIANet, directory / "net", what)
    return Seq2SeqModel(nn.ModuleDict({"net": net.eval()}), cfg, directory, info)


# training and evaluation ----------------------------------------------------------------------------------------
def seq2seq_loss_fn(model: Seq2SeqModel, r: Seq2SeqRecipe):
    """The Trainer's loss: a fresh batch of pairs per step from the step's generator, the DiffuSeq loss with the
    recipe's weights, its terms as metrics."""
    schedule = make_schedule(r.diffusion.schedule, r.diffusion.num_steps)
    d = r.diffusion
    weights = LossWeights(d.round_x0, d.round_z0, d.prior, d.z0_std)

    def fn(step, g):
        src, dst, _ = translation_batch(r.train.batch_size, g, r.data)
        return embedding_diffusion_loss(model.net, schedule, src, dst, g, weights)

    return fn


@torch.no_grad()
def exact_match(model: Seq2SeqModel, n: int, seed: int, steps: int, clamp: bool | None = None, batch=256) -> dict:
    """Translate n fresh sources (attributes from a generator seeded ``EVAL_SEED_OFFSET + seed``, apart from
    training's) and compare with the reference targets: ``exact_match`` all SEQ_LEN tokens equal,
    ``attributes_correct`` the sample names exactly the reference's attributes (``captions.parse``, omitted ones
    included), ``parses`` the sample is a sentence of the target template."""
    g = torch.Generator().manual_seed(EVAL_SEED_OFFSET + seed)
    src, dst, _ = translation_batch(n, g, model.data)
    schedule, clamp = model.schedule, model.config["clamp"] if clamp is None else clamp
    out = [
        sample_embeddings(model.net, schedule, src[i : i + batch], model.length, steps, g, clamp).tokens
        for i in range(0, n, batch)
    ]
    tokens = torch.cat(out)
    exact = (tokens == dst).all(1)
    attrs = (captions.parse(tokens) == captions.parse(dst)).all(1)
    ok = captions.parses(tokens, model.config["dst_template"])
    return {
        "exact_match": float(exact.float().mean()),
        "attributes_correct": float(attrs.float().mean()),
        "parses": float(ok.float().mean()),
    }


def _eval_fn(r: Seq2SeqRecipe):
    def run(model: Seq2SeqModel, ema_module):
        m = dataclasses.replace(model, module=ema_module)
        return exact_match(m, r.train.eval_n, seed=0, steps=r.train.eval_steps)

    return run


def make_seq2seq_trainer(r: Seq2SeqRecipe, out_dir, progress: bool = True) -> Trainer:
    """The Trainer for ``r`` (weights seeded by train.seed; train.threads threads), with exact match on
    train.eval_n held-out pairs (train.eval_steps sampling steps) every train.eval_every steps."""
    torch.set_num_threads(r.train.threads)
    torch.manual_seed(r.train.seed)  # deterministic initial weights
    model = build_seq2seq_model(r)
    return Trainer(model, r, Path(out_dir), progress=progress, evaluate=_eval_fn(r), loss_fn=seq2seq_loss_fn(model, r))
