"""Diffusion-DPO's objective (Wallace et al. 2024, "Diffusion Model Alignment Using Direct Preference
Optimization", CVPR; eq. 14, with its constant T w(lambda_t) folded into beta as the authors' code does).

Each row is a preference pair (condition c, winner x^w, loser x^l) noised with one shared time t and one shared
noise. With the per-sample denoising errors of the model being trained, e_theta^{w,l}, and of the frozen
reference, e_ref^{w,l} (each the mean over the sample of the squared error of the prediction target),

    inside = -(beta / 2) [(e_theta^w - e_theta^l) - (e_ref^w - e_ref^l)],    L = -mean log sigmoid(inside).

``implicit accuracy`` is the share of pairs with inside > 0 (the model prefers the winner more than the
reference does). With theta = ref every inside is 0: L = log 2 exactly and the implicit accuracy is 0. The SFT
baseline of the paper is the plain denoising loss on the winners alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from condiff.errors import ConfigError, is_real


@dataclass(frozen=True)
class DPOTerms:
    """The loss (a 0-d tensor, differentiable) and what the paper logs: implicit accuracy and the mean errors."""

    loss: torch.Tensor
    implicit_accuracy: float
    model_error: float
    reference_error: float


def dpo_loss(
    e_model_w: torch.Tensor,
    e_model_l: torch.Tensor,
    e_ref_w: torch.Tensor,
    e_ref_l: torch.Tensor,
    beta: float,
) -> DPOTerms:
    """Diffusion-DPO's loss from per-pair errors (each a 1-D tensor with one entry per pair)."""
    if not is_real(beta) or beta <= 0:
        raise ConfigError(f"beta must be a positive finite number, got {beta!r}")
    shapes = {tuple(t.shape) for t in (e_model_w, e_model_l, e_ref_w, e_ref_l)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ConfigError(f"the four per-pair errors must be 1-D tensors of one length, got shapes {sorted(shapes)}")
    e_ref_w, e_ref_l = e_ref_w.detach(), e_ref_l.detach()
    inside = -0.5 * beta * ((e_model_w - e_model_l) - (e_ref_w - e_ref_l))
    loss = -F.logsigmoid(inside).mean()
    model = torch.cat([e_model_w, e_model_l]).detach().mean()
    ref = torch.cat([e_ref_w, e_ref_l]).mean()
    return DPOTerms(loss, float((inside > 0).float().mean()), float(model), float(ref))


def pair_errors(predict, target, x_w: torch.Tensor, x_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean squared errors of ``predict(x)`` against ``target(x)`` for the winners and the losers,
    run as one batch ([winners, losers]); the caller noises both with the same t and noise."""
    if x_w.shape != x_l.shape:
        raise ConfigError(f"winners and losers must have one shape, got {tuple(x_w.shape)} and {tuple(x_l.shape)}")
    both = torch.cat([x_w, x_l])
    err = ((predict(both) - target(both)) ** 2).flatten(1).mean(1)
    return err[: x_w.shape[0]], err[x_w.shape[0] :]
