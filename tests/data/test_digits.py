"""The digits scorer's feature space and the digits family's distribution metrics: the features are the
scorer's own hidden layer (its prediction follows from them), the held-out digits against themselves are at
Fréchet distance 0 with precision and recall 1, and uniform noise lies outside the real digits' manifold."""

import torch

from condiff.data import digits
from condiff.models.digits import DigitsFamily


def test_features_are_the_scorers_hidden_layer():
    sc = digits.scorer()
    x = digits.load_split()["x_test"]
    h = sc.features(x)
    assert h.shape == (x.shape[0], 256) and h.dtype == torch.float64
    logits = h.clamp(min=0) @ torch.from_numpy(sc.clf.coefs_[1]).double() + torch.from_numpy(sc.clf.intercepts_[1])
    assert torch.equal(logits.argmax(1), sc.predict(x))
    assert torch.equal(sc.reference_features(), h)


def test_quality_of_the_held_out_digits_is_exact_and_noise_is_far():
    family = DigitsFamily()
    real = family.quality(digits.load_split()["x_test"])
    assert abs(real["frechet"]) < 1e-6 and (real["precision"], real["recall"]) == (1.0, 1.0)
    assert "450 held-out digits" in real["features"]
    noise = torch.rand(512, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    far = family.quality(noise)
    assert (far["precision"], far["recall"]) == (0.0, 0.0) and far["frechet"] > 100


def test_quality_of_too_few_samples_leaves_out_what_it_cannot_measure():
    x = digits.load_split()["x_test"]
    three = DigitsFamily().quality(x[:3])
    assert three["precision"] is None and three["recall"] is None and three["frechet"] >= 0
    one = DigitsFamily().quality(x[:1])
    assert one["frechet"] is None
