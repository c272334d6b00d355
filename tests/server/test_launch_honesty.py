"""The launcher's honesty rules on CPU, without tritonserver: ports checked before a launch
(a busy one named by its flag), readiness only from this launch's own listeners, children
that die with their parent, a stopped process seen as not ready, and a frontend whose
restarts keep failing given up after three."""

import argparse
import http.server
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from polling import wait_until
from tritonkv.server.errors import ServerStartError
from tritonkv.server.ports import check_ports_free, owns_listener
from tritonkv.server.process_tree import live_group_members, spawn, stopped_members


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_busy_port_fails_naming_its_flag_and_zero_picks_a_free_one(busy_port):
    with pytest.raises(ServerStartError, match=f"^--grpc-port {busy_port}: 127.0.0.1:{busy_port} is in use"):
        check_ports_free("127.0.0.1", {"--http-port": 0, "--grpc-port": busy_port})
    with pytest.raises(ServerStartError, match="--grpc-port 5000: the same port as --http-port"):
        check_ports_free("127.0.0.1", {"--http-port": 5000, "--grpc-port": 5000})
    chosen = check_ports_free("127.0.0.1", {"--http-port": 0, "--grpc-port": 0, "--metrics-port": 0})
    assert len(set(chosen.values())) == 3 and all(p > 0 for p in chosen.values())


def test_launch_refuses_a_busy_port_before_starting_anything(busy_port, monkeypatch):
    from tritonkv.server import launcher

    monkeypatch.setattr(launcher, "spawn", lambda *a, **k: pytest.fail("started despite the busy port"))
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match=f"^--openai-port {busy_port}"):
        launcher.launch(openai_port=busy_port)
    assert time.monotonic() - t0 < 2


def _listener_child(port_file):
    code = textwrap.dedent(f"""
        import socket, time
        s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
        open({port_file!r}, "w").write(str(s.getsockname()[1]))
        time.sleep(60)
    """)
    return spawn([sys.executable, "-c", code])


def test_readiness_counts_only_this_launchs_own_listener(tmp_path):
    """Another process answering 200 on the port is not this server being ready."""
    from tritonkv.server.launcher import Server

    port_file = str(tmp_path / "port")
    child = _listener_child(port_file)
    try:
        assert wait_until(lambda: os.path.exists(port_file) and open(port_file).read(), 30)
        child_port = int(open(port_file).read())
        assert owns_listener(child.pid, child_port)

        class Ready(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        impostor = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
        threading.Thread(target=impostor.serve_forever, daemon=True).start()
        try:
            port = impostor.server_address[1]
            assert not owns_listener(child.pid, port)
            server = Server(child, "127.0.0.1", port, child_port, 0, str(tmp_path))
            ready, why = server.readiness()
            assert (ready, why) == (False, f"the HTTP port {port} is not this tritonserver's")
        finally:
            impostor.shutdown()
            impostor.server_close()
    finally:
        child.kill()
        child.wait()


def test_a_stopped_member_is_seen_and_children_die_with_their_parent(tmp_path):
    """SIGSTOP shows as a stopped member; SIGKILL of the parent (no cleanup code runs) ends
    the child it spawned: the kernel's parent-death signal."""
    pid_file = str(tmp_path / "child")
    parent_code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.join(os.path.dirname(__file__), "..", "..", "backend")!r})
        from tritonkv.server.process_tree import spawn
        child = spawn(["sleep", "120"])
        open({pid_file!r}, "w").write(str(child.pid))
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    try:
        assert wait_until(lambda: os.path.exists(pid_file) and open(pid_file).read(), 30)
        child = int(open(pid_file).read())
        assert live_group_members(child) == [child]  # a session of its own
        os.kill(child, signal.SIGSTOP)
        assert wait_until(lambda: stopped_members(child) == [child], 5)
        os.kill(child, signal.SIGCONT)
        assert wait_until(lambda: stopped_members(child) == [], 5)
        parent.kill()
        parent.wait()
        assert wait_until(lambda: live_group_members(child) == [], 10), "the child outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_frontend_whose_restarts_fail_gives_up_after_three(tmp_path):
    from tritonkv.openai_frontend.process import FrontendProcess

    log = str(tmp_path / "openai.log")
    frontend = FrontendProcess(grpc_url="127.0.0.1:1", host="127.0.0.1", port=1, checkpoint=".", model_name=None,
                               log_path=log)
    frontend.cmd = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    frontend._spawn()
    watchdog = threading.Thread(target=frontend._watch, daemon=True)
    watchdog.start()
    try:
        assert wait_until(lambda: frontend.gave_up, 30)
        watchdog.join(5)
        assert not watchdog.is_alive() and frontend.restarts == 3
        assert frontend.readiness() == (False, "the OpenAI frontend could not be restarted")
    finally:
        frontend.stop(0)


def test_progress_lines_come_from_the_server_log_in_order():
    from tritonkv.server.probes import progress_lines

    log = ("I1206 10:00:01 1 model_lifecycle.cc:1] \"successfully loaded 'llm_stateless'\"\n"
           "tritonkv INFO: KV pool: 100 blocks x 16 tokens (cpu)\n"
           "I1206 10:00:02 1 something else\n"
           "tritonkv WARNING: ckpt has no tokenizer.json; only input_ids requests will be served\n"
           "I1206 10:00:03 1 model_lifecycle.cc:1] \"successfully loaded 'llm'\"\n")
    assert progress_lines(log) == ["model llm_stateless loaded", "KV pool: 100 blocks x 16 tokens (cpu)",
                                   "ckpt has no tokenizer.json; only input_ids requests will be served",
                                   "model llm loaded"]


def test_a_port_that_answers_without_http_is_not_ready():
    """A readiness probe that reaches something other than an HTTP server (another server's
    gRPC port, a raw socket) says not ready instead of raising (serve's start died on
    http.client.BadStatusLine)."""
    from tritonkv.server.probes import http_ok

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def answer():
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00 not http\r\n\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        assert http_ok(f"http://127.0.0.1:{port}/v2/health/ready", timeout_s=5) is False
        thread.join(5)


def test_serves_tool_call_parser_reaches_the_openai_frontends_command():
    """`tritonkv serve --tool-call-parser hermes` starts the frontend with that parser (the
    frontend's own flag parser then reads it: tests/openai_frontend/test_tool_calls.py)."""
    from tritonkv.openai_frontend.__main__ import parse_args
    from tritonkv.openai_frontend.process import FrontendProcess
    from tritonkv.server.cli import add_serve_parser

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--tool-call-parser", "hermes"])
    frontend = FrontendProcess(grpc_url="127.0.0.1:1", host="127.0.0.1", port=1, checkpoint=".", model_name=None,
                               log_path=None, tool_call_parser=args.tool_call_parser)
    assert parse_args(frontend.cmd[3:]).tool_call_parser == "hermes"
    default = FrontendProcess(grpc_url="127.0.0.1:1", host="127.0.0.1", port=1, checkpoint=".", model_name=None,
                              log_path=None)
    assert parse_args(default.cmd[3:]).tool_call_parser is None
