"""Feature injection (Tumanyan, Geyer, Bagon & Dekel, "Plug-and-Play Diffusion Features for Text-Driven
Image-to-Image Translation", CVPR 2023, sec. 4).

While sampling the edit, the source image's own trajectory (its inversion latents at the same times) is
run through the network in the same batch, under the source condition, and the outputs of chosen layers
for the edit's rows are replaced by the source row's. Spatial features of a decoder block carry the
layout (where the object's edges are) and the condition keeps steering the rest (what color it is), so
appearance edits keep the exact shape. Injection runs for the first ``steps`` sampler steps only (the
paper: 80% for features; for structural edits such as shape or position, inject little or nothing).

The hooks are registered for one forward and removed in ``finally``: nothing persists on the network, so
the wrapper nests with CFG or any other guidance, and works with any torch network (diffusers UNets
included), layers named as in ``net.named_modules()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from condiff.core.denoiser import Wrapper, check_cond_rows
from condiff.errors import ConfigError
from condiff.guidance.cfg import batch_cond

SOURCE_NAMES = ("source condition", "condition")  # batch_cond's labels of the [source, edit] layout


def parse_layers(text: str) -> tuple[str, ...]:
    """'a.b, c.d' -> ('a.b', 'c.d'); empty -> ()."""
    if not isinstance(text, str):
        raise ConfigError(f"layers must be a comma-separated string of module names, got {text!r}")
    return tuple(p.strip() for p in text.split(",") if p.strip())


def resolve_layers(net: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """The modules of ``net`` with these dotted names; an unknown name is a one-line error that lists
    some of the accepted ones."""
    table = dict(net.named_modules())
    out = []
    for name in names:
        if name not in table or not name:
            blocks = [n for n in table if n.count(".") <= 3 and ("resnets." in n or "attentions." in n)]
            raise ConfigError(
                f"unknown layer {name!r} for injection; accepted: module names such as {', '.join(blocks[:8])} ..."
            )
        out.append(table[name])
    return out


def network(denoiser) -> nn.Module:
    net = getattr(denoiser, "net", None)
    if not isinstance(net, nn.Module):
        raise ConfigError(
            f"feature injection needs a denoiser over a torch network (a .net module), got {type(denoiser).__name__}"
        )
    return net


@dataclass
class FeatureInjection(Wrapper):
    """Denoiser -> Denoiser. ``source[k]`` is the source latent at ``grid[k]``; injection is active at the
    first ``steps`` grid times. Guidance goes *outside*: ``CFG(FeatureInjection(D, ...), w)``."""

    denoiser: Any
    layers: Sequence[nn.Module]
    grid: torch.Tensor
    source: Sequence[torch.Tensor]
    source_cond: Mapping[str, Any]
    steps: int

    def __post_init__(self):
        if len(self.source):
            b = self.source[0].shape[0]
            check_cond_rows(self.source_cond, b, "source condition", against="the source latent")
        self._latent = {float(t): z for t, z in zip(self.grid, self.source)}
        self._active = {float(t) for t in self.grid[: self.steps]}

    def __call__(self, x, t, cond=None):
        key = float(t) if not isinstance(t, torch.Tensor) or t.dim() == 0 else None
        if key not in self._active or not self.layers:
            return self.denoiser(x, t, cond)
        z = self._latent[key].to(x)
        b = z.shape[0]
        if x.shape[0] % b:
            raise ConfigError(f"feature injection: batch {x.shape[0]} is not a multiple of the source batch {b}")
        reps = x.shape[0] // b

        def hook(module, args, out):
            first = out[0] if isinstance(out, tuple) else out
            src = first[:b]
            new = torch.cat([src] * (reps + 1))
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handles = [m.register_forward_hook(hook) for m in self.layers]
        try:
            conds = [dict(self.source_cond), dict(cond or {})]
            both = self.denoiser(torch.cat([z, x]), t, batch_cond(conds, (b, x.shape[0]), SOURCE_NAMES))
        finally:
            for h in handles:
                h.remove()
        return both[b:]
