"""A frontend's side of its engine core: attach (starting the core if none runs), submit
turns, receive their token outputs, turn them into text (``TextStream``), notice a dead core.

Threads: the caller's (``submit``, ``abort``: they only queue), one I/O thread that owns
the socket, sends what was queued, and calls each request's ``emit`` with its outputs, and
the ``CancelWatch`` thread (core/cancel_watch.py).

Rules:
- Outputs arrive one message per engine step; each request's outputs go through its
  ``TextStream`` (detokenise, stop strings; a stop string sends ``Abort`` with the tokens kept).
- What waits on the socket is read together (at most ``DRAIN_MESSAGES`` messages) and each
  request's outputs in it become one (``coalesce``): a frontend slower than the core sends
  fewer, larger responses and keeps up, instead of falling further behind one token at a time.
- Delivery order: the first outputs of requests not answered yet go before the outputs of
  requests already streaming (time to first token does not wait behind their backlog),
  unless an earlier output of the backlog belongs to another turn of the same conversation
  (its turns are answered in order); each request's outputs keep their order.
- After each delivery, what ``submit`` queued meanwhile is sent: a new request never waits
  for a whole backlog of responses.
- Cancellation: ``CancelWatch`` (a thread of its own) asks open requests' ``is_cancelled``
  and sends ``Abort`` for them; a request's outputs are delivered under its ``lock``.
- A core that dies (its process is gone) ends every open request with an error at once
  (checked every ``WATCH_PERIOD_S``); the client is then ``down`` and ``connect`` starts or
  attaches a core again.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import zmq

from tritonkv.config import EngineConfig
from tritonkv.core import liveness
from tritonkv.core import messages as m
from tritonkv.core.cancel_watch import CancelWatch
from tritonkv.core.proc import Wakeup
from tritonkv.core.runtime_dir import core_name, core_paths, device_label
from tritonkv.core.spawn import core_running, remove_stale, start_core
from tritonkv.engine.output import ChoiceStreams, TextStream, coalesce, output_stream
from tritonkv.engine.requests import PromptLimits, TurnOutput, check_prompt, encode_prompt

log = logging.getLogger("tritonkv.frontend")

POLL_S = 0.05  # the I/O thread's longest wait (closing, the core's liveness)
DRAIN_MESSAGES = 64  # engine steps read before their outputs are sent on
WATCH_PERIOD_S = 0.2
START_TIMEOUT_ENV = "TRITONKV_CORE_START_TIMEOUT_S"


class CoreUnavailable(RuntimeError):
    """No engine core could be attached (the message says why)."""


@dataclass
class _Request:
    emit: TextStream | ChoiceStreams
    is_cancelled: object
    cancel_sent: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)  # delivery vs is_cancelled (CancelWatch)
    conversation: object = None  # the correlation id of a turn of a conversation (None: stateless)
    answered: bool = False  # an output was delivered


class CoreClient:
    def __init__(self, config: EngineConfig, gpu_instance: bool = False, device_id: int = 0):
        self.config = config
        pool = config.pool_name or f"private-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.name = core_name(pool, device_label(config.device, gpu_instance, device_id))
        self.gpu_instance, self.device_id = gpu_instance, device_id
        self.welcome: m.Welcome | None = None
        self.tokenizer = None
        self.limits: PromptLimits | None = None
        self.down: str | None = "not connected"  # why no core serves this client now
        self.stats: dict[str, int] = {}
        self.loops = 0
        self.generated_tokens = 0  # tokens this frontend received (its own, of the core's)
        self.core_failure: str | None = None
        self._child = None  # the core, when this process started it (reaped here)
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = Wakeup()
        self._lock = threading.Lock()  # connect / disconnect
        self._req_lock = threading.Lock()  # open requests vs a core that died
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._cancel_watch = CancelWatch(lambda rid: self._requests.get(rid), self.abort, self._closing)
        self._sock = None
        self._ctx = zmq.Context.instance()

    # -- attach ------------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.welcome.max_model_len

    def connect(self, timeout_s: float | None = None) -> m.Welcome:
        """Attach to the core of this pool and device, starting it if none runs."""
        with self._lock:
            if self.down is None:
                return self.welcome
            if timeout_s is None:
                timeout_s = float(os.environ.get(START_TIMEOUT_ENV, "900"))
            welcome, sock = self._attach(timeout_s)
            if self.welcome is None or self.welcome.checkpoint != welcome.checkpoint:
                from tritonkv.model.tokenizer import TextTokenizer
                try:
                    self.tokenizer = TextTokenizer(welcome.checkpoint)
                except FileNotFoundError:
                    log.warning("%s has no tokenizer.json; only input_ids requests will be served", welcome.checkpoint)
                    self.tokenizer = None
            self.welcome = welcome
            self.limits = PromptLimits(welcome.vocab_size, welcome.max_model_len, welcome.context_limit)
            self._sock = sock
            self.down = None
            self.core_failure = None
            self._thread = threading.Thread(target=self._io_loop, args=(sock, welcome), name="tritonkv-core-client",
                                            daemon=True)
            self._thread.start()
            return welcome

    def _attach(self, timeout_s: float):
        """Start the core (unless one runs or is starting) and say Hello until it answers. A
        core found on its way out (its lock freed before it answered) is started again."""
        deadline = time.monotonic() + timeout_s
        while True:
            child = start_core(self.name, self.config, self.gpu_instance, self.device_id)
            if child is not None:
                self._reap()
                self._child = child
            fid = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, fid.encode())
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)  # (no limit: nothing is ever dropped or blocks)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.connect(core_paths(self.name).endpoint)
            me = os.getpid()
            sock.send(m.encoder.encode(m.Hello(fid, me, liveness.start_time(me), self.config)))
            reply = self._await_reply(sock, child, deadline)
            if isinstance(reply, m.Welcome):
                return reply, sock
            sock.close()
            if isinstance(reply, m.Refused):
                if not (reply.retry and self._wait_gone(deadline)):
                    raise CoreUnavailable(reply.reason)
            elif child is not None and child.poll() is not None:
                # (server/probes.py's failure_reason adds the core's own last error line on these words)
                raise CoreUnavailable(f"the engine core for pool {self.name!r} exited while starting (exit code "
                                      f"{child.returncode}; see the server log for why)")
            if time.monotonic() >= deadline:
                raise CoreUnavailable(f"the engine core for pool {self.name!r} did not answer within {timeout_s:.0f} s "
                                      f"(raise ${START_TIMEOUT_ENV} if loading takes longer)")

    def _await_reply(self, sock, child, deadline: float):
        """The core's answer to Hello; None when the core is gone (or the deadline passed)."""
        while time.monotonic() < deadline:
            if sock.poll(100, zmq.POLLIN):
                reply = m.frontend_decoder.decode(sock.recv())
                if isinstance(reply, (m.Welcome, m.Refused)):
                    return reply
                continue
            if (child is not None and child.poll() is not None) or not core_running(self.name):
                return None
        return None

    def _wait_gone(self, deadline: float) -> bool:
        """Wait for a core on its way out to be gone."""
        while time.monotonic() < deadline:
            self._reap()
            if not core_running(self.name):
                return True
            time.sleep(0.05)
        return False

    def _reap(self) -> None:
        if self._child is not None and self._child.poll() is not None:
            self._child = None

    # -- requests (any thread) -----------------------------------------------------------------
    def encode(self, text: str, first_turn: bool) -> list[int]:
        return encode_prompt(self.tokenizer, text, first_turn)

    def validate(self, prompt_ids, params) -> None:
        check_prompt(prompt_ids, params, self.limits)

    def submit(self, corr_id, prompt_ids, params, emit, *, start: bool, end: bool, is_cancelled=None,
               stateless: bool = False, extra_keys: tuple = (), close_only: bool = False,
               error: str | None = None) -> int:
        """Send one turn; ``emit`` gets its outputs (text included) on the I/O thread."""
        rid = next(self._ids)
        stream = output_stream(self.tokenizer, params, emit, lambda kept, index: self._ended_here(rid, kept, index))
        with self._req_lock:
            down = self.down
            if down is None:
                self._requests[rid] = _Request(stream, is_cancelled, conversation=None if stateless else corr_id)
        if down is not None:
            stream(TurnOutput("", [], True, "error", error=f"no engine core serves this instance: {down}; retry"))
            return rid
        self._send(m.Submit(rid, corr_id, list(prompt_ids), params, start, end, stateless, tuple(extra_keys),
                            close_only, error))
        if is_cancelled is not None:  # (after its Submit: an Abort never overtakes it)
            self._cancel_watch.add(rid)
        return rid

    def _ended_here(self, rid: int, kept_tokens: int | None, index: int = 0) -> None:
        """The request's TextStream ended it, or one of its choices (a stop string, or a fault
        in its text): the core ends that turn or sample (``Abort``); once the request is
        answered, nothing of it is polled again."""
        req = self._requests.get(rid)
        if req is not None and (kept_tokens is None or req.emit.done):
            self._requests.pop(rid, None)
        self.abort(rid, kept_tokens, index)

    def abort(self, rid: int, kept_tokens: int | None = None, index: int = 0) -> None:
        self._send(m.Abort(rid, kept_tokens, index))

    def _send(self, msg) -> None:
        self._out.put(m.encoder.encode(msg))
        self._wake.set()

    # -- I/O thread ------------------------------------------------------------------------------
    def _io_loop(self, sock, welcome: m.Welcome) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake.r, zmq.POLLIN)
        next_watch = 0.0
        reason = None
        try:
            while reason is None and not self._closing.is_set():
                events = dict(poller.poll(POLL_S * 1000))
                if self._wake.r in events:
                    self._wake.clear()
                self._send_queued(sock)
                while not self._closing.is_set() and sock.poll(0, zmq.POLLIN):
                    backlog = [m.frontend_decoder.decode(sock.recv())]
                    while len(backlog) < DRAIN_MESSAGES and sock.poll(0, zmq.POLLIN):
                        backlog.append(m.frontend_decoder.decode(sock.recv()))
                    self._receive(backlog, lambda: self._send_queued(sock))
                now = time.monotonic()
                if now >= next_watch:
                    next_watch = now + WATCH_PERIOD_S
                    self._reap()
                    if not liveness.alive(welcome.core_pid, welcome.core_started):
                        reason = f"the engine core (pid {welcome.core_pid}) exited"
        except Exception as exc:  # noqa: BLE001
            log.exception("engine core client failed")
            reason = f"the connection to the engine core failed: {exc}"
        if self._closing.is_set():
            self._send_queued(sock)  # a Bye queued by close()
            sock.close(linger=500)
            return
        sock.close()
        self._core_gone(reason)

    def _send_queued(self, sock) -> None:
        while not self._out.empty():
            sock.send(self._out.get_nowait(), copy=False)

    def _receive(self, msgs: list, between=None) -> None:
        """Deliver the outputs of messages received together (in arrival order); ``between``
        runs after each delivery (the I/O loop sends what was queued meanwhile: a Submit
        waits one response, not every response of the backlog)."""
        items = []
        for msg in msgs:
            if isinstance(msg, m.Outputs):
                items.extend(msg.items)
            elif isinstance(msg, m.Stats):
                self.stats, self.loops, self.core_failure = msg.stats, msg.loops, msg.failure
        for rid, out in self._delivery_order(coalesce(items) if len(msgs) > 1 else items):
            self.generated_tokens += len(out.token_ids)
            req = self._requests.get(rid)
            if req is None:
                continue
            if out.finished:
                del self._requests[rid]
            try:
                with req.lock:
                    req.emit(out)
                req.answered = True
            except Exception:  # a vanished client must not stop the others
                log.exception("could not deliver a response")
            if between is not None:
                between()

    def _delivery_order(self, items: list) -> list:
        """First outputs first (the module's rule): a stable partition of the backlog."""
        first, rest = [], []
        first_of: dict = {}  # conversation -> the request of its earliest output in the backlog
        for item in items:
            req = self._requests.get(item[0])
            conversation = None if req is None else req.conversation
            if conversation is not None:
                first_of.setdefault(conversation, item[0])
            early = req is not None and not req.answered and (conversation is None or first_of[conversation] == item[0])
            (first if early else rest).append(item)
        return first + rest

    def _core_gone(self, reason: str) -> None:
        log.error("%s; %d open requests fail; the next request restarts it", reason, len(self._requests))
        with self._req_lock:
            self.down = reason
            requests, self._requests = self._requests, {}
        for req in requests.values():
            try:
                with req.lock:
                    req.emit(TurnOutput("", [], True, "error", error=f"{reason} while serving this request; retry"))
            except Exception:
                log.exception("could not deliver a response")
        # after the errors (they must go out within 5 s); a SIGKILLed core's threads may hold
        # its lock a while as they exit
        remove_stale(self.name, wait_s=10.0)
        while True:
            try:
                self._out.get_nowait()
            except queue.Empty:
                break

    # -- leave -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Leave the core (it exits a grace period after its last frontend left)."""
        if self.down is None:
            self._send(m.Bye())
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._cancel_watch.join(timeout_s=5)
        self._reap()
