"""The step loop: schedule -> launch (the runner's forward + sampling) -> finalize (apply the
sampled tokens, emit). On CUDA, decode steps overlap: step n+1 is launched before step n is
read back (``step``).

The engine imports nothing from Triton. Callers (the Triton adapter, tests, benchmarks) hand
it turns through ``submit``; all sequence state changes happen on the engine thread, in the
order the turns were submitted, so a conversation's turns and its END stay in order.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from tritonkv.config import EngineConfig
from tritonkv.cache.block_pool import BlockPool
from tritonkv.cache.eviction.choose import policy_for
from tritonkv.cache.kv_cache_manager import KVCacheManager
from tritonkv.engine.conversations import Abort, Conversations, DropOwner
from tritonkv.engine.sample_group import Samples
from tritonkv.engine.output import output_stream
from tritonkv.engine.requests import (PromptLimits, SamplingParams, Submission, Turn, TurnOutput,
                                      check_prompt, encode_prompt)
from tritonkv.sampling import logprobs as lp, prompt_logprobs as prompt_lp
from tritonkv.engine.runner import ModelRunner, StepHandle, StepRow
from tritonkv.engine.step_times import StepBreakdown
from tritonkv.model.llama import CausalLM
from tritonkv.model.tokenizer import TextTokenizer
from tritonkv.ops.kv_relocate import rotate_keys, copy_rerotated_blocks, copy_rerotated_blocks_batched
from tritonkv.ops.kv_swap import build_host_tier, close_swapper, run_swaps, settle_restores, tier_stats
from tritonkv.sched.scheduler import ScheduledChunk, Scheduler
from tritonkv.sched.sequence import Sequence, SeqStatus

log = logging.getLogger("tritonkv.engine")


@dataclass
class PendingStep:
    """A launched step: what was planned, each row's turn at launch, the runner's handle."""

    plan: list[ScheduledChunk]
    turns: list[Turn]
    handle: StepHandle
    schedule_s: float
    origins: list | None = None  # h2o: each row's table at launch (original block numbers)


class Engine(Conversations, Samples):
    def __init__(self, config: EngineConfig, model: CausalLM, tokenizer: TextTokenizer | None,
                 pool: BlockPool, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.config = config
        self.checkpoint = ""  # where the model came from (factory.py sets it)
        self.model = model
        self.model_config = model.config
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.pool = pool
        self.kv_caches = kv_caches
        self.policy = policy_for(config, self.model_config.sliding_window)
        max_pos = self.model_config.max_position_embeddings
        self.max_model_len = self.policy.max_model_len(config.max_model_len, max_pos, pool.num_blocks * pool.block_size)
        self.policy.check_fits(pool.num_blocks, config.max_num_batched_tokens, max_pos, self.max_model_len)
        self.host_tier, self.disk_tier, self.swapper = build_host_tier(config, kv_caches, self.device, pool.num_blocks)
        self.kv = KVCacheManager(pool, 0, config.enable_prefix_caching, self.policy, max_pos, self.host_tier, self.disk_tier)
        self.scheduler = Scheduler(self.kv, config.max_num_batched_tokens, config.max_num_seqs)
        # the longest conversation (None: unbounded, positions inside the cache)
        self.context_limit = self.policy.context_limit(self.max_model_len)
        self.limits = PromptLimits(self.model_config.vocab_size, self.max_model_len, self.context_limit)
        self.runner = ModelRunner(model, kv_caches, block_size=pool.block_size, max_model_len=self.max_model_len,
                                  max_num_seqs=config.max_num_seqs,
                                  max_num_batched_tokens=config.max_num_batched_tokens, device=self.device,
                                  enable_cuda_graphs=config.enable_cuda_graphs,
                                  collect_mass=self.policy.needs_attention_mass)
        self.step_times = StepBreakdown()
        self._pending: PendingStep | None = None  # a launched step not yet read back
        # called on the engine thread after each loop iteration's outputs were emitted (the
        # server's response sender batches its wake-ups on it)
        self.after_emit: Callable[[], None] | None = None
        self.failure: str | None = None  # set when the engine thread died: the instance is unhealthy
        eos = set(self.model_config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._live: dict[Hashable, Sequence] = {}  # correlation id -> open conversation
        self._seqs: dict[int, Sequence] = {}  # engine key -> every sequence holding state
        self._keys = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._commands: queue.Queue = queue.Queue()
        self._steps = 0
        self._last_cancel_poll = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.num_generated_tokens = 0

    # -- intake (any thread) ---------------------------------------------------------------
    def encode(self, text: str, first_turn: bool) -> list[int]:
        return encode_prompt(self.tokenizer, text, first_turn)

    def submit(self, corr_id: Hashable, prompt_ids: list[int], params: SamplingParams,
               emit: Callable[[TurnOutput], None], **kw) -> None:
        """The in-process API (tests, benchmarks): ``submit_turn`` with the frontend's output
        processing (text deltas, stop strings: ``TextStream``) around ``emit``."""
        rid = kw.pop("request_id", None) or ("local", next(self._request_ids))
        stream = output_stream(self.tokenizer, params, emit, lambda kept, index: self.abort(rid, kept, index))
        self.submit_turn(corr_id, prompt_ids, params, stream, request_id=rid, **kw)

    def submit_turn(self, corr_id: Hashable, prompt_ids: list[int], params: SamplingParams,
                    emit: Callable[[TurnOutput], None], *, start: bool, end: bool,
                    is_cancelled: Callable[[], bool] = lambda: False, stateless: bool = False,
                    extra_keys: tuple = (), close_only: bool = False, error: str | None = None,
                    request_id: Hashable = None, owner: Hashable = None) -> None:
        """Queue one turn; ``emit`` gets token ids only. ``close_only``: no generation, just
        END. ``error``: the request was invalid; it is answered with that error in order (and
        END still closes). ``owner``: the frontend it came from (``drop_owner``)."""
        turn = Turn(list(prompt_ids), params, emit, is_cancelled, end_sequence=end or stateless,
                    request_id=request_id, opens_slot=start and not end and not stateless)
        if self.failure is not None:  # the engine thread is gone: answer now, never hang
            self._reply(turn, TurnOutput("", [], True, "error", error=f"this instance failed and serves no "
                                         f"more requests ({self.failure}); retry on another instance"))
            return
        self._commands.put(Submission(corr_id, turn, start, stateless, tuple(extra_keys), close_only, error,
                                      owner))

    def abort(self, request_id: Hashable, kept_tokens: int | None = None, index: int = 0) -> None:
        """End a turn from any thread, in order with submissions: ``kept_tokens`` None cancels
        it (its conversation is released); a count ends it as ``stop`` keeping that many output
        tokens in the conversation (a stop string the caller found; tokens sampled after it
        are taken back)."""
        self._commands.put(Abort(request_id, kept_tokens, index))

    def drop_owner(self, owner: Hashable) -> None:
        """A frontend is gone: its turns end unanswered and its conversations are released."""
        self._commands.put(DropOwner(owner))

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_prompt(prompt_ids, params, self.limits)

    # -- engine thread -----------------------------------------------------------------------
    def start_loop(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tritonkv-engine", daemon=True)
        self._thread.start()

    def stop_loop(self) -> None:
        self._stop.set()
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        """Rules: a request's fault fails that request (``_accept``) or that row (``_finalize``);
        a failing step fails the running turns; anything else that escapes marks the engine
        failed (``failure``), answers every open turn with an error, and later submissions
        are answered at once (the adapter reports the instance unhealthy)."""
        try:
            while not self._stop.is_set():
                self._iterate()
        except BaseException as exc:  # noqa: BLE001 - the thread must leave a trace and answer
            log.exception("engine thread died")
            self.failure = f"{type(exc).__name__}: {exc}"
            self._fail_everything(f"internal error, the engine stopped: {self.failure}")
            if self.after_emit is not None:
                self.after_emit()

    def _iterate(self) -> None:
        busy = any(s.status is SeqStatus.RUNNING for s in self._seqs.values())
        try:
            item = self._commands.get(block=not busy, timeout=None if busy else 1.0)
            if item is not None:
                self._accept_one(item)
        except queue.Empty:
            pass
        self._drain()
        self._expire_idle()
        try:
            self.step()
        except Exception as exc:  # a failing step must not take the server down
            log.exception("engine step failed")
            self._pending = None
            self._fail_running(f"internal error in engine step: {exc}")
        if self.after_emit is not None:
            self.after_emit()

    def _queued(self):
        """Take the submissions queued so far, in order."""
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Submission):
                yield item
            elif item is not None:
                self._accept_one(item)

    def _drain(self) -> None:
        for item in self._queued():
            self._accept_one(item)

    def run_until_idle(self, max_steps: int = 100_000) -> None:
        """Synchronous driving for tests and benchmarks (no thread)."""
        for _ in range(max_steps):
            self._drain()
            if not any(s.status is SeqStatus.RUNNING for s in self._seqs.values()):
                if self._pending is not None:
                    self._finalize(self._pending)
                    self._pending = None
                    continue
                return
            self.step()
        raise RuntimeError("engine did not go idle")

    def step(self) -> None:
        """One engine step. On CUDA with decode graphs, a pure decode continuation of the
        step in flight is launched before that step's tokens are read back (overlap): the
        host emits step n while the GPU runs step n + 1."""
        if self._pending is not None:
            if self._continue_pending():
                return
            self._finalize(self._pending)
            self._pending = None
        t0 = time.perf_counter()
        self._poll_cancelled()
        running = [s for s in self._seqs.values() if s.status is SeqStatus.RUNNING]
        if not running:
            return
        idle = [s for s in self._seqs.values() if s.status is SeqStatus.IDLE]
        settle_restores(self.kv, self.swapper)
        plan = self.scheduler.schedule(running, idle)
        run_swaps(self.kv, self.swapper)  # the tier copies it decided, before anything else
        self._steps += 1
        if not plan:
            if self.kv.restoring_any():  # only sequences whose restores are in flight: wait for them
                settle_restores(self.kv, self.swapper, block=True)
                return
            self._fail_unschedulable(running)
            return
        t1 = time.perf_counter()
        rows, plan = self._step_rows(plan)
        self._retire_parents(running)  # (n > 1: their samples hold the blocks now)
        if not plan:
            return
        self._apply_kv_ops()
        step = PendingStep(plan, [c.seq.turn for c in plan], self.runner.launch(rows), t1 - t0,
                           self._launch_origins(plan))
        if self.runner.graphs and all(c.sample and c.seq.turn.grammar is None for c in plan):
            self._pending = step  # read back after the next launch
        else:
            self._finalize(step)

    def _continue_pending(self) -> bool:
        """Launch the decode step that continues the sequences of the step in flight, then
        finalize that step. Rows whose turn ended meanwhile (a cancel poll runs here when due)
        are left out. False (nothing launched) unless those sequences are all the running work
        and the scheduler plans their continuation (``Scheduler.plan_continuation``)."""
        t0 = time.perf_counter()
        pend = self._pending
        self._poll_cancelled()
        live = [(i, chunk, turn) for i, (chunk, turn) in enumerate(zip(pend.plan, pend.turns))
                if chunk.seq.turn is turn and chunk.seq.status is SeqStatus.RUNNING]
        running = sum(s.status is SeqStatus.RUNNING for s in self._seqs.values())
        if not live or running != len(live):
            return False
        plan = self.scheduler.plan_continuation([chunk for _, chunk, _ in live], self.context_limit)
        if plan is None:
            return False
        run_swaps(self.kv, self.swapper)  # (a grow may have reclaimed blocks the host tier copies)
        t1 = time.perf_counter()
        rows = [StepRow([0], self.kv.cache_index(c.seq.seq_id, c.start), self.kv.block_table(c.seq.seq_id), True,
                        turn.params, turn.generator, from_prev=i, angle_shift=self.kv.angle_shift(c.seq.seq_id),
                        penalty=turn.penalty)
                for (i, _, turn), c in zip(live, plan)]
        self._apply_kv_ops()
        handle = self.runner.launch(rows, pend.handle)
        self._steps += 1
        self._finalize(pend)
        self._pending = PendingStep(plan, [turn for _, _, turn in live], handle, t1 - t0, self._launch_origins(plan))
        return True

    def _apply_kv_ops(self) -> None:
        """Key rotations and block copies that eviction queued, before the next launch."""
        ops = self.kv.take_kv_ops()
        if not ops:
            return
        cos_sin = self.model.rotary_table(self.device)
        # every re-rotated copy of the step in one call (ops/kv_relocate.py), when that cannot
        # reorder anything: each copy written once and read by nothing else (copies are fresh
        # blocks, sources are never written; an in-place rotate is a rebase of blocks that
        # are no one's source or copy), every shift within the rotary table
        copies = [op for op in ops if op.kind == "rerotated_copy"]
        dst = [b for op in copies for b in op.dst]
        if len(copies) > 1 and len(set(dst)) == len(dst) and all(abs(op.delta) < cos_sin.shape[0] for op in copies):
            copy_rerotated_blocks_batched(self.kv_caches, [b for op in copies for b in op.src], dst,
                                          [op.delta for op in copies for _ in op.src], cos_sin)
            ops = [op for op in ops if op.kind != "rerotated_copy"]
        for op in ops:
            if op.kind == "rerotated_copy":
                copy_rerotated_blocks(self.kv_caches, op.src, op.dst, op.delta, cos_sin)
            else:
                rotate_keys(self.kv_caches, op.slots, op.delta, cos_sin)

    def _launch_origins(self, plan: list[ScheduledChunk]) -> list | None:
        if not self.policy.needs_attention_mass:
            return None
        return [list(self.kv.origins(c.seq.seq_id)) for c in plan]

    def _finalize(self, step: PendingStep) -> None:
        """Read a launched step's tokens back and apply them; rows whose turn ended meanwhile
        (finished, cancelled, released) are dropped."""
        t0 = time.perf_counter()
        sampled = iter(self.runner.collect(step.handle))
        logprob_rows = iter(self.runner.collect_logprobs(step.handle))  # None where not asked
        t1 = time.perf_counter()
        mass = step.handle.mass.numpy() if step.handle.mass is not None else None
        for i, (chunk, turn) in enumerate(zip(step.plan, step.turns)):
            seq = chunk.seq
            token = next(sampled) if chunk.sample else None
            raw_logprob = next(logprob_rows) if chunk.sample else None
            if seq.turn is not turn or seq.status is not SeqStatus.RUNNING or seq.num_computed != chunk.start:
                continue
            seq.num_computed += chunk.num_tokens
            self.kv.commit(seq.seq_id, seq.token_ids, seq.num_computed)
            prompt_lp.record(seq, chunk.start, (step.handle.prompt_logprobs or {}).get(i), self._decode_one)
            if mass is not None and chunk.sample:  # h2o: the mass of the sampling query
                self.kv.add_mass(seq.seq_id, step.origins[i], mass[i])
            if token is None:
                continue
            try:
                self._append_token(seq, token, raw_logprob)
            except Exception as exc:  # this row's output failed (e.g. its text): end this turn only
                log.exception("output of one sequence failed")
                if seq.turn is turn:
                    self._finish(seq, TurnOutput("", [], True, "error", error=f"output failed: {exc}"))
        self.step_times.add(len(step.plan), sum(c.num_tokens for c in step.plan), step.schedule_s,
                            step.handle.times, t1 - t0, time.perf_counter() - t1)

    def _step_rows(self, plan: list[ScheduledChunk]) -> tuple[list[StepRow], list[ScheduledChunk]]:
        """The runner's rows of ``plan``; a row that cannot be built fails its own turn alone
        (the conversation is released), the others run."""
        rows, kept = [], []
        for chunk in plan:
            try:
                rows.append(self._step_row(chunk))
                kept.append(chunk)
            except Exception as exc:
                log.exception("the step row of one sequence could not be built")
                self._fail_sequence(chunk.seq, f"internal error while preparing this request's step: {exc}")
        return rows, kept

    def _step_row(self, chunk: ScheduledChunk) -> StepRow:
        seq = chunk.seq
        turn = seq.turn
        if not turn.scheduled:  # (a turn's first step is never a graph continuation)
            turn.scheduled = time.monotonic()
            for sample in seq.samples:  # n > 1: the prompt the samples share starts here
                sample.turn.scheduled = sample.turn.scheduled or turn.scheduled
        return StepRow(seq.token_ids[chunk.start:chunk.start + chunk.num_tokens],
                       self.kv.cache_index(seq.seq_id, chunk.start), self.kv.block_table(seq.seq_id), chunk.sample,
                       turn.params, turn.generator, angle_shift=self.kv.angle_shift(seq.seq_id),
                       penalty=turn.penalty, grammar=turn.grammar,
                       prompt_targets=prompt_lp.targets(seq, chunk.start, chunk.num_tokens))

    def _append_token(self, seq: Sequence, token: int, raw_logprob: tuple | None = None) -> None:
        turn = seq.turn
        logprobs = raw_logprob and [lp.token_logprob(token, raw_logprob, turn.params.logprobs, self._decode_one)]
        seq.token_ids.append(token)
        turn.output_ids.append(token)
        seq.last_active = time.monotonic()
        self.num_generated_tokens += 1
        # a grammar ends when its stop token was accepted (sampling/grammar.py)
        reason = "stop" if turn.grammar is not None and turn.grammar.accept(token) else None
        if token in self.eos_token_ids and not turn.params.ignore_eos:
            reason = "eos"
        elif token in turn.params.stop_token_ids:  # ends the turn like EOS (adds no text), reason "stop"
            reason = "stop"
        elif len(turn.output_ids) >= turn.params.max_tokens or (
                self.context_limit is not None and len(seq.token_ids) >= self.context_limit):
            reason = "length"
        out = TurnOutput("", [token], bool(reason), reason, logprobs=logprobs, prompt_logprobs=prompt_lp.take(seq))
        self._reply(turn, out) if reason is None else self._finish(seq, out)

    def close(self) -> None:
        """Stop the loop thread, if one runs; unpin the host tier."""
        if self._thread is not None:
            self.stop_loop()
        close_swapper(self.swapper)

    # -- introspection -----------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        counts = self.pool.counts()
        counts["live_sequences"] = len(self._seqs)
        counts["preemptions"] = self.scheduler.num_preemptions
        counts["preempted_blocks"] = self.kv.preempted_blocks  # KV blocks preemption released
        counts["forked_blocks"] = self.kv.forked_blocks  # prompt block references samples shared (n > 1)
        for mode, n in self.kv.evicted_blocks.items():  # blocks returned by each eviction policy
            counts[f"evicted_blocks_{mode}"] = n
        counts["generated_tokens"] = self.num_generated_tokens
        counts.update(tier_stats(self.kv, self.swapper, self.scheduler))
        return counts


