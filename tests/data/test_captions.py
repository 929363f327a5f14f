"""captions: the generated language, its exact recogniser and parser, and the translation pairs."""

import pytest
import torch

from condiff.data import captions
from condiff.data.shapes import ATTRIBUTES, random_attrs
from condiff.errors import ConfigError

V = captions.VOCAB.V
# the test's own synonym table: every word to its canonical form (the first synonym)
CANON = {"disc": "circle", "box": "square", "wedge": "triangle", "little": "small", "tiny": "small", "big": "large"}
CANON |= {
    "huge": "large",
    "upper": "top",
    "lower": "bottom",
    "middle": "center",
    "shape": "object",
    "thing": "object",
    "an": "a",
}
ALL_ATTRS = torch.cartesian_prod(*[torch.arange(len(v)) for v in ATTRIBUTES.values()])  # (324, 4)
ALL_KEEPS = torch.tensor([[bool(m >> j & 1) for j in range(4)] for m in range(16)])


def expected(attrs, keep):
    return torch.where(keep, attrs, torch.full_like(attrs, -1))


def canonical(tokens):
    return [" ".join(CANON.get(w, w) for w in s.split()) for s in captions.text(tokens)]


def test_vocabulary():
    assert V == 40 and captions.VOCAB.words[captions.PAD] == "<pad>" and captions.SEQ_LEN == 12
    words = ["there", "is", "a", "red", "disc", ",", "huge"]
    ids = captions.VOCAB.encode(words)
    assert ids.dtype == torch.long and captions.VOCAB.decode(ids) == words
    assert captions.VOCAB.decode(torch.tensor([0, V])) == ["<pad>", "<mask>"]
    with pytest.raises(ConfigError, match="unknown caption word 'purple'"):
        captions.VOCAB.encode(["a", "purple", "circle"])


def test_canonical_sentences_of_every_template():
    attrs = torch.tensor([[0, 0, 1, 0]])  # circle, red, large, top-left
    full = [
        "a large red circle at the top left",
        "top left : large red circle",
        "there is a red circle , large , in the top left",
        "circle , red , large , top left",
        "the circle in the top left is large and red",
    ]
    no_shape_size = ["a red object at the top left", "top left : red object", "there is a red object , in the top left"]
    no_shape_size += ["red , top left", "the object in the top left is red"]
    nothing = ["an object", "object", "there is an object", "object", "the object"]
    for t in range(captions.TEMPLATES):
        for keep, want in (([1, 1, 1, 1], full[t]), ([0, 1, 0, 1], no_shape_size[t]), ([0, 0, 0, 0], nothing[t])):
            tokens, _ = captions.generate(
                attrs, template=t, keep=torch.tensor([keep], dtype=torch.bool), synonyms=False
            )
            assert captions.text(tokens) == [want]


def test_every_attribute_set_template_and_subset_parses_back_exactly():
    g = torch.Generator().manual_seed(0)
    attrs = ALL_ATTRS.repeat_interleave(16, 0)
    keep = ALL_KEEPS.repeat(len(ALL_ATTRS), 1)
    longest = 0
    for t in range(captions.TEMPLATES):
        for synonyms in (False, True):
            tokens, k = captions.generate(attrs, g, template=t, keep=keep, synonyms=synonyms)
            assert tokens.shape == (len(attrs), captions.SEQ_LEN) and torch.equal(k, keep)
            assert torch.equal(captions.parse(tokens), expected(attrs, keep))
            assert captions.parses(tokens).all() and captions.parses(tokens, template=t).all()
            assert tokens.max() < V
            longest = max(longest, int((tokens != captions.PAD).sum(1).max()))
    assert longest == captions.SEQ_LEN


def test_random_captions_with_drops_are_reproducible_and_parse():
    g = torch.Generator().manual_seed(1)
    attrs = random_attrs(4000, g)
    tokens, keep = captions.generate(attrs, torch.Generator().manual_seed(2), p_drop=0.5)
    again, keep2 = captions.generate(attrs, torch.Generator().manual_seed(2), p_drop=0.5)
    assert torch.equal(tokens, again) and torch.equal(keep, keep2)
    assert abs(keep.float().mean().item() - 0.5) < 0.02
    assert torch.equal(captions.parse(tokens), expected(attrs, keep))
    assert captions.parses(tokens).all()
    nonpad = tokens != captions.PAD  # PAD only at the end: once a row pads, it stays padded
    assert torch.equal(nonpad, nonpad.cummin(1).values)
    used = {w for s in captions.text(tokens) for w in s.split()}
    assert used == set(captions.VOCAB.words[1:])  # every word is used, PAD aside
    keep_all, _ = captions.generate(attrs, g)
    assert torch.equal(captions.parse(keep_all), attrs)


def test_one_word_corruptions_are_caught_or_parse_consistently():
    g = torch.Generator().manual_seed(3)
    attrs = random_attrs(3000, g)
    tokens, _ = captions.generate(attrs, g, p_drop=0.3)
    length = (tokens != captions.PAD).sum(1)
    pos = (torch.rand(len(tokens), generator=g) * length).long()
    new = torch.randint(1, V - 1, (len(tokens),), generator=g)
    new = new + (new >= tokens[torch.arange(len(tokens)), pos]).long()  # a different non-PAD word
    bad = tokens.clone()
    bad[torch.arange(len(tokens)), pos] = new
    ok = captions.parses(bad)
    # most corruptions are caught; the rest are other sentences of the language (a colour for a colour, a size
    # for an article: "a box" -> "red box", one word for another: "big" -> "right")
    assert 0.05 < ok.float().mean() < 0.2
    parsed = captions.parse(bad)
    canon = canonical(bad)
    for i in ok.nonzero()[:, 0].tolist():
        # one word names at most one attribute: at most one attribute is lost and one gained
        assert (parsed[i] != captions.parse(tokens[i : i + 1])[0]).sum() <= 2
        # consistency: the sentence is a rendering (up to synonyms) of exactly the attributes it parses to
        renders = set()
        for t in range(captions.TEMPLATES):
            a = parsed[i : i + 1].clamp(min=0)
            tok, _ = captions.generate(a, template=t, keep=parsed[i : i + 1] >= 0, synonyms=False)
            renders |= set(canonical(tok))
        assert canon[i] in renders
    # a swap within a class parses whenever the class's words are interchangeable there, e.g. colours
    row = captions.VOCAB.encode(["there", "is", "a", "red", "circle", ",", "large"])
    for j, color in enumerate(ATTRIBUTES["color"]):
        swapped = torch.cat([row[:3], captions.VOCAB.encode([color]), row[4:], torch.zeros(5, dtype=torch.long)])
        assert captions.parse(swapped.unsqueeze(0)).tolist() == [[0, j, 1, -1]]


def test_malformed_sequences_do_not_parse():
    def enc(words):
        ids = captions.VOCAB.encode(words)
        return torch.cat([ids, torch.zeros(captions.SEQ_LEN - len(ids), dtype=torch.long)]).unsqueeze(0)

    good = enc(["a", "red", "circle", "at", "the", "top", "left"])
    pad_inside = good.clone()
    pad_inside[0, 1] = captions.PAD
    masked = good.clone()
    masked[0, 1] = V
    rows = [
        good,
        pad_inside,
        masked,
        torch.zeros(1, captions.SEQ_LEN, dtype=torch.long),
        enc(["an", "red", "circle"]),  # wrong article
        enc(["a", "object"]),
        enc(["a", "red", "blue", "circle"]),  # two colours
        enc(["circle", ",", "object"]),
        enc(["top", ":", "red", "circle", "at", "the", "top"]),  # two positions
        enc(["there", "is", "a", "circle", ",", "red"]),  # template 2 puts the colour before the noun
    ]
    batch = torch.cat(rows)
    assert captions.parses(batch).tolist() == [True] + [False] * (len(rows) - 1)
    assert captions.parse(batch).tolist() == [
        [0, 0, -1, 0],
        [0, -1, -1, 0],  # best effort on malformed text: the words' reading
        [0, -1, -1, 0],
        [-1, -1, -1, -1],
        [0, 0, -1, -1],
        [-1, -1, -1, -1],
        [0, -1, -1, -1],  # the colours disagree
        [0, -1, -1, -1],
        [0, 0, -1, 1],
        [0, 0, -1, -1],
    ]
    assert captions.text(batch[:3]) == ["a red circle at the top left", "a circle at the top left"] + [
        "a <mask> circle at the top left"
    ]


def test_translate_pairs():
    g = torch.Generator().manual_seed(4)
    attrs = random_attrs(500, g)
    src, dst = captions.translate_pairs(attrs, g, 3, 4, p_drop=0.25)
    assert captions.parses(src, template=3).all() and captions.parses(dst, template=4).all()
    assert torch.equal(captions.parse(src), captions.parse(dst))
    assert (captions.parse(src) == -1).float().mean().item() == pytest.approx(0.25, abs=0.03)
    src0, dst0 = captions.translate_pairs(attrs, g, 0, 2)
    assert torch.equal(captions.parse(src0), attrs) and torch.equal(captions.parse(dst0), attrs)
    # canonical words: the destination is a function of the source
    a, b = captions.translate_pairs(attrs, g, 1, 0, synonyms=False)
    table = {}
    for s, d in zip(a.tolist(), b.tolist()):
        assert table.setdefault(tuple(s), d) == d


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: captions.generate(torch.tensor([[3, 0, 0, 0]])), "shape ids must be in \\[0, 2\\], got 3..3"),
        (lambda: captions.generate(torch.zeros(2, 3, dtype=torch.long)), "attrs must be an integer tensor"),
        (lambda: captions.generate(torch.zeros(1, 4, dtype=torch.long), p_drop=1.5), "p_drop must be .* got 1.5"),
        (lambda: captions.generate(torch.zeros(1, 4, dtype=torch.long), template=5), "template must be .* got 5"),
        (lambda: captions.translate_pairs(torch.zeros(1, 4, dtype=torch.long), None, 0, -1), "dst_template"),
        (lambda: captions.parse(torch.full((1, 12), V + 1)), "token ids must be in \\[0, 40\\]"),
        (lambda: captions.parses(torch.zeros(12, dtype=torch.long)), "2-D integer token tensor"),
    ],
)
def test_bad_input_is_a_one_line_config_error(call, message):
    with pytest.raises(ConfigError, match=message) as e:
        call()
    assert "\n" not in str(e.value)
