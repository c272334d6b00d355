"""A stub whose tritonserver is SIGKILLed exits (server/parent_watch.py).

A middle process (standing in for tritonserver) starts a child that runs the watch, then is
SIGKILLed; the child must be gone within a few watch periods. Outside a stub the watch does
not start (a test process building the model class must never exit by it)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from tritonkv.server.parent_watch import in_stub, watch_stub_parent

CHILD = textwrap.dedent("""
    import os, time
    from tritonkv.server.parent_watch import watch_parent
    watch_parent(os.getppid(), lambda: os._exit(1), period_s=0.1)
    print("watching", flush=True)
    time.sleep(60)
""")

MIDDLE = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "watching"
    print(child.pid, flush=True)
    time.sleep(60)
""")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_child_whose_parent_is_sigkilled_exits():
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE, CHILD], stdout=subprocess.PIPE, text=True)
    try:
        child = int(middle.stdout.readline())
        assert alive(child)
        time.sleep(0.5)  # several periods with the parent alive: the watch keeps the child
        assert alive(child)
        os.kill(middle.pid, signal.SIGKILL)
        middle.wait()
        deadline = time.monotonic() + 5
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child)
    finally:
        middle.kill()


def test_outside_a_stub_the_watch_does_not_start():
    assert not in_stub()
    assert watch_stub_parent() is None
