"""Builds a turn's streamed deltas: incremental text, stop strings, held-back text.

Rule: while streaming, text that could still grow into a stop string is held back
(the last ``max(len(stop)) - 1`` characters); a matched stop string and what follows it are
never sent. Token-id deltas are sent as sampled (the ids of a stop string included).
"""

from __future__ import annotations

from tritonkv.model.tokenizer import IncrementalDetokenizer, TextTokenizer


class TurnTextBuilder:
    def __init__(self, tokenizer: TextTokenizer | None, stop: tuple[str, ...]):
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a sampled token; returns (text delta to send now, a stop string matched)."""
        if self.detok is None:
            return "", False
        search_from = max(0, len(self.text) - self.hold)
        self.text += self.detok.push([token_id])
        for s in self.stop:
            at = self.text.find(s, search_from)
            if at >= 0:
                self.text = self.text[:at]
                return self._take(len(self.text)), True
        return self._take(len(self.text) - self.hold), False

    def finish(self, stopped: bool) -> str:
        if self.detok is not None and not stopped:
            self.text += self.detok.flush()
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta = self.text[self.sent:upto]
        self.sent = upto
        return delta
