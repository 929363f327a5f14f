"""One-step smoothing base classifiers for the digits (``condiff.tasks.rrcm``): rRCM (Lei et al. 2025: contrastive
denoising pre-training, then labels on smoothing draws) and Cohen et al.'s (2019) Gaussian-augmentation classifier
(the same network and fine-tuning, no pre-training), certified by ``condiff certify --method rrcm|noise``.

A recipe (``family = "robust_digits"``) has [model] (``kind``: rrcm | noise; ``sigma``: the smoothing noise in
[0, 1] pixel units it is trained for; the encoder's ``hidden`` width and representation ``dim``), [pretrain]
(rRCM only: ``steps`` of the run's train.steps spent pre-training, the time ``grid``, InfoNCE ``temperature``, the
``consistency`` weight and the target's EMA ``target_decay``) and [train] (condiff's ``TrainConfig``). Unknown keys
and bad values are one-line ConfigErrors. The schedule is VP-cosine: t only labels the noise level, no diffusion
model is involved. Images are the digits split of ``condiff.data.digits`` in [0, 1] pixel units (the smoothing
units of ``condiff certify``); the network reads the forward-process point alpha(t*) (2 (x + delta) - 1).

A saved model is ``net.safetensors`` plus ``condiff.json`` with a "robust_digits" table (the recipe's [model]);
``make_robust_trainer`` trains one with condiff's Trainer (EMA, atomic checkpoints, exact resume; the rRCM target
network is part of the trained module's state, so a resumed run continues it exactly).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from condiff.core.files import atomic_dir, atomic_write_json, load_json, refuse_pickles, save_tensors
from condiff.core.schedules import VPCosine, unit_time
from condiff.errors import ConfigError, InputFileError, check_int, check_real, one_of
from condiff.models.family import TaskModel, family_dir, load_fitting_weights
from condiff.tasks.rrcm import adjacent_times, contrastive_denoising_loss, ema_update, noisy_label_loss
from condiff.training.recipe import (
    ObjectiveConfig,
    TaskRecipeDict,
    TrainConfig,
    check_keys,
    check_name,
    check_objective_train,
)
from condiff.training.recipe import typed_table as _typed
from condiff.training.trainer import Trainer

FAMILY = "robust_digits"
KINDS = ("rrcm", "noise")
WEIGHTS = "net.safetensors"
SCALE, SHIFT = 2.0, -1.0  # [0, 1] pixel units -> the network's [-1, 1]
NUM_CLASSES = 10
TIME_FEATURES = 8
EVAL_SEED = 2**40


@dataclass
class RobustNetConfig:
    kind: str = "rrcm"
    sigma: float = 0.25
    hidden: int = 256
    dim: int = 128


@dataclass
class PretrainConfig:
    steps: int = 0
    grid: int = 40
    temperature: float = 0.2
    consistency: float = 1.0
    target_decay: float = 0.99


@dataclass
class RobustRecipe(TaskRecipeDict):
    name: str
    family: str = FAMILY
    model: RobustNetConfig = field(default_factory=RobustNetConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # unused: the Trainer's field


class SmoothingNet(nn.Module):
    """A time-conditioned MLP encoder over 16x16 images, h(x_t, t) (the representation), with a projection head for
    the contrastive pre-training (``represent``) and a linear classification head (``forward``: logits)."""

    def __init__(self, hidden: int = 256, dim: int = 128, pixels: int = 256, classes: int = NUM_CLASSES):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(pixels + 2 * TIME_FEATURES, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, dim),
        )
        self.projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim))
        self.head = nn.Linear(dim, classes)

    def features(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u = unit_time(t, SCHEDULE.t_min, SCHEDULE.t_max).reshape(-1, 1)
        freq = torch.arange(1, TIME_FEATURES + 1, dtype=torch.float32) * math.pi
        emb = torch.cat([torch.sin(u * freq), torch.cos(u * freq)], dim=1)
        return self.encoder(torch.cat([x_t.flatten(1).float(), emb], dim=1))

    def represent(self, x_t, t):
        return self.projection(self.features(x_t, t))

    def forward(self, x_t, t):
        return self.head(self.features(x_t, t))


SCHEDULE = VPCosine()


def check_tables(model: RobustNetConfig, pretrain: PretrainConfig, steps: int) -> None:
    if model.kind not in KINDS:
        raise one_of("model.kind", model.kind, KINDS)
    check_real("model.sigma", model.sigma, 0.0, 2.0, accepted="a number in (0, 2] ([0, 1] pixel units)", lo_open=True)
    check_int("model.hidden", model.hidden, 8, 8192)
    check_int("model.dim", model.dim, 2, 4096)
    if model.kind == "noise" and pretrain != PretrainConfig():
        raise ConfigError("[pretrain] applies to model.kind 'rrcm' only (the noise baseline has no pre-training)")
    check_int("pretrain.steps", pretrain.steps, 0, steps)
    check_int("pretrain.grid", pretrain.grid, 1, 100_000)
    check_real("pretrain.temperature", pretrain.temperature, 1e-3, 10.0)
    check_real("pretrain.consistency", pretrain.consistency, 0.0, 100.0)
    check_real("pretrain.target_decay", pretrain.target_decay, 0.0, 1.0)


def robust_recipe_from_dict(data: dict) -> RobustRecipe:
    """A recipe from its TOML table; unknown keys and bad values are one-line ConfigErrors naming them."""
    check_keys(data, {"name", "family", "model", "pretrain", "train"}, what="robust_digits recipe")
    if data["family"] != FAMILY:
        raise one_of("robust_digits recipe family", data["family"], [FAMILY])
    model = _typed(RobustNetConfig, data.get("model", {}), "model")
    pretrain = _typed(PretrainConfig, data.get("pretrain", {}), "pretrain")
    train = _typed(TrainConfig, data.get("train", {}), "train")
    check_tables(model, pretrain, train.steps)
    r = RobustRecipe(data["name"], data["family"], model, pretrain, train)
    check_name(r.name)
    check_objective_train(ObjectiveConfig(), r.train)
    return r


@dataclass
class RobustModel(TaskModel):
    """A saved or trained RobustModel: module {"net": SmoothingNet, "target": its EMA copy (rRCM pre-training)}; config
    the recipe's [model]."""

    @property
    def net(self) -> SmoothingNet:
        return self.module["net"]

    @property
    def sigma(self) -> float:
        return float(self.config["sigma"])

    @property
    def schedule(self):
        return SCHEDULE

    def base_classifier(self, sigma: float | None = None):
        """The one-step smoothing base classifier on [0, 1] images at ``sigma`` (default: the trained one)."""
        from condiff.tasks.rrcm import OneStepClassifier

        s = self.sigma if sigma is None else sigma
        return OneStepClassifier(self.net.eval(), SCHEDULE, s, SCALE, SHIFT)

    def save(self, directory, extra: dict | None = None):
        weights = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        with atomic_dir(Path(directory)) as tmp:
            save_tensors(tmp / WEIGHTS, weights)
            atomic_write_json(tmp / "condiff.json", {FAMILY: self.config, **(extra or {})})


def build_robust_model(r: RobustRecipe) -> RobustModel:
    m = r.model
    net = SmoothingNet(m.hidden, m.dim)
    nets = {"net": net}
    if m.kind == "rrcm" and r.pretrain.steps > 0:
        nets["target"] = copy.deepcopy(net).requires_grad_(False)
    return RobustModel(nn.ModuleDict(nets), dataclasses.asdict(m))


def load_robust_model(path, what: str = "--classifier") -> RobustModel:
    """A saved model (its folder, or a training run's folder holding ``model/``); pickles refused, a bad
    condiff.json or weights that do not fit it are one InputFileError."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{what} {str(path)!r} does not exist; accepted: a robust_digits model or run folder")
    refuse_pickles(path, what)
    directory = family_dir(path, FAMILY)
    if directory is None:
        raise InputFileError(f"{what} {str(path)!r} is not a robust_digits model (no condiff.json with {FAMILY!r})")
    info = load_json(directory / "condiff.json", what)
    try:
        cfg = _typed(RobustNetConfig, info[FAMILY], FAMILY)
        check_tables(cfg, PretrainConfig(), 0)
    except (ConfigError, TypeError) as e:
        raise InputFileError(f"{what} {str(directory)!r}: condiff.json: {e}") from None
    net = SmoothingNet(cfg.hidden, cfg.dim)
    load_fitting_weights(net, directory, WEIGHTS, what)
    net.eval().requires_grad_(False)
    return RobustModel(nn.ModuleDict({"net": net}), dataclasses.asdict(cfg), directory, info)


def training_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits training split in [0, 1] pixel units and its labels (the held-out split is never read)."""
    from condiff.data.digits import load_split

    s = load_split()
    return (s["x_train"] - SHIFT) / SCALE, s["y_train"]


def robust_loss_fn(model: RobustModel, r: RobustRecipe):
    """The Trainer's loss: a batch of training digits per step (indices from the step's generator); steps below
    pretrain.steps: rRCM's contrastive denoising loss (the target follows the online net by EMA before each such
    step); after: the cross-entropy on smoothing draws at model.sigma."""
    x_all, y_all = training_split()
    p = r.pretrain

    def fn(step, g):
        idx = torch.randint(0, x_all.shape[0], (r.train.batch_size,), generator=g)
        x, y = x_all[idx], y_all[idx]
        if step < p.steps:
            ema_update(model.module["target"], model.net, p.target_decay)
            t_lo, t_hi = adjacent_times(SCHEDULE, x.shape[0], p.grid, g)
            eps = torch.randn(x.shape, generator=g)
            x0 = SCALE * x + SHIFT
            loss, metrics = contrastive_denoising_loss(
                model.net, model.module["target"], SCHEDULE, x0, t_lo, t_hi, eps, p.temperature, p.consistency
            )
            return loss.mean(), metrics
        loss = noisy_label_loss(model.net, SCHEDULE, x, y, r.model.sigma, g, SCALE, SHIFT)
        return loss.mean(), {"cross_entropy": loss.mean().item()}

    return fn


@torch.no_grad()
def noisy_accuracy(model: RobustModel, n: int | None = None, seed: int = 0) -> float:
    """Accuracy of the base classifier on one smoothing draw of each held-out digit (the first n) at its sigma."""
    from condiff.data.digits import load_split

    s = load_split()
    x = (s["x_test"][:n] - SHIFT) / SCALE
    g = torch.Generator().manual_seed(EVAL_SEED + seed)
    delta = torch.randn(x.shape, generator=g) * model.sigma
    return float((model.base_classifier()(x + delta) == s["y_test"][:n]).float().mean())


def _eval_fn(r: RobustRecipe):
    def run(model: RobustModel, ema_module):
        m = dataclasses.replace(model, module=ema_module)
        return {"noisy_accuracy": noisy_accuracy(m, r.train.eval_n)}

    return run


def make_robust_trainer(r: RobustRecipe, out_dir, progress: bool = True) -> Trainer:
    """The Trainer for ``r`` (weights seeded by train.seed; train.threads threads), with the held-out accuracy on
    one smoothing draw every train.eval_every steps."""
    torch.set_num_threads(r.train.threads)
    torch.manual_seed(r.train.seed)
    model = build_robust_model(r)
    return Trainer(model, r, Path(out_dir), progress=progress, evaluate=_eval_fn(r), loss_fn=robust_loss_fn(model, r))
