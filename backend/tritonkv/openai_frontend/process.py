"""The frontend as a child process of the launcher: start, wait until it answers, restart it
if it dies, stop it.

Rules: it runs in a session of its own (a signal to the launcher's terminal group does not
reach it; the launcher stops it) and dies with the launcher (``process_tree.spawn``; it is
also given the launcher's pid and exits when the launcher is gone). Ready means its
``/health`` answers 200 (which asks Triton over gRPC) from a socket its own process holds,
and none of its processes is stopped. A watchdog thread restarts it on the same port when it
exits while not stopping; ``max_failed_starts`` restarts in a row that do not come up end
the watchdog (``gave_up``: ``tritonkv serve`` then exits 1, docs/operations.md).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from tritonkv.server.ports import owns_listener
from tritonkv.server.probes import http_ok
from tritonkv.server.process_tree import end_group, signal_group, spawn, stopped_members, tree_members


class FrontendProcess:
    def __init__(self, *, grpc_url: str, host: str, port: int, checkpoint: str, model_name: str | None,
                 log_path: str | None, workers: int = 1, env: dict | None = None,
                 triton_model: str = "llm_stateless", max_failed_starts: int = 3, start_timeout_s: float = 60,
                 tool_call_parser: str | None = None):
        self.host = host
        self.port = port
        self.workers = workers
        self.log_path = log_path  # None: its output goes to the console
        self.cmd = [sys.executable, "-m", "tritonkv.openai_frontend", "--grpc-url", grpc_url, "--host", host,
                    "--port", str(port), "--checkpoint", checkpoint, "--parent-pid", str(os.getpid()),
                    "--workers", str(workers), "--triton-model", triton_model]
        if model_name:
            self.cmd += ["--model-name", model_name]
        if tool_call_parser:
            self.cmd += ["--tool-call-parser", tool_call_parser]
        backend = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.env = dict(env or os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([backend] + [p for p in [self.env.get("PYTHONPATH")] if p])
        self.process = None
        self.restarts = 0
        self.max_failed_starts = max_failed_starts
        self.start_timeout_s = start_timeout_s
        self.gave_up = False
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def _spawn(self) -> None:
        out = None if self.log_path is None else open(self.log_path, "a")
        try:
            self.process = spawn(self.cmd, env=self.env, stdout=out)
        finally:
            if out is not None:
                out.close()

    def start(self, timeout_s: float | None = None) -> None:
        self._spawn()
        self.wait_ready(timeout_s or self.start_timeout_s)
        self._watchdog = threading.Thread(target=self._watch, name="tritonkv-openai-watchdog", daemon=True)
        self._watchdog.start()

    def readiness(self) -> tuple[bool, str]:
        proc = self.process
        if self.gave_up:
            return False, "the OpenAI frontend could not be restarted"
        if proc is None or proc.poll() is not None:
            return False, "the OpenAI frontend is not running"
        members = tree_members(proc.pid)
        if stopped_members(proc.pid, members):
            return False, "the OpenAI frontend is stopped (SIGSTOP)"
        if not http_ok(f"http://{self.host}:{self.port}/health", timeout_s=1):
            return False, "the OpenAI frontend is not ready"
        if not owns_listener(proc.pid, self.port, members):
            return False, f"the OpenAI port {self.port} is not this frontend's"
        return True, ""

    def is_ready(self) -> bool:
        return self.readiness()[0]

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the OpenAI frontend exited with code {self.process.returncode}: "
                                   f"{self.last_log_line()}")
            if self.is_ready():
                return
            if self._stopping.wait(0.2):
                return
        raise TimeoutError(f"the OpenAI frontend on port {self.port} did not answer within {timeout_s}s "
                           f"({self.readiness()[1]})")

    def last_log_line(self) -> str:
        if self.log_path is None or not os.path.isfile(self.log_path):
            return "(its output is on the console)"
        with open(self.log_path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        return lines[-1] if lines else "(no output)"

    def _watch(self) -> None:
        failed = 0
        while not self._stopping.wait(0.5):
            if self.process.poll() is None or self._stopping.is_set():
                continue
            self.restarts += 1
            print(f"tritonkv: the OpenAI frontend exited (code {self.process.returncode}); restarting it "
                  f"on port {self.port}", file=sys.stderr, flush=True)
            end_group(self.process, time.monotonic())  # what it left (uvicorn workers)
            if self._stopping.is_set():
                return
            self._spawn()
            try:
                self.wait_ready(self.start_timeout_s)
                failed = 0
            except (RuntimeError, TimeoutError) as exc:
                failed += 1
                print(f"tritonkv: OpenAI frontend start {failed} of {self.max_failed_starts} failed: {exc}",
                      file=sys.stderr, flush=True)
                if failed >= self.max_failed_starts:
                    self.gave_up = True
                    return

    def begin_stop(self) -> None:
        """SIGTERM (uvicorn's graceful stop) and no more restarts; ``finish_stop`` waits."""
        self._stopping.set()
        if self.process is not None and self.process.poll() is None:
            signal_group(self.process.pid, signal.SIGTERM)

    def finish_stop(self, deadline: float) -> None:
        """Wait until ``deadline`` (time.monotonic), then kill what is left of the frontend."""
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=max(0.0, deadline - time.monotonic()) + 1)
        if self.process is not None:
            end_group(self.process, deadline)

    def stop(self, timeout_s: float = 3.0) -> None:
        self.begin_stop()
        self.finish_stop(time.monotonic() + timeout_s)
