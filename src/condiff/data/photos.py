"""``photos``: real photographs for out-of-distribution checks of inversion and editing.

These are the out-of-distribution real photos used by the editing oracle tests: scikit-image's bundled
astronaut (512x512), coffee (400x600) and chelsea (300x451) from ``skimage.data``. They ship inside the
scikit-image package, so loading them needs no network. Each is centre-cropped to a square and resized with
Pillow's Lanczos filter (``condiff.data.images.fit_pixels``, the same path ``read_image`` takes), giving
(3, size, size) float32 tensors in [-1, 1]. The result is deterministic.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from condiff.data.images import fit_pixels, pixels_to_tensor
from condiff.errors import ConfigError

NAMES = ("astronaut", "coffee", "chelsea")
MAX_SIZE = 1024


@lru_cache(maxsize=None)
def _raw(name: str) -> np.ndarray:
    import skimage.data

    pixels = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
    pixels.setflags(write=False)
    return pixels


def photos(size: int = 32) -> dict[str, torch.Tensor]:
    """{name: (3, size, size) float32 tensor in [-1, 1]} for astronaut, coffee and chelsea."""
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_SIZE:
        raise ConfigError(f"photo size {size!r} is not accepted; expected an integer from 1 to {MAX_SIZE}")
    return {name: pixels_to_tensor(fit_pixels(_raw(name), size, size)[0], 3)[0] for name in NAMES}
