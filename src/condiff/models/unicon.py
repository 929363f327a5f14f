"""UniCon on shapes: one joint model of (image, mask) with a time per modality (``condiff.tasks.unicon``), so the same
weights sample image -> mask (the image held clean), mask -> image (the mask held clean) and the joint pair.

The network is a small adapter on the bundled ``shapes`` UNet (``train.init_from``) rather than a new model: conv_in
takes 12 + 4 channels (the image and the mask, each 2x pixel-unshuffled) and conv_out gives 12 + 4, the new
channels zero-initialised; the mask's time enters through diffusers' timestep-condition projection (the UNet's own
sinusoidal features of t_mask, through a zero-initialised linear map, added to the features of t_image before the
time MLP). The caption context is the null caption's encoding (learned from there on). So the start is exactly the
pretrained net, caption-free, on the image, and predicts 0 for the mask. Both branches predict v (the bundled
model's parameterisation) on the cosine VP-discrete schedule.

The mask is one channel, +1 on the object and -1 elsewhere. A recipe (``family = "unicon"``) has [model]
(``p_clean``: the probability that a training row holds the image clean, and the same again for the mask, so the
conditional schemes' exact clean times are trained; the other rows draw both times independently, as UniCon does)
and [train] (condiff's ``TrainConfig``; ``init_from`` the shapes model that starts the run). A saved model is
``unet/``, ``extras/`` and ``condiff.json`` with a "unicon" table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from condiff.core.denoiser import V
from condiff.core.files import atomic_dir, atomic_write_json
from condiff.core.grids import make_grid
from condiff.core.sampling import initial_noise, sample
from condiff.core.schedules import schedule_from_config
from condiff.data import labeller, shapes
from condiff.errors import InputFileError, check_real
from condiff.guidance.cfg import CFG
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
from condiff.solvers import DPMSolverPP2M
from condiff.tasks.lotus import mask_iou, widen_unet
from condiff.tasks.unicon import UniCon, given, guidance_null, sample_times, unicon_loss
from condiff.training.recipe import (
    ObjectiveConfig,
    TaskRecipeDict,
    TrainConfig,
)
from condiff.training.trainer import Trainer

FAMILY = "unicon"
IMAGE_CHANNELS, MAP_CHANNELS = 3, 1
DEFAULT_STEPS = 20
GUIDED_ATTRIBUTES = ("shape", "size", "position")  # what a mask determines (its colour is free)


# recipes ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UniConNetConfig:
    p_clean: float = 0.25  # rows with the image clean; as many again with the mask clean


@dataclass(frozen=True)
class UniConRecipe(TaskRecipeDict):
    name: str
    family: str = FAMILY
    model: UniConNetConfig = field(default_factory=UniConNetConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(init_from="shapes"))
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # unused: the Trainer's field


def unicon_recipe_from_dict(data: dict) -> UniConRecipe:
    """A recipe from its TOML table; unknown keys and bad values are one-line ConfigErrors naming them."""
    r = shapes_start_recipe(UniConRecipe, UniConNetConfig, data, FAMILY)
    check_real("model.p_clean", r.model.p_clean, 0, 0.5)
    return r


# the model ----------------------------------------------------------------------------------------------------
def unicon_forward(module: nn.ModuleDict, x_img, x_map, t_img, t_map) -> tuple[torch.Tensor, torch.Tensor]:
    """(v of the image, v of the mask): the UNet on cat(image, mask) unshuffled at time t_img, with the sinusoidal
    features of t_map through the timestep-condition projection."""
    unet = module["unet"]
    n = x_img.shape[0]
    hidden, pooled = module["extras"].conditioning(n)
    h = torch.cat([unshuffle(x_img), unshuffle(x_map)], 1)
    t_cond = unet.time_proj(torch.as_tensor(t_map).reshape(-1).expand(n)).to(h.dtype)
    out = unet(h, t_img, encoder_hidden_states=hidden, class_labels=pooled, timestep_cond=t_cond).sample
    k = IMAGE_CHANNELS * 4
    return shuffle(out[:, :k]), shuffle(out[:, k:])


def mask_map(masks: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool masks -> (B, 1, H, W) maps, +1 on the object and -1 elsewhere."""
    return (masks.float() * 2 - 1).unsqueeze(1)


@dataclass
class UniConModel(TaskModel):
    """A saved or trained UniConModel: module {"unet", "extras"}; config {"map", "p_clean", "schedule",
    "pixel_unshuffle", "prediction", "init_from"}."""

    @property
    def schedule(self):
        return schedule_from_config(self.config["schedule"])

    @property
    def unicon(self) -> UniCon:
        module = self.module
        return UniCon(
            lambda xa, xb, ta, tb: unicon_forward(module, xa, xb, ta, tb),
            self.schedule,
            V(),
            IMAGE_CHANNELS,
            MAP_CHANNELS,
        )

    def _run(self, denoiser, shape, cond, steps: int, generator) -> tuple[torch.Tensor, int]:
        grid = make_grid(self.schedule, steps)
        x = initial_noise(self.schedule, float(grid[0]), shape, generator)
        out = sample(denoiser, DPMSolverPP2M(), grid, x, cond)
        return out.x, out.nfe

    @torch.no_grad()
    def image_to_map(self, images: torch.Tensor, steps: int = DEFAULT_STEPS, seed: int = 0):
        """(maps (B, 1, H, W) in [-1, 1], NFE): the mask sampled with the image held clean."""
        g = torch.Generator().manual_seed(seed)
        n, _, h, w = images.shape
        x, nfe = self._run(self.unicon.conditional("b"), (n, MAP_CHANNELS, h, w), {"given": images}, steps, g)
        return x.clamp(-1, 1), nfe

    @torch.no_grad()
    def map_to_image(self, maps: torch.Tensor, steps: int = DEFAULT_STEPS, seed: int = 0, guidance: float = 1.0):
        """(images (B, 3, H, W) in [-1, 1], NFE): the image sampled with the mask held clean; ``guidance`` w != 1
        contrasts it with the mask at T (UniCon's CFG-like guidance, through condiff's CFG)."""
        g = torch.Generator().manual_seed(seed)
        n, _, h, w = maps.shape
        den, cond = self.unicon.conditional("a"), given(self.schedule, maps)
        if guidance != 1.0:
            den = CFG(den, guidance)
            cond["null"] = guidance_null(self.schedule, maps, g)
        x, nfe = self._run(den, (n, IMAGE_CHANNELS, h, w), cond, steps, g)
        return x.clamp(-1, 1), nfe

    @torch.no_grad()
    def joint(self, n: int, steps: int = DEFAULT_STEPS, seed: int = 0):
        """(images (n, 3, 32, 32), maps (n, 1, 32, 32), NFE): both sampled together."""
        g = torch.Generator().manual_seed(seed)
        s = shapes.SIZE
        x, nfe = self._run(self.unicon.joint(), (n, IMAGE_CHANNELS + MAP_CHANNELS, s, s), None, steps, g)
        x = x.clamp(-1, 1)
        return x[:, :IMAGE_CHANNELS], x[:, IMAGE_CHANNELS:], nfe

    def save(self, directory, extra: dict | None = None):
        with atomic_dir(Path(directory)) as tmp:
            self.module["unet"].save_pretrained(tmp / "unet")
            self.module["extras"].save_pretrained(tmp / "extras")
            atomic_write_json(tmp / "condiff.json", {FAMILY: self.config, **(extra or {})})


def build_unicon_model(r: UniConRecipe) -> UniConModel:
    start = load_start(r.train.init_from)
    c = start.unet.config
    unet = widen_unet(
        start.unet, c.in_channels + MAP_CHANNELS * 4, c.out_channels + MAP_CHANNELS * 4, c.block_out_channels[0]
    )
    cfg = {
        "map": "mask",
        "p_clean": r.model.p_clean,
        "schedule": start.schedule_cfg,
        "pixel_unshuffle": start.pixel_unshuffle,
        "prediction": "v",
        "init_from": r.train.init_from,
    }
    return UniConModel(nn.ModuleDict({"unet": unet, "extras": start_extras(start, 0)}), cfg)


_CONFIG_TYPES = {"map": str, "schedule": dict, "pixel_unshuffle": int, "prediction": str}


def load_unicon_model(directory, what: str = "--model") -> UniConModel:
    """A saved UniCon model; pickled weights are refused, and so is a condiff.json whose "unicon" table is
    malformed."""
    directory = Path(directory)
    info, cfg = saved_table(directory, FAMILY, _CONFIG_TYPES, what)
    if cfg["map"] != "mask" or cfg["prediction"] != "v" or cfg["pixel_unshuffle"] != 2:
        raise InputFileError(
            f"{what} {str(directory)!r}: condiff.json's 'unicon' table must have map 'mask', prediction 'v' and "
            f"pixel_unshuffle 2"
        )
    module = load_networks(directory, what)
    unet = module["unet"].config
    if unet.in_channels != 16 or unet.out_channels != 16 or unet.time_cond_proj_dim is None:
        raise InputFileError(
            f"{what} {str(directory)!r}: the UNet does not have UniCon's channels (16 in, 16 out) and "
            f"timestep-condition projection"
        )
    return UniConModel(module, cfg, directory, info)


# training and evaluation --------------------------------------------------------------------------------------
def unicon_loss_fn(model: UniConModel, r: UniConRecipe):
    """The Trainer's loss: a fresh batch of renders per step, times per modality (``sample_times`` with
    model.p_clean), v-MSE on both branches (a clean one adds nothing)."""
    schedule = model.schedule

    def fn(step, g):
        b = shapes.sample_batch(r.train.batch_size, g)
        t_a, t_b = sample_times(schedule, r.train.batch_size, g, r.model.p_clean)
        per, metrics = unicon_loss(model.unicon, b.images, mask_map(b.masks), t_a, t_b, g)
        return per.mean(), metrics

    return fn


@torch.no_grad()
def evaluate_unicon(
    model: UniConModel, n: int, seed: int = 0, steps: int = DEFAULT_STEPS, guidance: float = 1.0, batch: int = 256
) -> dict:
    """Scores on n held-out renders (``dense.heldout_batch``) with ``steps`` DPM-Solver++(2M) steps:

    - image -> mask: IoU of the sampled mask (> 0) with the true one;
    - mask -> image: the exact labeller's shape, size and position of the sampled image against the render's (and
      all three right), and the IoU of the labeller's object mask with the given mask;
    - joint: the IoU of the labeller's object mask of each sampled image with its sampled mask (consistency)."""
    b = heldout_batch(n, seed)
    maps, images, joint_img, joint_map = [], [], [], []
    for i in range(0, n, batch):
        maps.append(model.image_to_map(b.images[i : i + batch], steps, seed + i)[0])
        images.append(model.map_to_image(mask_map(b.masks[i : i + batch]), steps, seed + i, guidance)[0])
        ji, jm, _ = model.joint(min(batch, n - i), steps, seed + i)
        joint_img.append(ji), joint_map.append(jm)
    maps, images = torch.cat(maps), torch.cat(images)
    read = labeller.label(images)
    cols = {"shape": 0, "size": 2, "position": 3}
    ok = {k: read[:, c] == b.attrs[:, c] for k, c in cols.items()}
    jm = torch.cat(joint_map)[:, 0] > 0
    return {
        "image_to_map": {"mask_iou": float(mask_iou(maps[:, 0] > 0, b.masks).mean())},
        "map_to_image": {
            **{k: float(v.float().mean()) for k, v in ok.items()},
            "all": float(torch.stack(list(ok.values())).all(0).float().mean()),
            "mask_iou": float(mask_iou(labeller.masks(images), b.masks).mean()),
            "guidance": guidance,
        },
        "joint": {"consistency_iou": float(mask_iou(labeller.masks(torch.cat(joint_img)), jm).mean())},
        "steps": steps,
    }


def _eval_fn(r: UniConRecipe):
    def run(model: UniConModel, ema_module):
        m = dataclasses.replace(model, module=ema_module)
        res = evaluate_unicon(m, r.train.eval_n, seed=0, steps=r.train.eval_steps)
        return {
            "image_to_map_iou": res["image_to_map"]["mask_iou"],
            "map_to_image_all": res["map_to_image"]["all"],
            "map_to_image_iou": res["map_to_image"]["mask_iou"],
            "joint_consistency": res["joint"]["consistency_iou"],
        }

    return run


def make_unicon_trainer(r: UniConRecipe, out_dir, progress: bool = True) -> Trainer:
    """The Trainer for ``r``, with the three directions scored on train.eval_n held-out renders every
    train.eval_every steps."""
    torch.set_num_threads(r.train.threads)
    torch.manual_seed(r.train.seed)
    model = build_unicon_model(r)
    return Trainer(model, r, Path(out_dir), progress=progress, evaluate=_eval_fn(r), loss_fn=unicon_loss_fn(model, r))
