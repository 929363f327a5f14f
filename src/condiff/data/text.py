"""Caption tokenizer for ``shapes``: every word of the vocabulary names one attribute value, so a caption
is tokenized into 4 slots (size, color, shape, position); an omitted attribute is the pad token. Word
order in the prompt does not matter; the empty caption is all pads and is the null condition for CFG.
"""

from __future__ import annotations

import torch

from condiff.data.shapes import COLORS, POSITIONS, SHAPES, SIZES
from condiff.errors import ConfigError

PAD = 0
SLOTS = (("size", SIZES), ("color", COLORS), ("shape", SHAPES), ("position", POSITIONS))
VOCAB: dict[str, tuple[int, int]] = {}  # word -> (slot, token id)
_next = 1
for _slot, (_name, _words) in enumerate(SLOTS):
    for _w in _words:
        VOCAB[_w] = (_slot, _next)
        _next += 1
VOCAB_SIZE = _next
SEQ_LEN = len(SLOTS)
ALIASES = {
    "middle": "center",
    "centre": "center",
    "top-center": "top",
    "bottom-center": "bottom",
    "middle-left": "left",
    "middle-right": "right",
    "top-middle": "top",
    "bottom-middle": "bottom",
}


def tokenize(prompt: str) -> list[int]:
    """'large red circle top-left' -> 4 token ids; raises ConfigError on unknown or repeated words."""
    if not isinstance(prompt, str):
        raise ConfigError(f"prompt must be a string, got {type(prompt).__name__}")
    ids = [PAD] * SEQ_LEN
    for word in prompt.lower().replace(",", " ").split():
        word = ALIASES.get(word, word)
        if word not in VOCAB:
            raise ConfigError(f"unknown word {word!r} in prompt {prompt!r}; accepted words: {', '.join(VOCAB)}")
        slot, tok = VOCAB[word]
        if ids[slot] != PAD:
            raise ConfigError(f"prompt {prompt!r} names the {SLOTS[slot][0]} twice")
        ids[slot] = tok
    return ids


def tokenize_batch(prompts: list[str]) -> torch.Tensor:
    return torch.tensor([tokenize(p) for p in prompts], dtype=torch.long)


def attrs_to_tokens(attrs: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 4) attributes (shape, color, size, position) -> (B, 4) slot tokens; ``keep`` (B, 4) bool in
    attribute order masks attributes out (partial captions)."""
    order = (2, 1, 0, 3)  # slots: size, color, shape, position
    offsets = []
    base = 1
    for _, words in SLOTS:
        offsets.append(base)
        base += len(words)
    toks = torch.stack([attrs[:, a] + off for a, off in zip(order, offsets)], 1)
    if keep is not None:
        toks = torch.where(keep[:, list(order)], toks, torch.full_like(toks, PAD))
    return toks


def tokens_to_attrs(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 4) slot tokens -> (B, 4) attributes (shape, color, size, position), -1 where a slot is empty: the
    inverse of ``attrs_to_tokens``."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1, SEQ_LEN)
    out = torch.full_like(tokens, -1)
    base = 1
    for slot, (name, words) in enumerate(SLOTS):
        col = ("shape", "color", "size", "position").index(name)
        tok = tokens[:, slot]
        out[:, col] = torch.where(tok == PAD, torch.full_like(tok, -1), tok - base)
        base += len(words)
    return out


def null_tokens(n: int) -> torch.Tensor:
    return torch.full((n, SEQ_LEN), PAD, dtype=torch.long)
