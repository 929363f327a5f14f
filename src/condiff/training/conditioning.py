"""Condition corruption used in training.

- ``cfg_dropout``: replace a sample's condition by the null condition with probability p, so one network
  learns both the conditional and the unconditional model (Ho & Salimans 2022, sec. 3.2).
- ``cep``: Condition Embedding Perturbation (Chen et al., NeurIPS 2024, eq. 8): add
  delta ~ U(-gamma/sqrt(d), gamma/sqrt(d)) (``uniform``) or N(0, gamma^2/d) (``gaussian``) to the encoded
  condition, fresh every step, after the encoder, without gradient. Training only.
"""

from __future__ import annotations

import math

import torch

from condiff.errors import one_of


def cfg_dropout(cond: dict, null: dict, p: float, generator=None) -> dict:
    """Row-wise: keep ``cond`` with probability 1 - p, else take ``null`` (same keys, same batch)."""
    if p <= 0:
        return dict(cond)
    first = next(v for v in cond.values() if isinstance(v, torch.Tensor))
    drop = torch.rand(first.shape[0], generator=generator) < p
    out = {}
    for k, v in cond.items():
        if isinstance(v, torch.Tensor):
            mask = drop.view(-1, *([1] * (v.dim() - 1)))
            out[k] = torch.where(mask, null[k].to(v.dtype).expand_as(v), v)
        else:
            out[k] = v
    return out


def cep(embedding: torch.Tensor, gamma: float, kind: str = "uniform", generator=None) -> torch.Tensor:
    """embedding + delta, delta scaled by gamma / sqrt(d) with d = embedding.shape[-1]."""
    if gamma <= 0:
        return embedding
    d = embedding.shape[-1]
    if kind == "uniform":
        delta = (torch.rand(embedding.shape, generator=generator) * 2 - 1) * (gamma / math.sqrt(d))
    elif kind == "gaussian":
        delta = torch.randn(embedding.shape, generator=generator) * (gamma / math.sqrt(d))
    else:
        raise one_of("CEP kind", kind, ["uniform", "gaussian"])
    return embedding + delta.to(embedding.dtype).detach()
