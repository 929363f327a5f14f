"""Lotus: single-step x0-prediction dense prediction (He et al., "Lotus: Diffusion-based Visual Foundation Model for
High-quality Dense Prediction", 2024).

The method, as Lotus-G trains it:

- the timestep is fixed at t = T (``schedule.t_max``); the network sees the image concatenated with the noisy
  annotation x_T = alpha_T y + sigma_T eps (at T nearly pure noise) and outputs the annotation itself
  (x0-prediction: at T an eps-model's x0 estimate (x - sigma eps_hat) / alpha amplifies its errors by
  sigma / alpha, 2e4 on a cosine table);
- the *detail preserver*: a task switcher (a class embedding) picks annotation or reconstruction; half the
  batch predicts the annotation, the other half reconstructs the image from the same input layout; the loss is
  the sum of the two halves' MSEs;
- inference is one network evaluation with the switcher on the annotation (``single_step``).

The start of fine-tuning equals the pretrained network: ``widen_unet`` adds input channels (and output channels,
and diffusers' timestep-condition projection) with zero weights, so the widened network computes exactly what
the pretrained one did on the old channels.

Everything here takes objects: a Denoiser (x0 of the annotation given the noisy annotation, t and a ``cond``
holding the image and the switch), an ``nn.Module``. The families, recipes and data live in ``condiff.models``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from condiff.core.denoiser import check_batch, coefficients
from condiff.errors import ConfigError


# widening a pretrained network --------------------------------------------------------------------------------
def widen_conv(conv: nn.Conv2d, in_channels: int | None = None, out_channels: int | None = None) -> nn.Conv2d:
    """A copy of ``conv`` with ``in_channels`` inputs and ``out_channels`` outputs (None: unchanged), at least as many
    as it had: the old weights in the first channels, zeros in the new ones (a new output's bias is zero too), so on
    inputs whose new channels are anything the old outputs are exactly ``conv``'s and the new outputs are 0."""
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise ConfigError(f"widen_conv needs an nn.Conv2d with groups=1, got {type(conv).__name__}")
    cin = conv.in_channels if in_channels is None else in_channels
    cout = conv.out_channels if out_channels is None else out_channels
    for what, new, old in (("in_channels", cin, conv.in_channels), ("out_channels", cout, conv.out_channels)):
        if isinstance(new, bool) or not isinstance(new, int) or new < old:
            raise ConfigError(f"widen_conv {what} must be an integer >= {old}, got {new!r}")
    w = conv.weight
    out = nn.Conv2d(
        cin,
        cout,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=w.device,
        dtype=w.dtype,
    )
    with torch.no_grad():
        out.weight.zero_()
        out.weight[: conv.out_channels, : conv.in_channels] = w
        if conv.bias is not None:
            out.bias.zero_()
            out.bias[: conv.out_channels] = conv.bias
    return out


def widen_unet(unet, in_channels: int, out_channels: int | None = None, time_cond_proj_dim: int | None = None):
    """A copy of a diffusers UNet (``UNet2DConditionModel`` or ``UNet2DModel``) with ``in_channels`` inputs and
    ``out_channels`` outputs (``widen_conv`` on conv_in and conv_out) and, with ``time_cond_proj_dim``, diffusers'
    timestep-condition projection (``timestep_cond``, added to the sinusoidal time features before the time MLP)
    initialised to zero. Every other weight is copied, so on the old channels, whatever the new inputs and
    ``timestep_cond`` hold, the copy's old outputs equal ``unet``'s exactly and its new outputs are 0."""
    cfg = dict(unet.config)
    out_channels = cfg["out_channels"] if out_channels is None else out_channels
    new_cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    new_cfg.update(in_channels=in_channels, out_channels=out_channels)
    if time_cond_proj_dim is not None:
        if cfg.get("time_cond_proj_dim") is not None:
            raise ConfigError("widen_unet: this UNet already has a timestep-condition projection")
        new_cfg["time_cond_proj_dim"] = time_cond_proj_dim
    wide = type(unet).from_config(new_cfg)
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith(("conv_in.", "conv_out."))}
    missing, unexpected = wide.load_state_dict(state, strict=False)
    extra = [k for k in missing if not k.startswith(("conv_in.", "conv_out.", "time_embedding.cond_proj."))]
    if extra or unexpected:
        raise ConfigError(f"widen_unet: the copy does not match the UNet ({(extra + unexpected)[0]})")
    wide.conv_in = widen_conv(unet.conv_in, in_channels)
    wide.conv_out = widen_conv(unet.conv_out, out_channels=out_channels)
    if time_cond_proj_dim is not None:
        nn.init.zeros_(wide.time_embedding.cond_proj.weight)
    return wide.to(device=unet.device, dtype=unet.dtype)


# training -----------------------------------------------------------------------------------------------------
def fixed_time(schedule, t=None) -> float:
    """Lotus's timestep: ``t`` when given, else the schedule's last time T (``t_max``)."""
    return float(schedule.t_max if t is None else t)


def lotus_loss(denoiser, target: torch.Tensor, cond, generator=None, t=None) -> torch.Tensor:
    """Per-sample MSE of Lotus's x0 objective: the denoiser's x0 estimate at the fixed time ``t`` (default T) from
    x_t = alpha_t target + sigma_t eps against ``target`` itself (the annotation, or the image on the
    reconstruction rows: ``cond`` carries each row's switch)."""
    check_batch(target, "target")
    tt = fixed_time(denoiser.schedule, t)
    a, s = coefficients(denoiser.schedule, tt, target)
    eps = torch.randn(target.shape, generator=generator, dtype=target.dtype).to(target.device)
    x0 = denoiser(a * target + s * eps, tt, cond)
    return (x0 - target).pow(2).flatten(1).mean(1)


@dataclass(frozen=True)
class DetailBatch:
    """A batch laid out for the detail preserver: ``target`` per row (the annotation on the first ``split`` rows, the
    image on the rest), ``switch`` per row (the annotation's task, or the reconstruction switch) and ``split``."""

    target: torch.Tensor
    switch: torch.Tensor
    split: int


def detail_preserver(image: torch.Tensor, annotation: torch.Tensor, task: torch.Tensor, recon: int) -> DetailBatch:
    """Lotus's detail preserver on a batch of n (image, annotation, task) rows: the first ceil(n / 2) rows predict
    their annotation under their task's switch, the other rows reconstruct their image under switch ``recon``. The
    loss is the mean over the first part plus the mean over the second (``detail_loss``)."""
    n = image.shape[0]
    if annotation.shape != image.shape or task.shape != (n,):
        raise ConfigError(
            f"detail_preserver needs annotations shaped like the images {tuple(image.shape)} and one task per row, "
            f"got {tuple(annotation.shape)} and {tuple(task.shape)}"
        )
    k = (n + 1) // 2
    target = torch.cat([annotation[:k], image[k:]])
    switch = torch.cat([task[:k].long(), torch.full((n - k,), int(recon), dtype=torch.long, device=task.device)])
    return DetailBatch(target, switch, k)


def detail_loss(per_sample: torch.Tensor, split: int) -> tuple[torch.Tensor, dict]:
    """(loss, metrics): the annotation rows' mean plus the reconstruction rows' mean (Lotus sums the two)."""
    ann, rec = per_sample[:split], per_sample[split:]
    loss = ann.mean() + (rec.mean() if rec.numel() else per_sample.new_zeros(()))
    ann, rec = ann.detach(), rec.detach()
    return loss, {"annotation": float(ann.mean()), "reconstruction": float(rec.mean()) if rec.numel() else 0.0}


# inference ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SingleStep:
    """Lotus's prediction: ``x0`` (the annotation), the number of network evaluations (1) and the time used."""

    x0: torch.Tensor
    nfe: int
    t: float


def single_step(denoiser, cond, shape, generator=None, t=None, dtype=torch.float32, device=None) -> SingleStep:
    """One network evaluation: x_T = sigma_T z (z ~ N(0, I) from ``generator``, the noisy annotation at T: the
    prior) and the denoiser's x0 estimate there, under ``cond`` (the image and the annotation switch)."""
    if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) >= 2 and all(int(s) > 0 for s in shape)):
        raise ConfigError(f"single_step shape must be (batch, channels, ...) with positive sizes, got {shape!r}")
    tt = fixed_time(denoiser.schedule, t)
    sigma = float(denoiser.schedule.sigma(torch.tensor(tt, dtype=torch.float64)))
    x = sigma * torch.randn(tuple(shape), generator=generator, dtype=dtype)
    x0 = denoiser(x.to(device) if device is not None else x, tt, cond)
    return SingleStep(x0, 1, tt)


# scores -------------------------------------------------------------------------------------------------------
def mask_iou(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per-sample intersection over union of (B, H, W) bool masks (1 where both are empty)."""
    pred, true = pred.bool(), true.bool()
    inter = (pred & true).flatten(1).sum(1).float()
    union = (pred | true).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def depth_errors(pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Depth errors of (B, H, W) maps: ``abs_rel`` mean |pred - true| / true and ``rmse`` on the object's pixels
    (``mask`` and true > 0), ``rmse_all`` over every pixel, ``within_0.05`` the share of object pixels within 0.05."""
    obj = mask.bool() & (true > 0)
    if not bool(obj.any()):
        raise ConfigError("depth_errors needs at least one object pixel with depth > 0")
    d, g = pred[obj].double(), true[obj].double()
    return {
        "abs_rel": float(((d - g).abs() / g).mean()),
        "rmse": float((d - g).pow(2).mean().sqrt()),
        "rmse_all": float((pred.double() - true.double()).pow(2).mean().sqrt()),
        "within_0.05": float(((d - g).abs() <= 0.05).double().mean()),
    }
