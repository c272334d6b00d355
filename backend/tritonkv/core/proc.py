"""The engine core process: one Engine serving every frontend that attaches by pool name.

Threads:
- the engine thread runs ``Engine``'s loop (schedule -> launch -> finalize); after each loop
  iteration (``after_emit``) it encodes one ``Outputs`` message per frontend that got
  outputs in that iteration, and ``Stats`` once a second, and hands them to the I/O thread;
- the I/O thread owns the socket: it decodes frontend messages into ``Engine.submit_turn`` /
  ``abort`` / ``drop_owner``, sends what the engine thread handed over, and watches the
  frontends' processes;
- the main thread loads the engine, then waits for the stop.

Rules:
- A conversation is keyed by (frontend, correlation id): the sequence batcher routes all of
  a conversation's requests to one instance, and two servers may use the same ids.
- A frontend whose process is gone (or that said ``Bye``) is dropped: its turns end and its
  conversations release their blocks.
- A frontend that attaches with other engine settings is refused, naming both sides.
- The core exits ``grace_s`` after its last frontend left (or after loading, if none came),
  on SIGTERM / SIGINT / SIGHUP, when the engine failed, and when its loop, once started, is
  stuck (``STUCK_S``) with no frontend left (new frontends are refused meanwhile, to retry once
  it is gone; while frontends are attached a newcomer is answered when the loop comes round);
  a load takes as long as it takes. On the way out it removes its
  socket and lock file while it still holds the lock. It ignores its terminal (own session).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import logging
import os
import queue
import sys
import threading
import time

import msgspec
import zmq

from tritonkv.config import EngineConfig
from tritonkv.core import messages as m
from tritonkv.core import liveness
from tritonkv.core.runtime_dir import core_paths
from tritonkv.core.startup_heap import freeze_startup_heap
from tritonkv.server.stop_signals import StopSignals

log = logging.getLogger("tritonkv.core")

STATS_PERIOD_S = 0.5
WATCH_PERIOD_S = 0.2
GRACE_ENV = "TRITONKV_CORE_GRACE_S"
# an engine loop that has not come round for this long is stuck (an idle one comes round
# every second): a stuck core takes no new frontend and exits once it has none. Only a loop
# that has started can be stuck: loading (the engine built, its heap frozen, CUDA graphs
# captured) may take any time
STUCK_S = 5.0
# per-frontend settings: they may differ between the frontends of one core
FRONTEND_FIELDS = ("default_max_tokens", "stream_interval")


def core_settings(config: EngineConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in FRONTEND_FIELDS}


def mismatch(core: EngineConfig, frontend: EngineConfig) -> str | None:
    """None when ``frontend`` may attach to a core built from ``core``; else what differs."""
    a, b = core_settings(core), core_settings(frontend)
    diff = [k for k in a if a[k] != b[k]]
    if not diff:
        return None
    return ", ".join(f"{k}={a[k]!r} (core) vs {k}={b[k]!r} (this instance)" for k in diff)


@dataclasses.dataclass
class Frontend:
    identity: bytes
    pid: int
    started: int


class Wakeup:
    """A pipe the I/O thread polls beside its socket: other threads write a byte to wake it."""

    def __init__(self):
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def set(self) -> None:
        try:
            os.write(self.w, b"x")
        except BlockingIOError:  # already full of wake-ups
            pass

    def clear(self) -> None:
        try:
            while os.read(self.r, 4096):
                pass
        except BlockingIOError:
            pass


class EngineCore:
    def __init__(self, name: str, config: EngineConfig, gpu_instance: bool, device_id: int, lock_fd: int):
        self.name = name
        self.paths = core_paths(name)
        self.config = config
        self.gpu_instance, self.device_id = gpu_instance, device_id
        self.lock_fd = lock_fd
        self.grace_s = float(os.environ.get(GRACE_ENV, "2"))
        self.engine = None
        self.welcome: m.Welcome | None = None
        self.load_error: str | None = None
        self.gave_up = False  # the engine failed, or its loop was stuck with no frontend: exit code 1
        self.frontends: dict[str, Frontend] = {}
        self.waiting: list[tuple[bytes, m.Hello]] = []  # hellos that came while loading or in a long step
        self.stop = threading.Event()
        self.loaded = threading.Event()
        self._out: queue.SimpleQueue = queue.SimpleQueue()  # (identity, bytes) from the engine thread
        self._wake = Wakeup()
        self._outbox: dict[str, list] = {}  # frontend id -> (request id, output); engine thread only
        self._loops = 0
        self._last_loop = time.monotonic()
        self._next_stats = 0.0
        self._empty_since: float | None = None  # no frontend attached since (grace), once loaded
        from tritonkv.server.fault_injection import fault_hook
        self._fault = fault_hook()

    # -- main thread ---------------------------------------------------------------------------
    def run(self) -> int:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        # a ROUTER drops what exceeds its high-water mark: no limit, so a frontend that falls
        # behind gets every output late rather than some never
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.bind(self.paths.endpoint)
        os.chmod(self.paths.socket, 0o600)
        io = threading.Thread(target=self._io_loop, args=(sock,), name="tritonkv-core-io", daemon=True)
        io.start()
        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001 - the reason goes to every waiting frontend
            log.exception("engine core %s failed to load", self.name)
            self.load_error = f"the engine core for pool {self.name!r} failed to load: {type(exc).__name__}: {exc}"
        self._last_loop = time.monotonic()  # the loop starts now (_stuck)
        if not self.frontends:
            self._empty_since = time.monotonic()
        self.loaded.set()
        self._wake.set()
        if self.load_error is not None:
            time.sleep(0.5)  # let the refusals go out
            self.stop.set()
        else:
            self.engine.start_loop()
        self.stop.wait()
        io.join(timeout=2)
        return 1 if self.load_error is not None or self.gave_up else 0

    def _load(self) -> None:
        from tritonkv.engine.factory import build_engine

        engine = build_engine(self.config, gpu_instance=self.gpu_instance, device_id=self.device_id)
        engine.after_emit = self._after_iteration
        self.welcome = m.Welcome(os.getpid(), liveness.start_time(os.getpid()), engine.checkpoint,
                                 engine.model_config.vocab_size, engine.max_model_len, engine.context_limit,
                                 engine.pool.num_blocks, str(engine.kv_caches[0][0].dtype).replace("torch.", ""),
                                 engine.device.type)
        self.engine = engine
        frozen = freeze_startup_heap()
        log.info("engine core %s (pid %d) serving (%d startup objects out of the collector's scans)",
                 self.name, os.getpid(), frozen)

    # -- engine thread --------------------------------------------------------------------------
    def _emitter(self, fid: str, rid: int):
        def emit(out) -> None:
            box = self._outbox.get(fid)
            if box is None:
                box = self._outbox[fid] = []
            box.append((rid, out))
        return emit

    def _after_iteration(self) -> None:
        self._loops += 1
        self._last_loop = time.monotonic()
        if self._fault is not None:
            self._fault()
        sent = False
        if self._outbox:
            boxes, self._outbox = self._outbox, {}
            for fid, items in boxes.items():
                fe = self.frontends.get(fid)
                if fe is not None:
                    self._out.put((fe.identity, m.encoder.encode(m.Outputs(items))))
                    sent = True
        now = time.monotonic()
        if now >= self._next_stats or self.engine.failure is not None:
            self._next_stats = now + STATS_PERIOD_S
            payload = m.encoder.encode(m.Stats(self._stats(), self._loops, self.engine.failure))
            for fe in list(self.frontends.values()):
                self._out.put((fe.identity, payload))
                sent = True
        if sent:
            self._wake.set()

    def _stats(self) -> dict[str, int]:
        """The engine's stats, with its request counts (server/gauges.py's rule)."""
        from tritonkv.server.gauges import request_counts

        stats = self.engine.stats()
        waiting, running = request_counts(self.engine)
        stats["requests_waiting"] = waiting + self.engine._commands.qsize()
        stats["requests_running"] = running
        return stats

    # -- I/O thread ----------------------------------------------------------------------------
    def _io_loop(self, sock) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake.r, zmq.POLLIN)
        next_watch = 0.0
        try:
            while not self.stop.is_set():
                events = dict(poller.poll(WATCH_PERIOD_S * 1000))
                if self._wake.r in events:
                    self._wake.clear()
                if self.loaded.is_set() and self.waiting:
                    waiting, self.waiting = self.waiting, []
                    for identity, hello in waiting:
                        self._hello(sock, identity, hello)
                while True:
                    try:
                        identity, payload = self._out.get_nowait()
                    except queue.Empty:
                        break
                    sock.send_multipart([identity, payload], copy=False)
                while sock.poll(0, zmq.POLLIN):
                    identity, payload = sock.recv_multipart()
                    self._receive(sock, identity, payload)
                now = time.monotonic()
                if now >= next_watch:
                    next_watch = now + WATCH_PERIOD_S
                    self._watch(now)
        except Exception:
            log.exception("engine core I/O thread failed")
        finally:
            self._drain_out(sock)
            self.stop.set()

    def _drain_out(self, sock) -> None:
        while True:
            try:
                identity, payload = self._out.get_nowait()
            except queue.Empty:
                return
            sock.send_multipart([identity, payload], copy=False)

    def _receive(self, sock, identity: bytes, payload: bytes) -> None:
        try:
            msg = m.core_decoder.decode(payload)
        except msgspec.DecodeError:
            log.warning("undecodable message from a frontend dropped")
            return
        fid = identity.decode()
        if isinstance(msg, m.Hello):
            if self.loaded.is_set():
                self._hello(sock, identity, msg)
            else:
                self.waiting.append((identity, msg))
            return
        if fid not in self.frontends:
            return  # not attached (refused, or dropped as dead)
        engine = self.engine
        if isinstance(msg, m.Submit):
            engine.submit_turn((fid, msg.corr_id), msg.prompt_ids, msg.params, self._emitter(fid, msg.request_id),
                               start=msg.start, end=msg.end, stateless=msg.stateless, extra_keys=msg.extra_keys,
                               close_only=msg.close_only, error=msg.error, request_id=(fid, msg.request_id),
                               owner=fid)
        elif isinstance(msg, m.Abort):
            engine.abort((fid, msg.request_id), msg.kept_tokens, msg.index)
        elif isinstance(msg, m.Bye):
            self._drop(fid)

    def _hello(self, sock, identity: bytes, hello: m.Hello) -> None:
        if self.load_error is not None:
            reply = m.Refused(self.load_error)
        elif (why := mismatch(self.config, hello.config)) is not None:
            reply = m.Refused(f"pool {hello.config.pool_name!r} is served by an engine core with other settings: "
                              f"{why}; use the same settings or another pool_name")
        elif self._leaving():
            reply = m.Refused(f"the engine core {self.name!r} (pid {os.getpid()}) is failed or stuck and exits",
                              retry=True)
        elif self._stuck():
            # a long step with frontends attached: the core is not exiting (_watch), so the
            # newcomer is answered once the loop comes round (the I/O loop retries waiting hellos)
            self.waiting.append((identity, hello))
            return
        else:
            self.frontends[hello.frontend_id] = Frontend(identity, hello.pid, hello.started)
            self._empty_since = None
            reply = self.welcome
            self._next_stats = 0.0  # the newcomer gets stats after the next loop iteration
            log.info("frontend %s (pid %d) attached; %d attached", hello.frontend_id, hello.pid, len(self.frontends))
        sock.send_multipart([identity, m.encoder.encode(reply)])

    def _drop(self, fid: str) -> None:
        fe = self.frontends.pop(fid, None)
        if fe is None:
            return
        self.engine.drop_owner(fid)
        log.info("frontend %s (pid %d) left; %d attached", fid, fe.pid, len(self.frontends))
        if not self.frontends:
            self._empty_since = time.monotonic()

    def _leaving(self) -> bool:
        """The engine failed, or its loop is stuck with no frontend attached: the core exits
        (``_watch``) and refuses newcomers meanwhile (``_hello``)."""
        return self.engine is not None and (self.engine.failure is not None or (self._stuck() and not self.frontends))

    def _stuck(self) -> bool:
        # loaded is set after _last_loop is reset to the loop's start (run)
        return self.loaded.is_set() and self.engine is not None and time.monotonic() - self._last_loop > STUCK_S

    def _watch(self, now: float) -> None:
        for fid, fe in list(self.frontends.items()):
            if not liveness.alive(fe.pid, fe.started):
                log.warning("frontend %s (pid %d) is gone: its requests are cancelled", fid, fe.pid)
                self._drop(fid)
        if self._leaving():
            log.error("engine core %s: %s, exiting", self.name,
                      f"the engine failed: {self.engine.failure}" if self.engine.failure is not None else
                      f"the engine loop has not come round for {now - self._last_loop:.1f} s "
                      f"(stuck after {STUCK_S:g} s) and no frontend is attached")
            self.gave_up = True
            self.stop.set()
        if self.loaded.is_set() and self._empty_since is not None and now - self._empty_since >= self.grace_s:
            log.info("engine core %s: no frontend for %.1f s, exiting", self.name, self.grace_s)
            self.stop.set()

    # -- exit ----------------------------------------------------------------------------------
    def remove_files(self) -> None:
        """Remove the socket and the lock file; we still hold the lock, so no new core can
        have taken these names."""
        for path in (self.paths.socket, self.paths.lock):
            try:
                if os.path.lexists(path) and os.stat(path, follow_symlinks=False).st_ino == (
                        os.fstat(self.lock_fd).st_ino if path == self.paths.lock else os.lstat(path).st_ino):
                    os.unlink(path)
            except OSError:
                pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tritonkv.core")
    ap.add_argument("--name", required=True)
    ap.add_argument("--config", required=True, help="EngineConfig as JSON")
    ap.add_argument("--gpu-instance", type=int, default=0)
    ap.add_argument("--device-id", type=int, default=0)
    ap.add_argument("--lock-fd", type=int, required=True, help="the locked lock file, handed over by the spawner")
    args = ap.parse_args(argv)
    # the frontends' line format: the launcher shows these lines (KV pool, "KV capacity: ...")
    # as start progress (server/probes.py)
    logging.basicConfig(level=logging.INFO, format="tritonkv %(levelname)s: %(message)s")
    try:
        import setproctitle
        setproctitle.setproctitle(f"tritonkv-core {args.name}")  # ps / pgrep find it by this name
    except ImportError:
        pass
    fcntl.flock(args.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: the spawner took it for us
    os.ftruncate(args.lock_fd, 0)
    os.pwrite(args.lock_fd, f"{os.getpid()}\n".encode(), 0)  # who the core is, for operators and tests
    config = msgspec.json.decode(args.config.encode(), type=EngineConfig)
    core = EngineCore(args.name, config, bool(args.gpu_instance), args.device_id, args.lock_fd)

    signals = StopSignals(core.stop)
    code = 1
    try:
        code = core.run()
    finally:
        if signals.received:
            log.info("engine core %s: %s, exiting", args.name, signals.received)
        core.remove_files()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # the engine thread may be inside a step (or hung): do not wait for it
    return code
