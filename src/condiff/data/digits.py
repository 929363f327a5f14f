"""``digits``: scikit-learn's 8x8 handwritten digits (real data, 1797 images), bilinearly upsampled to
16x16 and scaled to [-1, 1]; class-conditional with 10 classes. A fixed 75/25 split (random_state 0):
the diffusion model trains on the train split; the scorer, an MLP classifier trained on the train split,
reports its accuracy on the held-out split. Its hidden layer is also the feature space in which samples are
compared with the held-out digits (``Scorer.features``: Fréchet distance, precision and recall), since a class
accuracy alone passes noisy blobs that the classifier still assigns to the right class."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

SIZE = 16
NUM_CLASSES = 10


@lru_cache(maxsize=1)
def load_split() -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = (x * 2 - 1).clamp(-1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=d.target)
    return {"x_train": x[idx_tr], "y_train": y[idx_tr], "x_test": x[idx_te], "y_test": y[idx_te]}


class Scorer:
    """MLP(256) on the 256 pixels of a 16x16 digit, trained on real digits with a fixed seed."""

    def __init__(self):
        from sklearn.neural_network import MLPClassifier

        s = load_split()
        self.clf = MLPClassifier(hidden_layer_sizes=(256,), max_iter=400, random_state=0)
        self.clf.fit(s["x_train"].flatten(1).numpy(), s["y_train"].numpy())
        self.heldout_accuracy = float(self.clf.score(s["x_test"].flatten(1).numpy(), s["y_test"].numpy()))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().float().clamp(-1, 1).flatten(1).cpu().numpy()
        return torch.tensor(self.clf.predict(x), dtype=torch.long)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 256) float64: the hidden layer before its ReLU (a ReLU leaves 36 units dead, constant 0, on the
        training digits, which makes the covariance singular), of images clamped to [-1, 1] as ``predict``
        reads them."""
        x = images.detach().double().clamp(-1, 1).flatten(1).cpu()
        w = torch.from_numpy(self.clf.coefs_[0]).double()
        b = torch.from_numpy(self.clf.intercepts_[0]).double()
        return x @ w + b

    def reference_features(self) -> torch.Tensor:
        """``features`` of the held-out split (450 real digits, none seen by the scorer or the diffusion model)."""
        if not hasattr(self, "_reference"):
            self._reference = self.features(load_split()["x_test"])
        return self._reference


@lru_cache(maxsize=1)
def scorer() -> Scorer:
    return Scorer()
