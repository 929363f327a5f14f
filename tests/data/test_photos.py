"""condiff.data.photos: scikit-image's bundled photos as (3, size, size) tensors in [-1, 1], loaded
offline, deterministic, distinct, and exactly what read_image gives for the same picture."""

from __future__ import annotations

import itertools
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from condiff.data import photos as photos_mod
from condiff.data.images import from_uint8, read_image
from condiff.data.photos import NAMES, photos
from condiff.errors import ConfigError


def test_shapes_ranges_and_determinism():
    """Each photo is a finite float32 (3, size, size) tensor in [-1, 1] using most of that range; two
    calls give equal tensors, and changing a returned tensor does not change the next call's."""
    for size in (32, 16):
        a, b = photos(size), photos(size)
        assert tuple(a) == NAMES == ("astronaut", "coffee", "chelsea")
        for name in NAMES:
            x = a[name]
            assert x.dtype == torch.float32 and x.shape == (3, size, size)
            assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
            assert x.max() - x.min() > 1.0 and x.std() > 0.2  # a photo, not a flat field
            assert torch.equal(x, b[name])
        a["coffee"].fill_(0)
        assert torch.equal(photos(size)["coffee"], b["coffee"])


def test_photos_are_distinct():
    """No two photos are alike: their mean absolute difference is over 0.2 (a tenth of the range)."""
    p = photos(32)
    for m, n in itertools.combinations(NAMES, 2):
        assert (p[m] - p[n]).abs().mean() > 0.2, (m, n)


def test_same_as_read_image_of_the_file(tmp_path):
    """photos(size)[name] equals read_image of the original picture saved as PNG (the same centre crop
    and Lanczos resize); at the astronaut's own 512x512 it is its exact 8-bit values."""
    import skimage.data

    for name in NAMES:
        raw = getattr(skimage.data, name)()
        Image.fromarray(raw).save(tmp_path / f"{name}.png")
        got = read_image(tmp_path / f"{name}.png", shape=(3, 24, 24))
        assert got.notice is not None and torch.equal(got.tensor[0], photos(24)[name])
    raw = torch.from_numpy(np.array(skimage.data.astronaut())).permute(2, 0, 1)
    assert torch.equal(photos(512)["astronaut"], from_uint8(raw))


def test_loads_without_network(monkeypatch):
    """The photos ship with scikit-image: loading them with every socket connection refused works."""

    def refuse(*_a, **_k):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    photos_mod._raw.cache_clear()
    assert all(x.shape == (3, 8, 8) for x in photos(8).values())


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "32", 100_000])
def test_bad_size_is_a_config_error(size):
    """A size that is not an integer from 1 to MAX_SIZE is a one-line ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        photos(size)
    msg = str(info.value)
    assert msg.splitlines() == [msg] and repr(size) in msg
