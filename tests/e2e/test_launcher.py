"""`tritonkv serve`: prints its endpoints, serves, and stops cleanly on SIGTERM."""

import os
import signal
import socket
import subprocess
import sys
import time

from triton_calls import http_generate
from tritonkv.serve import free_port


def test_serve_prints_endpoints_and_stops_on_sigterm():
    http, grpc, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tritonkv.cli", "serve", "--http-port", str(http), "--grpc-port", str(grpc),
         "--metrics-port", str(metrics)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "..", "backend")})
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip().startswith("chat:"):
                break
        banner = "".join(lines)
        assert f"http://127.0.0.1:{http}" in banner and f"127.0.0.1:{grpc}" in banner
        assert f"http://127.0.0.1:{metrics}/metrics" in banner and "curl" in banner
        code, body = http_generate(f"127.0.0.1:{http}", "llm_stateless", {"text_input": "Hi", "max_tokens": 3})
        assert code == 200 and body["finish_reason"] == "length"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        # the server is gone: nothing listens on its port (SO_REUSEADDR skips TIME_WAIT only)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", http))
    finally:
        if proc.poll() is None:
            proc.kill()
