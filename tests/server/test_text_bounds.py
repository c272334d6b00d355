"""``TextTokenizer.max_text_bytes``: a text longer than the bound surely encodes to more than
``n`` tokens, so the server may refuse it before tokenising."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from tritonkv.model.demo_checkpoint import byte_level_tokenizer
from tritonkv.model.tokenizer import TextTokenizer


def load(tmp_path, tok: Tokenizer) -> TextTokenizer:
    tok.save(str(tmp_path / "tokenizer.json"))
    return TextTokenizer(str(tmp_path))


def llama2_style() -> Tokenizer:
    """SentencePiece-BPE as Llama 2 / Mistral ship it: byte fallback, ▁ for spaces."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "t", "h", "e", "▁t", "he", "▁the", "▁▁", "▁▁▁▁"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "▁"), ("▁▁", "▁▁")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def covers_at_most(tok: TextTokenizer, texts, n: int) -> None:
    bound = tok.max_text_bytes(n)
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        # the bound's promise: per token, at most bound / n text bytes
        assert len(text.encode()) <= len(ids) * bound / n, text


def sample_texts(seed=0):
    rng = random.Random(seed)
    alphabet = "the  \t\n\u00e9\u212a\uff21\u3042\U0001f600<s></s>"
    return [''.join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(200)]


def test_demo_byte_level_tokenizer(tmp_path):
    tok = load(tmp_path, byte_level_tokenizer())
    assert tok.longest_token_bytes == 4  # "</s>"; a byte token covers one byte
    assert tok.max_text_bytes(512) == 2048
    covers_at_most(tok, sample_texts(), 512)


def test_llama2_style_tokenizer(tmp_path):
    tok = load(tmp_path, llama2_style())
    assert tok.longest_token_bytes == 12  # "▁▁▁▁" as written
    assert tok.max_text_bytes(10) == 120
    covers_at_most(tok, sample_texts(1), 10)


def test_nfc_normaliser_widens_the_bound(tmp_path):
    t = llama2_style()
    t.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Prepend("▁"),
                                         normalizers.Replace(" ", "▁")])
    assert load(tmp_path, t).max_text_bytes(10) == 10 * 12 * 3


@pytest.mark.parametrize("change", ["whitespace", "strip", "wordpiece", "regex_replace"])
def test_pipelines_that_may_drop_text_get_no_bound(tmp_path, change):
    t = llama2_style()
    if change == "whitespace":
        t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    elif change == "strip":
        t.normalizer = normalizers.Strip()
    elif change == "regex_replace":
        from tokenizers import Regex

        t.normalizer = normalizers.Replace(Regex(r"\s+"), " ")
    else:
        t = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert load(tmp_path, t).max_text_bytes(10) is None
