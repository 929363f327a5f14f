"""DiT-MoE on shapes: the caption-conditioned shapes task (condiff.data.shapes, captions of slot tokens, scored by
the labeller's per-attribute and ``all`` accuracy) with a Diffusion Transformer whose MLPs are sparse mixtures of
experts (condiff.nets.dit_moe: Fei et al., 2024, Eq. 1-4), or dense SwiGLU MLPs of the same active parameters
(the baseline).

A recipe (``family = "dit_moe"``, registered in condiff.cli.recipe_kinds) has the image recipe's tables: [model]
(``DiTConfig``: the network's sizes; ``experts = 0`` is the dense baseline), [schedule], [objective] and [train]
(condiff's ObjectiveConfig / TrainConfig). Unknown keys and bad values are one-line ConfigErrors naming them.
Training runs condiff's Trainer on the family's own batches and diffusion loss (``ModelFamily.loss``: CFG dropout
of the caption, the objective's prediction), EMA, atomic checkpoints and exact resume; the MoE balance loss enters
the backward pass through the network's pass-through autograd (``AddAuxiliaryLoss``), so the logged loss is the
diffusion loss alone. A saved model is ``unet/`` (the DiTMoE network, safetensors + config.json) and
``condiff.json`` (family "dit_moe", prediction, schedule, model config): a ``LoadedModel`` whose denoiser samples
with every condiff solver and guidance, read back by ``load_dit_model``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from condiff.core.denoiser import as_prediction
from condiff.core.files import load_json, refuse_pickles
from condiff.core.schedules import schedule_from_config
from condiff.data import text
from condiff.errors import ConfigError, InputFileError, check_real
from condiff.models.family import load_pretrained
from condiff.models.loaded import LoadedModel
from condiff.models.shapes import ShapesFamily
from condiff.nets.dit_moe import DiTMoE
from condiff.training.recipe import (
    ObjectiveConfig,
    Recipe,
    TrainConfig,
    check_keys,
    check_name,
    check_objective_train,
    typed_table,
)
from condiff.training.trainer import Trainer

FAMILY = "dit_moe"
MAX_SIZE = 4096  # a bound on every width, depth and count of [model] (a recipe cannot ask for a huge network)


@dataclass(frozen=True)
class DiTConfig:
    patch_size: int = 4
    dim: int = 64
    depth: int = 4
    heads: int = 4
    experts: int = 8  # routed experts E; 0: the dense baseline (one SwiGLU of hidden dense_ratio * dim)
    top_k: int = 2  # K active routed experts per token
    expert_ratio: int = 4  # each expert's SwiGLU hidden size / dim (the paper: 4)
    shared: int = 2  # shared experts, one SwiGLU of hidden shared * shared_ratio * dim (the paper: 2, hidden dim)
    shared_ratio: int = 1
    dense_ratio: int = 10  # the dense baseline's hidden / dim: top_k * expert_ratio + shared * shared_ratio
    alpha: float = 0.01  # the balance loss weight (the paper: 0.01)
    cross_attention: bool = False  # image tokens also attend to the caption's tokens (PixArt-alpha's block)
    rope: bool = False  # 2-D rotary position embedding on the self-attention's queries and keys


def check_dit_config(m: DiTConfig) -> DiTConfig:
    """Value checks of [model] beyond types."""
    size = ShapesFamily.image_shape[1]
    for key in ("patch_size", "dim", "depth", "heads"):
        check_real(f"model.{key}", getattr(m, key), 1, MAX_SIZE)
    for key in ("experts", "shared", "expert_ratio", "shared_ratio", "dense_ratio"):
        check_real(f"model.{key}", getattr(m, key), 0, MAX_SIZE)
    check_real("model.alpha", m.alpha, 0, 1e3)
    if size % m.patch_size:
        raise ConfigError(f"model.patch_size must divide the image size {size}, got {m.patch_size}")
    if m.dim % m.heads or m.dim % 4:
        raise ConfigError(f"model.dim must be a multiple of 4 and of model.heads ({m.heads}), got {m.dim}")
    if m.rope and (m.dim // m.heads) % 4:
        raise ConfigError(
            f"model.rope needs a head size model.dim / model.heads that is a multiple of 4, got {m.dim // m.heads}"
        )
    if m.experts:
        if not 1 <= m.top_k <= m.experts:
            raise ConfigError(f"model.top_k must be in [1, model.experts = {m.experts}], got {m.top_k}")
        if m.expert_ratio < 1:
            raise ConfigError(f"model.expert_ratio must be >= 1 with experts, got {m.expert_ratio}")
        if m.shared and m.shared_ratio < 1:
            raise ConfigError(f"model.shared_ratio must be >= 1 with shared experts, got {m.shared_ratio}")
    elif m.dense_ratio < 1:
        raise ConfigError(f"model.dense_ratio must be >= 1 for the dense baseline (experts = 0), got {m.dense_ratio}")
    return m


def dit_recipe_from_dict(data: dict) -> Recipe:
    """A DiT-MoE recipe from its TOML table; unknown keys and bad values are one-line ConfigErrors naming them."""
    check_keys(data, {"name", "family", "model", "schedule", "objective", "train"}, what=f"{FAMILY} recipe")
    if data["family"] != FAMILY:
        raise ConfigError(f"{FAMILY} recipe family {data['family']!r} is not accepted; accepted: {FAMILY}")
    model = check_dit_config(typed_table(DiTConfig, data.get("model", {}), "model"))
    schedule = data.get("schedule", {"type": "vp_discrete", "beta_schedule": "squaredcos_cap_v2"})
    if not isinstance(schedule, dict):
        raise ConfigError(f"[schedule] must be a table, got {schedule!r}")
    r = Recipe(
        data["name"],
        FAMILY,
        dataclasses.asdict(model),
        schedule,
        typed_table(ObjectiveConfig, data.get("objective", {}), "objective"),
        typed_table(TrainConfig, data.get("train", {}), "train"),
    )
    check_name(r.name)
    check_objective_train(r.objective, r.train)
    if r.train.init_from:
        raise ConfigError(f"train.init_from is not taken by the {FAMILY} family (it trains from scratch)")
    schedule_from_config(r.schedule)
    return r


class DiTShapesFamily(ShapesFamily):
    """The shapes task with a DiT(-MoE) network: the caption enters as the sum of its slot-token embeddings."""

    name = FAMILY

    def build(self, model_cfg):
        return nn.ModuleDict({"unet": DiTMoE(**network_config(model_cfg))})

    def forward(self, module, model_cfg, x, t_in, cond):
        return module["unet"](x, t_in, cond["caption"])

    def encode(self, module, raw):
        return {"caption": module["unet"].embed_caption(raw)}

    def save_parts(self, module, directory: Path):
        module["unet"].save_pretrained(directory / "unet")

    def load_parts(self, directory: Path, model_cfg):
        return nn.ModuleDict({"unet": load_pretrained(DiTMoE, directory / "unet")})


def network_config(model_cfg: dict) -> dict:
    """The DiTMoE constructor arguments of a [model] table (the image and vocabulary sizes from the shapes task)."""
    c, s, _ = ShapesFamily.image_shape
    return {"sample_size": s, "in_channels": c, "vocab_size": text.VOCAB_SIZE, "seq_len": text.SEQ_LEN, **model_cfg}


def build_dit_model(r: Recipe) -> LoadedModel:
    fam = DiTShapesFamily()
    return LoadedModel(
        fam,
        fam.build(r.model),
        schedule_from_config(r.schedule),
        as_prediction(r.objective.prediction),
        dict(r.model),
        None,
        {"schedule_cfg": r.schedule},
    )


def load_dit_model(directory, what: str = "--model") -> LoadedModel:
    """A saved DiT-MoE model folder (pickled weights refused by ``load_pretrained``); one InputFileError for a folder
    that is not one."""
    directory = refuse_pickles(Path(directory), what)
    f = directory / "condiff.json"
    meta = load_json(f) if f.is_file() else None
    if not isinstance(meta, dict) or meta.get("family") != FAMILY:
        raise InputFileError(
            f"{what} {str(directory)!r} is not a {FAMILY} model folder (condiff.json family {FAMILY!r})"
        )
    try:
        model = dataclasses.asdict(check_dit_config(typed_table(DiTConfig, meta.get("model"), "model")))
        schedule, prediction = schedule_from_config(meta.get("schedule")), as_prediction(meta.get("prediction"))
    except ConfigError as e:
        raise InputFileError(f"{what} {str(directory)!r}: condiff.json: {e}") from None
    fam = DiTShapesFamily()
    try:
        module = fam.load_parts(directory, model).eval()
    except InputFileError:
        raise
    except Exception as e:  # diffusers raises many types for missing, truncated or mismatched weights
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise InputFileError(
            f"{what} {str(directory)!r}: cannot load the network ({type(e).__name__}: {first})"
        ) from None
    info = {"schedule_cfg": meta["schedule"], **{k: v for k, v in meta.items() if k not in ("family", "model")}}
    return LoadedModel(fam, module, schedule, prediction, model, directory, info)


def active_parameters(model_cfg: dict) -> dict:
    """Parameters of the network: total, and active per token (the routed experts counted K of E times)."""
    net = DiTMoE(**network_config(model_cfg))
    total = sum(p.numel() for p in net.parameters())
    routed = sum(p.numel() for m in net.moe_layers() for p in m.experts.parameters())
    e, k = model_cfg.get("experts", 8), model_cfg.get("top_k", 2)
    active = total - routed + (routed * k // e if e else 0)
    return {"total": total, "active": active}


def _eval_fn(r: Recipe):
    t = r.train
    if not t.eval_every:
        return None

    def run(model, ema_module):
        from condiff.evaluation.evaluate import evaluate
        from condiff.solvers import DPMSolverPP2M

        m = dataclasses.replace(model, module=ema_module)
        res = evaluate(m, DPMSolverPP2M(), t.eval_steps, t.eval_cfg, t.eval_n, seed=12345)
        return {"accuracy": res["accuracy"], "eval_seconds": res["seconds"]}

    return run


def make_dit_trainer(r: Recipe, out_dir, progress: bool = True) -> Trainer:
    """The Trainer for ``r`` (train.threads threads), with the labeller's accuracy of train.eval_n samples every
    train.eval_every steps."""
    torch.set_num_threads(r.train.threads)
    torch.manual_seed(r.train.seed)
    model = build_dit_model(r)
    return Trainer(model, r, Path(out_dir), progress=progress, evaluate=_eval_fn(r))
