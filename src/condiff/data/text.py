"""Caption tokenizer for ``shapes``: every word of the vocabulary names one attribute value, so a caption
is tokenized into 4 slots (size, color, shape, position); an omitted attribute is the pad token. Word
order in the prompt does not matter; the empty caption is all pads and is the null condition for CFG.
Captions may read as English: the articles and prepositions in ``FILLER`` are skipped ("a red circle in the
top left"), and a position may be written with a space ("top left", "bottom right") as well as a hyphen.
"""

from __future__ import annotations

import difflib

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
FILLER = frozenset({"a", "an", "the", "at", "in", "on"})  # skipped: they name no attribute


def _words(prompt: str) -> list[str]:
    """The caption's words, lower case, with each two-word position joined ("top left" -> "top-left"); a comma
    separates words and never joins them."""
    out = []
    for part in prompt.lower().split(","):
        words = part.split()
        i = 0
        while i < len(words):
            pair = "-".join(words[i : i + 2])
            if i + 1 < len(words) and (pair in VOCAB or pair in ALIASES):
                out.append(pair)
                i += 2
            else:
                out.append(words[i])
                i += 1
    return out


def _unknown(word: str, prompt: str) -> ConfigError:
    """The one-line error of an unknown word: the closest accepted word (difflib), then every accepted word."""
    close = difflib.get_close_matches(word, [*VOCAB, *ALIASES], n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        f"unknown word {word!r} in prompt {prompt!r}{hint}; accepted words: {', '.join(VOCAB)} (a position may "
        f"also be written with a space, e.g. 'top left'; {', '.join(sorted(FILLER))} are skipped)"
    )


def _twice(prompt: str, slot: int, first: str, second: str) -> ConfigError:
    """The one-line error of an attribute named twice; two words that make one position ("left top", "top, left")
    are told how to write it."""
    name, hint = SLOTS[slot][0], ""
    for a, b in ((first, second), (second, first)):
        if f"{a}-{b}" in VOCAB or f"{a}-{b}" in ALIASES:
            hint = f"; for one position write '{a} {b}' or '{a}-{b}'"
            break
    return ConfigError(f"prompt {prompt!r} names the {name} twice ({first!r} and {second!r}){hint}")


def tokenize(prompt: str) -> list[int]:
    """'large red circle top-left' -> 4 token ids; raises ConfigError on unknown or repeated words."""
    if not isinstance(prompt, str):
        raise ConfigError(f"prompt must be a string, got {type(prompt).__name__}")
    ids, given = [PAD] * SEQ_LEN, [None] * SEQ_LEN
    words = _words(prompt)
    for word in words:
        if word in FILLER:
            continue
        name = ALIASES.get(word, word)
        if name not in VOCAB:
            raise _unknown(word, prompt)
        slot, tok = VOCAB[name]
        if ids[slot] != PAD:
            raise _twice(prompt, slot, given[slot], word)
        ids[slot], given[slot] = tok, word
    if words and all(w in FILLER for w in words):
        raise ConfigError(
            f"prompt {prompt!r} names no attribute (give e.g. 'a red circle', or '' for the unconditional model)"
        )
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
