"""A tokenizer for the tiny checkpoints (vocab 96): ids 0-2 are <unk> <s> </s>, 3-92 the
characters chr(32)..chr(121) (id = ord(c) - 29), and three merged tokens: 93 "ab",
94 " ab", 95 " a" (BPE merges a+b, " "+ab, " "+a)."""

from tokenizers import Tokenizer, models

SPECIAL = ["<unk>", "<s>", "</s>"]
CHARS = [chr(c) for c in range(32, 122)]
MERGED = ["ab", " ab", " a"]


def char_id(c: str) -> int:
    return ord(c) - 29


def tiny_tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS + MERGED)}
    assert len(vocab) == 96
    return Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), (" ", "ab"), (" ", "a")], unk_token="<unk>"))


def token_text(token_id: int) -> str:
    return (SPECIAL + CHARS + MERGED)[token_id]
