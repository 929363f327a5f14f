"""diffusers networks as condiff Denoisers.

``wrap_diffusers(model, scheduler)`` is ``condiff.core.denoiser.wrap`` with what the scheduler config says: the
VP-discrete schedule of its ``alphas_cumprod``, its ``prediction_type``, and the identity as time input
(condiff's VP-discrete t is diffusers' timestep). The network is held as
``nn.ModuleDict({'unet' or 'transformer': model})``, the layout of condiff's own model families, so layer names
of PAG and feature injection read the same ('mid', 'unet.up_blocks.1.resnets.0'). It is called the way
diffusers' pipelines call it, ``model(x, t, **cond, return_dict=False)[0]``; ``cond`` holds the model's own
keyword arguments (``encoder_hidden_states`` for UNet2DConditionModel, ``class_labels`` for DiT or a class-conditional
UNet2DModel, nothing for an unconditional UNet2DModel). For a network with learned variance (DiT:
``out_channels = 2 in_channels``, Nichol & Dhariwal 2021, sec. 3.1) only the mean prediction, the first
``in_channels`` channels, is used, as diffusers' samplers do.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

from torch import nn

from condiff.core.denoiser import WrappedDenoiser, config_channels, wrap
from condiff.errors import ConfigError
from condiff.interop.schedule import prediction_from_config, schedule_from_scheduler

SUPPORTED = (
    "UNet2DModel",
    "UNet2DConditionModel",
    "DiTTransformer2DModel",
    "PixArtTransformer2DModel",
    "Transformer2DModel",
)


@dataclass(frozen=True)
class DiffusersCall:
    """``call`` for ``wrap``: runs ``net[key]`` (a diffusers model) with keyword conditions and keeps
    ``channels`` output channels (None: all)."""

    key: str = "unet"
    channels: int | None = None

    def __call__(self, net, x, t_in, cond):
        model = net[self.key]
        accepted = forward_keywords(type(model))
        kwargs = {k: v for k, v in dict(cond or {}).items() if accepted is None or k in accepted}
        out = model(x, t_in, **kwargs, return_dict=False)[0]
        return out if self.channels is None or out.shape[1] == self.channels else out[:, : self.channels]


@functools.lru_cache(maxsize=None)
def forward_keywords(cls) -> frozenset | None:
    """The keyword arguments ``cls.forward`` takes (None when it takes any). Condition entries that are not
    among them, such as the null condition CFG reads or a classifier's target, never reach the network."""
    params = inspect.signature(cls.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


def part_name(model) -> str:
    """'unet' for diffusers UNets, 'transformer' for transformers (the pipeline folder's names)."""
    return "unet" if type(model).__name__.startswith("UNet") else "transformer"


def mean_channels(model) -> int | None:
    """The number of output channels that hold the prediction (``in_channels`` when the model also outputs
    a learned variance), or None when every output channel does."""
    cfg = model.config
    cin, cout = cfg.get("in_channels"), cfg.get("out_channels")
    if cin is not None and cout is not None and cout == 2 * cin:
        return int(cin)
    return None


def wrap_diffusers(model, scheduler) -> WrappedDenoiser:
    """A condiff Denoiser over a diffusers UNet or transformer, with schedule and prediction from ``scheduler``."""
    name = type(model).__name__
    if name not in SUPPORTED:
        raise ConfigError(f"cannot wrap a {name}; supported diffusers models: {', '.join(SUPPORTED)}")
    key = part_name(model)
    return wrap(
        nn.ModuleDict({key: model}),
        schedule_from_scheduler(scheduler),
        prediction_from_config(scheduler.config),
        time_input=lambda t: t,
        call=DiffusersCall(key, mean_channels(model)),
        channels=config_channels(model),
    )
