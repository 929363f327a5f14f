"""The digits family: a class-conditional UNet2DModel (``num_class_embeds`` = 11; label 10 is null)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from condiff.data import digits
from condiff.errors import ConfigError
from condiff.models.family import ModelFamily, load_pretrained
from condiff.nets import build_unet

NULL = digits.NUM_CLASSES


class DigitsFamily(ModelFamily):
    name = "digits"
    attributes = ("class",)
    image_shape = (1, 16, 16)

    def build(self, model_cfg):
        return nn.ModuleDict({"unet": build_unet("UNet2DModel", model_cfg["unet"])})

    def forward(self, module, model_cfg, x, t_in, cond):
        return module["unet"](x, t_in, class_labels=cond["class_labels"]).sample

    def encode(self, module, raw):
        return {"class_labels": raw}

    def null_raw(self, n):
        return torch.full((n,), NULL, dtype=torch.long)

    def parse_prompt(self, prompt):
        p = prompt.strip()
        if p not in [str(i) for i in range(10)]:
            raise ConfigError(f"digits prompt must be a digit 0-9, got {prompt!r}")
        return torch.tensor([int(p)])

    def random_conditions(self, n, generator):
        y = torch.arange(n) % digits.NUM_CLASSES  # balanced classes
        y = y[torch.randperm(n, generator=generator)]
        return y, y.unsqueeze(1)

    def score(self, images, targets):
        pred = digits.scorer().predict(images)
        return {"class": float((pred == targets[:, 0]).float().mean())}

    def training_batch(self, step, n, generator, seed, objective):
        s = digits.load_split()
        x, y = s["x_train"], s["y_train"]
        if n > x.shape[0]:
            raise ConfigError(f"train.batch_size must be at most the {x.shape[0]} digits training images, got {n}")
        per_epoch = x.shape[0] // n
        epoch, k = divmod(step, per_epoch)
        perm_seed = (seed * 100_003 + epoch) % (2**63 - 1)  # the identity for every seed below ~9e13
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(perm_seed))
        idx = perm[k * n : (k + 1) * n]
        return x[idx], y[idx]

    def load_parts(self, directory: Path, model_cfg):
        from diffusers import UNet2DModel

        return nn.ModuleDict({"unet": load_pretrained(UNet2DModel, directory / "unet")})
