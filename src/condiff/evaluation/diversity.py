"""Diversity and memorisation measures for few-shot adaptation (the evaluation of DomainStudio, Zhu et al. 2023,
sec. 4: does the adapted model keep the source model's variety, or collapse onto the few training images?).

- ``distance_spearman(a, b)``: Spearman's rank correlation between the pairwise L2 distances of two equally sized
  sample sets drawn from the same noise (source and adapted model): 1 when the adapted samples keep the source's
  relative distances in order.
- ``distinct_fraction(labels)``: the share of distinct rows (attribute combinations) among the samples' labels.
- ``nearest_training_distance(samples, train)``: per sample, the L2 distance to the nearest training image, and
  its mean: 0 for a model that reproduces its training images.
"""

from __future__ import annotations

import torch

from condiff.errors import ConfigError


def _pairwise(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1).double()
    d = torch.cdist(flat, flat)
    i, j = torch.triu_indices(len(flat), len(flat), offset=1)
    return d[i, j]


def distance_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation of the pairwise distances within ``a`` and within ``b`` (same length, >= 3)."""
    from scipy.stats import spearmanr

    if a.shape[0] != b.shape[0] or a.shape[0] < 3:
        raise ConfigError(
            f"distance_spearman needs two sets of one size, at least 3, got {a.shape[0]} and {b.shape[0]}"
        )
    return float(spearmanr(_pairwise(a).numpy(), _pairwise(b).numpy()).statistic)


def distinct_fraction(labels: torch.Tensor) -> float:
    """The number of distinct label rows over the number of rows."""
    if labels.dim() != 2 or labels.shape[0] == 0:
        raise ConfigError(f"distinct_fraction needs (N, K) labels with N >= 1, got shape {tuple(labels.shape)}")
    return float(torch.unique(labels, dim=0).shape[0] / labels.shape[0])


def nearest_training_distance(samples: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(per-sample L2 distance to the nearest training image, its mean)."""
    if samples.shape[1:] != train.shape[1:] or train.shape[0] == 0:
        raise ConfigError(
            f"samples {tuple(samples.shape)} and training images {tuple(train.shape)} must share their image shape"
        )
    d = torch.cdist(samples.flatten(1).double(), train.flatten(1).double()).min(1).values
    return d, float(d.mean())
