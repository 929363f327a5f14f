"""Restoration on shapes by RDDM (Liu et al., "Residual Denoising Diffusion Models", CVPR 2024) against a plain
conditional DDPM at equal network evaluations.

Three degradations, each a pure function of (clean images, generator) (``degrade``): ``denoise`` adds Gaussian noise
of fixed std ``NOISE_SIGMA``; ``deblur`` convolves with a fixed Gaussian kernel (std ``BLUR_SIGMA`` px, radius
``BLUR_RADIUS``, reflect padding); ``inpaint`` sets a random ``BOX`` x ``BOX`` square to 0 (mid-gray; shapes'
background is -1).

Two model kinds, one per recipe (``family = "rddm"``), each covering the three degradations (the degradation is a
learned, zero-initialised switch vector added to the pooled text embedding, as in ``models.dense``):

- ``rddm``: the network reads I_t | I_in and predicts the residual I_res = I_in - I_0, with ``objective``
  ``pred_res_noise`` the noise too (the paper's SM-Res-N, L1 loss on both, eq. (6)-(8)) or with ``pred_res`` the
  residual alone (SM-Res, sec. 3.3: the noise is solved from I_t, so the last step lands on I_in - I_res_hat);
  the paper's schedules (alpha_t "decreased" summing to 1, beta_t^2 "increased" summing to ``sum_scale`` = 0.01
  for restoration, ``tasks.rddm.RDDMSchedule.paper``), sampled with the generalised DDIM step of eq. (13) (eta =
  RDDM_ETA) from I_T = I_in + beta_bar_T eps, ``tasks.rddm.sample``.
- ``ddpm``: the baseline, a DDPM on x_t | I_in conditioned by channel concatenation (Saharia et al., SR3/Palette),
  trained with the MSE of its ``prediction`` (v: the bundled start's own parameterisation, or eps) at uniform t on
  the bundled model's DDPM table (the cosine table) and sampled from noise with DDPM_SOLVER (DDIM), its x0
  estimates limited by DDPM_THRESHOLD (none; ``models.dense.limited``), both chosen on validation renders. On the
  cosine table alpha_T = 5e-5, so an eps-model's x0 estimate near T multiplies its errors by sigma/alpha ~ 2e4:
  the eps variant's first few-step samples are poor.

Both start from the bundled shapes UNet (``dense.load_start``): conv_in widened 12 -> 24 with zero weights
(``tasks.lotus.widen_unet``), so at the start the network computes exactly the pretrained one on the I_t (x_t)
channels; RDDM's conv_out is widened 12 -> 24 too, the pretrained head giving the noise and the new, zero
channels the residual. The bundled model predicts v; RDDM (pred_res_noise) retrains that head as its noise predictor
(pred_res leaves it unused), the ddpm kind keeps it as v (or retrains it as eps). A saved model is ``unet/``,
``extras/`` and ``condiff.json`` with an "rddm" table.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from condiff.core.denoiser import PREDICTIONS, wrap
from condiff.core.files import atomic_dir, atomic_write_json
from condiff.core.grids import make_grid
from condiff.core.sampling import Gaussian, initial_noise, sample
from condiff.core.schedules import schedule_from_config
from condiff.data import labeller, shapes
from condiff.errors import ConfigError, InputFileError, check_real, one_of
from condiff.models.dense import (
    PIXEL_UNSHUFFLE,
    heldout_batch,
    limited,
    load_networks,
    load_start,
    saved_table,
    shapes_start_recipe,
    shuffle,
    start_extras,
    unshuffle,
)
from condiff.models.family import TaskModel
from condiff.solvers import get_solver
from condiff.tasks import rddm
from condiff.tasks.lotus import widen_unet
from condiff.training.objectives import UniformTime, diffusion_loss
from condiff.training.recipe import ObjectiveConfig, TaskRecipeDict, TrainConfig
from condiff.training.trainer import Trainer

FAMILY = "rddm"
KINDS = ("rddm", "ddpm")
DDPM_PREDICTIONS = ("v", "eps")  # the ddpm kind's output: v (the bundled start's own head) or eps
DEGRADATIONS = ("denoise", "deblur", "inpaint")
RDDM_OBJECTIVES = ("pred_res_noise", "pred_res")  # the paper's SM-Res-N and SM-Res (sec. 3.3)
NOISE_SIGMA = 0.4  # denoise: std of the added noise on the [-1, 1] scale
BLUR_SIGMA = 1.5  # deblur: the Gaussian kernel's std in pixels
BLUR_RADIUS = 4  # deblur: the kernel is (2 r + 1) x (2 r + 1)
BOX = 12  # inpaint: side of the masked square in pixels
FILL = 0.0  # inpaint: the value of the masked pixels (mid-gray)
DEFAULT_STEPS = 5  # the paper's restoration setting
DDPM_SOLVERS = ("dpmpp-2m", "ddim")  # the ddpm kind's samplers, one network evaluation a step
# sampling defaults, chosen on validation renders (benchmarks/rddm.py's seed 2; the test seed is 1)
RDDM_ETA = 0.0
DDPM_SOLVER = "ddim"
DDPM_THRESHOLD = "none"
IMAGE_SHAPE = (3, shapes.SIZE, shapes.SIZE)


# degradations -------------------------------------------------------------------------------------------------
def blur_kernel(sigma: float = BLUR_SIGMA, radius: int = BLUR_RADIUS) -> torch.Tensor:
    """The normalised (2 r + 1)^2 Gaussian kernel (float32, sums to 1, symmetric)."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k1 = torch.exp(-(x**2) / (2 * sigma**2))
    k = torch.outer(k1, k1)
    return (k / k.sum()).float()


def blur(images: torch.Tensor) -> torch.Tensor:
    """Each channel convolved with ``blur_kernel`` (reflect padding)."""
    c = images.shape[1]
    k = blur_kernel().to(images)[None, None].expand(c, 1, -1, -1)
    x = F.pad(images, (BLUR_RADIUS,) * 4, mode="reflect")
    return F.conv2d(x, k, groups=c)


def box_masks(n: int, generator: torch.Generator | None = None, size: int = shapes.SIZE) -> torch.Tensor:
    """(n, 1, size, size) bool, True inside one ``BOX`` x ``BOX`` square per row, its top-left corner uniform over
    the positions that keep it inside the image."""
    top = torch.randint(0, size - BOX + 1, (n,), generator=generator)
    left = torch.randint(0, size - BOX + 1, (n,), generator=generator)
    r = torch.arange(size)
    rows = (r.view(1, -1) >= top.view(-1, 1)) & (r.view(1, -1) < (top + BOX).view(-1, 1))
    cols = (r.view(1, -1) >= left.view(-1, 1)) & (r.view(1, -1) < (left + BOX).view(-1, 1))
    return (rows[:, :, None] & cols[:, None, :]).unsqueeze(1)


def check_degradation(task: str) -> str:
    if not isinstance(task, str) or task not in DEGRADATIONS:
        raise one_of("task", task, DEGRADATIONS)
    return task


def degrade(images: torch.Tensor, task: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """The degraded images (a new tensor): denoise x + NOISE_SIGMA z (z from ``generator``); deblur ``blur(x)``
    (the generator unused); inpaint: a random ``box_masks`` square set to FILL."""
    check_degradation(task)
    if task == "denoise":
        return images + NOISE_SIGMA * torch.randn(images.shape, generator=generator, dtype=images.dtype)
    if task == "deblur":
        return blur(images)
    m = box_masks(images.shape[0], generator, images.shape[-1])
    return torch.where(m, torch.full_like(images, FILL), images)


def degrade_mixed(images: torch.Tensor, task: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Row i degraded by DEGRADATIONS[task[i]]; every degradation is drawn for the whole batch in the order of
    DEGRADATIONS (so the generator's use does not depend on ``task``)."""
    out = images
    for i, name in enumerate(DEGRADATIONS):
        d = degrade(images, name, generator)
        out = torch.where((task == i).view(-1, 1, 1, 1), d, out)
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR in dB of images in [-1, 1] (both clipped; peak-to-peak 2)."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


# recipes ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RDDMNetConfig:
    kind: str = "rddm"  # rddm: the residual model (see objective) | ddpm: the conditional-DDPM baseline
    sum_scale: float = 0.01  # rddm: beta_bar_T^2 (the paper's 0.01 for restoration)
    loss: str = "l1"  # rddm: the loss on residual and noise (the paper's L1)
    prediction: str = "v"  # ddpm: what the network predicts, v (the start's own) or eps
    objective: str = "pred_res_noise"  # rddm: residual + noise (SM-Res-N) or the residual alone (pred_res, SM-Res)


@dataclass(frozen=True)
class RDDMRecipe(TaskRecipeDict):
    name: str
    family: str = FAMILY
    model: RDDMNetConfig = field(default_factory=RDDMNetConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(init_from="shapes"))
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # unused: the Trainer's field


def rddm_recipe_from_dict(data: dict) -> RDDMRecipe:
    """A recipe from its TOML table; unknown keys and bad values are one-line ConfigErrors naming them."""
    r = shapes_start_recipe(RDDMRecipe, RDDMNetConfig, data, FAMILY)
    m = r.model
    if m.kind not in KINDS:
        raise one_of("model.kind", m.kind, KINDS)
    check_real("model.sum_scale", m.sum_scale, 0.0, 1.0, lo_open=True)
    if m.loss not in rddm.LOSSES:
        raise one_of("model.loss", m.loss, rddm.LOSSES)
    if m.prediction not in DDPM_PREDICTIONS:
        raise one_of("model.prediction", m.prediction, DDPM_PREDICTIONS)
    if m.objective not in RDDM_OBJECTIVES:
        raise one_of("model.objective", m.objective, RDDM_OBJECTIVES)
    if m.kind == "ddpm" and m.objective != RDDMNetConfig.objective:
        raise ConfigError(f"model.objective is RDDM's; kind 'ddpm' takes the default, got {m.objective!r}")
    if m.kind == "rddm" and m.prediction != RDDMNetConfig.prediction:
        raise ConfigError(
            f"model.prediction is the ddpm kind's; kind 'rddm' predicts residual and noise, got {m.prediction!r}"
        )
    if m.kind == "ddpm" and (m.sum_scale != RDDMNetConfig.sum_scale or m.loss != RDDMNetConfig.loss):
        raise ConfigError(
            "model.sum_scale and model.loss are RDDM's; kind 'ddpm' trains the eps-MSE on the start's DDPM table "
            f"and takes the defaults ({RDDMNetConfig.sum_scale}, {RDDMNetConfig.loss!r})"
        )
    return r


# the model ----------------------------------------------------------------------------------------------------
def restore_forward(module: nn.ModuleDict, x, x_in, t_in, switch) -> torch.Tensor:
    """UNet(cat(x, x_in) unshuffled, t, null context, pooled + switch vector) shuffled back: (B, 3, H, W) for the
    ddpm kind (eps), (B, 6, H, W) for rddm (noise in channels 0-2, from the pretrained head's channels; residual in
    3-5, from the new zero ones)."""
    hidden, pooled = module["extras"].conditioning(x.shape[0], switch)
    h = torch.cat([unshuffle(x), unshuffle(x_in)], 1)
    return shuffle(module["unet"](h, t_in, encoder_hidden_states=hidden, class_labels=pooled).sample)


@dataclass
class RestoreModel(TaskModel):
    """A saved or trained RestoreModel: module {"unet", "extras"}; config {"kind", "tasks", "schedule",
    "pixel_unshuffle", "init_from", "sum_scale", "loss", "degradations"}."""

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def schedule(self):
        """The start's DDPM table (the ddpm kind's schedule; RDDM uses its length)."""
        return schedule_from_config(self.config["schedule"])

    @property
    def prediction(self):
        """The ddpm kind's Prediction (a model saved before the key existed predicts eps)."""
        return PREDICTIONS[self.config.get("prediction", "eps")]

    @property
    def rddm_schedule(self) -> rddm.RDDMSchedule:
        T = int(self.schedule.num_steps)
        return rddm.RDDMSchedule.paper(T, self.config["sum_scale"])

    def switch(self, task: str, n: int) -> torch.Tensor:
        return torch.full((n,), DEGRADATIONS.index(check_degradation(task)), dtype=torch.long)

    @property
    def objective(self) -> str:
        """RDDM's objective (a model saved before the key existed: pred_res_noise)."""
        return self.config.get("objective", "pred_res_noise")

    def rddm_net(self, module=None):
        """``tasks.rddm`` Model: (I_t, t, I_in, cond {'switch'}) -> {'res', 'noise'} (pred_res: {'res'})."""
        module = self.module if module is None else module
        keep_noise = self.objective == "pred_res_noise"

        def net(x, t, x_in, cond):
            out = restore_forward(module, x, x_in, t.to(x.dtype), cond["switch"])
            return {"noise": out[:, :3], "res": out[:, 3:]} if keep_noise else {"res": out[:, 3:]}

        return net

    def denoiser(self, module=None):
        """The ddpm kind as a condiff Denoiser (its ``prediction``), cond {'image': I_in, 'switch'}."""
        module = self.module if module is None else module
        return wrap(
            module,
            self.schedule,
            self.prediction,
            call=lambda net, x, t_in, cond: restore_forward(net, x, cond["image"], t_in, cond["switch"]),
            channels=IMAGE_SHAPE[0],
        )

    @torch.no_grad()
    def restore(
        self,
        x_in: torch.Tensor,
        task: str,
        steps: int | None = None,
        seed: int = 0,
        eta: float = RDDM_ETA,
        threshold: str = DDPM_THRESHOLD,
        solver: str = DDPM_SOLVER,
    ) -> Restoration:
        """Restorations (B, 3, 32, 32) in [-1, 1] of degraded images ``x_in`` by ``steps`` network evaluations
        (default 5): RDDM's sampler (``eta``) from I_in + beta_bar_T eps, or for the ddpm kind a ``solver`` in
        DDPM_SOLVERS from noise, its x0 estimates limited by ``threshold`` (``dense.limited``: dynamic, clip or
        none); noise from ``seed``. The defaults were chosen on validation renders (RDDM_ETA, DDPM_SOLVER,
        DDPM_THRESHOLD)."""
        steps = DEFAULT_STEPS if steps is None else steps
        if solver not in DDPM_SOLVERS:
            raise one_of("solver", solver, DDPM_SOLVERS)
        switch = self.switch(task, x_in.shape[0])
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        if self.kind == "rddm":
            sched = self.rddm_schedule
            calls = [0]
            net = self.rddm_net()

            def counted(x, t, xi, cond):
                calls[0] += 1
                return net(x, t, xi, cond)

            x = rddm.sample(counted, sched, x_in, steps, eta, self.objective, {"switch": switch}, Gaussian(g))
            nfe = calls[0]
        else:
            den = limited(self.denoiser(), threshold)
            grid = make_grid(self.schedule, steps)
            x_T = initial_noise(self.schedule, float(grid[0]), x_in.shape, g)
            res = sample(den, get_solver(solver), grid, x_T, {"image": x_in, "switch": switch})
            x, nfe = res.x, int(res.nfe)
        return Restoration(x.clamp(-1, 1), nfe, time.perf_counter() - t0)

    def save(self, directory, extra: dict | None = None):
        with atomic_dir(Path(directory)) as tmp:
            self.module["unet"].save_pretrained(tmp / "unet")
            self.module["extras"].save_pretrained(tmp / "extras")
            atomic_write_json(tmp / "condiff.json", {FAMILY: self.config, **(extra or {})})


@dataclass(frozen=True)
class Restoration:
    """Restored images (B, 3, H, W) in [-1, 1], the network evaluations they took and the seconds."""

    x: torch.Tensor
    nfe: int
    seconds: float


def degradation_config() -> dict:
    return {"noise_sigma": NOISE_SIGMA, "blur_sigma": BLUR_SIGMA, "blur_radius": BLUR_RADIUS, "box": BOX, "fill": FILL}


def build_restore_model(r: RDDMRecipe) -> RestoreModel:
    start = load_start(r.train.init_from)
    c = start.unet.config.in_channels
    unet = widen_unet(start.unet, 2 * c, 2 * c if r.model.kind == "rddm" else None)
    extras = start_extras(start, len(DEGRADATIONS))
    cfg = {
        "kind": r.model.kind,
        "tasks": list(DEGRADATIONS),
        "schedule": start.schedule_cfg,
        "pixel_unshuffle": start.pixel_unshuffle,
        "init_from": r.train.init_from,
        "sum_scale": r.model.sum_scale,
        "loss": r.model.loss,
        "prediction": r.model.prediction if r.model.kind == "ddpm" else "res_noise",
        "objective": r.model.objective,
        "degradations": degradation_config(),
    }
    return RestoreModel(nn.ModuleDict({"unet": unet, "extras": extras}), cfg)


_CONFIG_TYPES = {
    "kind": str,
    "tasks": list,
    "schedule": dict,
    "pixel_unshuffle": int,
    "sum_scale": float,
    "loss": str,
    "degradations": dict,
}


def resolve_dir(directory) -> Path:
    """A run folder (``runs/rddm-shapes``, its model in ``model/``) or the model folder itself."""
    d = Path(directory)
    return d / "model" if not (d / "condiff.json").is_file() and (d / "model" / "condiff.json").is_file() else d


def check_model_kind(model, method: str, what: str = "--model") -> Path:
    """The model folder of ``model`` (a run folder or its ``model/``) when its condiff.json has an "rddm" table of
    kind ``method``; else one InputFileError naming it (read before any weights)."""
    from condiff.models.dense import table_of

    directory = resolve_dir(model)
    cfg = table_of(directory, FAMILY)
    if not isinstance(cfg, dict):
        example = "runs/rddm-shapes" if method == "rddm" else "runs/ddpm-restore-shapes"
        raise InputFileError(
            f"--method {method} needs {what} to be a trained rddm-family model folder (e.g. {example}); "
            f"{str(model)!r} is not one (no condiff.json with an 'rddm' table)"
        )
    if cfg.get("kind") != method:
        raise InputFileError(
            f"{what} {str(model)!r} is a model of kind {cfg.get('kind')!r}; --method {method} needs kind {method!r}"
        )
    return directory


def load_restore_model(directory, what: str = "--model") -> RestoreModel:
    """A saved rddm-family model (a run folder or its ``model/``); pickled weights are refused, and so is a
    condiff.json whose "rddm" table lacks a key, has one of the wrong type, names another kind or tasks, or was
    trained on other degradations than this version's."""
    directory = resolve_dir(directory)
    info, cfg = saved_table(directory, FAMILY, _CONFIG_TYPES, what)
    if cfg["kind"] == "rddm":  # a model saved before the key existed: rddm predicts residual and noise
        cfg.setdefault("prediction", "res_noise")
    if (
        cfg["kind"] not in KINDS
        or list(cfg["tasks"]) != list(DEGRADATIONS)
        or cfg["pixel_unshuffle"] != PIXEL_UNSHUFFLE
        or cfg["degradations"] != degradation_config()
        or not 0 < cfg["sum_scale"] <= 1
        or cfg.get("prediction", "eps") not in (("res_noise",) if cfg["kind"] == "rddm" else DDPM_PREDICTIONS)
        or cfg.get("objective", "pred_res_noise") not in RDDM_OBJECTIVES
    ):
        raise InputFileError(
            f"{what} {str(directory)!r}: condiff.json's 'rddm' table must have kind one of {', '.join(KINDS)}, "
            f"tasks {list(DEGRADATIONS)}, pixel_unshuffle {PIXEL_UNSHUFFLE}, sum_scale in (0, 1], prediction "
            f"res_noise (rddm) or one of {', '.join(DDPM_PREDICTIONS)} (ddpm), objective one of "
            f"{', '.join(RDDM_OBJECTIVES)} and the degradations "
            f"{degradation_config()}"
        )
    module = load_networks(directory, what)
    unet, extras = module["unet"].config, module["extras"].config
    out = 24 if cfg["kind"] == "rddm" else 12
    if unet.in_channels != 24 or unet.out_channels != out or extras.switches != len(DEGRADATIONS):
        raise InputFileError(
            f"{what} {str(directory)!r}: the networks do not have an {cfg['kind']} model's channels (24 in, {out} "
            f"out) and {len(DEGRADATIONS)} switches"
        )
    return RestoreModel(module, cfg, directory, info)


# training and evaluation --------------------------------------------------------------------------------------
def restore_loss_fn(model: RestoreModel, r: RDDMRecipe):
    """The Trainer's loss: a fresh batch of renders per step from the step's generator, each row's degradation
    drawn at random (``degrade_mixed``). rddm: the L1 (or L2) loss on the objective's targets (residual and noise,
    or the residual alone) at uniform t of the RDDM table; ddpm: the MSE of its prediction (v or eps) at uniform t
    of the start's DDPM table."""
    schedule = model.schedule

    def fn(step, g):
        n = r.train.batch_size
        b = shapes.sample_batch(n, g)
        task = torch.randint(len(DEGRADATIONS), (n,), generator=g)
        x0 = b.images
        x_in = degrade_mixed(x0, task, g)
        if r.model.kind == "rddm":
            sched = model.rddm_schedule
            t = torch.randint(sched.num_steps, (n,), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            x_t = rddm.q_sample(sched, x0, x_in, t, eps)
            out = model.rddm_net()(x_t, t, x_in, {"switch": task})
            target = rddm.targets(x0, x_in, eps, r.model.objective)
            return rddm.loss(out, target, r.model.loss), {}
        t = UniformTime().sample(schedule, n, g)
        eps = torch.randn(x0.shape, generator=g)
        cond = {"image": x_in, "switch": task}
        call = lambda x, t_in, c: restore_forward(model.module, x, c["image"], t_in.to(x.dtype), c["switch"])  # noqa: E731
        return diffusion_loss(call, x0, cond, t, eps, schedule, model.prediction).mean(), {}

    return fn


def heldout_degraded(task: str, n: int, seed: int) -> tuple[shapes.ShapesBatch, torch.Tensor]:
    """n held-out renders (``dense.heldout_batch``) and their degradation by ``task`` (generator seeded from the
    seed and the task)."""
    b = heldout_batch(n, seed)
    g = torch.Generator().manual_seed(7919 * (seed + 1) + DEGRADATIONS.index(check_degradation(task)))
    return b, degrade(b.images, task, g)


@torch.no_grad()
def evaluate_restore(
    model: RestoreModel,
    n: int,
    seed: int = 0,
    steps: int | None = None,
    tasks=DEGRADATIONS,
    batch: int = 256,
    **sampling,
) -> dict:
    """Per degradation on n held-out renders: mean PSNR (and its standard error) of the restorations, the
    labeller's accuracy (every attribute right, and per attribute) against the true attributes, the same for the
    degraded input, the network evaluations and seconds per image. ``sampling``: ``restore``'s eta, threshold,
    solver."""
    res = {}
    for task in tasks:
        b, x_in = heldout_degraded(task, n, seed)
        outs, nfe, secs = [], 0, 0.0
        for i in range(0, n, batch):
            r = model.restore(x_in[i : i + batch], task, steps, seed + i, **sampling)
            outs.append(r.x)
            nfe, secs = r.nfe, secs + r.seconds
        x = torch.cat(outs)
        p, p_in = psnr(x, b.images), psnr(x_in, b.images)
        res[task] = {
            "psnr": float(p.mean()),
            "psnr_se": float(p.std() / n**0.5) if n > 1 else 0.0,
            "accuracy": labeller.accuracy(labeller.label(x), b.attrs),
            "input_psnr": float(p_in.mean()),
            "input_accuracy": labeller.accuracy(labeller.label(x_in.clamp(-1, 1)), b.attrs)["all"],
            "nfe": nfe,
            "seconds_per_image": secs / n,
        }
    return res


def _eval_fn(r: RDDMRecipe):
    def run(model: RestoreModel, ema_module):
        m = dataclasses.replace(model, module=ema_module)
        res = evaluate_restore(m, r.train.eval_n, seed=0, steps=DEFAULT_STEPS)
        out = {}
        for task, v in res.items():
            out[f"{task}_psnr"] = v["psnr"]
            out[f"{task}_accuracy"] = v["accuracy"]["all"]
        return out

    return run


def make_rddm_trainer(r: RDDMRecipe, out_dir, progress: bool = True) -> Trainer:
    """The Trainer for ``r`` (the start from train.init_from; train.threads threads), with PSNR and the labeller's
    accuracy at 5 network evaluations on train.eval_n held-out renders every train.eval_every steps."""
    torch.set_num_threads(r.train.threads)
    torch.manual_seed(r.train.seed)
    model = build_restore_model(r)
    return Trainer(model, r, Path(out_dir), progress=progress, evaluate=_eval_fn(r), loss_fn=restore_loss_fn(model, r))
