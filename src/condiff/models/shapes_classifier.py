"""The shapes_classifier family: an ``AttributeClassifier`` trained on shapes renders, read by classifier
guidance (condiff.guidance.classifier, elucd, ppap).

Two recipes use it: ``shapes-clean-classifier`` (clean renders only, the "off-the-shelf" classifier
of EluCD and PPAP) and ``shapes-noisy-classifier`` (``noise_aware = true``: trained on
x_t = alpha_t x0 + sigma_t eps with t uniform, cross-entropy on every attribute, as ADM's noisy classifier;
Dhariwal & Nichol 2021, sec. 4.1). The schedule in the recipe is the one t refers to: use the diffusion model's.
A trained classifier is saved like a model (``classifier/`` with safetensors, ``condiff.json``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from condiff.core.denoiser import diffuse
from condiff.core.schedules import unit_time
from condiff.data import shapes
from condiff.errors import ConfigError
from condiff.models.family import ModelFamily, load_pretrained
from condiff.nets import AttributeClassifier
from condiff.training.objectives import TIME_SAMPLERS

EVAL_TIMES = (0.0, 0.25, 0.5, 0.75)  # fractions of the schedule's t range


def attribute_loss(net: AttributeClassifier, logits: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy summed over the attribute heads (attrs columns in ``net.head_names`` order)."""
    return sum(
        F.cross_entropy(net.head(logits, name), attrs[:, i], reduction="none") for i, name in enumerate(net.head_names)
    )


class ShapesClassifierFamily(ModelFamily):
    name = "shapes_classifier"
    attributes = tuple(shapes.ATTRIBUTES)
    image_shape = (3, 32, 32)

    def build(self, model_cfg):
        unknown = set(model_cfg) - {"width", "hidden", "noise_aware", "time_dim"}
        if unknown:
            raise ConfigError(
                f"unknown [model] key {sorted(unknown)[0]!r} for a shapes classifier; accepted: "
                f"width, hidden, noise_aware, time_dim"
            )
        heads = [[k, len(v)] for k, v in shapes.ATTRIBUTES.items()]
        return nn.ModuleDict({"classifier": AttributeClassifier(heads=heads, **model_cfg)})

    def training_batch(self, step, n, generator, seed, objective):
        b = shapes.sample_batch(n, generator)
        return b.images, b.attrs

    def loss(self, module, model_cfg, schedule, objective, x0, raw, generator):
        net = module["classifier"]
        if not net.config.noise_aware:
            return attribute_loss(net, net(x0), raw)
        t = TIME_SAMPLERS[objective.time_sampler]().sample(schedule, x0.shape[0], generator)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return attribute_loss(
            net, net(diffuse(schedule, x0, t, eps), unit_time(t, schedule.t_min, schedule.t_max)), raw
        )

    def learning_curve(self, module, schedule, n: int = 512, seed: int = 12345) -> dict:
        """Accuracy per attribute on fresh renders, clean and (noise-aware only) at t in EVAL_TIMES."""
        net = module["classifier"].eval()
        g = torch.Generator().manual_seed(seed)
        b = shapes.sample_batch(n, g)
        eps = torch.randn(b.images.shape, generator=g)
        out = {}
        times = EVAL_TIMES if net.config.noise_aware else (0.0,)
        with torch.no_grad():
            for t in times:
                tt = torch.full((n,), schedule.t_min + t * (schedule.t_max - schedule.t_min), dtype=torch.float64)
                x = b.images if t == 0 else diffuse(schedule, b.images, tt, eps)
                logits = net(x, unit_time(tt, schedule.t_min, schedule.t_max))
                out[f"t={t}"] = {
                    name: float((net.head(logits, name).argmax(1) == b.attrs[:, i]).float().mean())
                    for i, name in enumerate(net.head_names)
                }
        return {"accuracy": out}

    def save_parts(self, module, directory: Path):
        module["classifier"].save_pretrained(directory / "classifier")

    def load_parts(self, directory: Path, model_cfg):
        return nn.ModuleDict({"classifier": load_pretrained(AttributeClassifier, directory / "classifier")})
