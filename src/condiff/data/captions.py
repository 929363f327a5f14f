"""``captions``: a procedural word-level language describing the ``shapes`` world, with an exact parser.

A caption names some of an object's attributes (shape, color, size, position: the column order of
``shapes.random_attrs``) in one of ``TEMPLATES`` sentence patterns, with synonyms drawn at random::

    0  a large red circle at the top left            (an object, a red thing at the bottom, ...)
    1  top left : big red disc                       (position first, then a noun phrase)
    2  there is a red circle , large , in the top left
    3  circle , red , large , top left               (a list; "object" when nothing is named)
    4  the circle in the top left is large and red

Every attribute may be omitted (``p_drop``, or an explicit ``keep`` mask); with the shape omitted the noun is
a generic one (object, shape, thing). Every content word names exactly one attribute value, so the words alone
fix the attributes: ``parse`` reads them, and ``parses`` is an exact recogniser of the language (each template
with each subset of attributes, PAD only at the end), the judge of "the text still parses". Since attributes
are optional, a one-word change can give another sentence of the language ("a box" -> "red box"); on any
sentence that ``parses``, ``parse`` returns exactly the attributes the sentence renders.

Tokens: ``VOCAB.V`` real words with ids 0..V-1, PAD = 0 (``<pad>``); id V is the diffusion code's MASK and is
never produced. Sequences are ``SEQ_LEN`` = 12 tokens (the longest template), padded with PAD at the end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from condiff.data.shapes import ATTRIBUTES, COLORS
from condiff.errors import ConfigError

SEQ_LEN = 12
TEMPLATES = 5
PAD = 0
SHAPE_WORDS = (("circle", "disc"), ("square", "box"), ("triangle", "wedge"))  # by shape id; first is canonical
COLOR_WORDS = tuple((c,) for c in COLORS)
SIZE_WORDS = (("small", "little", "tiny"), ("large", "big", "huge"))
ROW_WORDS = {0: ("top", "upper"), 2: ("bottom", "lower")}  # position = 3 * row + col
COL_WORDS = {0: ("left",), 2: ("right",)}
CENTER_WORDS = ("center", "middle")
GENERIC = ("object", "shape", "thing")  # the noun when the shape is omitted
FILLER = ("a", "an", "the", "at", "in", "is", "there", "and", ":", ",")
SLOT_WORDS = (SHAPE_WORDS, COLOR_WORDS, SIZE_WORDS)


def _describe(x) -> str:
    """A one-line description of a value: a tensor's shape and dtype, otherwise its type."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


@dataclass(frozen=True)
class Vocabulary:
    """A word-level vocabulary: ``words[i]`` is token i; ``words[0]`` is PAD."""

    words: tuple[str, ...]
    ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if len(set(self.words)) != len(self.words):
            raise ConfigError(f"vocabulary words must be distinct, got {self.words!r}")
        object.__setattr__(self, "ids", {w: i for i, w in enumerate(self.words)})

    @property
    def V(self) -> int:
        return len(self.words)

    def encode(self, words: list[str]) -> torch.Tensor:
        bad = [w for w in words if w not in self.ids]
        if bad:
            raise ConfigError(f"unknown caption word {bad[0]!r}; accepted: {' '.join(self.words)}")
        return torch.tensor([self.ids[w] for w in words], dtype=torch.long)

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Words of a 1-D token tensor; the MASK id V reads as ``<mask>``."""
        ids = _ids(tokens, 1, "decode")
        return [self.words[i] if i < self.V else "<mask>" for i in ids[0]]


def _all_words() -> tuple[str, ...]:
    content = [w for slot in SLOT_WORDS for words in slot for w in words]
    content += [w for d in (ROW_WORDS, COL_WORDS) for words in d.values() for w in words]
    return ("<pad>", *FILLER, *GENERIC, *content, *CENTER_WORDS)


VOCAB = Vocabulary(_all_words())
_READ = {w: (a, v) for a, slot in enumerate(SLOT_WORDS) for v, words in enumerate(slot) for w in words}
_ROW = {w: r for r, words in ROW_WORDS.items() for w in words}
_COL = {w: c for c, words in COL_WORDS.items() for w in words}


def _template(t: int, shape, color, size, pos, noun) -> list:
    """Template ``t`` as a list of pieces; an omitted attribute is None; ``pos`` is a list of words."""
    if t == 0:
        return ["<a>", size, color, noun] + (["at", "the", *pos] if pos else [])
    if t == 1:
        return ([*pos, ":"] if pos else []) + [size, color, noun]
    if t == 2:
        return (
            ["there", "is", "<a>", color, noun]
            + ([",", size] if size else [])
            + ([",", "in", "the", *pos] if pos else [])
        )
    if t == 3:
        items = [[w] for w in (shape, color, size) if w] + ([pos] if pos else [])
        return [w for i, item in enumerate(items) for w in ([","] if i else []) + item] if items else [noun]
    adjs = [size, "and", color] if size and color else [size or color]
    return ["the", noun] + (["in", "the", *pos] if pos else []) + (["is", *adjs] if size or color else [])


def _check_template(template, what: str = "template") -> None:
    if template is not None and (isinstance(template, bool) or template not in range(TEMPLATES)):
        raise ConfigError(f"{what} must be None or an integer in [0, {TEMPLATES - 1}], got {template!r}")


def _ids(tokens, ndim: int, what: str) -> list[list[int]]:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != ndim or tokens.is_floating_point():
        raise ConfigError(f"{what} needs a {ndim}-D integer token tensor, got {_describe(tokens)}")
    t = tokens.reshape(-1, tokens.shape[-1]).long()
    if t.numel() and (t.min() < 0 or t.max() > VOCAB.V):
        raise ConfigError(f"{what}: token ids must be in [0, {VOCAB.V}] (V = MASK), got {t.min()}..{t.max()}")
    return t.tolist()


def _check_attrs(attrs) -> torch.Tensor:
    if not isinstance(attrs, torch.Tensor) or attrs.dim() != 2 or attrs.shape[1] != 4 or attrs.is_floating_point():
        raise ConfigError(
            f"attrs must be an integer tensor (B, 4) of shape, color, size, position, got {_describe(attrs)}"
        )
    for j, (name, values) in enumerate(ATTRIBUTES.items()):
        col = attrs[:, j]
        if col.numel() and (col.min() < 0 or col.max() >= len(values)):
            raise ConfigError(f"attrs {name} ids must be in [0, {len(values) - 1}], got {col.min()}..{col.max()}")
    return attrs.long()


def _pick(words: tuple[str, ...], u: float, synonyms: bool) -> str:
    return words[min(int(u * len(words)), len(words) - 1)] if synonyms else words[0]


def _position_words(p: int, u: list[float], synonyms: bool) -> list[str]:
    if p == 4:
        return [_pick(CENTER_WORDS, u[0], synonyms)]
    r, c = divmod(p, 3)
    return ([_pick(ROW_WORDS[r], u[0], synonyms)] if r != 1 else []) + ([COL_WORDS[c][0]] if c != 1 else [])


def _sentence(t: int, row: list[int], keep: list[bool], u: list[float], synonyms: bool) -> list[str]:
    s, c, z, p = row
    shape = _pick(SHAPE_WORDS[s], u[0], synonyms) if keep[0] else None
    color = COLOR_WORDS[c][0] if keep[1] else None
    size = _pick(SIZE_WORDS[z], u[1], synonyms) if keep[2] else None
    pos = _position_words(p, u[2:3], synonyms) if keep[3] else None
    noun = shape or _pick(GENERIC, u[3], synonyms)
    pieces = [w for w in _template(t, shape, color, size, pos, noun) if w]
    return [("an" if pieces[i + 1][0] in "aeiou" else "a") if w == "<a>" else w for i, w in enumerate(pieces)]


def generate(
    attrs: torch.Tensor,
    generator: torch.Generator | None = None,
    p_drop: float = 0.0,
    template: int | None = None,
    keep: torch.Tensor | None = None,
    synonyms: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions of ``attrs`` (B, 4): tokens (B, SEQ_LEN) and ``keep`` (B, 4), the attributes named. Each is
    omitted with probability ``p_drop`` unless ``keep`` is given; the template is random unless ``template``
    is given; synonyms are random (``synonyms=False``: always the first, canonical word)."""
    attrs = _check_attrs(attrs)
    _check_template(template)
    if isinstance(p_drop, bool) or not isinstance(p_drop, (int, float)) or not 0 <= p_drop <= 1:
        raise ConfigError(f"p_drop must be a probability in [0, 1], got {p_drop!r}")
    b = attrs.shape[0]
    drop = torch.rand(b, 4, generator=generator) < p_drop
    if keep is None:
        keep = ~drop
    elif not isinstance(keep, torch.Tensor) or keep.shape != (b, 4) or keep.dtype != torch.bool:
        raise ConfigError(f"keep must be None or a bool tensor of shape ({b}, 4), got {_describe(keep)}")
    ts = torch.randint(TEMPLATES, (b,), generator=generator).tolist() if template is None else [template] * b
    us = torch.rand(b, 4, generator=generator).tolist()
    tokens = torch.full((b, SEQ_LEN), PAD, dtype=torch.long)
    for i, (row, k) in enumerate(zip(attrs.tolist(), keep.tolist())):
        words = _sentence(ts[i], row, k, us[i], synonyms)
        tokens[i, : len(words)] = VOCAB.encode(words)
    return tokens, keep.clone()


def translate_pairs(
    attrs: torch.Tensor,
    generator: torch.Generator | None,
    src_template: int,
    dst_template: int,
    p_drop: float = 0.0,
    synonyms: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) tokens (B, SEQ_LEN) naming the same attributes (the same ``keep``) in two fixed templates,
    synonyms drawn independently for each (``synonyms=False``: canonical words, so dst is a function of src)."""
    _check_template(src_template, "src_template")
    _check_template(dst_template, "dst_template")
    if src_template is None or dst_template is None:
        raise ConfigError(f"src_template and dst_template must be integers in [0, {TEMPLATES - 1}], got None")
    src, keep = generate(attrs, generator, p_drop, src_template, synonyms=synonyms)
    dst, _ = generate(attrs, generator, 0.0, dst_template, keep=keep, synonyms=synonyms)
    return src, dst


def _alt(words) -> str:
    return "(?:" + "|".join(re.escape(w) for w in words) + ")"


_ARTICLE = r"(?:an(?= [aeiou])|a(?= [^aeiou]))"  # "an" exactly before a vowel-initial word


@lru_cache(maxsize=None)
def _grammar(template: int) -> re.Pattern:
    """Template ``template`` with every subset of attributes, as one regular expression over words."""
    rows, cols = _alt(w for ws in ROW_WORDS.values() for w in ws), _alt(w for ws in COL_WORDS.values() for w in ws)
    pos = [f"(?:{rows}(?: {cols})?|{cols}|{_alt(CENTER_WORDS)})"]
    shape, color, size = (_alt(w for ws in slot for w in ws) for slot in SLOT_WORDS)
    alternatives = []
    for m in range(16):
        k = [bool(m >> j & 1) for j in range(4)]
        noun = shape if k[0] else _alt(GENERIC)
        pieces = _template(template, *(x if kj else None for x, kj in zip((shape, color, size, pos), k)), noun)
        words = [_ARTICLE if w == "<a>" else w if w.startswith("(?:") else re.escape(w) for w in pieces if w]
        alternatives.append(" ".join(words))
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


def _words_of(ids: list[int]) -> list[str] | None:
    """The sentence's words, or None when PAD or MASK appears before the end or the sentence is empty."""
    n = len(ids)
    while n and ids[n - 1] == PAD:
        n -= 1
    if n == 0 or any(i in (PAD, VOCAB.V) for i in ids[:n]):
        return None
    return [VOCAB.words[i] for i in ids[:n]]


def parses(tokens: torch.Tensor, template: int | None = None) -> torch.Tensor:
    """(B,) bool: True exactly when the row is a sentence of a template (of ``template`` when given) with some
    subset of attributes named, followed only by PAD."""
    _check_template(template)
    ts = range(TEMPLATES) if template is None else [template]
    out = []
    for ids in _ids(tokens, 2, "parses"):
        words = _words_of(ids)
        out.append(words is not None and any(_grammar(t).fullmatch(" ".join(words)) for t in ts))
    return torch.tensor(out, dtype=torch.bool)


def _read(words: list[str]) -> list[int]:
    """Attribute ids named by the words: -1 where none is named or the words disagree."""
    found: list[set[int]] = [set(), set(), set()]
    rows, cols, center = set(), set(), False
    for w in words:
        if w in _READ:
            found[_READ[w][0]].add(_READ[w][1])
        rows |= {_ROW[w]} if w in _ROW else set()
        cols |= {_COL[w]} if w in _COL else set()
        center |= w in CENTER_WORDS
    out = [f.pop() if len(f) == 1 else -1 for f in found]
    if len(rows) > 1 or len(cols) > 1 or (center and (rows or cols)) or not (rows or cols or center):
        return out + [-1]
    return out + [3 * (rows.pop() if rows else 1) + (cols.pop() if cols else 1)]


def parse(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 4) attribute ids (shape, color, size, position) named by each row, -1 for an attribute not named.
    Exact on sentences that ``parses``; on others a best effort from the words (-1 where they disagree)."""
    rows = [_read([VOCAB.words[i] for i in ids if i not in (PAD, VOCAB.V)]) for ids in _ids(tokens, 2, "parse")]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 4)


def text(tokens: torch.Tensor) -> list[str]:
    """Each row's words joined with spaces, PAD stripped, for printing."""
    if isinstance(tokens, torch.Tensor) and tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    return [
        " ".join(VOCAB.words[i] if i < VOCAB.V else "<mask>" for i in ids if i != PAD)
        for ids in _ids(tokens, 2, "text")
    ]
