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


# ---- captions as English: articles, prepositions, spaced positions, suggestions --------------------------


@pytest.mark.parametrize(
    "caption, same_as",
    [
        ("top left red circle", "red circle top-left"),
        ("a large red circle in the top left", "large red circle top-left"),
        ("the blue square at the bottom right", "blue square bottom-right"),
        ("an small green triangle on the left", "small green triangle left"),
        ("Top Right", "top-right"),
        ("a red circle in the middle left", "red circle left"),
        ("yellow, bottom left", "yellow bottom-left"),
    ],
)
def test_articles_prepositions_and_spaced_positions(caption, same_as):
    assert text.tokenize(caption) == text.tokenize(same_as)


def test_spaced_position_tokens_are_the_hyphenated_ones():
    size, color, shape, position = text.tokenize("top left red circle")
    assert (size, color, shape) == (text.PAD, text.VOCAB["red"][1], text.VOCAB["circle"][1])
    assert position == text.VOCAB["top-left"][1]


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            "red cirle",
            "unknown word 'cirle' in prompt 'red cirle' (did you mean 'circle'?); accepted words: small, large, red",
        ),
        ("top lft", "unknown word 'lft' in prompt 'top lft' (did you mean 'left'?); accepted words: small"),
        ("large purple circle", "unknown word 'purple' in prompt 'large purple circle'; accepted words: small"),
        (
            "left top red",
            "prompt 'left top red' names the position twice ('left' and 'top'); for one position write 'top left' "
            "or 'top-left'",
        ),
        (
            "top, left",
            "prompt 'top, left' names the position twice ('top' and 'left'); for one position write 'top left' or "
            "'top-left'",
        ),
        ("top left right", "prompt 'top left right' names the position twice ('top-left' and 'right')"),
        ("red blue", "prompt 'red blue' names the color twice ('red' and 'blue')"),
        ("a the", "prompt 'a the' names no attribute"),
    ],
)
def test_errors_name_the_words_and_suggest(bad, message):
    with pytest.raises(ConfigError) as e:
        text.tokenize(bad)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "caption, digit", [("7", 7), (" 3 ", 3), ("digit 3", 3), ("the digit 0", 0), ("a 9", 9), ("Number 5", 5)]
)
def test_digits_captions(caption, digit):
    from condiff.models.digits import DigitsFamily

    assert DigitsFamily().parse_prompt(caption).tolist() == [digit]


@pytest.mark.parametrize(
    "bad, hint",
    [
        ("seven", " (did you mean '7'?)"),
        ("digit seven", " (did you mean '7'?)"),
        ("12", ""),
        ("digit", ""),
        ("3 4", ""),
    ],
)
def test_digits_caption_errors(bad, hint):
    from condiff.models.digits import DigitsFamily

    with pytest.raises(ConfigError) as e:
        DigitsFamily().parse_prompt(bad)
    assert str(e.value) == f"digits prompt must be a digit 0-9, got {bad!r}{hint}; e.g. '7' or 'digit 7'"
