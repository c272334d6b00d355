"""A core that is loading, or running a long step for attached frontends, is not leaving
(core/proc.py, STUCK_S): loading may take any time (on a busy GPU host the CUDA graph capture
and the startup heap's freeze took longer than STUCK_S), and a frontend that says Hello
meanwhile is welcomed once the load ends or the step is over. Found on the H100
(bench/results/gpu_check.md, 2026-12-08): cores exited with code 0 while starting, because the
I/O thread's watch saw an engine built, no loop turn since the core's construction and no
frontend attached yet. The engine here is a stand-in whose loop only ticks the core's
per-iteration hook: what is tested is the core's watch and its answers to Hello."""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from types import SimpleNamespace

import zmq

from polling import wait_until
from tritonkv.config import EngineConfig
from tritonkv.core import liveness
from tritonkv.core import messages as m
from tritonkv.core import proc

CONFIG = EngineConfig(checkpoint="ckpt")


class FakeCore:
    """An EngineCore on its real socket whose load sleeps ``load_s`` and whose engine loop
    calls the per-iteration hook every 50 ms, pausing while ``pause`` is set."""

    def __init__(self, monkeypatch, load_s: float):
        monkeypatch.setattr(proc, "STUCK_S", 0.2)  # one watch period (WATCH_PERIOD_S 0.2)
        self.lock = tempfile.TemporaryFile()
        self.core = core = proc.EngineCore(f"t{uuid.uuid4().hex[:10]}-cpu0", CONFIG, False, 0, self.lock.fileno())
        monkeypatch.setattr(core, "_stats", lambda: {})
        self.pause, self.done = threading.Event(), threading.Event()
        self.stopped_while_loading = None
        self.exit_code = None

        def loop():
            while not self.done.is_set():
                time.sleep(0.05)
                while self.pause.is_set():
                    time.sleep(0.01)
                core._after_iteration()

        def slow_load():
            # what _load does: the engine is built first, the rest of the startup follows
            core.engine = SimpleNamespace(failure=None, drop_owner=lambda fid: None,
                                          start_loop=lambda: threading.Thread(target=loop, daemon=True).start())
            core.welcome = m.Welcome(os.getpid(), liveness.start_time(os.getpid()), "ckpt", 10, 10, 10, 10,
                                     "float32", "cpu")
            time.sleep(load_s)
            self.stopped_while_loading = core.stop.is_set()

        monkeypatch.setattr(core, "_load", slow_load)
        self.ctx = zmq.Context()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.exit_code = self.core.run()

    def hello(self, fid: str):
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, fid.encode())
        sock.setsockopt(zmq.LINGER, 0)
        assert wait_until(lambda: os.path.exists(self.core.paths.socket), 10)
        sock.connect(self.core.paths.endpoint)
        me = os.getpid()
        sock.send(m.encoder.encode(m.Hello(fid, me, liveness.start_time(me), CONFIG)))
        return sock

    @staticmethod
    def reply(sock, timeout_s: float = 10):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sock.poll(100):
                msg = m.frontend_decoder.decode(sock.recv())
                if isinstance(msg, (m.Welcome, m.Refused)):
                    return msg
        return None

    def close(self):
        self.done.set()
        self.core.stop.set()
        self.thread.join(10)
        self.core.remove_files()
        self.ctx.destroy(linger=0)
        self.lock.close()


def test_a_hello_during_a_load_longer_than_stuck_s_is_welcomed(monkeypatch):
    fake = FakeCore(monkeypatch, load_s=1.2)  # six watch periods past STUCK_S
    try:
        sock = fake.hello("fe1")
        reply = fake.reply(sock)
        assert isinstance(reply, m.Welcome), reply
        assert fake.stopped_while_loading is False
        time.sleep(0.6)  # the loop runs: not stuck, a frontend attached, so no grace exit
        assert not fake.core.stop.is_set() and list(fake.core.frontends) == ["fe1"]
        sock.send(m.encoder.encode(m.Bye()))
        fake.thread.join(10)  # the last frontend left: the grace period (tests/core/conftest.py: 0.5 s)
        assert fake.exit_code == 0
        sock.close()
    finally:
        fake.close()
    assert not os.path.lexists(fake.core.paths.socket)


def test_a_hello_during_a_long_step_with_frontends_attached_waits_for_the_step(monkeypatch):
    fake = FakeCore(monkeypatch, load_s=0.0)
    try:
        first = fake.hello("fe1")
        assert isinstance(fake.reply(first), m.Welcome)
        fake.pause.set()  # a step of ~1 s (five times STUCK_S) while fe1 is attached
        time.sleep(0.6)
        second = fake.hello("fe2")
        time.sleep(0.4)
        fake.pause.clear()
        reply = fake.reply(second)
        # before: Refused("... is failed or stuck and exits", retry=True), and the newcomer
        # waited for an exit that never came (the core keeps serving fe1)
        assert isinstance(reply, m.Welcome), reply
        assert sorted(fake.core.frontends) == ["fe1", "fe2"] and not fake.core.stop.is_set()
        first.close()
        second.close()
    finally:
        fake.close()


def test_a_loaded_core_whose_loop_stops_coming_round_with_no_frontend_exits(monkeypatch):
    monkeypatch.setattr(proc, "STUCK_S", 0.2)
    core = proc.EngineCore.__new__(proc.EngineCore)  # (the watch alone: no socket, no lock)
    core.engine, core.loaded, core.frontends = SimpleNamespace(failure=None), threading.Event(), {}
    core.name, core.stop, core._empty_since, core.grace_s = "t-cpu0", threading.Event(), None, 60.0
    core.gave_up = False
    core._last_loop = time.monotonic() - 1.0
    core._watch(time.monotonic())
    assert not core.stop.is_set()  # still loading
    core.loaded.set()
    core._watch(time.monotonic())
    assert core.stop.is_set() and core.gave_up  # loaded, its loop a second behind, no frontend: it exits, code 1
