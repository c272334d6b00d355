"""A `tritonkv serve` for a benchmark: the CLI as a subprocess (what a user runs), on free
loopback ports, no OpenAI frontend; ready when Triton's /v2/health/ready answers 200; stopped
with SIGINT (the CLI's own clean exit), then SIGKILL of whatever is left of its session."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_env(**extra: str) -> dict[str, str]:
    """This environment, with ``extra``, for a subprocess that imports this tree's tritonkv."""
    path = os.pathsep.join([os.path.join(ROOT, "backend"), os.path.join(ROOT, "client"),
                            os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, **extra}


def serve_command(checkpoint: str, ports: dict, instances: int, params: dict) -> list[str]:
    cmd = [sys.executable, "-m", "tritonkv.server.cli", "serve", checkpoint, "--no-openai",
           "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
           "--metrics-port", str(ports["metrics"]), "--health-port", str(ports["health"]),
           "--instances", str(instances)]
    for k, v in params.items():
        cmd += ["--param", f"{k}={v}"]
    return cmd


@contextlib.contextmanager
def served(checkpoint: str, *, instances: int = 1, params: dict | None = None, ready_timeout_s: float = 900):
    """Yields (grpc_url, the command line as a string, the /metrics URL)."""
    ports = {k: free_port() for k in ("http", "grpc", "metrics", "health")}
    cmd = serve_command(checkpoint, ports, instances, params or {})
    env = project_env()
    log = tempfile.NamedTemporaryFile("w+", prefix="tritonkv-bench-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + ready_timeout_s
        url = f"http://127.0.0.1:{ports['http']}/v2/health/ready"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tritonkv serve exited ({proc.returncode}) before ready: {_tail(log.name)}")
            with contextlib.suppress(Exception):
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"tritonkv serve not ready after {ready_timeout_s:.0f} s: {_tail(log.name)}")
            time.sleep(1)
        yield (f"127.0.0.1:{ports['grpc']}", " ".join(cmd[2:]).replace("tritonkv.server.cli", "tritonkv", 1),
               f"http://127.0.0.1:{ports['metrics']}/metrics")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        os.unlink(log.name)


def _tail(path: str, n: int = 1500) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]
