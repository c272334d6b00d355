"""A core that is still loading is not stuck (core/proc.py, STUCK_S): loading may take any
time (on a busy GPU host the CUDA graph capture and the startup heap's freeze took longer than
STUCK_S), and a frontend that said Hello meanwhile is welcomed once the load ends. Found on the
H100 (bench/results/gpu_check.md, 2026-12-08): cores exited with code 0 while starting, because
the I/O thread's watch saw an engine built, no loop turn since the core's construction and no
frontend attached yet."""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from types import SimpleNamespace

from tritonkv.config import EngineConfig
from tritonkv.core import proc


def test_a_core_loading_longer_than_stuck_s_keeps_running(monkeypatch):
    monkeypatch.setattr(proc, "STUCK_S", 0.2)  # one watch period (WATCH_PERIOD_S 0.2)
    name = f"t{uuid.uuid4().hex[:10]}-cpu0"
    lock = tempfile.TemporaryFile()
    core = proc.EngineCore(name, EngineConfig(checkpoint="ckpt"), False, 0, lock.fileno())
    seen = {}
    started = threading.Event()

    def slow_load():
        # what _load does: the engine is built first, the rest of the startup follows
        core.engine = SimpleNamespace(failure=None, start_loop=started.set)
        time.sleep(1.2)  # six watch periods past STUCK_S, no frontend attached
        seen["stopped while loading"] = core.stop.is_set()

    monkeypatch.setattr(core, "_load", slow_load)
    runner = threading.Thread(target=lambda: seen.setdefault("exit", core.run()), daemon=True)
    runner.start()
    assert started.wait(10), "the core did not start its loop"
    assert seen["stopped while loading"] is False
    # once loaded, no frontend within the grace period still ends it, with exit code 0
    runner.join(15)
    assert not runner.is_alive()
    assert seen["exit"] == 0
    core.remove_files()
    assert not os.path.lexists(core.paths.socket)
    lock.close()


def test_a_loaded_core_whose_loop_stops_coming_round_is_stuck(monkeypatch):
    monkeypatch.setattr(proc, "STUCK_S", 0.2)
    core = proc.EngineCore.__new__(proc.EngineCore)  # (the watch alone: no socket, no lock)
    core.engine, core.loaded, core.frontends = SimpleNamespace(failure=None), threading.Event(), {}
    core.name, core.stop, core._empty_since, core.grace_s = "t-cpu0", threading.Event(), None, 60.0
    core._last_loop = time.monotonic() - 1.0
    core._watch(time.monotonic())
    assert not core.stop.is_set()  # still loading
    core.loaded.set()
    core._watch(time.monotonic())
    assert core.stop.is_set()  # loaded, its loop a second behind, no frontend: it exits
