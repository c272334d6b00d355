"""`tritonkv serve`: prints its endpoints, serves, and stops cleanly on SIGTERM."""

import os
import signal
import socket
import subprocess
import sys
import time

from triton_calls import http_generate
from tritonkv.server.launcher import free_port, live_group_members


def test_serve_prints_endpoints_and_stops_on_sigterm():
    http, grpc, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tritonkv.server.cli", "serve", "--http-port", str(http), "--grpc-port", str(grpc),
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


def test_stop_with_an_open_conversation_leaves_no_stub_and_no_pool_files():
    from triton_calls import StreamClient
    from tritonkv.cache.pool_file import shm_dir
    from tritonkv.server.launcher import start_server

    pool = f"stoptest{os.getpid()}"
    with start_server(extra_params={"pool_name": pool, "kv_cache_memory_mb": "32"}, exit_timeout_s=3) as server:
        client = StreamClient(server.grpc_url)
        t = client.turn(seq_id=77, start=True, ids=[256, 65], max_tokens=2, temperature=0.0)
        client.close()
        assert t.error is None and len(t.ids) == 2  # the conversation stays open (no END)
        group = server.process.pid
    assert live_group_members(group) == []  # the stubs of the model that did not unload are gone
    assert not [f for f in os.listdir(shm_dir()) if f.startswith(f"tritonkv-{pool}-")]

