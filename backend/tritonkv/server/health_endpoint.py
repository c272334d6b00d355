"""The supervisor's HTTP health endpoint, what Kubernetes probes call (docs/operations.md):

- ``GET /health/live``: 200 while the supervisor is watching; 503 once it gave up (the
  server could not be restarted): restart the container.
- ``GET /health/ready``: 200 while every instance is up and Triton is ready; 503 (with the
  reason) while the supervisor detects or recovers a failure, and while Triton is not ready.

The bodies are JSON: ``{"live": bool}`` / ``{"ready": bool, "reason": str}``. Served on a
thread of the serve process, so it answers while tritonserver itself is down or restarting.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tritonkv.server.supervisor import Supervisor


class HealthEndpoint:
    """``HealthEndpoint(supervisor, host, port)`` serves until ``close()``; port 0 picks one
    (``port`` says which)."""

    def __init__(self, supervisor: Supervisor, host: str, port: int):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                if self.path == "/health/live":
                    ok, body = supervisor.alive, {"live": supervisor.alive}
                elif self.path == "/health/ready":
                    ok = supervisor.alive and supervisor.ready
                    body = {"ready": ok, "reason": "" if ok else (supervisor.reason or "supervisor stopped")}
                else:
                    ok, body = None, {"error": f"unknown path {self.path!r}: use /health/live or /health/ready"}
                data = json.dumps(body).encode()
                self.send_response(404 if ok is None else 200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # probes every few seconds: no access log
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="tritonkv-health", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
