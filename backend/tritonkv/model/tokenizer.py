"""Text <-> token ids through a checkpoint's ``tokenizer.json`` (the ``tokenizers`` library).

Streaming detokenisation rule: a delta is emitted only once the text it decodes to is
stable (no trailing U+FFFD from a multi-byte character cut in half).

Size bound (``max_text_bytes``): every token covers at most ``longest_token_bytes`` bytes of
the (normalised) text, so a text longer than ``n * longest_token_bytes`` bytes cannot encode to
``n`` tokens or fewer, and is refused before tokenising. The bound only holds when the
pipeline never drops text and its normaliser shrinks text by a known factor; tokenizers for
which that is not known (whitespace-dropping pre-tokenizers, fused unknown tokens, strip /
precompiled normalisers, added tokens that eat whitespace) get no bound (None).
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer

from tritonkv.model.onnx_files import checkpoint_directory


class TextTokenizer:
    def __init__(self, checkpoint_dir: str):
        checkpoint_dir = checkpoint_directory(checkpoint_dir)  # an .onnx file: the files beside it
        path = os.path.join(checkpoint_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint_dir!r} has no tokenizer.json; send input_ids instead of text_input "
                "or add the tokenizer to the checkpoint"
            )
        self._tok = Tokenizer.from_file(path)
        special = {}
        cfg_path = os.path.join(checkpoint_dir, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                special = json.load(f)
        self.eos_token = special.get("eos_token")
        if isinstance(self.eos_token, dict):
            self.eos_token = self.eos_token.get("content")

        self.longest_token_bytes = _longest_token_bytes(self._tok)
        self._shrink = _shrink_factor(json.loads(self._tok.to_str()))

    def max_text_bytes(self, max_tokens: int) -> int | None:
        """UTF-8 bytes beyond which a text surely encodes to more than ``max_tokens`` tokens;
        None when this tokenizer gives no such bound."""
        if self._shrink is None:
            return None
        return max_tokens * self.longest_token_bytes * self._shrink

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._tok.token_to_id(self.eos_token)

    @property
    def backend(self) -> Tokenizer:
        """The ``tokenizers`` object (its vocabulary and serialised pipeline)."""
        return self._tok


def _longest_token_bytes(tok: Tokenizer) -> int:
    """Longest vocabulary entry in UTF-8 bytes, as written in the vocabulary (``▁the``,
    ``<0xE2>``) or as decoded (byte-level ``Ġthe`` -> `` the``), whichever is longer; at least 4
    (one character, for an unknown token)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    longest = max((len(piece.encode("utf-8")) for piece in vocab), default=0)
    ids = sorted(vocab.values())
    for start in range(0, len(ids), 8192):
        decoded = tok.decode_batch([[i] for i in ids[start:start + 8192]], skip_special_tokens=False)
        longest = max(longest, max((len(d.encode("utf-8")) for d in decoded), default=0))
    return max(longest, 4)


# normalisers that only add text (factor 1) or shrink it at most 3x (a 3-byte character such
# as U+212A KELVIN SIGN or a fullwidth letter becomes one byte; 3 jamo compose to one syllable)
_NORMALIZER_FACTOR = {"Prepend": 1, "ByteLevel": 1, "NFD": 1, "NFC": 3, "NFKC": 3, "NFKD": 3, "Lowercase": 3}
_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split"}


def _shrink_factor(spec: dict) -> int | None:
    """How many text bytes one byte of normalised text can stand for; None when unbounded
    (the pipeline may drop text)."""
    if any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or []):
        return None
    model = spec.get("model") or {}
    if model.get("type") not in ("BPE", "Unigram"):
        return None  # WordPiece / WordLevel map a whole unknown word to one token
    if model.get("type") == "BPE" and model.get("unk_token") is not None and model.get("fuse_unk") \
            and not model.get("byte_fallback"):
        return None
    if model.get("type") == "Unigram" and not model.get("byte_fallback"):
        return None

    def pre_ok(p) -> bool:
        if p is None:
            return True
        if p.get("type") == "Sequence":
            return all(pre_ok(q) for q in p.get("pretokenizers", []))
        if p.get("type") == "Split":
            return str(p.get("behavior", "")).lower() != "removed"
        return p.get("type") in _SAFE_PRE_TOKENIZERS

    if not pre_ok(spec.get("pre_tokenizer")):
        return None

    def factor(n) -> int | None:
        if n is None:
            return 1
        kind = n.get("type")
        if kind == "Sequence":
            total = 1
            for m in n.get("normalizers", []):
                f = factor(m)
                if f is None:
                    return None
                total *= f
            return total
        if kind == "Replace":
            pattern = (n.get("pattern") or {}).get("String")
            content = n.get("content") or ""
            if pattern is None or not content:
                return None  # a regex or a deletion
            ratio = len(pattern.encode()) / len(content.encode())
            return max(1, -int(-ratio // 1))
        return _NORMALIZER_FACTOR.get(kind)

    return factor(spec.get("normalizer"))


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas (vLLM's prefix/read offsets)."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back, at the end of a turn."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]
