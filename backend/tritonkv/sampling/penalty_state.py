"""Per-sequence token state on the device for the settings that depend on what a sequence
already holds (repetition / presence / frequency penalties, min_tokens) or add a fixed bias
(logit_bias) or ban words (bad_words, sampling/bad_words.py). One ``PenaltyTable`` per runner;
a turn that uses any of them holds one slot (``PenaltyState``) from its first step to its end.

Rules:
- A slot is one row of each table tensor: ``counts`` (int32, times each token was generated
  in this turn), ``seen`` (bool, tokens of the context the turn started from, for
  repetition_penalty), ``bias`` (float32 logit_bias), ``stops`` (bool, EOS and stop_token_ids,
  masked while fewer than min_tokens were generated) and ``out_len`` (int32).
- bad_words: a one-token word's token has ``bias`` -inf (after logit_bias). Longer words live
  in ``word_prefix`` (int32 ``[slot, W, L]``: a word's tokens but its last, right-aligned,
  padded on the left with ``ANY`` = -2, which matches any token), ``word_last`` (int64
  ``[slot, W]``, -1: no word) and ``recent`` (int32 ``[slot, L]``: the turn's last L generated
  tokens, -1 before there were L, so a prefix longer than the output never matches). A word
  whose prefix equals the end of ``recent`` has its last token masked (``ban_words_``). W and
  L widen (copying) when a turn brings more or longer words; with no open slot holding such
  words, ``ban_words_`` does nothing.
- A slot is written only by device operations queued in stream order: when it is opened
  (reset from the turn's context) and by the sampler after each draw (``record``, in place,
  one scatter for the whole batch). A step already launched for a turn that ended may still
  update its old slot; reopening it later queues the reset after that update.
- The table grows (doubling) when every slot is taken; it is allocated at the first turn
  that needs it, so a server whose requests use none of these settings holds no memory for it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable

import torch

from tritonkv.sampling.params import SamplingParams

FIRST_SLOTS = 8
ANY = -2  # a word_prefix entry that matches any token (left padding)


class PenaltyTable:
    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.capacity = 0
        self.counts = self.seen = self.bias = self.stops = self.out_len = None
        self.word_prefix = self.word_last = self.recent = None  # allocated by the first multi-token word
        self.words, self.word_len = 0, 0  # W and L
        self._word_slots: set[int] = set()  # open slots holding multi-token words
        self._free: list[int] = []
        self._lock = threading.Lock()  # close() may come from a finalizer on another thread

    def _grow(self) -> None:
        old, cap = self.capacity, max(FIRST_SLOTS, 2 * self.capacity)
        v, dev = self.vocab_size, self.device

        def grown(t, dtype, shape):
            new = torch.zeros(shape, dtype=dtype, device=dev)
            if t is not None:
                new[:old].copy_(t)
            return new

        self.counts = grown(self.counts, torch.int32, (cap, v))
        self.seen = grown(self.seen, torch.bool, (cap, v))
        self.bias = grown(self.bias, torch.float32, (cap, v))
        self.stops = grown(self.stops, torch.bool, (cap, v))
        self.out_len = grown(self.out_len, torch.int32, (cap,))
        self._free.extend(range(cap - 1, old - 1, -1))
        self.capacity = cap
        if self.words:
            self._widen(self.words, self.word_len, old)

    def _widen(self, words: int, length: int, rows: int | None = None) -> None:
        """Word tables of ``capacity`` slots x ``words`` x ``length``; the first ``rows`` slots
        (default: all) keep their words (right-aligned) and recent tokens."""
        rows = self.capacity if rows is None else rows
        cap, dev, w, n = self.capacity, self.device, self.words, self.word_len
        prefix = torch.full((cap, words, length), ANY, dtype=torch.int32, device=dev)
        last = torch.full((cap, words), -1, dtype=torch.int64, device=dev)
        recent = torch.full((cap, length), -1, dtype=torch.int32, device=dev)
        if w:
            prefix[:rows, :w, length - n:].copy_(self.word_prefix[:rows])
            last[:rows, :w].copy_(self.word_last[:rows])
            if n:
                recent[:rows, length - n:].copy_(self.recent[:rows])
        self.word_prefix, self.word_last, self.recent = prefix, last, recent
        self.words, self.word_len = words, length

    def open(self, params: SamplingParams, context_ids: Iterable[int], eos_ids: Iterable[int],
             bad_words_ids: list[list[int]] = ()) -> PenaltyState:
        """A slot for one turn, reset from ``context_ids`` (every token of the sequence before
        the turn's first output), the settings and ``bad_words_ids`` (sampling/bad_words.py)."""
        with self._lock:
            if not self._free:
                self._grow()
            slot = self._free.pop()
        dev = self.device
        self.counts[slot].zero_()
        self.out_len[slot] = 0
        self.seen[slot].zero_()
        if params.repetition_penalty != 1.0:
            ids = torch.tensor(list(context_ids), dtype=torch.int64).to(dev, non_blocking=True)
            self.seen[slot].index_fill_(0, ids, True)
        self.bias[slot].zero_()
        if params.logit_bias:
            ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.int64)
            values = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32)
            self.bias[slot].index_copy_(0, ids.to(dev), values.to(dev))
        single = sorted({ids[0] for ids in bad_words_ids if len(ids) == 1})
        if single:
            self.bias[slot].index_fill_(0, torch.tensor(single, dtype=torch.int64).to(dev), float("-inf"))
        self._open_words(slot, [ids for ids in bad_words_ids if len(ids) > 1])
        self.stops[slot].zero_()
        if params.min_tokens > 0:
            stops = sorted({*eos_ids, *params.stop_token_ids})
            if stops:
                self.stops[slot].index_fill_(0, torch.tensor(stops, dtype=torch.int64).to(dev), True)
        return PenaltyState(self, slot)

    def _open_words(self, slot: int, words: list[list[int]]) -> None:
        if self.words:
            self.word_last[slot].fill_(-1)
            self.recent[slot].fill_(-1)
        if not words:
            self._word_slots.discard(slot)
            return
        longest = max(len(w) for w in words) - 1
        if len(words) > self.words or longest > self.word_len:
            self._widen(max(len(words), self.words), max(longest, self.word_len))
        n = self.word_len
        prefix = torch.full((len(words), n), ANY, dtype=torch.int32)
        for i, w in enumerate(words):
            prefix[i, n - len(w) + 1:] = torch.tensor(w[:-1], dtype=torch.int32)
        self.word_prefix[slot].fill_(ANY)
        self.word_prefix[slot, :len(words)].copy_(prefix.to(self.device, non_blocking=True))
        self.word_last[slot, :len(words)].copy_(torch.tensor([w[-1] for w in words], dtype=torch.int64).to(self.device))
        self._word_slots.add(slot)

    def ban_words_(self, logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``logits`` (rows of ``slots``, changed in place) with each multi-token bad word's
        last token at -inf where the row's output ends with the word's other tokens. Touches
        only [rows, W] entries: a min-scatter of -inf (matched) or +inf (not, or no word), so
        two words ending in one token cannot undo each other."""
        if not self._word_slots:
            return logits
        prefix = self.word_prefix.index_select(0, slots)  # [m, W, L]
        recent = self.recent.index_select(0, slots)[:, None, :]
        last = self.word_last.index_select(0, slots)
        match = ((prefix == recent) | (prefix == ANY)).all(dim=-1) & (last >= 0)
        values = torch.where(match, float("-inf"), float("inf")).to(logits.dtype)
        return logits.scatter_reduce_(1, last.clamp(min=0), values, reduce="amin")

    def _release(self, slot: int) -> None:
        with self._lock:
            self._word_slots.discard(slot)
            self._free.append(slot)

    @property
    def slots_in_use(self) -> int:
        return self.capacity - len(self._free)

    def record(self, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """After a draw: each slot's sequence generated ``token_ids`` (device tensors [m])."""
        self.counts.index_put_((slots, token_ids), torch.ones_like(token_ids, dtype=torch.int32), accumulate=True)
        self.out_len.index_add_(0, slots, torch.ones_like(slots, dtype=torch.int32))
        if self._word_slots:  # (a slot opened later resets its recent tokens)
            shifted = torch.cat([self.recent.index_select(0, slots)[:, 1:], token_ids[:, None].to(torch.int32)], dim=1)
            self.recent.index_copy_(0, slots, shifted)


class PenaltyState:
    """One turn's slot; ``close`` (or the state being dropped) gives it back."""

    def __init__(self, table: PenaltyTable, slot: int):
        self.table = table
        self.slot = slot
        self._finalizer = weakref.finalize(self, table._release, slot)

    def close(self) -> None:
        self._finalizer()  # runs once
