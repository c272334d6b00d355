"""The supervisor's rules (server/supervisor.py) on a fake server: which failures lead to a
restart and when, what readiness and the health endpoint say meanwhile. The real
thing, with tritonserver and killed / hung / failed stubs: tests/e2e/test_fault.py."""

import json
import urllib.request

import pytest

from polling import wait_until

from tritonkv.server import supervisor as sup
from tritonkv.server.health_endpoint import HealthEndpoint
from tritonkv.server.heartbeat import FAILED, LOOPS
from tritonkv.server.supervisor import Stub, Supervisor, parse_heartbeats


class FakeProcess:
    def __init__(self):
        self.returncode = None

    def poll(self):
        return self.returncode


class FakeServer:
    def __init__(self, stubs):
        self.process = FakeProcess()
        self.stubs = {s.pid: s for s in stubs}
        self.beats = {s.pid: {LOOPS: 1.0, FAILED: 0.0} for s in stubs}
        self.ready = True
        self.stopped = False
        self.metrics_url = self  # read_heartbeats is patched to read .beats

    def readiness(self):
        return (True, "") if self.ready else (False, "tritonserver is not ready")

    def stop(self):
        self.stopped = True


STUBS = [Stub(11, "llm", "llm_0_0"), Stub(12, "llm", "llm_0_1"),
         Stub(21, "llm_stateless", "llm_stateless_0_0"), Stub(22, "llm_stateless", "llm_stateless_0_1")]


@pytest.fixture
def world(monkeypatch):
    """A supervisor over a fake server; relaunches make new fake servers (or fail)."""
    state = {"launches": [], "fail_launches": 0, "now": 1000.0}
    monkeypatch.setattr(sup, "find_stubs", lambda server: dict(server.stubs))
    monkeypatch.setattr(sup, "read_heartbeats", lambda server: {p: dict(b) for p, b in server.beats.items()})
    clock = type("Clock", (), {"monotonic": staticmethod(lambda: state["now"])})
    monkeypatch.setattr(sup, "time", clock)  # the supervisor's clock only

    def relaunch(old):
        if state["fail_launches"]:
            state["fail_launches"] -= 1
            raise RuntimeError("tritonserver exited with code 1")
        server = FakeServer([Stub(s.pid + 1000, s.model, s.instance) for s in STUBS])
        state["launches"].append(server)
        return server

    first = FakeServer(STUBS)
    s = Supervisor(first, relaunch, stuck_after_s=5.0, launch_backoff_s=0.0, log=lambda m: None)
    s.check()
    assert s.ready and s.reason == ""
    state["supervisor"], state["first"] = s, first
    return state


def messages(s):
    return [m for _, m in s.events]


def test_heartbeats_are_read_by_pid():
    text = "\n".join([
        "# HELP tritonkv_engine_loops engine loop iterations",
        f'{LOOPS}{{instance="llm_0_0",model="llm",pid="4242"}} 17',
        f'{FAILED}{{model="llm",pid="4242",instance="llm_0_0"}} 0',
        f'{FAILED}{{instance="llm_0_1",model="llm",pid="4243"}} 1',
        'tritonkv_kv_blocks_used{instance="llm_0_0",model="llm"} 3',
        f'{LOOPS}{{instance="x",model="llm"}} 5',  # no pid: not a heartbeat of ours
    ])
    assert parse_heartbeats(text) == {4242: {LOOPS: 17.0, FAILED: 0.0}, 4243: {FAILED: 1.0}}


def test_a_dead_stub_restarts_the_server(world):
    s, first = world["supervisor"], world["first"]
    del first.stubs[22]  # killed (a zombie is not listed either)
    s.check()
    assert first.stopped and s.server is world["launches"][0]
    assert messages(s)[-4:] == ["not ready: stub of llm_stateless_0_1 (pid 22) died",
                                "stub of llm_stateless_0_1 (pid 22) died: restarting tritonserver",
                                "tritonserver stopped", "tritonserver restarted"]
    assert not s.ready
    s.check()  # the new server's stubs are watched from now on; ready again
    assert s.ready and not s.server.stopped
    del s.server.stubs[1011]
    s.check()
    assert len(world["launches"]) == 2


def test_tritonserver_exiting_restarts_it(world):
    s, first = world["supervisor"], world["first"]
    first.process.returncode = -11
    s.check()
    assert "tritonserver exited with code -11: restarting tritonserver" in messages(s)
    assert s.server is world["launches"][0]


def test_a_failed_engine_restarts_the_server(world):
    s, first = world["supervisor"], world["first"]
    first.beats[21][FAILED] = 1.0
    s.check()
    assert first.stopped and s.server is world["launches"][0]
    assert messages(s)[-4:] == ["not ready: engine of llm_stateless_0_0 (pid 21) failed",
                                "engine of llm_stateless_0_0 (pid 21) failed: restarting tritonserver",
                                "tritonserver stopped", "tritonserver restarted"]
    s.check()
    assert s.ready


def test_an_engine_that_stops_stepping_restarts_after_stuck_after_s(world):
    s, first = world["supervisor"], world["first"]
    for t in range(4):  # loops move on every stub but 12
        world["now"] += 1.0
        for pid in first.beats:
            first.beats[pid][LOOPS] += 0 if pid == 12 else 1
        s.check()
        assert s.ready and not first.stopped
    world["now"] += 1.0
    s.check()
    assert first.stopped
    assert "engine of llm_0_1 (pid 12) has not stepped for 5 s: restarting tritonserver" in messages(s)


def test_a_stub_without_any_heartbeat_counts_as_stuck(world):
    s, first = world["supervisor"], world["first"]
    for pid in first.beats:
        first.beats[pid][LOOPS] += 1
    first.beats.pop(11)  # never publishes (e.g. its whole process is frozen)
    world["now"] += 5.0
    s.check()
    assert "engine of llm_0_0 (pid 11) has not stepped for 5 s: restarting tritonserver" in messages(s)


def test_triton_not_ready_too_long_restarts(world):
    s, first = world["supervisor"], world["first"]
    first.ready = False
    for _ in range(5):
        for pid in first.beats:
            first.beats[pid][LOOPS] += 1
        s.check()
        assert not s.ready and s.reason == "tritonserver is not ready" and not first.stopped
        world["now"] += 1.0
    s.check()
    assert first.stopped and "not ready for 5 s (tritonserver is not ready): restarting tritonserver" in messages(s)


def test_three_failed_launches_give_up(world):
    s, first = world["supervisor"], world["first"]
    world["fail_launches"] = 3
    first.process.returncode = 1
    s.check()
    assert s.gave_up and not s.ready and s.reason == "tritonserver could not be restarted"
    assert [m for m in messages(s) if m.startswith("launch ")] == [
        f"launch {i} of 3 failed: tritonserver exited with code 1" for i in (1, 2, 3)]


def test_health_endpoint_answers_for_the_supervisor(world):
    s = world["supervisor"]
    health = HealthEndpoint(s, "127.0.0.1", 0)

    def get(path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health.port}{path}", timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        assert get("/health/live") == (503, {"live": False})  # not started: not watching
        assert get("/health/ready") == (503, {"ready": False, "reason": "supervisor stopped"})
        s.start()
        assert get("/health/live") == (200, {"live": True})
        assert get("/health/ready") == (200, {"ready": True, "reason": ""})
        world["first"].ready = False
        assert wait_until(lambda: get("/health/ready")[0] == 503, 10)
        assert get("/health/ready") == (503, {"ready": False, "reason": "tritonserver is not ready"})
        assert get("/health/live") == (200, {"live": True})
        status, body = get("/v2/health/ready")
        assert status == 404 and "use /health/live or /health/ready" in body["error"]
    finally:
        s.stop()
        health.close()


def test_a_relaunch_waits_for_the_old_ports():
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        assert sup.wait_ports_free("127.0.0.1", [port], timeout_s=0.3) is False
    finally:
        listener.close()
    assert sup.wait_ports_free("127.0.0.1", [port], timeout_s=5) is True


def test_serve_refuses_a_busy_port_before_launching_naming_its_flag(monkeypatch):
    import argparse
    import socket

    from tritonkv.server import serve
    from tritonkv.server.errors import ServerStartError

    monkeypatch.setattr(serve, "launch", lambda *a, **k: pytest.fail("launched despite the busy port"))
    for flag in ("http_port", "grpc_port", "metrics_port", "openai_port", "health_port"):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            ports = dict(http_port=0, grpc_port=0, metrics_port=0, openai_port=0, health_port=0)
            ports[flag] = port
            args = argparse.Namespace(checkpoint=None, instances=1, host="127.0.0.1", verbose=False, param=[],
                                      **ports)
            name = "--" + flag.replace("_", "-")
            with pytest.raises(ServerStartError, match=f"^{name} {port}: 127.0.0.1:{port} is in use"):
                serve.serve_forever(args)


def test_a_frontend_that_gave_up_ends_supervision(world):
    s, first = world["supervisor"], world["first"]
    first.openai = type("Frontend", (), {"gave_up": True})()
    s.check()
    assert s.gave_up and not s.ready and s.reason == "the OpenAI frontend could not be restarted"
    assert not first.stopped  # serve stops it, then exits 1


def test_a_stopped_process_makes_the_server_not_ready_then_restarts_it(world):
    s, first = world["supervisor"], world["first"]
    first.readiness = lambda: (False, "process 21 of tritonserver is stopped (SIGSTOP)")
    for pid in first.beats:
        first.beats[pid][LOOPS] += 1
    s.check()
    assert not s.ready and s.reason == "process 21 of tritonserver is stopped (SIGSTOP)" and not first.stopped
    world["now"] += 5.0
    for pid in first.beats:
        first.beats[pid][LOOPS] += 1
    s.check()
    assert first.stopped
