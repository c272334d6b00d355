"""bad_words become token sequences by vLLM's rule (with and without a leading space), with
ids written out by hand from the tokenizer's vocabulary; bad values are refused naming them."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from bad_words_helpers import char_id, tiny_tokenizer  # noqa: E402

from tritonkv.sampling.bad_words import bad_words_token_ids  # noqa: E402
from tritonkv.sampling.params import ParameterError, RequestError, check_value  # noqa: E402


def encode(text):
    return tiny_tokenizer().encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("word,expected", [
    ("ab", [[93], [94]]),  # one token either way, different tokens: both banned
    ("abc", [[93, char_id("c")], [94, char_id("c")]]),
    ("ac", [[char_id("a"), char_id("c")], [95, char_id("c")]]),
    ("c", [[char_id("c")]]),  # " c" is two tokens: only the plain form
    ("  ab", [[93], [94]]),  # leading whitespace is stripped first
    ("xa", [[char_id("x"), char_id("a")]]),  # " xa" is three tokens: only the plain form
])
def test_vllm_rule(word, expected):
    assert bad_words_token_ids((word,), encode, 96) == expected


def test_without_a_tokenizer_bad_words_are_refused():
    assert bad_words_token_ids((), None, 96) == []
    with pytest.raises(RequestError, match="bad_words need the checkpoint's tokenizer"):
        bad_words_token_ids(("x",), None, 96)


def test_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(RequestError, match="outside the model's vocabulary"):
        bad_words_token_ids(("ab",), encode, 90)


@pytest.mark.parametrize("value,words", [(5, "list of strings"), (["a", 3], "list of strings"),
                                         ([" "], r"bad_words\[0\] is blank"), (["x"] * 65, "at most 64"),
                                         (["y" * 300], "at most 256")])
def test_bad_values_name_bad_words(value, words):
    with pytest.raises(ParameterError, match=words):
        check_value("bad_words", value)


def test_values_as_sent_by_each_surface():
    assert check_value("bad_words", ["a", "b c"]) == ("a", "b c")
    assert check_value("bad_words", '["a", "b c"]') == ("a", "b c")  # a request parameter's JSON text
    assert check_value("bad_words", "word") == ("word",)
