"""n > 1 and best_of: one request's samples of one prompt, on one prefill.

Rules:
- A request whose ``samples`` (best_of, else n) is > 1 runs as its sequence, the *parent*,
  plus one *sample* sequence per sample (sched/sequence.py). The parent computes the prompt
  up to ``fork_at``: the last whole block before the prompt's last token (0 when the prompt
  fits in one block, under an evicting KV policy, or with prompt_logprobs: the samples then
  compute their prompts alone). The scheduler forks the samples off the parent in the step
  that completes it (sched/scheduler.py); they hold its blocks by reference
  (cache/kv_cache_manager.py ``fork``) and each computes the rest of the prompt (at most one
  block) into blocks of its own, then samples. The parent never samples; it ends once its
  samples forked (``_retire_parents``).
- Sample i's settings are the request's with n = 1 and no best_of, and with seed s + i
  (mod 2**64) when the request has seed s (vLLM's rule): sample i draws exactly what the
  request sent alone with n = 1 and that seed draws. Each sample has its own generator,
  penalty state (sampling/penalty_state.py) and grammar state.
- Outputs carry their choice ``index``; an output with a ``finish_reason`` ends its choice and
  ``finished`` is set on the request's last output (every choice ended). Without best_of,
  sample i is choice i, sent as it is produced. With best_of the outputs are held until every
  sample ended; then the n samples with the highest cumulative logprob (the sum of their
  tokens' logprobs of the model's distribution, sampling/logprobs.py; ties: the lower
  sample) are sent as choices 0..n-1, best first, one output each (vLLM v0's best_of).
- An error in the parent or any sample ends the request with that error (one output,
  ``finished``); the other samples are then cancelled (they poll ``cancelled``). A cancel ends
  every sample; its choices end "cancelled".
"""

from __future__ import annotations

import time
from dataclasses import replace

from tritonkv.engine.requests import Turn, TurnOutput
from tritonkv.sampling.params import MAX_SEED
from tritonkv.sched.sequence import Sequence, SeqStatus


def sample_seed(seed: int | None, index: int) -> int | None:
    """The seed sample ``index`` of a request seeded ``seed`` draws with (None stays None)."""
    return None if seed is None else (seed + index) % (MAX_SEED + 1)


def fork_point(num_prompt: int, block_size: int) -> int:
    """Tokens the parent computes for its samples: whole blocks, never the last token."""
    return (num_prompt - 1) // block_size * block_size


class SampleGroup:
    """The outputs of one request's samples, to the request's ``emit``."""

    def __init__(self, turn: Turn):
        params = turn.params
        self.emit = turn.emit
        self.request_cancelled = turn.is_cancelled
        self.count = params.samples
        self.n = params.n
        self.best_of = params.best_of is not None
        self.keep_logprobs = params.logprobs is not None
        self.ended: set[int] = set()
        self.done = False
        self.held: dict[int, list[TurnOutput]] = {}  # best_of: each sample's outputs

    def cancelled(self) -> bool:
        return self.done or self.request_cancelled()

    def sample_params(self, params, index: int):
        """Sample ``index``'s settings (best_of samples compute their tokens' logprobs)."""
        logprobs = params.logprobs if params.logprobs is not None or not self.best_of else 0
        return replace(params, n=1, best_of=None, seed=sample_seed(params.seed, index), logprobs=logprobs)

    def parent_output(self, out: TurnOutput) -> None:
        """The parent answers only when it fails (or is cancelled: its samples end themselves)."""
        if out.error is not None:
            self._fail(out)

    def sample_output(self, index: int, out: TurnOutput) -> None:
        if self.done:
            return
        if out.error is not None:
            self._fail(out)
            return
        if self.best_of:
            self.held.setdefault(index, []).append(out)
        if out.finish_reason is not None:
            self.ended.add(index)
        if not self.best_of:
            out.index = index
            out.finished = len(self.ended) == self.count
            self.done = out.finished
            self.emit(out)
        elif len(self.ended) == self.count:
            self.done = True
            self._send_best()

    def _fail(self, out: TurnOutput) -> None:
        self.done = True
        self.emit(replace(out, index=0, finished=True, finish_reason="error"))

    def _send_best(self) -> None:
        """Every sample ended: the n best by cumulative logprob, best first, as choices 0..n-1."""
        merged = {i: _joined(outs) for i, outs in self.held.items()}
        ranked = sorted(merged, key=lambda i: (-cumulative_logprob(merged[i]), i))[: self.n]
        for choice, i in enumerate(ranked):
            out = merged[i]
            out.index = choice
            out.finished = choice == len(ranked) - 1
            if not self.keep_logprobs:
                out.logprobs = None
            self.emit(out)


def cumulative_logprob(out: TurnOutput) -> float:
    return sum(e.logprob for e in out.logprobs or ())


def _joined(outs: list[TurnOutput]) -> TurnOutput:
    """One sample's outputs as one (token ids and logprobs concatenated, the last's other fields)."""
    last = outs[-1]
    logprobs = [e for o in outs for e in (o.logprobs or ())]
    firsts = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
    return replace(last, token_ids=[t for o in outs for t in o.token_ids], logprobs=logprobs,
                   prompt_logprobs=firsts[0] if firsts else None)


class Samples:
    """The Engine's part in n / best_of (a mixin: the state is the Engine's)."""

    def _start_samples(self, seq: Sequence, turn: Turn, bad_words: list[list[int]] = ()) -> None:
        """``seq`` (running ``turn``, its prompt appended) becomes the parent of the request's
        samples; each sample starts waiting for the fork (or alone when there is nothing to share)."""
        group = SampleGroup(turn)
        share = not self.policy.evicts and turn.params.prompt_logprobs is None
        seq.fork_at = fork_point(len(seq.token_ids), self.pool.block_size) if share else 0
        turn.emit = group.parent_output
        turn.is_cancelled = group.cancelled
        samples = []
        for i in range(group.count):
            params = group.sample_params(turn.params, i)
            child = Turn(list(turn.prompt_ids), params, lambda out, i=i: group.sample_output(i, out),
                         group.cancelled, end_sequence=True, request_id=turn.request_id,
                         arrival=turn.arrival)  # (its request's: first-token stages)
            child.sample_index = i
            self._open_turn_state(child, seq.token_ids, bad_words)
            key = next(self._keys)
            # prompt_logprobs: each sample scores the whole prompt, so none may hit another's blocks
            keys = (*seq.extra_keys, ("sample", key)) if params.prompt_logprobs is not None else seq.extra_keys
            sample = Sequence(seq_id=key, extra_keys=keys, token_ids=list(seq.token_ids),
                              status=SeqStatus.RUNNING, turn=child, admitted_at=seq.admitted_at,
                              last_active=time.monotonic(), stateless=True, owner=seq.owner,
                              parent=seq if seq.fork_at else None)
            self._seqs[sample.seq_id] = sample
            samples.append(sample)
        seq.samples = samples if seq.fork_at else []

    def _retire_parents(self, running: list[Sequence]) -> None:
        """Parents whose samples forked (or that had nothing to share) end: their blocks stay
        held by the samples. Called once the step's rows hold the block tables they need."""
        for seq in running:
            if seq.fork_at is not None and not seq.samples and seq.status is SeqStatus.RUNNING:
                seq.turn = None
                self._release(seq)
