"""sampling/grammar.py's ``tokenizer_info`` (built from tokenizer.json alone, no transformers)
equals xgrammar's own ``TokenizerInfo.from_huggingface`` on transformers' fast tokenizer of the
same files: the decoded vocabulary, vocab type, prefix space, size and stop ids. Two pipelines:
the demo checkpoint's byte-level BPE and a Llama-2-style SentencePiece BPE with byte fallback."""

import json
import os

import pytest

from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint
from tritonkv.sampling.grammar import tokenizer_info

xgr = pytest.importorskip("xgrammar")


def sentencepiece_style_checkpoint(path) -> str:
    """tokenizer.json of a Llama-2-like tokenizer: ▁ pieces, <0xNN> byte fallback tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ("▁", "a", "b", "c", "▁a", "▁b", "ab", "▁ab", "▁abc"):
        vocab[piece] = len(vocab)
    merges = [("▁", "a"), ("▁", "b"), ("a", "b"), ("▁a", "b"), ("▁ab", "c")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>"}, f)
    return str(path)


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece_byte_fallback"])
def test_tokenizer_info_equals_xgrammars_from_huggingface(kind, tmp_path):
    from transformers import AutoTokenizer

    from tritonkv.model.tokenizer import TextTokenizer

    path = ensure_demo_checkpoint() if kind == "byte_level" else sentencepiece_style_checkpoint(tmp_path)
    tok = TextTokenizer(path)
    vocab_size = tok.backend.get_vocab_size(with_added_tokens=True) + 5  # a model vocab wider than the tokenizer's
    stops = [tok.eos_token_id]
    ours = tokenizer_info(xgr, tok.backend, vocab_size, stops)
    theirs = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(path), vocab_size=vocab_size,
                                                stop_token_ids=stops)
    assert (ours.vocab_type, ours.add_prefix_space, ours.vocab_size, ours.stop_token_ids) == (
        theirs.vocab_type, theirs.add_prefix_space, theirs.vocab_size, theirs.stop_token_ids)
    assert ours.decoded_vocab == theirs.decoded_vocab
    # the two kinds really differ (the detection is not a constant)
    assert ours.vocab_type == (xgr.VocabType.BYTE_LEVEL if kind == "byte_level" else xgr.VocabType.BYTE_FALLBACK)
