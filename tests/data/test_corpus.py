"""corpus: the normalised pydoc_data text, its character vocabulary and deterministic splits."""

import pytest
import torch

from condiff.data import corpus
from condiff.errors import ConfigError


@pytest.fixture(scope="module")
def c():
    return corpus.load()


def test_alphabet_and_source():
    assert corpus.ALPHABET[0] == " " and len(corpus.ALPHABET) == 95 and corpus.ALPHABET[-1] == "~"
    assert corpus.SOURCE.startswith("pydoc_data.topics.topics (Python ")


def test_normalise():
    raw = "It\u2019s  \u201cfine\u201d\n\n\tx\u2014y\u2026 \u00df\u00b0 caf\u00e9 "
    assert corpus.normalise(raw) == 'It\'s "fine" x-y... caf'
    assert corpus.normalise("\n a\tb \n") == "a b"


def test_text_is_normalised_and_round_trips(c):
    text = corpus.normalised_text()
    assert len(text) > 400_000 and set(text) <= set(corpus.ALPHABET)
    assert "  " not in text and text == text.strip() and "assert" in text
    ids = c.encode(text)
    assert ids.dtype == torch.long and c.decode(ids) == text
    assert c.V == 95 < 128 and int(ids.min()) == 0 and int(ids.max()) < c.V
    assert c.encode("Az ~").tolist() == [33, 90, 0, 94]


def test_splits_are_contiguous_disjoint_cover_and_deterministic(c):
    full = c.encode(corpus.normalised_text())
    n = len(full)
    assert (len(c.train), len(c.valid)) == (int(0.9 * n), int(0.95 * n) - int(0.9 * n))
    assert len(c.train) + len(c.valid) + len(c.test) == n
    assert torch.equal(torch.cat([c.train, c.valid, c.test]), full)
    again = corpus.load()
    for a, b in ((c.train, again.train), (c.valid, again.valid), (c.test, again.test)):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # equal, not shared
    assert c.decode(c.train[:10]) == corpus.normalised_text()[:10]


def test_windows_and_chunks(c):
    w = corpus.windows(c.valid, 64, 500, torch.Generator().manual_seed(0))
    assert w.shape == (500, 64) and w.dtype == torch.long
    assert torch.equal(w, corpus.windows(c.valid, 64, 500, torch.Generator().manual_seed(0)))
    text = c.decode(c.valid)
    for row in w[:50]:
        assert c.decode(row) in text  # every window is a contiguous piece of the split
    whole = corpus.windows(c.test, len(c.test), 2)
    assert torch.equal(whole, c.test.expand(2, -1))
    ch = corpus.chunks(c.test, 1000)
    k = len(c.test) // 1000
    assert ch.shape == (k, 1000) and torch.equal(ch.flatten(), c.test[: k * 1000])
    assert torch.equal(corpus.chunks(torch.arange(7), 3), torch.tensor([[0, 1, 2], [3, 4, 5]]))


def test_errors(c):
    with pytest.raises(ConfigError, match="character '\\\\n' is not in the corpus alphabet"):
        c.encode("a\nb")
    with pytest.raises(ConfigError, match=r"character ids must be in \[0, 94\], got 0..95"):
        c.decode(torch.tensor([0, 95]))
    with pytest.raises(ConfigError, match=r"length must be an integer in \[1, 7\] .* got 8"):
        corpus.chunks(torch.arange(7), 8)
    with pytest.raises(ConfigError, match="n must be an integer >= 0, got -1"):
        corpus.windows(torch.arange(7), 3, -1)
    with pytest.raises(ConfigError, match="needs a 1-D integer tensor"):
        corpus.chunks(torch.zeros(2, 3, dtype=torch.long), 1)
