"""``corpus``: a real character-level text corpus shipped with Python itself, so nothing is downloaded.

The text is ``pydoc_data.topics.topics``, the Python language reference's help topics, concatenated in
sorted key order with one space between topics (on CPython 3.11.7: 79 topics, 465,048 characters, 103
distinct). ``SOURCE`` names it and the running Python. Normalised: typographic quotes, dashes and the ellipsis
become their ASCII forms, every other character outside ``ALPHABET`` (printable ASCII, space first: id 0, the
PAD) becomes a space, and runs of whitespace collapse to one space (then the ends are stripped).

On 3.11.7 that leaves 433,294 characters, split contiguously 90 / 5 / 5 %: train 389,964, valid 21,665,
test 21,665. Tokens are ids 0..V-1 (V = 95); id V is the diffusion code's MASK and never occurs.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from condiff.errors import ConfigError

ALPHABET = "".join(chr(i) for i in range(32, 127))
SOURCE = f"pydoc_data.topics.topics (Python {sys.version.split()[0]}; sys.version {sys.version!r})"
SPLITS = (0.90, 0.05, 0.05)
_ASCII = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-", "\u2026": "..."}


def _describe(x) -> str:
    """A one-line description of a value: a tensor's shape and dtype, otherwise its type."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def normalise(raw: str) -> str:
    """Map ``raw`` onto ``ALPHABET``: ASCII forms for typographic punctuation, other characters to spaces,
    whitespace runs collapsed to one space, ends stripped."""
    s = "".join(_ASCII.get(c, c if c in ALPHABET else " ") for c in raw)
    return re.sub(" +", " ", s).strip()


@lru_cache(maxsize=1)
def normalised_text() -> str:
    """The whole normalised corpus text."""
    from pydoc_data.topics import topics

    return normalise(" ".join(topics[k] for k in sorted(topics)))


def _encode(alphabet: str, s: str) -> torch.Tensor:
    """1-D ids of ``s``; a character outside the alphabet is a ConfigError."""
    if not isinstance(s, str):
        raise ConfigError(f"encode needs a str, got {type(s).__name__}")
    codes = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    lut = np.full(max(map(ord, alphabet), default=0) + 2, -1, dtype=np.int64)
    lut[[ord(c) for c in alphabet]] = np.arange(len(alphabet))
    ids = lut[np.minimum(codes, len(lut) - 1)]
    if (ids < 0).any():
        c = s[int(np.argmax(ids < 0))]
        raise ConfigError(f"character {c!r} is not in the corpus alphabet; accepted: {alphabet!r}")
    return torch.from_numpy(ids)


@dataclass(frozen=True, eq=False)
class Corpus:
    """A character vocabulary (``alphabet[i]`` is token i) and the train / valid / test splits as 1-D ids."""

    alphabet: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    @property
    def V(self) -> int:
        return len(self.alphabet)

    def encode(self, s: str) -> torch.Tensor:
        """1-D ids of ``s``; a character outside the alphabet is a ConfigError."""
        return _encode(self.alphabet, s)

    def decode(self, ids: torch.Tensor) -> str:
        ids = _check_ids(ids, self.V, "decode")
        return "".join(self.alphabet[i] for i in ids.tolist())


def _check_ids(ids, v: int, what: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ConfigError(f"{what} needs a 1-D integer tensor of character ids, got {_describe(ids)}")
    if ids.numel() and (ids.min() < 0 or ids.max() >= v):
        raise ConfigError(f"{what}: character ids must be in [0, {v - 1}], got {ids.min()}..{ids.max()}")
    return ids.long()


def load() -> Corpus:
    """The corpus with its deterministic contiguous 90 / 5 / 5 % train / valid / test split (fresh tensors)."""
    ids = _encode(ALPHABET, normalised_text())
    n = len(ids)
    a, b = int(n * SPLITS[0]), int(n * (SPLITS[0] + SPLITS[1]))
    return Corpus(ALPHABET, ids[:a].clone(), ids[a:b].clone(), ids[b:].clone())


def _check_length(split, length) -> torch.Tensor:
    split = _check_ids(split, len(ALPHABET), "windows/chunks")
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= len(split):
        raise ConfigError(f"length must be an integer in [1, {len(split)}] (the split's length), got {length!r}")
    return split


def windows(split: torch.Tensor, length: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, length) windows of ``split`` at uniformly random starts (for training)."""
    split = _check_length(split, length)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"n must be an integer >= 0, got {n!r}")
    starts = torch.randint(len(split) - length + 1, (n,), generator=generator)
    return split[starts.unsqueeze(1) + torch.arange(length)]


def chunks(split: torch.Tensor, length: int) -> torch.Tensor:
    """(len(split) // length, length) non-overlapping chunks from the start (for evaluation); the final
    partial chunk is dropped."""
    split = _check_length(split, length)
    k = len(split) // length
    return split[: k * length].reshape(k, length).clone()
