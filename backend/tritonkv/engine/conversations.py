"""The conversation table of the engine: turns applied in submission order, a sequence's
turn started, finished, aborted or failed, its KV released; every answer to a caller.

Rules (the engine thread alone runs these):
- A correlation id names one open conversation; START opens it, a turn without START must
  find it, END releases it after its last turn; a rejected request changes nothing except
  that its END still closes the conversation once the turns before it are done.
- A request can only fail itself: a fault while admitting it or while building its step row
  ends that turn (and releases its conversation), never another.
- ``abort`` ends a turn in order with submissions: cancelled (the conversation is released)
  or stopped keeping N output tokens (the caller found a stop string; tokens sampled after
  it are taken back).
- A frontend that is gone (``drop_owner``) gets no more answers; its conversations release
  their blocks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from tritonkv.engine.requests import RequestError, SamplingParams, Submission, Turn, TurnOutput
from tritonkv.sampling.bad_words import bad_words_token_ids
from tritonkv.sampling.params import check_samples
from tritonkv.sampling.grammar import GrammarCompiler, guided_kind
from tritonkv.sched.sequence import Sequence, SeqStatus

log = logging.getLogger("tritonkv.engine")

CANCEL_POLL_S = 0.05  # how often running turns' is_cancelled is asked (in-process callers)


@dataclass
class Abort:
    request_id: Hashable
    kept_tokens: int | None  # None: cancel (every sample of the request)
    index: int = 0  # kept_tokens: the sample (choice) they are of


@dataclass
class DropOwner:
    owner: Hashable


def _unanswered(out: TurnOutput) -> None:
    """The emit of a turn whose frontend is gone."""


class Conversations:
    """The Engine's conversation rules (a mixin: the state is the Engine's)."""

    def _accept_one(self, sub) -> None:
        """``_accept`` with the request's own faults kept to the request."""
        if isinstance(sub, Abort):
            return self._abort(sub)
        if isinstance(sub, DropOwner):
            return self._drop_owner(sub.owner)
        try:
            self._accept(sub)
        except Exception as exc:
            log.exception("request could not be admitted")
            seq = self._live.get(sub.corr_id)
            if seq is not None and seq.turn is sub.turn:
                self._finish(seq, TurnOutput("", [], True, "error", error=f"request failed: {exc}"))
            elif not sub.turn.output_ids:
                self._reply_error(sub.turn, f"request failed: {exc}")

    def _fail_everything(self, message: str) -> None:
        for seq in list(self._seqs.values()):
            if seq.turn is not None:
                self._reply_error(seq.turn, message)
                seq.turn = None
            while seq.pending:
                self._reply_error(seq.pending.popleft(), message)
        for item in self._queued():
            self._reply_error(item.turn, message)

    def _accept(self, sub: Submission) -> None:
        """Apply one submitted turn to the conversation table, in submission order.

        A rejected request (``error``) changes nothing, except that its END still closes the
        conversation once the turns queued before it are done."""
        corr_id, turn, start, stateless, error = sub.corr_id, sub.turn, sub.start, sub.stateless, sub.error
        seq = self._live.get(corr_id)
        if start and seq is not None and seq.turn is not None and seq.turn.is_cancelled():
            # a client that cancelled and at once reuses the id must not race the cancel poll
            self._finish(seq, TurnOutput("", [], True, "cancelled"))
            seq = self._live.get(corr_id)
        if start and seq is not None and not stateless:
            turn.opens_slot = False  # the id's slot belongs to the live conversation
            self._reply_error(turn, error or f"sequence {corr_id!r} is already live: START was sent "
                                    "for an open conversation; send END first or use a new correlation id")
            return
        if not start and seq is None:
            self._reply_error(turn, error or f"sequence {corr_id!r} is not live: its first request must "
                                    "carry START (it may have ended, been cancelled or timed out)")
            return
        if error is None:  # n / best_of > 1 only on one-shot requests
            try:
                check_samples(turn.params, False, stateless)
            except RequestError as exc:
                error = str(exc)
        if error is not None and (start or not turn.end_sequence):
            self._reply_error(turn, error)
            return
        if start:
            seq = Sequence(seq_id=next(self._keys), extra_keys=sub.extra_keys, stateless=stateless, owner=sub.owner)
            if turn.params.prompt_logprobs is not None:  # its own block keys: no prefix hit skips a position
                seq.extra_keys = (*sub.extra_keys, ("prompt_logprobs", seq.seq_id))
            self._seqs[seq.seq_id] = seq
            if not stateless:
                self._live[corr_id] = seq
        if turn.end_sequence and self._live.get(corr_id) is seq:
            del self._live[corr_id]
        if error is not None or sub.close_only:
            turn.prompt_ids = []  # a close marker: answered when reached, in order
            turn.error = error
        seq.pending.append(turn)
        if seq.status is SeqStatus.IDLE:
            self._begin_next_turn(seq)

    def _begin_next_turn(self, seq: Sequence) -> None:
        while seq.pending:
            turn = seq.pending.popleft()
            error, bad_words = self._check_turn(seq, turn) if turn.prompt_ids else (turn.error, [])
            if not turn.prompt_ids or error is not None:  # a close marker, or a refused request
                self._reply(turn, TurnOutput("", [], True, "error" if error else "closed", error=error))
                if turn.end_sequence:
                    self._release(seq)
                    return
                continue
            seq.token_ids.extend(turn.prompt_ids)
            seq.turn = turn
            seq.status = SeqStatus.RUNNING
            seq.admitted_at = self._steps
            seq.last_active = time.monotonic()
            turn.cached_tokens = seq.num_computed if seq.seq_id in self.kv else -1
            if turn.params.samples > 1:  # n / best_of: the samples run it (engine/sample_group.py)
                self._start_samples(seq, turn, bad_words)
                return
            self._open_turn_state(turn, seq.token_ids, bad_words)
            return
        seq.status = SeqStatus.IDLE

    def _check_turn(self, seq: Sequence, turn: Turn) -> tuple[str | None, list[list[int]]]:
        """The refusal of a turn as it starts (None: it runs), and its bad_words as token ids."""
        context = len(seq.token_ids) + len(turn.prompt_ids)
        if self.context_limit is not None and context >= self.context_limit:
            return (f"conversation would hold {context} tokens; this model serves at most {self.max_model_len} "
                    "(max_model_len) — shorten the prompt or start a new conversation"), []
        try:  # bad_words as token sequences, with this model's tokenizer
            return None, bad_words_token_ids(turn.params.bad_words, self.tokenizer and (
                lambda text: self.tokenizer.encode(text, add_special_tokens=False)), self.model_config.vocab_size)
        except RequestError as exc:
            return str(exc), []

    def _open_turn_state(self, turn: Turn, context: list[int], bad_words: list[list[int]]) -> None:
        """The sampling state of ``turn`` (a request's, or one of its samples'), from its params."""
        turn.generator = None
        if turn.params.seed is not None:  # (check_sampling bounds it to a uint64)
            turn.generator = torch.Generator(device=self.device).manual_seed(turn.params.seed)
        turn.grammar = self._open_grammar(turn.params)  # structured output, None when not asked
        # per-row penalty state (sampling/penalty_state.py): from the whole context
        turn.penalty = self.runner.penalties.open(turn.params, context, self.eos_token_ids, bad_words) \
            if turn.params.uses_penalties else None

    @property
    def _decode_one(self):
        return self.tokenizer and (lambda t: self.tokenizer.decode([t]))

    def _open_grammar(self, params: SamplingParams):
        """Structured output (sampling/grammar.py): the turn's grammar state, or None; the
        compiler is made on the first guided turn."""
        if guided_kind(params) is None:
            return None
        if getattr(self, "_grammars", None) is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, sorted(self.eos_token_ids))
        return self._grammars.open(params)

    def _finish(self, seq: Sequence, out: TurnOutput) -> None:
        turn = seq.turn
        if turn.penalty is not None:
            turn.penalty.close()
        self._reply(turn, out)
        seq.turn = None
        seq.status = SeqStatus.IDLE
        if turn.end_sequence or out.finish_reason == "cancelled":
            self._release(seq)
            return
        self._begin_next_turn(seq)

    def _release(self, seq: Sequence) -> None:
        """Free the conversation's KV; queued turns behind it are answered with an error."""
        self.kv.release(seq.seq_id)
        seq.status = SeqStatus.ENDED
        self._seqs.pop(seq.seq_id, None)
        for corr_id, live in list(self._live.items()):
            if live is seq:
                del self._live[corr_id]
        while seq.pending:
            turn = seq.pending.popleft()
            self._reply_error(turn, "the conversation was released (cancelled, ended or timed out) "
                                    "before this request ran")

    def _reply(self, turn: Turn, out: TurnOutput) -> None:
        out.cached_tokens = max(turn.cached_tokens, 0)
        out.prompt_tokens = len(turn.prompt_ids)
        out.release_slot = turn.opens_slot and not turn.replied and out.error is not None
        if not turn.replied and out.token_ids and turn.scheduled:
            out.first_token_times = (turn.arrival, turn.scheduled, time.monotonic())
        turn.replied = True
        try:
            turn.emit(out)
        except Exception:  # a vanished client must not stop the engine
            log.exception("could not deliver a response")

    def _reply_error(self, turn: Turn, message: str) -> None:
        self._reply(turn, TurnOutput("", [], True, "error", error=message))

    def _abort(self, cmd: Abort) -> None:
        for seq in list(self._seqs.values()):
            queued = [t for t in seq.pending if t.request_id == cmd.request_id]
            for turn in queued:  # not started yet: it ends before it runs
                seq.pending.remove(turn)
                self._reply(turn, TurnOutput("", [], True, "cancelled"))
            turn = seq.turn
            if turn is None or turn.request_id != cmd.request_id:
                continue
            if cmd.kept_tokens is None:  # every sample of the request (engine/sample_group.py)
                self._finish(seq, TurnOutput("", [], True, "cancelled"))
                continue
            if turn.sample_index != cmd.index:
                continue
            self._take_back(seq, len(turn.output_ids) - cmd.kept_tokens)
            self._finish(seq, TurnOutput("", [], True, "stop"))
            return

    def _take_back(self, seq: Sequence, count: int) -> None:
        """Remove the last ``count`` sampled tokens of the running turn. KV of the kept tokens
        stays valid; if KV was written past them, the sequence's KV is dropped (its full
        blocks stay in the prefix cache, so the next turn recomputes only the tail)."""
        if count <= 0:
            return
        del seq.turn.output_ids[-count:]
        del seq.token_ids[-count:]
        if seq.num_computed > len(seq.token_ids) and seq.seq_id in self.kv:
            self.kv.preempt(seq.seq_id)
            seq.num_computed = 0

    def _drop_owner(self, owner: Hashable) -> None:
        for seq in list(self._seqs.values()):
            if seq.owner != owner:
                continue
            if seq.turn is not None:
                seq.turn.emit = _unanswered
                if seq.turn.penalty is not None:
                    seq.turn.penalty.close()
            for turn in seq.pending:
                turn.emit = _unanswered
            seq.turn = None
            self._release(seq)

    def _poll_cancelled(self) -> None:
        now = time.monotonic()
        if now - self._last_cancel_poll < CANCEL_POLL_S:
            return
        self._last_cancel_poll = now
        for seq in list(self._seqs.values()):
            if seq.status is SeqStatus.RUNNING and seq.turn.is_cancelled():
                self._finish(seq, TurnOutput("", [], True, "cancelled"))

    def _expire_idle(self) -> None:
        deadline = time.monotonic() - self.config.sequence_idle_timeout_s
        for seq in list(self._seqs.values()):
            if seq.status is SeqStatus.IDLE and not seq.pending and seq.last_active < deadline:
                log.info("releasing conversation idle for over %ss", self.config.sequence_idle_timeout_s)
                self._release(seq)

    def _fail_running(self, message: str) -> None:
        for seq in list(self._seqs.values()):
            if seq.status is SeqStatus.RUNNING:
                self._fail_sequence(seq, message)

    def _fail_sequence(self, seq: Sequence, message: str) -> None:
        """End the running turn with an error and release the conversation."""
        self._finish(seq, TurnOutput("", [], True, "error", error=message))
        if seq.seq_id in self._seqs:
            self._release(seq)

    def _fail_unschedulable(self, running: list[Sequence]) -> None:
        """No block can be had for anyone even after preemption: the oldest turn cannot fit."""
        oldest = min(running, key=lambda s: s.admitted_at)
        self._finish(oldest, TurnOutput("", [], True, "error", error=(
            f"the KV cache cannot hold this conversation ({len(oldest.token_ids)} tokens, "
            f"pool of {self.pool.num_blocks} blocks x {self.pool.block_size}); raise num_blocks")))
        if oldest.seq_id in self._seqs:
            self._release(oldest)
