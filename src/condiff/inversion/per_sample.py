"""Per-sample optimisation with early stopping, shared by null-text inversion and DCI: a batch is a set of
independent problems (per-sample losses, per-sample variables, an elementwise optimiser such as Adam), and
each sample stops on its own once its loss is below the threshold."""

from __future__ import annotations

import torch


def per_sample(v: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, N): one row per sample."""
    return v.reshape(v.shape[0], -1)


def early_stopping_step(
    opt,
    params,
    loss: torch.Tensor,
    active: torch.Tensor,
    threshold: float,
    losses: torch.Tensor,
    iterations: torch.Tensor,
) -> torch.Tensor:
    """Record ``loss`` (B,) for the active samples in ``losses``, stop the samples whose loss is below
    ``threshold`` (tested before stepping, so a sample that already meets it is not moved), and take one
    ``opt`` step on the rest: only their loss is differentiated, and samples that had stopped get their
    values back after the step (an optimiser with momentum would otherwise still move them). Counts the
    step in ``iterations`` (B,); returns the new active mask (all False: every sample has stopped)."""
    losses.copy_(torch.where(active, loss.detach(), losses))
    active = active & ~(loss.detach() < threshold)
    if not bool(active.any()):
        return active
    iterations += active.long()
    frozen = [p.detach().clone() for p in params]
    grads = torch.autograd.grad(loss[active].sum(), params)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    with torch.no_grad():
        for p, f in zip(params, frozen):
            p.copy_(torch.where((~active).view(-1, *([1] * (p.dim() - 1))), f, p))
    return active
