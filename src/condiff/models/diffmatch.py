"""The DiffMatch family: dense matching of procedural image pairs under known affine warps (``condiff.data.matching``)
by conditional diffusion over the flow field (``condiff.tasks.diffmatch``; Nam et al., ICLR 2024).

A recipe (``family = "diffmatch"``) has the tables [model] (the network's width, the data term's feature radius,
soft-argmax temperature and local-cost radius, the flow's unit, and whether a direct-regression baseline with the
same network trains beside it), [diffusion] (the schedule), [sampling] (solver, steps, hypotheses, start), [data]
(``condiff.data.matching.WarpConfig``: the warps and scenes drawn) and [train] (condiff's ``TrainConfig``);
unknown keys and bad values are one-line ConfigErrors. A saved model is ``net.safetensors`` (the networks' weights)
plus ``condiff.json`` with a "diffmatch" table (the recipe's [model], [diffusion], [sampling] and [data]);
``make_diffmatch_trainer`` trains one with condiff's Trainer (EMA, atomic checkpoints, exact resume).

Training pairs come from the Trainer's per-step generators; evaluation pairs from generators seeded
``EVAL_SEED_OFFSET + seed``, which training never reaches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from condiff.core.files import atomic_dir, atomic_write_json, load_json, refuse_pickles, save_tensors
from condiff.core.schedules import VPCosine, VPLinear
from condiff.data.matching import WarpConfig, check_warp_config, matching_batch
from condiff.errors import ConfigError, InputFileError, check_int, check_real, one_of
from condiff.models.family import TaskModel, family_dir, load_fitting_weights
from condiff.solvers import get_solver
from condiff.tasks.diffmatch import (
    FlowDenoiserNet,
    MatchingCondition,
    cond_channels,
    diffmatch_loss,
    end_point_error,
    flow_denoiser,
    matching_condition,
    regress_flow,
    regression_loss,
    sample_flow,
)
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

FAMILY = "diffmatch"
EVAL_SEED_OFFSET = 2**40  # evaluation pairs come from generators the Trainer's (seed, step) ones never reach
SCHEDULES = {"vp_cosine": VPCosine, "vp_linear": VPLinear}
WEIGHTS = "net.safetensors"
# solvers with one network evaluation a step that run from any grid (the stochastic EDM sampler and the fitted
# DPM-Solver-v3 / DC-Solver need their own preparation)
SAMPLING_SOLVERS = ("ddim", "ddpm", "euler", "heun", "dpmpp-2m", "dpmpp-3m", "dpmpp-2s", "unipc")


# recipes --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffMatchNetConfig:
    channels: int = 32
    time_dim: int = 64
    feature_radius: int = 2  # patch features: (2 r + 1)^2 RGB neighbourhoods
    temperature: float = 0.01  # soft-argmax temperature of the initial flow
    local_radius: int = 3  # local cost volume: (2 r + 1)^2 displacements around the initial flow
    flow_scale: float = 4.0  # pixels per unit of the diffused flow
    regression: bool = True  # also train the direct-regression baseline (the same network, no noisy input)


@dataclass(frozen=True)
class DiffMatchDiffusionConfig:
    schedule: str = "vp_cosine"


@dataclass(frozen=True)
class SamplingConfig:
    solver: str = "ddim"
    steps: int = 10
    hypotheses: int = 4  # samples per pair, averaged
    t_start: float = 0.0  # 0: from noise at the schedule's start; else from the initial flow diffused to t_start


@dataclass(frozen=True)
class DiffMatchRecipe(TaskRecipeDict):
    name: str
    family: str = FAMILY
    model: DiffMatchNetConfig = field(default_factory=DiffMatchNetConfig)
    diffusion: DiffMatchDiffusionConfig = field(default_factory=DiffMatchDiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: WarpConfig = field(default_factory=WarpConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # unused: the Trainer's field


TABLES = {
    "model": DiffMatchNetConfig,
    "diffusion": DiffMatchDiffusionConfig,
    "sampling": SamplingConfig,
    "data": WarpConfig,
}


def check_sampling(s: SamplingConfig, schedule_name: str, where: str = "sampling") -> SamplingConfig:
    if s.solver not in SAMPLING_SOLVERS:
        raise one_of(f"{where}.solver", s.solver, SAMPLING_SOLVERS)
    check_int(f"{where}.steps", s.steps, 1, 1000)
    check_int(f"{where}.hypotheses", s.hypotheses, 1, 256)
    sched = SCHEDULES[schedule_name]()
    if s.t_start != 0:
        check_real(
            f"{where}.t_start",
            s.t_start,
            sched.t_min,
            sched.t_max,
            accepted=f"0 (from noise) or a time in ({sched.t_min:g}, {sched.t_max:g}]",
            lo_open=True,
        )
    return s


def _check_tables(tables: dict) -> dict:
    m = tables["model"]
    check_int("model.channels", m.channels, 8, 512)
    if m.channels % 8:
        raise ConfigError(f"model.channels must be a multiple of 8 (GroupNorm groups), got {m.channels}")
    check_int("model.time_dim", m.time_dim, 2, 1024)
    if m.time_dim % 2:
        raise ConfigError(f"model.time_dim must be even, got {m.time_dim}")
    check_int("model.feature_radius", m.feature_radius, 0, 4)
    check_real("model.temperature", m.temperature, 1e-4, 10)
    check_int("model.local_radius", m.local_radius, 0, 8)
    check_real("model.flow_scale", m.flow_scale, 0.1, 100)
    if tables["diffusion"].schedule not in SCHEDULES:
        raise one_of("diffusion.schedule", tables["diffusion"].schedule, SCHEDULES)
    check_sampling(tables["sampling"], tables["diffusion"].schedule)
    check_warp_config(tables["data"])
    return tables


def diffmatch_recipe_from_dict(data: dict) -> DiffMatchRecipe:
    """A recipe from its TOML table; unknown keys and bad values are one-line ConfigErrors naming them."""
    check_keys(data, {"name", "family", *TABLES, "train"}, what="diffmatch recipe")
    if data["family"] != FAMILY:
        raise one_of("diffmatch recipe family", data["family"], [FAMILY])
    tables = _check_tables({k: _typed(cls, data.get(k, {}), k) for k, cls in TABLES.items()})
    r = DiffMatchRecipe(
        data["name"], data["family"], **tables, train=_typed(TrainConfig, data.get("train", {}), "train")
    )
    check_name(r.name)
    check_objective_train(ObjectiveConfig(), r.train)
    return r


# the model ------------------------------------------------------------------------------------------------------
@dataclass
class DiffMatchModel(TaskModel):
    """A saved or trained DiffMatchModel: module {"net": FlowDenoiserNet, "regressor": FlowDenoiserNet (when
    model.regression)}; config {"model": {...}, "diffusion": {...}, "sampling": {...}, "data": {...}}."""

    @property
    def net_config(self) -> DiffMatchNetConfig:
        return DiffMatchNetConfig(**self.config["model"])

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(**self.config["sampling"])

    @property
    def data(self) -> WarpConfig:
        return WarpConfig(**self.config["data"])

    @property
    def schedule(self):
        return SCHEDULES[self.config["diffusion"]["schedule"]]()

    @property
    def denoiser(self):
        return flow_denoiser(self.module["net"], self.schedule)

    @property
    def has_regressor(self) -> bool:
        return "regressor" in self.module

    def condition(self, source: torch.Tensor, target: torch.Tensor) -> MatchingCondition:
        m = self.net_config
        return matching_condition(source, target, m.feature_radius, m.temperature, m.local_radius)

    @torch.no_grad()
    def match(
        self,
        source: torch.Tensor,
        target: torch.Tensor,
        steps: int | None = None,
        seed: int = 0,
        hypotheses: int | None = None,
        cond: MatchingCondition | None = None,
    ) -> tuple[torch.Tensor, MatchingCondition]:
        """(DiffMatch's flow (B, 2, H, W) in pixels, the condition with the initial flow) for image pairs; steps and
        hypotheses default to the recipe's [sampling]."""
        s = self.sampling
        cond = self.condition(source, target) if cond is None else cond
        flow = sample_flow(
            self.denoiser,
            get_solver(s.solver),
            cond.tensor(self.net_config.flow_scale),
            self.net_config.flow_scale,
            s.steps if steps is None else steps,
            torch.Generator().manual_seed(seed),
            s.hypotheses if hypotheses is None else hypotheses,
            s.t_start or None,
        )
        return flow, cond

    @torch.no_grad()
    def regress(self, cond: MatchingCondition) -> torch.Tensor:
        """The direct-regression baseline's flow (pixels); a ConfigError when the model has none."""
        if not self.has_regressor:
            raise ConfigError("this diffmatch model has no regression baseline (its recipe had model.regression false)")
        scale = self.net_config.flow_scale
        return regress_flow(self.module["regressor"], self.schedule, cond.tensor(scale), scale)

    def save(self, directory, extra: dict | None = None):
        with atomic_dir(Path(directory)) as tmp:
            save_tensors(tmp / WEIGHTS, {k: v.detach().contiguous() for k, v in self.module.state_dict().items()})
            atomic_write_json(tmp / "condiff.json", {FAMILY: self.config, **(extra or {})})


def _build(config: dict) -> DiffMatchModel:
    m = DiffMatchNetConfig(**config["model"])
    nets = {"net": FlowDenoiserNet(cond_channels(m.local_radius), m.channels, m.time_dim)}
    if m.regression:
        nets["regressor"] = FlowDenoiserNet(cond_channels(m.local_radius), m.channels, m.time_dim)
    return DiffMatchModel(nn.ModuleDict(nets), config)


def build_diffmatch_model(r: DiffMatchRecipe) -> DiffMatchModel:
    return _build({k: dataclasses.asdict(getattr(r, k)) for k in TABLES})


def model_dir(path) -> Path | None:
    """The model folder ``path`` names: itself when its condiff.json has a "diffmatch" table, or its ``model``
    sub-folder (a training run's --out); None otherwise."""
    return family_dir(path, FAMILY)


def load_diffmatch_model(path, what: str = "--model") -> DiffMatchModel:
    """A saved model (a model folder, or a training run's folder holding ``model/``). Pickled files are refused
    before anything is read; so is a condiff.json whose "diffmatch" table is not a valid recipe's, or weights that
    do not fit it."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{what} {str(path)!r} does not exist; accepted: a diffmatch model or run folder")
    refuse_pickles(path, what)
    directory = model_dir(path)
    if directory is None:
        raise InputFileError(
            f"{what} {str(path)!r} is not a diffmatch model folder (no condiff.json with a 'diffmatch' table, "
            f"there or in {str(path / 'model')!r})"
        )
    info = load_json(directory / "condiff.json", what)
    cfg = info[FAMILY]
    try:
        if not isinstance(cfg, dict) or set(cfg) != set(TABLES):
            raise ConfigError(f"the 'diffmatch' table needs the tables {', '.join(TABLES)}")
        tables = _check_tables({k: _typed(cls, cfg[k], k) for k, cls in TABLES.items()})
    except (ConfigError, TypeError) as e:
        raise InputFileError(f"{what} {str(directory)!r}: condiff.json: {e}") from None
    model = _build({k: dataclasses.asdict(v) for k, v in tables.items()})
    load_fitting_weights(model.module, directory, WEIGHTS, what)
    model.module.eval()
    model.path, model.info = directory, info
    return model


# training and evaluation ----------------------------------------------------------------------------------------
def diffmatch_loss_fn(model: DiffMatchModel, r: DiffMatchRecipe):
    """The Trainer's loss: a fresh batch of pairs per step from the step's generator, DiffMatch's x0 loss (and the
    regression baseline's, on the same pairs and condition), each as a metric."""
    schedule, m = model.schedule, r.model

    def fn(step, g):
        b = matching_batch(r.train.batch_size, g, r.data)
        cond = matching_condition(b.source, b.target, m.feature_radius, m.temperature, m.local_radius)
        c = cond.tensor(m.flow_scale)
        loss = diffmatch_loss(model.module["net"], schedule, b.flow, c, g, m.flow_scale)
        metrics = {"diffusion_loss": loss.item()}
        if model.has_regressor:
            reg = regression_loss(model.module["regressor"], schedule, b.flow, c, m.flow_scale)
            metrics["regression_loss"] = reg.item()
            loss = loss + reg
        return loss, metrics

    return fn


def eval_pairs(model: DiffMatchModel, n: int, seed: int = 0):
    """n held-out pairs (generator seeded ``EVAL_SEED_OFFSET + seed``) of the model's [data] warps."""
    return matching_batch(n, torch.Generator().manual_seed(EVAL_SEED_OFFSET + seed), model.data)


@torch.no_grad()
def evaluate_epe(model: DiffMatchModel, n: int, seed: int = 0, steps: int | None = None, batch: int = 64) -> dict:
    """Average end-point error over valid pixels, averaged over n held-out pairs: the initial flow's, DiffMatch's
    (the recipe's sampling, ``steps`` if given) and the regression baseline's (when the model has one)."""
    pairs = eval_pairs(model, n, seed)
    out: dict[str, list] = {"init_epe": [], "diffmatch_epe": [], "regression_epe": []}
    for i in range(0, n, batch):
        sl = slice(i, i + batch)
        flow, cond = model.match(pairs.source[sl], pairs.target[sl], steps=steps, seed=seed + i)
        true, valid = pairs.flow[sl], pairs.valid[sl]
        out["init_epe"].append(end_point_error(cond.init_flow, true, valid))
        out["diffmatch_epe"].append(end_point_error(flow, true, valid))
        if model.has_regressor:
            out["regression_epe"].append(end_point_error(model.regress(cond), true, valid))
    return {k: float(torch.cat(v).nanmean()) for k, v in out.items() if v}


def _eval_fn(r: DiffMatchRecipe):
    def run(model: DiffMatchModel, ema_module):
        m = dataclasses.replace(model, module=ema_module)
        return evaluate_epe(m, r.train.eval_n, seed=0, steps=r.train.eval_steps)

    return run


def make_diffmatch_trainer(r: DiffMatchRecipe, out_dir, progress: bool = True) -> Trainer:
    """The Trainer for ``r`` (weights seeded by train.seed; train.threads threads), with the held-out EPEs on
    train.eval_n pairs (train.eval_steps sampling steps) every train.eval_every steps."""
    torch.set_num_threads(r.train.threads)
    torch.manual_seed(r.train.seed)  # deterministic initial weights
    model = build_diffmatch_model(r)
    return Trainer(
        model, r, Path(out_dir), progress=progress, evaluate=_eval_fn(r), loss_fn=diffmatch_loss_fn(model, r)
    )
