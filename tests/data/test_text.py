import pytest

from condiff.data import text
from condiff.errors import ConfigError


def test_word_order_does_not_matter_and_empty_is_null():
    assert text.tokenize("large red circle top-left") == text.tokenize("top-left circle red large")
    assert text.tokenize("") == [text.PAD] * text.SEQ_LEN
    assert text.null_tokens(2).tolist() == [[text.PAD] * text.SEQ_LEN] * 2


def test_partial_caption_fills_only_its_slots():
    ids = text.tokenize("blue")
    assert sum(i != text.PAD for i in ids) == 1


@pytest.mark.parametrize("bad", ["large purple circle", "circle square", "hello"])
def test_bad_prompts_raise_one_line_errors(bad):
    with pytest.raises(ConfigError) as e:
        text.tokenize(bad)
    assert "\n" not in str(e.value) and repr(bad) in str(e.value)
