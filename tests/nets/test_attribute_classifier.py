"""AttributeClassifier: safetensors round trip keeps the head order (diffusers sorts config dict keys on save,
which once reordered the heads), heads slice the logits, and the time input is used only when noise-aware."""

import pytest
import torch

from condiff.errors import ConfigError
from condiff.nets import AttributeClassifier

HEADS = {"shape": 3, "color": 6, "size": 2, "position": 9}


@pytest.mark.parametrize("noise_aware", [False, True])
def test_round_trip_keeps_heads_and_outputs(tmp_path, noise_aware):
    """save_pretrained + from_pretrained gives the same head order and bit-identical logits."""
    torch.manual_seed(0)
    net = AttributeClassifier(heads=HEADS, noise_aware=noise_aware, width=16, hidden=32).eval()
    net.save_pretrained(tmp_path)
    back = AttributeClassifier.from_pretrained(tmp_path).eval()
    assert back.head_names == list(HEADS) and back.head_sizes == list(HEADS.values())
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(net(x, t), back(x, t))
    assert not list(tmp_path.glob("*.bin")) and list(tmp_path.glob("*.safetensors"))


def test_heads_partition_the_logits():
    """The heads, in order, are consecutive slices covering every logit; an unknown head is one error."""
    net = AttributeClassifier(heads=HEADS, width=16, hidden=32)
    z = net(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, sum(HEADS.values()))
    assert torch.equal(torch.cat([net.head(z, k) for k in HEADS], 1), z)
    with pytest.raises(ConfigError, match="accepted: shape, color, size, position"):
        net.head(z, "texture")


def test_time_input():
    """A clean net ignores t; a noise-aware net depends on it and refuses to run without it."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    clean = AttributeClassifier(width=16, hidden=32)
    assert torch.equal(clean(x, torch.tensor([0.1, 0.1])), clean(x, torch.tensor([0.9, 0.9])))
    noisy = AttributeClassifier(width=16, hidden=32, noise_aware=True)
    assert not torch.allclose(noisy(x, torch.tensor([0.1, 0.1])), noisy(x, torch.tensor([0.9, 0.9])))
    assert torch.equal(noisy(x, 0.3), noisy(x, torch.tensor([0.3, 0.3])))
    with pytest.raises(ValueError, match="needs t"):
        noisy(x)
