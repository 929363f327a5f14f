"""Sample-quality metrics.

``frechet_distance``: the Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017,
"GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", eq. 6, the FID formula):
||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2}). The matrix square root is scipy's
``sqrtm``. For shapes the features are the clean attribute classifier's penultimate activations
(``classifier_features``), a small stand-in for Inception features that needs no download; for digits, the
scorer's hidden layer (``condiff.data.digits.Scorer.features``).

``precision_recall``: k-NN manifold precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall
Metric for Assessing Generative Models", sec. 2): each set's manifold is the union of balls around its points,
each ball reaching the point's k-th nearest neighbour in its own set; precision is the fraction of generated
points inside the real manifold, recall the fraction of real points inside the generated one.
"""

from __future__ import annotations

import warnings

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
    with warnings.catch_warnings():  # fewer points than dimensions: singular, still positive semi-definite
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root_a = linalg.sqrtm(s_a)
        cross = linalg.sqrtm(root_a @ s_b @ root_a)
    trace = np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(np.real(cross))
    return float(((mu_a - mu_b) ** 2).sum() + max(trace, 0.0))


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of ``fake`` against ``real``, two (n, d) feature arrays with more than k rows each:
    Kynkäänniemi et al.'s k-NN manifolds (k = 3, their default), Euclidean distances in float64. A point on a
    ball's boundary counts as inside."""
    a = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"precision_recall needs a positive integer k, got {k!r}")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) <= k:
        raise ConfigError(
            f"precision_recall needs two (n, d) feature arrays with the same d and n > k = {k}, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )

    def dist(x, y):  # exact differences, not the matrix-product shortcut (which rounds a zero distance)
        return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")

    def radii(x):  # distance to the k-th nearest other point (the 0th is the point itself)
        return dist(x, x).kthvalue(k + 1, dim=1).values

    d = dist(b, a)  # (fake, real)
    precision = (d <= radii(a)[None, :]).any(1).double().mean()
    recall = (d.T <= radii(b)[None, :]).any(1).double().mean()
    return float(precision), float(recall)


def classifier_features(images: torch.Tensor, net, batch: int = 512) -> torch.Tensor:
    """Penultimate features ``net.features(x)`` of a classifier network (e.g. the bundled shapes classifier,
    ``condiff.models.classifiers.load_classifier("clean")``), in batches, without gradients."""
    with torch.no_grad():
        return torch.cat([net.features(x) for x in torch.split(images, batch)])
