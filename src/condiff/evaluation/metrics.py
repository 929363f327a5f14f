"""Sample-quality metrics.

``frechet_distance``: the Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017,
"GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", eq. 6, the FID formula):
||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2}). The matrix square root is scipy's
``sqrtm``. For shapes the features are the clean attribute classifier's penultimate activations
(``classifier_features``), a small stand-in for Inception features that needs no download.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

from condiff.errors import ConfigError


def frechet_distance(a, b) -> float:
    """Fréchet distance between N(mean(a), cov(a)) and N(mean(b), cov(b)); a, b are (n, d) with n >= 2."""
    a = np.asarray(torch.as_tensor(a, dtype=torch.float64))
    b = np.asarray(torch.as_tensor(b, dtype=torch.float64))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ConfigError(
            f"frechet_distance needs two (n, d) feature arrays with the same d and n >= 2, got {a.shape} and {b.shape}"
        )
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = linalg.sqrtm(s_a)
    cross = linalg.sqrtm(root_a @ s_b @ root_a)
    trace = np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(np.real(cross))
    return float(((mu_a - mu_b) ** 2).sum() + max(trace, 0.0))


def classifier_features(images: torch.Tensor, net, batch: int = 512) -> torch.Tensor:
    """Penultimate features ``net.features(x)`` of a classifier network (e.g. the bundled shapes classifier,
    ``condiff.models.shapes_classifier.load_classifier("clean")``), in batches, without gradients."""
    with torch.no_grad():
        return torch.cat([net.features(x) for x in torch.split(images, batch)])
