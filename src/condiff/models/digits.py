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
K_NEAREST = 3  # precision / recall neighbourhoods (Kynkäänniemi et al.'s default)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


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
        """'7', or as a caption: 'digit 7', 'the digit 7', 'a 7', 'number 7' -> tensor([7])."""
        words = prompt.lower().split() if isinstance(prompt, str) else []
        while len(words) > 1 and words[0] in ("a", "an", "the", "digit", "number"):
            words = words[1:]
        if len(words) != 1 or words[0] not in [str(i) for i in range(10)]:
            spelled = [NUMBER_WORDS.index(w) for w in words if w in NUMBER_WORDS]
            hint = f" (did you mean '{spelled[0]}'?)" if len(spelled) == 1 else ""
            raise ConfigError(f"digits prompt must be a digit 0-9, got {prompt!r}{hint}; e.g. '7' or 'digit 7'")
        return torch.tensor([int(words[0])])

    def captions(self, raw):
        return [str(int(y)) for y in raw.reshape(-1)]

    def random_conditions(self, n, generator):
        y = torch.arange(n) % digits.NUM_CLASSES  # balanced classes
        y = y[torch.randperm(n, generator=generator)]
        return y, y.unsqueeze(1)

    def score(self, images, targets):
        pred = digits.scorer().predict(images)
        return {"class": float((pred == targets[:, 0]).float().mean())}

    def quality(self, images):
        """Fréchet distance (Heusel et al. 2017) and k-NN precision / recall (Kynkäänniemi et al. 2019, k = 3)
        of the samples against the 450 held-out digits, in the scorer's hidden features; None where there are
        too few samples (Fréchet: 2, precision / recall: 4)."""
        from condiff.evaluation.metrics import frechet_distance, precision_recall

        sc = digits.scorer()
        fake, real = sc.features(images), sc.reference_features()
        n = fake.shape[0]
        precision, recall = precision_recall(real, fake, K_NEAREST) if n > K_NEAREST else (None, None)
        return {
            "frechet": frechet_distance(fake, real) if n >= 2 else None,
            "precision": precision,
            "recall": recall,
            "features": f"the digits scorer's 256 hidden units, against {real.shape[0]} held-out digits",
        }

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
