"""Dense prediction on shapes: depth and mask maps from an image, by Lotus (one network evaluation, x0 at the fixed
time T, with the detail preserver; ``condiff.tasks.lotus``) or by a multi-step eps-model conditioned on the image
(the baseline, sampled with a condiff solver). Both start from the bundled ``shapes`` UNet (``train.init_from``):
its conv_in is widened from 12 to 24 channels with zero weights (``tasks.lotus.widen_unet``), so the start computes
exactly what the pretrained net did on the image channels; the caption context is the null caption's encoding,
kept as learned parameters (Lotus also runs Stable Diffusion with an empty prompt), and the task switcher is a
learned, zero-initialised vector per switch (depth, mask, reconstruction) added to the pooled text embedding that
the UNet projects into its time embedding (Lotus's class embedding).

Maps are images: the depth d in [0, 1] as 2 d - 1, the mask as +-1, repeated over the three colour channels, so the
annotation has the image's layout (2x pixel-unshuffled to 12 channels at 16x16, as the bundled model runs) and the
reconstruction switch shares the output. ``read_map`` averages the channels back: depth (x + 1) / 2 clipped to
[0, 1], mask x > 0.

A recipe (``family = "dense"``) has [model] (``kind``: lotus | eps; ``reconstruction``: Lotus's detail
preserver) and [train] (condiff's ``TrainConfig``; ``init_from`` names the shapes model that starts the run).
Unknown keys and bad values are one-line ConfigErrors. A saved model is ``unet/`` and ``extras/`` (diffusers
folders, safetensors) and ``condiff.json`` with a "dense" table; ``make_dense_trainer`` trains one with condiff's
Trainer (EMA, atomic checkpoints, exact resume).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from condiff.core.denoiser import X0, Eps, wrap
from condiff.core.files import atomic_dir, atomic_write_json, load_json
from condiff.core.grids import make_grid
from condiff.core.sampling import initial_noise, sample
from condiff.core.schedules import schedule_from_config
from condiff.data import shapes, text
from condiff.errors import ConfigError, InputFileError, one_of
from condiff.guidance.thresholding import DynamicThresholding
from condiff.models.family import TaskModel, load_pretrained
from condiff.solvers import DPMSolverPP2M
from condiff.tasks.lotus import (
    depth_errors,
    detail_loss,
    detail_preserver,
    lotus_loss,
    mask_iou,
    single_step,
    widen_unet,
)
from condiff.training.objectives import UniformTime, diffusion_loss
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

FAMILY = "dense"
KINDS = ("lotus", "eps")
TASKS = ("depth", "mask")  # the annotation switches 0, 1; the reconstruction switch is 2
RECON = len(TASKS)
PIXEL_UNSHUFFLE = 2
IMAGE_SHAPE = (3, shapes.SIZE, shapes.SIZE)
EVAL_SEED_OFFSET = 2**41  # evaluation renders come from generators the Trainer's (seed, step) ones never reach
DEFAULT_STEPS = 20  # the eps-model's sampling steps (DPM-Solver++(2M))
# how the eps-model's x0 estimates are limited while sampling: Imagen's dynamic thresholding at the 0.995 quantile
# (Saharia et al. 2022; the DPM-Solver++ paper's setting for pixel-space models), static clipping to [-1, 1], or none
THRESHOLDS = ("dynamic", "clip", "none")
EPS_THRESHOLD = "dynamic"


# the networks' shared parts -----------------------------------------------------------------------------------
class DenseExtras(ModelMixin, ConfigMixin):
    """What the widened UNet needs beside its own weights: the cross-attention ``context`` and the ``pooled``
    vector (the null caption's encoding at the start; learned), and ``switches`` zero-initialised switch vectors
    added to ``pooled`` (Lotus's task switcher; none for UniCon)."""

    @register_to_config
    def __init__(self, context_len: int = 4, dim: int = 64, switches: int = 0):
        super().__init__()
        self.context = nn.Parameter(torch.zeros(1, context_len, dim))
        self.pooled = nn.Parameter(torch.zeros(1, dim))
        if switches:
            self.switch = nn.Parameter(torch.zeros(switches, dim))

    def conditioning(self, n: int, switch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder_hidden_states, class_labels) for n rows; ``switch`` (n,) long picks each row's switch vector."""
        pooled = self.pooled.expand(n, -1)
        if switch is not None:
            pooled = pooled + self.switch[switch]
        return self.context.expand(n, -1, -1), pooled


@dataclass(frozen=True)
class Pretrained:
    """The start of a run: the shapes model's UNet, its null-caption encoding and its schedule config."""

    unet: nn.Module
    context: torch.Tensor
    pooled: torch.Tensor
    schedule_cfg: dict
    pixel_unshuffle: int


def load_start(init_from: str, what: str = "train.init_from") -> Pretrained:
    """The shapes model that ``init_from`` names (the bundled 'shapes' or a shapes model folder) as a start; a
    model of another family or without 2x pixel-unshuffle is one line."""
    from condiff.models.base import load_model, silence_diffusers

    silence_diffusers()
    src = load_model(init_from, what)
    f = src.model_cfg.get("pixel_unshuffle", 1)
    if src.family.name != "shapes" or f != PIXEL_UNSHUFFLE:
        raise ConfigError(
            f"{what} {init_from!r} is a {src.family.name} model (pixel_unshuffle {f}); it must be a shapes model "
            f"with pixel_unshuffle {PIXEL_UNSHUFFLE}, e.g. the bundled 'shapes'"
        )
    with torch.no_grad():
        cond = src.family.encode(src.module, text.null_tokens(1))
    return Pretrained(src.module["unet"], cond["encoder_hidden_states"], cond["pooled"], src.info["schedule_cfg"], f)


def start_extras(start: Pretrained, switches: int) -> DenseExtras:
    ex = DenseExtras(start.context.shape[1], start.context.shape[2], switches)
    with torch.no_grad():
        ex.context.copy_(start.context)
        ex.pooled.copy_(start.pooled)
    return ex


def unshuffle(x: torch.Tensor) -> torch.Tensor:
    return F.pixel_unshuffle(x, PIXEL_UNSHUFFLE)


def shuffle(x: torch.Tensor) -> torch.Tensor:
    return F.pixel_shuffle(x, PIXEL_UNSHUFFLE)


def heldout_batch(n: int, seed: int) -> shapes.ShapesBatch:
    """n renders from a generator seeded ``EVAL_SEED_OFFSET + seed``, apart from every training batch."""
    return shapes.sample_batch(n, torch.Generator().manual_seed(EVAL_SEED_OFFSET + seed))


# maps ---------------------------------------------------------------------------------------------------------
def check_task(task: str, accepted=TASKS) -> str:
    if task not in accepted:
        raise one_of("task", task, accepted)
    return task


def annotation(batch: shapes.ShapesBatch, task: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) maps in [-1, 1], row i the map of task ``task[i]`` (0 depth: 2 d - 1; 1 mask: +-1), repeated
    over three channels."""
    depth = batch.depth * 2 - 1
    mask = batch.masks.float() * 2 - 1
    m = torch.where((task == 0).view(-1, 1, 1), depth, mask)
    return m.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def read_map(x: torch.Tensor, task: str) -> torch.Tensor:
    """(B, C, H, W) maps in [-1, 1] -> (B, H, W): depth in [0, 1] ((mean + 1) / 2, clipped) or a bool mask
    (mean > 0)."""
    m = x.float().mean(1)
    return m > 0 if task == "mask" else ((m + 1) / 2).clamp(0, 1)


def map_image(m: torch.Tensor) -> torch.Tensor:
    """(B, H, W) depth in [0, 1] or bool mask -> (B, 1, H, W) gray images in [-1, 1] (write_image writes them)."""
    return (m.float() * 2 - 1).unsqueeze(1)


# recipes ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DenseNetConfig:
    kind: str = "lotus"  # lotus: one step, x0 at T | eps: the multi-step eps-model baseline
    reconstruction: bool = False  # Lotus's detail preserver (half the batch reconstructs the image)


@dataclass(frozen=True)
class DenseRecipe(TaskRecipeDict):
    name: str
    family: str = FAMILY
    model: DenseNetConfig = field(default_factory=DenseNetConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(init_from="shapes"))
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # unused: the Trainer's field


def train_table(data: dict):
    """The recipe's [train] table with ``init_from`` 'shapes' (the bundled model) where it names none."""
    train = data.get("train", {})
    return {"init_from": "shapes", **train} if isinstance(train, dict) else train


def check_init_from(t: TrainConfig) -> None:
    if not t.init_from.strip():
        raise ConfigError(
            "train.init_from must name the shapes model that starts the run (the bundled 'shapes' or a shapes "
            "model folder), got ''"
        )


def shapes_start_recipe(recipe_cls, net_cls, data: dict, family: str):
    """A recipe of a family fine-tuned from a shapes model (tables name, family, [model] of ``net_cls``, [train]
    with init_from defaulting to "shapes"): unknown keys and bad values are one-line ConfigErrors naming them.
    The family checks its [model] values after this."""
    check_keys(data, {"name", "family", "model", "train"}, what=f"{family} recipe")
    if data["family"] != family:
        raise one_of(f"{family} recipe family", data["family"], [family])
    r = recipe_cls(
        data["name"],
        data["family"],
        typed_table(net_cls, data.get("model", {}), "model"),
        typed_table(TrainConfig, train_table(data), "train"),
    )
    check_name(r.name)
    check_objective_train(ObjectiveConfig(), r.train)
    check_init_from(r.train)
    return r


def dense_recipe_from_dict(data: dict) -> DenseRecipe:
    """A recipe from its TOML table; unknown keys and bad values are one-line ConfigErrors naming them."""
    r = shapes_start_recipe(DenseRecipe, DenseNetConfig, data, FAMILY)
    if r.model.kind not in KINDS:
        raise one_of("model.kind", r.model.kind, KINDS)
    if r.model.reconstruction and r.model.kind != "lotus":
        raise ConfigError("model.reconstruction is Lotus's detail preserver; kind 'eps' takes false, got true")
    return r


# the model ----------------------------------------------------------------------------------------------------
def dense_forward(module: nn.ModuleDict, image, y, t_in, switch) -> torch.Tensor:
    """The network: UNet(cat(image, y) unshuffled, t, null context, pooled + switch vector) shuffled back."""
    n = y.shape[0]
    hidden, pooled = module["extras"].conditioning(n, switch)
    h = torch.cat([unshuffle(image), unshuffle(y)], 1)
    return shuffle(module["unet"](h, t_in, encoder_hidden_states=hidden, class_labels=pooled).sample)


@dataclass
class DenseModel(TaskModel):
    """A saved or trained DenseModel: module {"unet", "extras"}; config {"kind", "reconstruction", "tasks", "schedule",
    "pixel_unshuffle", "init_from"}."""

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.config["tasks"])

    @property
    def schedule(self):
        return schedule_from_config(self.config["schedule"])

    @property
    def denoiser(self):
        """x0 of the map given the noisy map, t and cond {'image', 'switch'} (x0-prediction for Lotus, eps for the
        baseline)."""
        return wrap(
            self.module,
            self.schedule,
            X0() if self.kind == "lotus" else Eps(),
            call=lambda net, x, t_in, cond: dense_forward(net, cond["image"], x, t_in, cond["switch"]),
            channels=IMAGE_SHAPE[0],
        )

    def condition(self, image: torch.Tensor, task: str) -> dict:
        """The cond mapping of (B, 3, 32, 32) images for ``task`` (depth, mask, or 'reconstruction')."""
        switch = RECON if task == "reconstruction" else TASKS.index(check_task(task, self.tasks))
        return {"image": image, "switch": torch.full((image.shape[0],), switch, dtype=torch.long)}

    @torch.no_grad()
    def predict(
        self, image: torch.Tensor, task: str, steps: int | None = None, seed: int = 0, threshold: str | None = None
    ) -> "Prediction":
        """The maps (B, 3, 32, 32) in [-1, 1] of images (B, 3, 32, 32): Lotus in one evaluation (``steps`` must be
        None or 1), the eps-model with ``steps`` DPM-Solver++(2M) steps (default 20), its x0 estimates limited by
        ``threshold`` (one of ``THRESHOLDS``; default ``EPS_THRESHOLD``); noise from ``seed``."""
        if task == "reconstruction" and not self.config["reconstruction"]:
            raise ConfigError("this model has no reconstruction switch (model.reconstruction was false)")
        cond = self.condition(image, task)
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        if self.kind == "lotus":
            if steps not in (None, 1):
                raise ConfigError(f"a Lotus model predicts in one network evaluation; --steps must be 1, got {steps}")
            if threshold is not None:
                raise ConfigError(
                    f"--threshold is for the eps-model's sampling steps; Lotus takes one, got {threshold}"
                )
            out = single_step(self.denoiser, cond, image.shape, g)
            x, nfe = out.x0, out.nfe
        else:
            steps = DEFAULT_STEPS if steps is None else steps
            den = limited(self.denoiser, EPS_THRESHOLD if threshold is None else threshold)
            grid = make_grid(self.schedule, steps)
            x_T = initial_noise(self.schedule, float(grid[0]), image.shape, g)
            res = sample(den, DPMSolverPP2M(), grid, x_T, cond)
            x, nfe = res.x, res.nfe
        return Prediction(x.clamp(-1, 1), nfe, time.perf_counter() - t0)

    def save(self, directory, extra: dict | None = None):
        with atomic_dir(Path(directory)) as tmp:
            self.module["unet"].save_pretrained(tmp / "unet")
            self.module["extras"].save_pretrained(tmp / "extras")
            atomic_write_json(tmp / "condiff.json", {FAMILY: self.config, **(extra or {})})


def limited(denoiser, threshold: str):
    """``denoiser`` with its x0 estimates limited: 'dynamic' (Imagen's dynamic thresholding, quantile 0.995),
    'clip' (static clipping to [-1, 1]) or 'none'."""
    if threshold not in THRESHOLDS:
        raise one_of("threshold", threshold, THRESHOLDS)
    if threshold == "none":
        return denoiser
    return DynamicThresholding(denoiser, 0.995, 1.0 if threshold == "clip" else math.inf)


@dataclass(frozen=True)
class Prediction:
    """Maps (B, 3, H, W) in [-1, 1], the network evaluations they took and the seconds."""

    x: torch.Tensor
    nfe: int
    seconds: float


def build_dense_model(r: DenseRecipe) -> DenseModel:
    start = load_start(r.train.init_from)
    unet = widen_unet(start.unet, 2 * start.unet.config.in_channels)
    extras = start_extras(start, len(TASKS) + 1)
    cfg = {
        "kind": r.model.kind,
        "reconstruction": r.model.reconstruction,
        "tasks": list(TASKS),
        "schedule": start.schedule_cfg,
        "pixel_unshuffle": start.pixel_unshuffle,
        "init_from": r.train.init_from,
    }
    return DenseModel(nn.ModuleDict({"unet": unet, "extras": extras}), cfg)


def table_of(directory, key: str):
    """The ``key`` table of a folder's condiff.json, or None (no such file, not JSON, no such table)."""
    f = Path(directory) / "condiff.json"
    try:
        info = load_json(f) if f.is_file() else None
    except (OSError, ValueError, InputFileError):
        return None
    return info.get(key) if isinstance(info, dict) else None


_CONFIG_TYPES = {"kind": str, "reconstruction": bool, "tasks": list, "schedule": dict, "pixel_unshuffle": int}


def saved_table(directory: Path, table: str, types: dict, what: str) -> tuple[dict, dict]:
    """(condiff.json, its ``table``) of a saved model folder whose table has every key of ``types`` with its type
    and a schedule condiff reads; else one InputFileError."""
    if table_of(directory, table) is None:
        raise InputFileError(
            f"{what} {str(directory)!r} is not a {table} model folder (no condiff.json with {table!r})"
        )
    info = load_json(directory / "condiff.json")
    check_saved_config(info[table], directory, table, types, what)
    return info, info[table]


def load_networks(directory: Path, what: str) -> nn.ModuleDict:
    """The saved UNet and DenseExtras of a folder (pickled weights refused by ``load_pretrained``), frozen in eval
    mode."""
    from diffusers import UNet2DConditionModel

    unet = load_pretrained(UNet2DConditionModel, directory / "unet", what)
    extras = load_pretrained(DenseExtras, directory / "extras", what)
    module = nn.ModuleDict({"unet": unet, "extras": extras}).eval()
    module.requires_grad_(False)
    return module


def check_saved_config(cfg, directory: Path, table: str, types: dict, what: str) -> None:
    """A saved model's table has every key with its type, and a schedule condiff reads; else one InputFileError."""
    bad = [
        k
        for k, kind in types.items()
        if not isinstance(cfg, dict) or not isinstance(cfg.get(k), kind) or (kind is int and isinstance(cfg[k], bool))
    ]
    if not bad:
        try:
            schedule_from_config(cfg["schedule"])
        except ConfigError:
            bad = ["schedule"]
    if bad:
        raise InputFileError(
            f"{what} {str(directory)!r}: condiff.json's {table!r} table needs {', '.join(types)}; "
            f"{bad[0]!r} is missing or wrong"
        )


def load_dense_model(directory, what: str = "--model") -> DenseModel:
    """A saved dense model; pickled weights are refused (``load_pretrained``), and so is a condiff.json whose
    "dense" table lacks a key, has one of the wrong type or names another kind or tasks."""
    directory = Path(directory)
    info, cfg = saved_table(directory, FAMILY, _CONFIG_TYPES, what)
    if cfg["kind"] not in KINDS or list(cfg["tasks"]) != list(TASKS) or cfg["pixel_unshuffle"] != PIXEL_UNSHUFFLE:
        raise InputFileError(
            f"{what} {str(directory)!r}: condiff.json's 'dense' table must have kind one of {', '.join(KINDS)}, "
            f"tasks {list(TASKS)} and pixel_unshuffle {PIXEL_UNSHUFFLE}"
        )
    module = load_networks(directory, what)
    unet, extras = module["unet"].config, module["extras"].config
    if unet.in_channels != 24 or unet.out_channels != 12 or extras.switches != RECON + 1:
        raise InputFileError(
            f"{what} {str(directory)!r}: the networks do not have a dense model's channels (24 in, 12 out) and "
            f"{RECON + 1} switches"
        )
    return DenseModel(module, cfg, directory, info)


# training and evaluation --------------------------------------------------------------------------------------
def dense_loss_fn(model: DenseModel, r: DenseRecipe):
    """The Trainer's loss: a fresh batch of renders per step from the step's generator, each row's task drawn at
    random (depth or mask). Lotus: the x0 loss at T (with the detail preserver: annotation rows + reconstruction
    rows, the sum of their means); eps: the eps-MSE at uniform t."""
    schedule = model.schedule

    def fn(step, g):
        n = r.train.batch_size
        b = shapes.sample_batch(n, g)
        task = torch.randint(len(TASKS), (n,), generator=g)
        y = annotation(b, task)
        den = model.denoiser
        if r.model.kind == "lotus":
            if r.model.reconstruction:
                lay = detail_preserver(b.images, y, task, RECON)
                per = lotus_loss(den, lay.target, {"image": b.images, "switch": lay.switch}, g)
                return detail_loss(per, lay.split)
            per = lotus_loss(den, y, {"image": b.images, "switch": task}, g)
            return per.mean(), {}
        t = UniformTime().sample(schedule, n, g)
        eps = torch.randn(y.shape, generator=g)
        cond = {"image": b.images, "switch": task}
        call = lambda x, t_in, c: dense_forward(model.module, c["image"], x, t_in.to(x.dtype), c["switch"])  # noqa: E731
        return diffusion_loss(call, y, cond, t, eps, schedule, Eps()).mean(), {}

    return fn


@torch.no_grad()
def evaluate_dense(
    model: DenseModel, n: int, seed: int = 0, steps: int | None = None, batch: int = 256, threshold: str | None = None
) -> dict:
    """Scores on n held-out renders (``heldout_batch``): mask IoU (mean, minimum, share of samples at >= 0.95), the
    depth errors (``tasks.lotus.depth_errors``), the network evaluations and the seconds per image; with the
    reconstruction switch, the reconstruction's RMSE against the image."""
    b = heldout_batch(n, seed)
    out, nfe, secs = {"mask": [], "depth": [], "reconstruction": []}, {}, {}
    tasks = list(TASKS) + (["reconstruction"] if model.config["reconstruction"] else [])
    for task in tasks:
        for i in range(0, n, batch):
            p = model.predict(b.images[i : i + batch], task, steps, seed + i, threshold)
            out[task].append(p.x)
            nfe[task] = p.nfe
            secs[task] = secs.get(task, 0.0) + p.seconds
    mask = read_map(torch.cat(out["mask"]), "mask")
    depth = read_map(torch.cat(out["depth"]), "depth")
    iou = mask_iou(mask, b.masks)
    res = {
        "mask_iou": float(iou.mean()),
        "mask_iou_min": float(iou.min()),
        "mask_iou_ge_0.95": float((iou >= 0.95).float().mean()),
        "depth": depth_errors(depth, b.depth, b.masks),
        "nfe": nfe["mask"],
        "seconds_per_image": {k: v / n for k, v in secs.items()},
    }
    if out["reconstruction"]:
        rec = torch.cat(out["reconstruction"])
        res["reconstruction_rmse"] = float((rec - b.images).pow(2).mean().sqrt())
    return res


def _eval_fn(r: DenseRecipe):
    def run(model: DenseModel, ema_module):
        m = dataclasses.replace(model, module=ema_module)
        res = evaluate_dense(m, r.train.eval_n, seed=0, steps=None if r.model.kind == "lotus" else r.train.eval_steps)
        return {
            "mask_iou": res["mask_iou"],
            "depth_abs_rel": res["depth"]["abs_rel"],
            "depth_rmse": res["depth"]["rmse"],
        }

    return run


def make_dense_trainer(r: DenseRecipe, out_dir, progress: bool = True) -> Trainer:
    """The Trainer for ``r`` (the start from train.init_from; train.threads threads), with mask IoU and depth errors on
    train.eval_n held-out renders every train.eval_every steps."""
    torch.set_num_threads(r.train.threads)
    torch.manual_seed(r.train.seed)
    model = build_dense_model(r)
    return Trainer(model, r, Path(out_dir), progress=progress, evaluate=_eval_fn(r), loss_fn=dense_loss_fn(model, r))
