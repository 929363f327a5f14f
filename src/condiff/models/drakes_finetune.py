"""``condiff finetune`` with ``objective = "drakes"``: reward fine-tuning of a token (RADD) model by DRAKES (Wang et
al., ICLR 2025, Eq. 6): maximise E[r(x)] - alpha KL(P_theta^traj || P_pre^traj) through a Gumbel-softmax trajectory of
the model's own sampler, with truncated backpropagation (``condiff.discrete.drakes``). The reward is named here, at
the edge (``REWARDS``); the pretrained model stays frozen as the KL's reference. The result is a token model folder
that ``condiff sample`` and ``eval`` read like any other.

``drakes.sampler = "ordered"`` differentiates through the ordered sampler (left to right, one letter per step,
``sampler_steps`` = the length) instead of tau-leaping; ``drakes.adapter = k`` trains only a zero-initialised
k-letter convolution added to the frozen network's logits (``TokenTransformer(adapter_kernel=k)``), at the recipe's
learning rate.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from condiff.data import dna
from condiff.discrete import NetworkDenoiser, drakes_loss, sample, sample_ordered
from condiff.errors import ConfigError, one_of
from condiff.models.tokens import load_token_model
from condiff.nets.token_transformer import TokenTransformer
from condiff.training.recipe import (
    ObjectiveConfig,
    TrainConfig,
    check_keys,
    check_name,
    check_objective_train,
    check_real,
    typed_table,
)
from condiff.training.trainer import Trainer

REWARDS = {"dna": dna.reward}  # reward name -> (one-hots (B, L, V+1) or ids) -> (B,)
HELDOUT = {"dna": dna.heldout_reward}  # the evaluation's variant, never optimised
SAMPLERS = ("tau-leaping", "ordered")


@dataclass(frozen=True)
class DrakesConfig:
    reward: str = "dna"
    alpha: float = 0.01
    sampler_steps: int = 32
    truncate: int = 8
    tau: float = 0.5
    soft_reward: bool = False  # the reward of the relaxed x_0 for the gradient (drakes_loss)
    sampler: str = "tau-leaping"  # or "ordered": left to right, sampler_steps = the length
    adapter: int = 0  # > 0: train only a zero-initialised convolution of this (odd) size on the frozen network


@dataclass(frozen=True)
class DrakesRecipe:
    name: str
    base: str
    objective: str = "drakes"
    drakes: DrakesConfig = field(default_factory=DrakesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def is_drakes(data) -> bool:
    return isinstance(data, dict) and data.get("objective") == "drakes"


def drakes_recipe_from_dict(data: dict) -> DrakesRecipe:
    check_keys(data, {"name", "base", "objective", "drakes", "train"}, ("name", "base"), "DRAKES recipe")
    r = DrakesRecipe(
        data["name"],
        data["base"],
        "drakes",
        typed_table(DrakesConfig, data.get("drakes", {}), "drakes"),
        typed_table(TrainConfig, data.get("train", {}), "train"),
    )
    check_name(r.name)
    d = r.drakes
    if d.reward not in REWARDS:
        raise one_of("drakes.reward", d.reward, REWARDS)
    check_real("drakes.alpha", d.alpha, 0, 1e6)
    check_real("drakes.sampler_steps", d.sampler_steps, 1, 100_000)
    check_real("drakes.truncate", d.truncate, 1, 100_000)
    check_real("drakes.tau", d.tau, 0, 100, lo_open=True)
    if d.sampler not in SAMPLERS:
        raise one_of("drakes.sampler", d.sampler, SAMPLERS)
    if d.adapter != 0 and (d.adapter < 1 or d.adapter % 2 == 0 or d.adapter > 255):
        raise ConfigError(f"drakes.adapter must be 0 (train all) or an odd size in 1..255, got {d.adapter}")
    check_objective_train(ObjectiveConfig(), r.train)
    return r


@torch.no_grad()
def reward_of(model, reward: str, n: int, steps: int, seed: int, ordered: bool = False) -> dict:
    """Mean optimised and held-out rewards of n samples of a token model: the ordinary cached sampler with ``steps``
    steps, or with ``ordered`` the ordered sampler (left to right)."""
    g = torch.Generator().manual_seed(seed)
    if ordered:
        x, _ = sample_ordered(model.denoiser, n, model.length, generator=g)
    else:
        x, _ = sample(model.denoiser, n, model.length, steps, generator=g)
    r, h = REWARDS[reward](x).double(), HELDOUT[reward](x).double()
    return {"reward": float(r.mean()), "heldout_reward": float(h.mean()), "heldout_se": float(h.std() / n**0.5)}


def with_adapter(model, kernel: int):
    """The model with a zero-initialised ``kernel``-letter adapter on its network, the only trainable part (its
    output equals the model's until the adapter trains)."""
    if model.net.config.adapter_kernel:
        raise ConfigError(f"base {model.path} already has an adapter (kernel {model.net.config.adapter_kernel})")
    config = {k: v for k, v in model.net.config.items() if not k.startswith("_")}  # "_use_default_values" too
    net = TokenTransformer.from_config({**config, "adapter_kernel": kernel})
    missing, unexpected = net.load_state_dict(model.net.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("adapter.") for k in missing), (missing, unexpected)
    net.train().requires_grad_(False)
    net.adapter.requires_grad_(True)
    return dataclasses.replace(model, module=torch.nn.ModuleDict({"net": net}))


def make_drakes_trainer(r: DrakesRecipe, out_dir, progress: bool = True) -> Trainer:
    torch.set_num_threads(r.train.threads)
    model = load_token_model(r.base, "base")
    if model.kind != "radd":
        raise ConfigError(f"base {r.base!r} is a {model.kind!r} model; DRAKES fine-tunes a RADD (diffusion) model")
    if model.family.name != r.drakes.reward:
        raise ConfigError(
            f"reward {r.drakes.reward!r} scores {r.drakes.reward} sequences; base {r.base!r} is a "
            f"{model.family.name} model"
        )
    v, d = model.family.vocab_size, r.drakes
    ordered = d.sampler == "ordered"
    if ordered and d.sampler_steps != model.length:
        raise ConfigError(
            f"drakes.sampler_steps must be the length {model.length} with the ordered sampler, got {d.sampler_steps}"
        )
    # the frozen reference, in train mode like the trained copy so both take the same kernels (at the start the
    # trajectory KL is then exactly 0)
    frozen = copy.deepcopy(model.net).train().requires_grad_(False)
    if d.adapter:
        model = with_adapter(model, d.adapter)
    else:
        model.module.train().requires_grad_(True)
    reward = REWARDS[d.reward]

    def loss_fn(step, g):
        loss, m = drakes_loss(
            NetworkDenoiser(model.net, v),
            NetworkDenoiser(frozen, v),
            reward,
            d.alpha,
            n=r.train.batch_size,
            length=model.length,
            steps=d.sampler_steps,
            tau=d.tau,
            generator=g,
            truncate=d.truncate,
            soft_reward=d.soft_reward,
            ordered=ordered,
        )
        return loss, {"reward": float(m["reward"]), "kl": float(m["kl"])}

    def evaluate(m, ema_module):
        return reward_of(dataclasses.replace(m, module=ema_module), d.reward, 256, d.sampler_steps, 1, ordered)

    return Trainer(model, r, Path(out_dir), progress=progress, evaluate=evaluate, loss_fn=loss_fn)
