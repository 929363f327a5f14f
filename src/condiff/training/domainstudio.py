"""DomainStudio's few-shot adaptation losses (Zhu et al. 2023, "DomainStudio: Fine-Tuning Diffusion Models for
Domain-Driven Image Generation using Limited Data": the relative-distance preservation loss and the
high-frequency losses of its sec. 3).

- ``haar2(x)`` / ``ihaar2(bands)``: the one-level orthonormal 2-D Haar transform of images (B, C, H, W), H and W
  even. Bands LL, LH, HL, HH are (a + b + c + d)/2, (a - b + c - d)/2, (a + b - c - d)/2, (a - b - c + d)/2 of each
  2x2 block [[a, b], [c, d]]; the inverse is the same matrix (it is symmetric and orthogonal), so the round trip
  is exact wherever the sums are (dyadic values) and within one rounding elsewhere.
- ``high_frequency(x)``: LH + HL + HH, the paper's hf(.).
- ``relative_distance_kl(adapted, source)``: for each anchor i of a batch, the softmax over j != i of the
  cosine similarities between flattened samples, p_i^a and p_i^s; the loss is sum_i KL(p_i^a || p_i^s). It is 0
  when the adapted model's x0 estimates are the source's (or any rescaling of them), and keeps the adapted
  samples as different from each other as the source's were.
- ``hf_mse(adapted, target)``: MSE of the high-frequency bands, which learns the target domain's detail.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from condiff.errors import ConfigError


def _blocks(x: torch.Tensor):
    if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ConfigError(f"the Haar transform needs (B, C, H, W) with H and W even, got shape {tuple(x.shape)}")
    return x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]


def haar2(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, H/2, W/2): the LL, LH, HL, HH bands."""
    a, b, c, d = _blocks(x)
    return torch.stack([a + b + c + d, a - b + c - d, a + b - c - d, a - b - c + d], 1) / 2


def ihaar2(bands: torch.Tensor) -> torch.Tensor:
    """The inverse of ``haar2``: (B, 4, C, h, w) -> (B, C, 2h, 2w)."""
    if bands.dim() != 5 or bands.shape[1] != 4:
        raise ConfigError(f"Haar bands must have shape (B, 4, C, h, w), got {tuple(bands.shape)}")
    ll, lh, hl, hh = bands.unbind(1)
    out = bands.new_empty(ll.shape[0], ll.shape[1], 2 * ll.shape[2], 2 * ll.shape[3])
    out[..., 0::2, 0::2] = (ll + lh + hl + hh) / 2
    out[..., 0::2, 1::2] = (ll - lh + hl - hh) / 2
    out[..., 1::2, 0::2] = (ll + lh - hl - hh) / 2
    out[..., 1::2, 1::2] = (ll - lh - hl + hh) / 2
    return out


def high_frequency(x: torch.Tensor) -> torch.Tensor:
    """LH + HL + HH of ``haar2``: (B, C, H/2, W/2)."""
    bands = haar2(x)
    return bands[:, 1] + bands[:, 2] + bands[:, 3]


def relative_distance_kl(adapted: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """sum_i KL(p_i^a || p_i^s), p_i the softmax over j != i of cosine similarities within the batch; source
    is treated as fixed (no gradient)."""
    if adapted.shape != source.shape or adapted.shape[0] < 2:
        raise ConfigError(
            f"the relative-distance loss needs two batches of one shape with at least 2 samples, got "
            f"{tuple(adapted.shape)} and {tuple(source.shape)}"
        )
    n = adapted.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=adapted.device)

    def log_p(x):
        z = F.normalize(x.flatten(1), dim=1)
        sim = (z @ z.T)[off].view(n, n - 1)
        return F.log_softmax(sim, dim=1)

    la, ls = log_p(adapted), log_p(source.detach())
    return (la.exp() * (la - ls)).sum()


def hf_mse(adapted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between the high-frequency bands of the adapted x0 estimates and of the target images."""
    return F.mse_loss(high_frequency(adapted), high_frequency(target))
