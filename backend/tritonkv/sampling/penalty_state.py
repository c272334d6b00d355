"""Per-sequence token state on the device for the settings that depend on what a sequence
already holds (repetition / presence / frequency penalties, min_tokens) or add a fixed bias
(logit_bias). One ``PenaltyTable`` per runner; a turn that uses any of them holds one slot
(``PenaltyState``) from its first step to its end.

Rules:
- A slot is one row of each table tensor: ``counts`` (int32, times each token was generated
  in this turn), ``seen`` (bool, tokens of the context the turn started from, for
  repetition_penalty), ``bias`` (float32 logit_bias), ``stops`` (bool, EOS and stop_token_ids,
  masked while fewer than min_tokens were generated) and ``out_len`` (int32).
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


class PenaltyTable:
    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.capacity = 0
        self.counts = self.seen = self.bias = self.stops = self.out_len = None
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

    def open(self, params: SamplingParams, context_ids: Iterable[int], eos_ids: Iterable[int]) -> PenaltyState:
        """A slot for one turn, reset from ``context_ids`` (every token of the sequence before
        the turn's first output) and the settings."""
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
        self.stops[slot].zero_()
        if params.min_tokens > 0:
            stops = sorted({*eos_ids, *params.stop_token_ids})
            if stops:
                self.stops[slot].index_fill_(0, torch.tensor(stops, dtype=torch.int64).to(dev), True)
        return PenaltyState(self, slot)

    def _release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    @property
    def slots_in_use(self) -> int:
        return self.capacity - len(self._free)

    def record(self, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """After a draw: each slot's sequence generated ``token_ids`` (device tensors [m])."""
        self.counts.index_put_((slots, token_ids), torch.ones_like(token_ids, dtype=torch.int32), accumulate=True)
        self.out_len.index_add_(0, slots, torch.ones_like(slots, dtype=torch.int32))


class PenaltyState:
    """One turn's slot; ``close`` (or the state being dropped) gives it back."""

    def __init__(self, table: PenaltyTable, slot: int):
        self.table = table
        self.slot = slot
        self._finalizer = weakref.finalize(self, table._release, slot)

    def close(self) -> None:
        self._finalizer()  # runs once
