"""x4 super-resolution on shapes: 32x32 renders from their 8x8 low-resolution versions, by a conditional diffusion
model sampled with a deterministic solver, so that the output is a function ``x_0 = F(x_T, y)`` of the start noise
x_T and the low-resolution image y (the setting of Ma et al., ICLR 2024, whose shared boundary condition
``condiff.tasks.boundary`` searches).

The low-resolution image is the 4x4 box average of the render (``degrade``); the network sees it upsampled back to
32x32 (``upsample``: bicubic, clipped to [-1, 1], or nearest), concatenated on the channels with the noisy image,
as ``condiff.models.dense`` conditions its maps on the image. The start is the bundled ``shapes`` UNet
(``train.init_from``): conv_in widened from 12 to 24 channels with zero weights (``tasks.lotus.widen_unet``), the
null caption's encoding as learned context (``dense.start_extras``), v-prediction on the bundled model's cosine
schedule; so the start computes exactly the unconditional shapes model and fine-tuning teaches it to read y.

A recipe (``family = "sr"``) has [model] (``upsample``: bicubic | nearest) and [train] (condiff's ``TrainConfig``;
``init_from`` the shapes model that starts the run). A saved model is ``unet/``, ``extras/`` and ``condiff.json``
with an "sr" table; ``make_sr_trainer`` trains one with condiff's Trainer (EMA, atomic checkpoints, exact resume).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from condiff.core.denoiser import V, wrap
from condiff.core.files import atomic_dir, atomic_write_json, load_tensors, save_tensors
from condiff.core.grids import make_grid
from condiff.core.sampling import initial_noise, sample
from condiff.core.schedules import schedule_from_config
from condiff.data import labeller, shapes
from condiff.errors import ConfigError, InputFileError, check_int, one_of
from condiff.evaluation.editbench import psnr
from condiff.models.dense import (
    heldout_batch,
    load_networks,
    load_start,
    saved_table,
    shapes_start_recipe,
    shuffle,
    start_extras,
    unshuffle,
)
from condiff.models.family import TaskModel
from condiff.solvers import DDIM, DPMSolverPP2M
from condiff.tasks.boundary import BoundarySearch, search_boundary
from condiff.tasks.lotus import widen_unet
from condiff.training.objectives import UniformTime, diffusion_loss
from condiff.training.recipe import ObjectiveConfig, TaskRecipeDict, TrainConfig
from condiff.training.trainer import Trainer

FAMILY = "sr"
FACTOR = 4  # 32x32 from 8x8
LOW = shapes.SIZE // FACTOR
CHANNELS = 3
UPSAMPLERS = ("bicubic", "nearest")
SOLVERS = ("ddim", "dpmpp2m")  # deterministic: DDIM with eta 0, DPM-Solver++(2M)
DEFAULT_STEPS = 10
DEFAULT_SOLVER = "dpmpp2m"
DEFAULT_CANDIDATES = 64  # K candidate starts of the search
DEFAULT_VALIDATION = 64  # R validation pairs they are scored on
# generators of the search's renders and noises, apart from the Trainer's (seed, step) streams and from the held-out
# renders (``dense.heldout_batch``: 2**41 + seed) the searched start is judged on
VALIDATION_SEED_OFFSET = 2**42
CANDIDATE_SEED_OFFSET = 2**43
XT_FORMAT = "condiff-sr-xT"


# the degradation ----------------------------------------------------------------------------------------------
def degrade(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) images -> (B, 3, 8, 8): the mean of each 4x4 block."""
    return F.avg_pool2d(images, FACTOR)


def upsample(low: torch.Tensor, mode: str = "bicubic") -> torch.Tensor:
    """(B, 3, h, w) -> (B, 3, 4h, 4w): bicubic (clipped to [-1, 1]) or nearest."""
    if mode not in UPSAMPLERS:
        raise one_of("upsample", mode, UPSAMPLERS)
    if mode == "nearest":
        return F.interpolate(low, scale_factor=FACTOR, mode="nearest")
    return F.interpolate(low, scale_factor=FACTOR, mode="bicubic", align_corners=False).clamp(-1, 1)


# recipes ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SRNetConfig:
    upsample: str = "bicubic"  # how the 8x8 image is brought to 32x32 before it is concatenated


@dataclass(frozen=True)
class SRRecipe(TaskRecipeDict):
    name: str
    family: str = FAMILY
    model: SRNetConfig = field(default_factory=SRNetConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(init_from="shapes"))
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # unused: the Trainer's field


def sr_recipe_from_dict(data: dict) -> SRRecipe:
    """A recipe from its TOML table; unknown keys and bad values are one-line ConfigErrors naming them."""
    r = shapes_start_recipe(SRRecipe, SRNetConfig, data, FAMILY)
    if r.model.upsample not in UPSAMPLERS:
        raise one_of("model.upsample", r.model.upsample, UPSAMPLERS)
    return r


# the model ----------------------------------------------------------------------------------------------------
def sr_forward(module: nn.ModuleDict, x, t_in, up) -> torch.Tensor:
    """The network: UNet(cat(x, upsampled y) unshuffled, t, null context) shuffled back (v of x)."""
    hidden, pooled = module["extras"].conditioning(x.shape[0])
    h = torch.cat([unshuffle(x), unshuffle(up)], 1)
    return shuffle(module["unet"](h, t_in, encoder_hidden_states=hidden, class_labels=pooled).sample)


def check_solver(name: str) -> str:
    if name not in SOLVERS:
        raise one_of("solver", name, SOLVERS)
    return name


def make_solver(name: str):
    """The deterministic solver ``name`` (one of ``SOLVERS``)."""
    return DDIM(eta=0.0) if check_solver(name) == "ddim" else DPMSolverPP2M()


def check_low(low, what: str = "low-resolution images") -> torch.Tensor:
    """(B, 3, 8, 8) floating images; else one ConfigError."""
    if not isinstance(low, torch.Tensor) or low.dim() != 4 or tuple(low.shape[1:]) != (CHANNELS, LOW, LOW):
        got = tuple(low.shape) if isinstance(low, torch.Tensor) else type(low).__name__
        raise ConfigError(f"{what} must be (B, {CHANNELS}, {LOW}, {LOW}) images, got {got}")
    return low.float()


@dataclass
class SRModel(TaskModel):
    """A saved or trained SRModel: module {"unet", "extras"}; config {"upsample", "factor", "schedule",
    "pixel_unshuffle", "prediction", "init_from"}."""

    @property
    def schedule(self):
        return schedule_from_config(self.config["schedule"])

    @property
    def denoiser(self):
        """x0 of the 32x32 image given the noisy image, t and cond {'up': the upsampled 8x8 image} (v-model)."""
        return wrap(
            self.module,
            self.schedule,
            V(),
            call=lambda net, x, t_in, cond: sr_forward(net, x, t_in, cond["up"]),
            channels=CHANNELS,
        )

    def condition(self, low: torch.Tensor) -> dict:
        """The cond mapping of (B, 3, 8, 8) low-resolution images."""
        return {"up": upsample(check_low(low), self.config["upsample"])}

    def grid(self, steps: int = DEFAULT_STEPS) -> torch.Tensor:
        return make_grid(self.schedule, check_int("steps", steps, lo=1, hi=1000))

    def random_start(self, n: int, steps: int = DEFAULT_STEPS, seed: int = 0) -> torch.Tensor:
        """(n, 3, 32, 32) start noises x_T drawn from the prior at the grid's first time, from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        return initial_noise(self.schedule, float(self.grid(steps)[0]), (n, CHANNELS, shapes.SIZE, shapes.SIZE), g)

    @torch.no_grad()
    def upscale(
        self,
        low: torch.Tensor,
        x_T: torch.Tensor | None = None,
        steps: int = DEFAULT_STEPS,
        solver: str = DEFAULT_SOLVER,
        seed: int = 0,
        batch: int = 256,
    ) -> torch.Tensor:
        """(B, 3, 32, 32) in [-1, 1] from (B, 3, 8, 8): the deterministic ``solver`` from ``x_T`` (one (3, 32, 32)
        start shared by every image, or (B, 3, 32, 32)); None draws one start per image from ``seed``."""
        low = check_low(low)
        n = low.shape[0]
        if x_T is None:
            x_T = self.random_start(n, steps, seed)
        elif x_T.dim() == 3:
            x_T = x_T.unsqueeze(0).expand(n, -1, -1, -1)
        if tuple(x_T.shape) != (n, CHANNELS, shapes.SIZE, shapes.SIZE):
            raise ConfigError(f"x_T must be (3, 32, 32) or ({n}, 3, 32, 32), got {tuple(x_T.shape)}")
        den, sol, grid = self.denoiser, make_solver(solver), self.grid(steps)
        out = []
        for i in range(0, n, batch):
            cond = self.condition(low[i : i + batch])
            out.append(sample(den, sol, grid, x_T[i : i + batch].float().contiguous(), cond).x)
        return torch.cat(out).clamp(-1, 1)

    def save(self, directory, extra: dict | None = None):
        with atomic_dir(Path(directory)) as tmp:
            self.module["unet"].save_pretrained(tmp / "unet")
            self.module["extras"].save_pretrained(tmp / "extras")
            atomic_write_json(tmp / "condiff.json", {FAMILY: self.config, **(extra or {})})


def build_sr_model(r: SRRecipe) -> SRModel:
    start = load_start(r.train.init_from)
    unet = widen_unet(start.unet, 2 * start.unet.config.in_channels)
    cfg = {
        "upsample": r.model.upsample,
        "factor": FACTOR,
        "schedule": start.schedule_cfg,
        "pixel_unshuffle": start.pixel_unshuffle,
        "prediction": "v",
        "init_from": r.train.init_from,
    }
    return SRModel(nn.ModuleDict({"unet": unet, "extras": start_extras(start, 0)}), cfg)


_CONFIG_TYPES = {"upsample": str, "factor": int, "schedule": dict, "pixel_unshuffle": int, "prediction": str}


def load_sr_model(directory, what: str = "--model") -> SRModel:
    """A saved SR model; pickled weights are refused, and so is a condiff.json whose "sr" table is malformed."""
    directory = Path(directory)
    info, cfg = saved_table(directory, FAMILY, _CONFIG_TYPES, what)
    if (
        cfg["upsample"] not in UPSAMPLERS
        or cfg["factor"] != FACTOR
        or cfg["prediction"] != "v"
        or cfg["pixel_unshuffle"] != 2
    ):
        raise InputFileError(
            f"{what} {str(directory)!r}: condiff.json's 'sr' table must have upsample one of "
            f"{', '.join(UPSAMPLERS)}, factor {FACTOR}, prediction 'v' and pixel_unshuffle 2"
        )
    module = load_networks(directory, what)
    unet = module["unet"].config
    if unet.in_channels != 24 or unet.out_channels != 12:
        raise InputFileError(
            f"{what} {str(directory)!r}: the UNet does not have an SR model's channels (24 in, 12 out)"
        )
    return SRModel(module, cfg, directory, info)


# training and evaluation --------------------------------------------------------------------------------------
def sr_loss_fn(model: SRModel, r: SRRecipe):
    """The Trainer's loss: a fresh batch of renders per step, their 8x8 versions as the condition, v-MSE at
    uniform t."""
    schedule = model.schedule

    def fn(step, g):
        b = shapes.sample_batch(r.train.batch_size, g)
        up = upsample(degrade(b.images), r.model.upsample)
        t = UniformTime().sample(schedule, b.images.shape[0], g)
        eps = torch.randn(b.images.shape, generator=g)
        call = lambda x, t_in, c: sr_forward(model.module, x, t_in.to(x.dtype), c)  # noqa: E731
        return diffusion_loss(call, b.images, up, t, eps, schedule, V()).mean(), {}

    return fn


def attribute_accuracy(images: torch.Tensor, attrs: torch.Tensor) -> dict:
    """The exact labeller's shape, colour, size, position of ``images`` against ``attrs``, and all four."""
    read = labeller.label(images)
    ok = read == attrs
    names = ("shape", "color", "size", "position")
    return {**{k: float(ok[:, i].float().mean()) for i, k in enumerate(names)}, "all": float(ok.all(1).float().mean())}


@torch.no_grad()
def evaluate_sr(model: SRModel, n: int, seed: int = 0, steps: int = DEFAULT_STEPS, x_T=None) -> dict:
    """PSNR (dB, mean) and attribute accuracy on n held-out renders (``dense.heldout_batch``), random starts from
    ``seed`` (or the shared ``x_T``); the bicubic upsampling's PSNR beside it."""
    b = heldout_batch(n, seed)
    low = degrade(b.images)
    hi = model.upscale(low, x_T, steps, seed=seed)
    return {
        "psnr": float(psnr(hi, b.images).mean()),
        "bicubic_psnr": float(psnr(upsample(low), b.images).mean()),
        "accuracy": attribute_accuracy(hi, b.attrs),
        "steps": steps,
    }


def _eval_fn(r: SRRecipe):
    def run(model: SRModel, ema_module):
        m = dataclasses.replace(model, module=ema_module)
        res = evaluate_sr(m, r.train.eval_n, seed=0, steps=r.train.eval_steps)
        return {"psnr": res["psnr"], "accuracy_all": res["accuracy"]["all"]}

    return run


def make_sr_trainer(r: SRRecipe, out_dir, progress: bool = True) -> Trainer:
    """The Trainer for ``r``, with PSNR and attribute accuracy on train.eval_n held-out renders every
    train.eval_every steps."""
    torch.set_num_threads(r.train.threads)
    torch.manual_seed(r.train.seed)
    model = build_sr_model(r)
    return Trainer(model, r, Path(out_dir), progress=progress, evaluate=_eval_fn(r), loss_fn=sr_loss_fn(model, r))


# the shared start (Ma et al. 2024; condiff.tasks.boundary) ----------------------------------------------------
def validation_batch(n: int, seed: int = 0) -> shapes.ShapesBatch:
    """n renders from a generator seeded ``VALIDATION_SEED_OFFSET + seed``: the search's reference pairs."""
    return shapes.sample_batch(n, torch.Generator().manual_seed(VALIDATION_SEED_OFFSET + seed))


@torch.no_grad()
def search_start(
    model: SRModel,
    candidates: int = DEFAULT_CANDIDATES,
    n_val: int = DEFAULT_VALIDATION,
    steps: int = DEFAULT_STEPS,
    solver: str = DEFAULT_SOLVER,
    seed: int = 0,
    batch: int = 256,
    progress=None,
) -> BoundarySearch:
    """The shared x_T of highest mean PSNR on ``n_val`` validation renders (``validation_batch``) among
    ``candidates`` prior draws (from ``CANDIDATE_SEED_OFFSET + seed``), each upscaled from the renders' 8x8
    versions with ``steps`` steps of the deterministic ``solver``."""
    check_int("candidates", candidates, lo=1, hi=100_000)
    check_int("validation pairs", n_val, lo=1, hi=100_000)
    b = validation_batch(n_val, seed)
    cands = model.random_start(candidates, steps, CANDIDATE_SEED_OFFSET + seed)
    return search_boundary(
        model.denoiser,
        make_solver(solver),
        model.grid(steps),
        model.condition,
        degrade(b.images),
        b.images,
        psnr,
        cands,
        batch,
        progress,
    )


def save_start(path, x_T: torch.Tensor, steps: int, solver: str, upsample_mode: str) -> Path:
    """Write a shared start as safetensors ({"x_T": (3, 32, 32)}), the sampler it was searched for in the metadata."""
    meta = {"format": XT_FORMAT, "steps": str(steps), "solver": solver, "upsample": upsample_mode}
    return save_tensors(path, {"x_T": x_T.float()}, meta)


def load_start_file(path, what: str = "--xT") -> tuple[torch.Tensor, int, str]:
    """(x_T (3, 32, 32), steps, solver) of a file ``save_start`` wrote; pickles refused, anything else one
    InputFileError naming the file and what is accepted."""
    from safetensors import safe_open

    path = Path(path)
    try:
        tensors = load_tensors(path, what)
    except InputFileError as e:
        raise InputFileError(f"{what}: {e}") from None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    x = tensors.get("x_T")
    accepted = f"a {XT_FORMAT} safetensors file from `condiff sr search` (x_T (3, 32, 32), steps, solver)"
    steps, solver = meta.get("steps", ""), meta.get("solver", "")
    if (
        meta.get("format") != XT_FORMAT
        or set(tensors) != {"x_T"}
        or x is None
        or tuple(x.shape) != (CHANNELS, shapes.SIZE, shapes.SIZE)
        or not x.dtype.is_floating_point
        or not bool(torch.isfinite(x).all())
        or not steps.isdigit()
        or not 1 <= int(steps) <= 1000
        or solver not in SOLVERS
    ):
        raise InputFileError(f"{what} {str(path)!r} is not {accepted}")
    return x.float(), int(steps), solver
