"""Streaming text: multi-byte characters and stop strings."""

from tritonkv.model.demo_checkpoint import byte_level_tokenizer, write_checkpoint
from tritonkv.model.tokenizer import IncrementalDetokenizer, TextTokenizer
from tritonkv.engine.output import TurnTextBuilder


def tokenizer(tmp_path):
    write_checkpoint(str(tmp_path), {"architectures": ["LlamaForCausalLM"]}, {}, byte_level_tokenizer())
    return TextTokenizer(str(tmp_path))


def test_byte_tokenizer_round_trip_and_bos(tmp_path):
    tok = tokenizer(tmp_path)
    ids = tok.encode("héllo", add_special_tokens=True)
    assert ids == [256, 104, 195, 169, 108, 108, 111]
    assert tok.encode("héllo", add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == "héllo" and tok.eos_token_id == 257


def test_multibyte_character_is_held_until_complete(tmp_path):
    detok = IncrementalDetokenizer(tokenizer(tmp_path))
    deltas = [detok.push([b]) for b in "aé€".encode()]
    assert deltas == ["a", "", "é", "", "", "€"]


def test_stop_string_cuts_text_and_holds_back_partial_matches(tmp_path):
    tok = tokenizer(tmp_path)
    builder = TurnTextBuilder(tok, ("END",))
    sent, stopped = [], False
    for b in b"abcENxEND tail":
        delta, stopped = builder.push(b)
        sent.append(delta)
        if stopped:
            break
    assert stopped and "".join(sent) == "abcENx"
    assert sent[:4] == ["", "", "a", "b"]  # two characters held back while they could start "END"
