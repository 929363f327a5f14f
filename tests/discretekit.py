"""Enumerable toy distributions for the discrete oracles (shared by tests/discrete)."""

from __future__ import annotations

import torch


def random_joint(vocab: int = 3, length: int = 4, seed: int = 0) -> torch.Tensor:
    """A random joint over vocab^length as log-probabilities (float64)."""
    g = torch.Generator().manual_seed(seed)
    lj = torch.randn((vocab,) * length, generator=g, dtype=torch.float64) * 1.5
    return lj - lj.logsumexp(tuple(range(length)))


def markov_joint(transition: torch.Tensor, start: torch.Tensor, length: int) -> torch.Tensor:
    """The joint of a first-order Markov chain as log-probabilities of shape (V,) * length."""
    lj = start.double().log()
    for _ in range(length - 1):
        lj = lj.unsqueeze(-1) + transition.double().log().view(*([1] * (lj.dim() - 1)), *transition.shape)
    return lj


def index_of(x: torch.Tensor, vocab: int) -> torch.Tensor:
    """Row-major index of each sequence (matches ExactConditional.sequences)."""
    w = vocab ** torch.arange(x.shape[1] - 1, -1, -1)
    return (x * w).sum(1)
