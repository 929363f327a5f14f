"""ConPreDiff's context prediction loss (Yang et al. 2023, "Improving Diffusion-Based Image Synthesis with
Context Prediction", NeurIPS: the neighbourhood prediction of sec. 3 with a permutation-invariant distance).

A context decoder on the denoiser's last features predicts, for every position, the values of its neighbours at
several strides. The neighbours of a position form an unordered set, so the loss compares sets: with K values
per set, the squared 1-D Wasserstein-2 distance between the two empirical distributions, which is the mean
squared difference of the sorted values (``set_distance``). It is 0 for any permutation of the true
neighbours. ``neighbours(x, stride)`` gathers the 8 neighbours at a stride (replicate padding at the border).
The decoder is used in training only and removed for sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from condiff.errors import ConfigError, check_int

OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def neighbours(x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 8, H, W): the value at (i + di s, j + dj s) for the 8 offsets (di, dj) in
    ``OFFSETS``, the border replicated."""
    stride = check_int("stride", stride, 1, 1024)
    if x.dim() != 4:
        raise ConfigError(f"neighbours needs (B, C, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    p = F.pad(x, (stride, stride, stride, stride), mode="replicate")
    return torch.stack(
        [
            p[..., stride + di * stride : stride + di * stride + h, stride + dj * stride : stride + dj * stride + w]
            for di, dj in OFFSETS
        ],
        2,
    )


def set_distance(pred: torch.Tensor, true: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Mean over positions of the squared 1-D Wasserstein-2 distance between the sets along ``dim``: the mean
    squared difference of the sorted values. 0 exactly when ``pred`` is a permutation of ``true`` along dim."""
    if pred.shape != true.shape:
        raise ConfigError(
            f"predicted and true neighbour sets must have one shape, got {tuple(pred.shape)} and {tuple(true.shape)}"
        )
    return ((pred.sort(dim=dim).values - true.sort(dim=dim).values) ** 2).mean()


def context_loss(pred: dict[int, torch.Tensor], x0: torch.Tensor) -> torch.Tensor:
    """Sum over strides s of ``set_distance(pred[s], neighbours(x0, s))``; ``pred[s]`` is (B, C, 8, H, W)."""
    if not pred:
        raise ConfigError("context_loss needs predictions for at least one stride")
    return sum(set_distance(p, neighbours(x0, s)) for s, p in sorted(pred.items()))


class ContextHead(torch.nn.Module):
    """The context decoder: a 1x1 convolution from the network's last features (``feature_channels`` at the
    output's resolution) to 8 neighbour values per channel of x0 (``channels``) for each stride."""

    def __init__(self, feature_channels: int, channels: int, strides=(1, 2)):
        super().__init__()
        self.strides = tuple(check_int("stride", s, 1, 1024) for s in strides)
        if not self.strides:
            raise ConfigError("ContextHead needs at least one stride")
        self.channels = check_int("channels", channels, 1)
        self.proj = torch.nn.Conv2d(
            check_int("feature_channels", feature_channels, 1), channels * 8 * len(self.strides), 1
        )
        self.features: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> dict[int, torch.Tensor]:
        b, _, hh, ww = h.shape
        out = self.proj(h).view(b, len(self.strides), self.channels, 8, hh, ww)
        return {s: out[:, k] for k, s in enumerate(self.strides)}


def attach(layer: torch.nn.Module, head: ContextHead):
    """Record ``layer``'s output (the network's last features) in ``head.features`` on every forward, changing
    nothing the network returns; returns the hook handle (``handle.remove()`` detaches it for sampling)."""

    def keep(module, args, output):
        head.features = output

    return layer.register_forward_hook(keep)


class ContextObjective:
    """Ordinary training with ConPreDiff's auxiliary loss: the family's denoising loss on its training batches plus
    ``weight`` times ``context_loss`` of ``head`` on the features the network's forward recorded (``attach``), against
    the clean batch at the network's resolution (``unshuffle``: the family's pixel-unshuffle factor). A Trainer
    ``loss_fn``; the head is trained beside the network and left out of the exported model."""

    def __init__(self, model, head: ContextHead, weight: float, objective, batch_size: int, seed: int, unshuffle=1):
        self.model, self.head, self.weight = model, head, float(weight)
        self.objective, self.batch_size, self.seed, self.unshuffle = objective, batch_size, seed, unshuffle

    def __call__(self, step: int, generator: torch.Generator):
        m = self.model
        x0, raw = m.family.training_batch(step, self.batch_size, generator, self.seed, self.objective)
        self.head.features = None
        loss = m.family.loss(m.module, m.model_cfg, m.schedule, self.objective, x0, raw, generator).mean()
        if self.head.features is None:
            raise ConfigError("the context head's layer did not run in the network's forward")
        target = F.pixel_unshuffle(x0, self.unshuffle) if self.unshuffle > 1 else x0
        ctx = context_loss(self.head(self.head.features), target)
        self.head.features = None  # a graph tensor kept on the module would stop the Trainer's deep copies
        return loss + self.weight * ctx, {"context": float(ctx.detach())}
