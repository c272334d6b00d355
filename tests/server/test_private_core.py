"""server/private_core.py: a stop ends the engine cores of the server's private pool, waits
for them, kills one that does not exit, and never signals a process that is not the core
(a reused pid). Fake cores here: processes whose command line names the core as the real
one's does (``--name <core>``); the real path is tests/e2e/test_launcher.py."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tritonkv.core.runtime_dir import core_paths
from tritonkv.server.private_core import end_pool_cores, pool_cores

# a core's behaviour on SIGTERM: remove its socket and lock file, then exit
POLITE = ("import os, signal, sys, time\n"
          "def bye(*_):\n"
          "    for p in sys.argv[3:5]:\n"
          "        os.unlink(p)\n"
          "    os._exit(0)\n"
          "signal.signal(signal.SIGTERM, bye)\n"
          "open(sys.argv[5], 'w').close()\n"
          "time.sleep(60)\n")
DEAF = POLITE.replace("signal.signal(signal.SIGTERM, bye)", "signal.signal(signal.SIGTERM, signal.SIG_IGN)")


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("TRITONKV_RUNTIME_DIR", str(path))
    return path


def fake_core(name, code, tmp_path):
    paths = core_paths(name)
    ready = tmp_path / f"{name}.ready"
    for p in (paths.socket, paths.lock):
        open(p, "w").close()
    proc = subprocess.Popen([sys.executable, "-c", code, "--name", name, paths.socket, paths.lock, str(ready)])
    with open(paths.lock, "w") as f:
        f.write(f"{proc.pid}\n")
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    return proc, paths


def test_cores_of_the_pool_get_sigterm_and_are_waited_for(runtime, tmp_path):
    a, a_paths = fake_core("server-abc-cpu0", POLITE, tmp_path)
    b, b_paths = fake_core("server-abc-cuda1", POLITE, tmp_path)
    other, other_paths = fake_core("server-abcd-cpu0", POLITE, tmp_path)  # another pool's
    try:
        assert pool_cores("server-abc") == ["server-abc-cpu0", "server-abc-cuda1"]
        end_pool_cores("server-abc", wait_s=10)
        # returned only once both exited (their own handler removed their files)
        assert a.poll() == 0 and b.poll() == 0
        assert not any(os.path.lexists(p) for p in (a_paths.socket, a_paths.lock, b_paths.socket, b_paths.lock))
        assert other.poll() is None and os.path.exists(other_paths.lock)
    finally:
        for p in (a, b, other):
            p.kill()
            p.wait()


def test_a_core_that_ignores_sigterm_is_killed_at_the_bound_and_its_files_removed(runtime, tmp_path):
    deaf, paths = fake_core("server-def-cpu0", DEAF, tmp_path)
    try:
        t0 = time.monotonic()
        end_pool_cores("server-def", wait_s=1.0)
        took = time.monotonic() - t0
        assert deaf.wait(5) == -signal.SIGKILL
        assert 1.0 <= took < 5, took
        assert not os.path.lexists(paths.lock) and not os.path.lexists(paths.socket)
    finally:
        deaf.kill()
        deaf.wait()


def test_a_pid_that_is_not_the_core_is_never_signalled(runtime):
    bystander = subprocess.Popen(["sleep", "60"])  # its pid written in a dead core's lock file
    try:
        paths = core_paths("server-ghi-cpu0")
        with open(paths.lock, "w") as f:
            f.write(f"{bystander.pid}\n")
        open(paths.socket, "w").close()
        end_pool_cores("server-ghi", wait_s=1.0)
        assert bystander.poll() is None  # untouched
        assert not os.path.lexists(paths.lock) and not os.path.lexists(paths.socket)  # stale files removed
    finally:
        bystander.kill()
        bystander.wait()
