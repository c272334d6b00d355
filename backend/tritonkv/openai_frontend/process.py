"""The frontend as a child process of the launcher: start, wait until it answers, restart it
if it dies, stop it.

Rules: it runs in a session of its own (a signal to the launcher's terminal group does not
reach it; the launcher stops it); it is given the launcher's pid and exits when the launcher
is gone; a watchdog thread restarts it on the same port when it exits while not stopping.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

from tritonkv.server.launcher import http_ok


class FrontendProcess:
    def __init__(self, *, grpc_url: str, host: str, port: int, checkpoint: str, model_name: str | None,
                 log_path: str | None, workers: int = 1, env: dict | None = None):
        self.host = host
        self.port = port
        self.workers = workers
        self.log_path = log_path  # None: its output goes to the console
        self.cmd = [sys.executable, "-m", "tritonkv.openai_frontend", "--grpc-url", grpc_url, "--host", host,
                    "--port", str(port), "--checkpoint", checkpoint, "--parent-pid", str(os.getpid()),
                    "--workers", str(workers)]
        if model_name:
            self.cmd += ["--model-name", model_name]
        backend = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.env = dict(env or os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([backend] + [p for p in [self.env.get("PYTHONPATH")] if p])
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def _spawn(self) -> None:
        out = None if self.log_path is None else open(self.log_path, "a")
        try:
            self.process = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True, umask=0o077)
        finally:
            if out is not None:
                out.close()

    def start(self, timeout_s: float = 60) -> None:
        self._spawn()
        self.wait_ready(timeout_s)
        self._watchdog = threading.Thread(target=self._watch, name="tritonkv-openai-watchdog", daemon=True)
        self._watchdog.start()

    def is_ready(self) -> bool:
        return http_ok(f"http://{self.host}:{self.port}/health")

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the OpenAI frontend exited with code {self.process.returncode}: "
                                   f"{self.last_log_line()}")
            if self.is_ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"the OpenAI frontend on port {self.port} did not answer within {timeout_s}s")

    def last_log_line(self) -> str:
        if self.log_path is None or not os.path.isfile(self.log_path):
            return "(its output is on the console)"
        with open(self.log_path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        return lines[-1] if lines else "(no output)"

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            if self.process.poll() is not None and not self._stopping.is_set():
                self.restarts += 1
                print(f"tritonkv: the OpenAI frontend exited (code {self.process.returncode}); restarting it "
                      f"on port {self.port}", file=sys.stderr, flush=True)
                time.sleep(0.5)  # let its port be released
                if not self._stopping.is_set():
                    self._spawn()

    def stop(self, timeout_s: float = 3.0) -> None:
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
