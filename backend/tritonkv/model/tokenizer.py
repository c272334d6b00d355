"""Text <-> token ids through a checkpoint's ``tokenizer.json`` (the ``tokenizers`` library).

Streaming detokenisation rule: a delta is emitted only once the text it decodes to is
stable (no trailing U+FFFD from a multi-byte character cut in half).
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer


class TextTokenizer:
    def __init__(self, checkpoint_dir: str):
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

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._tok.token_to_id(self.eos_token)


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
