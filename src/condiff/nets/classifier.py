"""A small attribute classifier for 32x32 images, clean or noise-aware.

Four strided 3x3 convolutions with GroupNorm and ``nn.ReLU`` modules (so EluCD's Softplus smoothing can swap
them, and peft's LoRA can target every ``nn.Conv2d``/``nn.Linear``), a flattened 4x4 map (position needs the
layout, so no global pooling) and one linear head per attribute, concatenated. The noise-aware variant adds a
time embedding (sinusoidal features of t -> MLP) to every block, as ADM's noisy classifier does (Dhariwal &
Nichol 2021, sec. 4.1); the clean variant ignores t.

It is a diffusers ``ModelMixin``, so ``save_pretrained``/``from_pretrained`` write and read safetensors.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (frequencies 1 .. 1000), (B, dim)."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, dtype=torch.float32))
    arg = t.reshape(-1, 1).float() * freqs * math.pi
    return torch.cat([torch.sin(arg), torch.cos(arg)], 1)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, tdim: int | None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.norm = nn.GroupNorm(8, cout)
        self.act = nn.ReLU()
        self.temb = nn.Linear(tdim, cout) if tdim else None

    def forward(self, h, temb):
        h = self.norm(self.conv(h))
        if self.temb is not None:
            h = h + self.temb(temb)[:, :, None, None]
        return self.act(h)


class AttributeClassifier(ModelMixin, ConfigMixin):
    """logits = net(x, t): (B, sum(heads)); ``head(logits, name)`` slices one attribute's logits."""

    @register_to_config
    def __init__(
        self,
        heads: list | dict | None = None,
        in_channels: int = 3,
        width: int = 32,
        hidden: int = 128,
        noise_aware: bool = False,
        time_dim: int = 64,
        sample_size: int = 32,
    ):
        super().__init__()
        # (name, size) pairs, kept as a list: diffusers writes config dicts with sorted keys, which would
        # reorder a dict of heads on reload
        heads = heads or [["shape", 3], ["color", 6], ["size", 2], ["position", 9]]
        pairs = list(heads.items()) if isinstance(heads, dict) else [tuple(p) for p in heads]
        self.register_to_config(heads=[[str(k), int(v)] for k, v in pairs])
        self.head_names = [str(k) for k, _ in pairs]
        self.head_sizes = [int(v) for _, v in pairs]
        tdim = time_dim if noise_aware else None
        self.time_mlp = (
            nn.Sequential(nn.Linear(time_dim, time_dim), nn.ReLU(), nn.Linear(time_dim, time_dim))
            if noise_aware
            else None
        )
        w = width
        self.blocks = nn.ModuleList(
            [
                _Block(in_channels, w, 1, tdim),
                _Block(w, 2 * w, 2, tdim),
                _Block(2 * w, 2 * w, 2, tdim),
                _Block(2 * w, 2 * w, 2, tdim),
            ]
        )
        side = sample_size // 8
        self.fc = nn.Linear(2 * w * side * side, hidden)
        self.act = nn.ReLU()
        self.out = nn.Linear(hidden, sum(self.head_sizes))

    def forward(self, x: torch.Tensor, t=None) -> torch.Tensor:
        return self.out(self.act(self.features(x, t)))

    def features(self, x: torch.Tensor, t=None) -> torch.Tensor:
        """The penultimate layer before its ReLU (B, hidden; no dead, constant units): the feature space of
        ``condiff.evaluation.metrics.frechet_distance``."""
        temb = None
        if self.time_mlp is not None:
            if t is None:
                raise ValueError("a noise-aware classifier needs t")
            t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
            temb = self.time_mlp(time_features(t, self.config.time_dim))
        h = x
        for block in self.blocks:
            h = block(h, temb)
        return self.fc(h.flatten(1))

    def head(self, logits: torch.Tensor, name: str) -> torch.Tensor:
        """The logits of attribute ``name`` (B, C_name)."""
        if name not in self.head_names:
            from condiff.errors import one_of

            raise one_of("classifier attribute", name, self.head_names)
        i = self.head_names.index(name)
        start = sum(self.head_sizes[:i])
        return logits[:, start : start + self.head_sizes[i]]
