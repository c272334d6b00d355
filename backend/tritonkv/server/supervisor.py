"""The supervisor of ``tritonkv serve``: watches tritonserver and its model instances,
restores service, and says whether the server is ready (served by ``health_endpoint``).

What tritonserver 2.51 does by itself (python_backend r24.10, src/python_be.cc; checked on
the wheel's server): nothing. A stub that dies is never restarted; requests routed to its
instance fail with "Stub process '<instance>' is not healthy"; the decoupled requests it was
answering get no response at all, not even after the model is reloaded, and the response
factories they leave in tritonserver keep the whole old model (every instance's stub)
loaded for good. Only closing their connections ends them, i.e. ending tritonserver.

Why every recovery is a restart, never a model reload: a reload unloads the old instances
while their streams run (the backend releases decoupled requests at once), and once the
parent has stopped its response threads a stub that sends blocks for good
(``ResponseSender::Send`` waits for the parent): the streams end without an error and the
old model, with its KV blocks, can stay loaded (measured: docs/operations.md).

Rules, checked every ``poll_s``; each action is a restart on the same ports:
1. tritonserver exited.
2. a stub of the server died. Its in-flight requests end with an error (their connections
   drop) instead of hanging; the other instances' requests get the launcher's exit timeout.
3. an instance reports that its engine thread died (``tritonkv_engine_failed`` 1; it has
   answered its requests with errors and answers new ones UNAVAILABLE at once).
4. an instance whose engine loop counter (``tritonkv_engine_loops``) has not moved for
   ``stuck_after_s`` (0: never): a stuck engine cannot answer its requests.
5. Ready is false from the moment a rule fires until the new server is up and ready, and
   whenever the server is not ready (``Server.readiness``: Triton's /v2/health/ready 200
   from its own listeners, the OpenAI frontend's /health 200 from its own listener, no
   process of either stopped by SIGSTOP); if it stays not ready for ``stuck_after_s``:
   restart (a hung tritonserver or frontend, a model left unloaded, a stopped stub).
6. A failed launch is retried after ``launch_backoff_s`` (doubling, at most 10 s); after
   ``max_failed_launches`` failed launches in a row the supervisor gives up (``gave_up``;
   ``tritonkv serve`` then exits with code 1, so that the container restarts). So does an
   OpenAI frontend that failed its own restarts (``FrontendProcess.gave_up``).
Stubs are watched by process id, from the first pass after each launch.
"""

from __future__ import annotations

import os
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from tritonkv.server.heartbeat import FAILED, LOOPS
from tritonkv.server.launcher import Server, launch
from tritonkv.server.ports import wait_ports_free
from tritonkv.server.process_tree import tree_members

STUB_BINARY = b"triton_python_backend_stub"
HEARTBEAT_RE = re.compile(rf"^({LOOPS}|{FAILED})\{{([^}}]*)\}} (\S+)$", re.M)
LABEL_RE = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Stub:
    pid: int
    model: str
    instance: str


def find_stubs(server: Server) -> dict[int, Stub]:
    """The server's live (not zombie) Python backend stubs, by pid. A stub's argv is
    ``stub MODEL_PATH REGION SIZE GROWTH PARENT_PID LIBPYTHON IPC_HANDLE INSTANCE MODEL_DIR``
    (python_backend r24.10, stub_launcher.cc); MODEL_PATH is ``<repo>/<model>/<version>/model.py``."""
    stubs = {}
    for pid in tree_members(server.process.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if len(argv) > 8 and os.path.basename(argv[0]) == STUB_BINARY:
            model = os.path.basename(os.path.dirname(os.path.dirname(argv[1].decode())))
            stubs[pid] = Stub(pid, model, argv[8].decode())
    return stubs


def read_heartbeats(metrics_url: str, timeout_s: float = 1.0) -> dict[int, dict[str, float]]:
    """stub pid -> {"tritonkv_engine_loops": n, "tritonkv_engine_failed": 0 or 1}."""
    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as r:
        return parse_heartbeats(r.read().decode())


def parse_heartbeats(text: str) -> dict[int, dict[str, float]]:
    """The heartbeat gauges of a Prometheus text page, by the ``pid`` label."""
    beats: dict[int, dict[str, float]] = {}
    for name, labels, value in HEARTBEAT_RE.findall(text):
        pid = dict(LABEL_RE.findall(labels)).get("pid")
        if pid and pid.isdigit():
            beats.setdefault(int(pid), {})[name] = float(value)
    return beats


def relauncher(checkpoint: str | None, **launch_kwargs) -> Callable[[Server], Server]:
    """A function that starts a server like ``launch(checkpoint, **launch_kwargs)`` on the
    ports of the one it replaces (so clients and probes find it where it was)."""
    def relaunch(old: Server) -> Server:
        ports = (old.http_port, old.grpc_port, old.metrics_port)
        openai_port = None if old.openai is None else old.openai.port
        wait_ports_free(old.host, ports + (() if openai_port is None else (openai_port,)))
        return launch(checkpoint, **{**launch_kwargs, "http_port": ports[0], "grpc_port": ports[1],
                                     "metrics_port": ports[2], "openai_port": openai_port})
    return relaunch


class Supervisor:
    """Runs the rules above on a thread (``start`` / ``stop``); ``server`` is the current
    server (replaced by a restart), ``ready`` the readiness, ``events`` what happened:
    ``(time.monotonic(), message)`` pairs, also passed to ``log``."""

    def __init__(self, server: Server, relaunch: Callable[[Server], Server], *, stuck_after_s: float = 60.0,
                 poll_s: float = 0.25, max_failed_launches: int = 3, launch_backoff_s: float = 2.0,
                 log: Callable[[str], None] = print):
        self.server = server
        self.relaunch = relaunch
        self.stuck_after_s = stuck_after_s
        self.poll_s = poll_s
        self.max_failed_launches = max_failed_launches
        self.launch_backoff_s = launch_backoff_s
        self.log = log
        self.ready = False
        self.reason = "starting"  # why not ready
        self.gave_up = False
        self.events: list[tuple[float, str]] = []
        self._watched: dict[int, Stub] = {}
        self._beats: dict[int, tuple[float | None, float]] = {}  # pid -> (loops, since when)
        self._unready_since: float | None = None  # Triton's readiness not 200 since then
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- thread ------------------------------------------------------------------------------
    def start(self) -> "Supervisor":
        self._thread = threading.Thread(target=self._run, name="tritonkv-supervisor", daemon=True)
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Stop watching from the next pass on (a relaunch in progress sees it: ``cancel``)."""
        self._stop.set()

    def stop(self) -> None:
        """Stop watching (waits for a restart in progress); the server is left running."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self.gave_up

    def _run(self) -> None:
        while not self._stop.is_set() and not self.gave_up:
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the watcher must keep watching
                self._note(f"supervisor check failed: {type(exc).__name__}: {exc}")
            self._stop.wait(self.poll_s)

    # -- rules -------------------------------------------------------------------------------
    def check(self) -> None:
        """One pass over the rules."""
        server = self.server
        if server.process.poll() is not None:  # rule 1
            return self._restart(f"tritonserver exited with code {server.process.returncode}")
        stubs = find_stubs(server)
        dead = [stub for pid, stub in self._watched.items() if pid not in stubs]
        if dead:  # rule 2
            return self._restart(f"stub of {dead[0].instance} (pid {dead[0].pid}) died")
        for pid, stub in stubs.items():
            if pid not in self._watched:
                self._watched[pid] = stub
                self._beats[pid] = (None, time.monotonic())
        try:
            beats = read_heartbeats(server.metrics_url)
        except OSError:
            beats = None  # metrics unreachable this time: no heartbeat rule
        if beats is not None:
            failed = [self._watched[pid] for pid, b in beats.items()
                      if pid in self._watched and b.get(FAILED)]
            if failed:  # rule 3
                return self._restart(f"engine of {failed[0].instance} (pid {failed[0].pid}) failed")
            stuck = self._stuck(beats)
            if stuck is not None:  # rule 4
                return self._restart(f"engine of {stuck.instance} (pid {stuck.pid}) has not stepped for "
                                     f"{self.stuck_after_s:g} s")
        frontend = getattr(server, "openai", None)
        if frontend is not None and frontend.gave_up:  # rule 6
            self.gave_up = True
            self._set_ready(False, "the OpenAI frontend could not be restarted")
            return self._note("giving up: the OpenAI frontend could not be restarted")
        ready, why = server.readiness()  # rule 5
        now = time.monotonic()
        self._unready_since = None if ready else (self._unready_since or now)
        if not ready and self.stuck_after_s and now - self._unready_since >= self.stuck_after_s:
            return self._restart(f"not ready for {self.stuck_after_s:g} s ({why})")
        self._set_ready(ready, why)

    def _stuck(self, beats: dict[int, dict[str, float]]) -> Stub | None:
        now = time.monotonic()
        for pid, stub in self._watched.items():
            loops = beats.get(pid, {}).get(LOOPS)
            last, since = self._beats[pid]
            if loops != last and loops is not None:
                self._beats[pid] = (loops, now)
            elif self.stuck_after_s and now - since >= self.stuck_after_s:
                return stub
        return None

    # -- recovery ----------------------------------------------------------------------------
    def _restart(self, reason: str) -> None:
        self._set_ready(False, reason)
        self._note(f"{reason}: restarting tritonserver")
        old = self.server
        old.stop()
        self._note("tritonserver stopped")
        self._watched, self._beats, self._unready_since = {}, {}, None
        for attempt in range(1, self.max_failed_launches + 1):
            if self._stop.is_set():
                return
            try:
                self.server = self.relaunch(old)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - launch says why in its message
                self._note(f"launch {attempt} of {self.max_failed_launches} failed: {exc}")
                self._stop.wait(min(self.launch_backoff_s * 2 ** (attempt - 1), 10.0))
                continue
            self._note("tritonserver restarted")  # ready once Triton says so (next pass)
            return
        self.gave_up = True
        self._set_ready(False, "tritonserver could not be restarted")
        self._note("giving up: tritonserver could not be restarted")

    # -- state -------------------------------------------------------------------------------
    def _set_ready(self, ready: bool, reason: str) -> None:
        if ready != self.ready:
            self._note("ready" if ready else f"not ready: {reason}")
        self.ready = ready
        self.reason = "" if ready else reason

    def _note(self, message: str) -> None:
        self.events.append((time.monotonic(), message))
        self.log(f"tritonkv supervisor: {message}")
