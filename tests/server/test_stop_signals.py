"""A stop signal sets the event even when it lands while the main thread holds that event's
lock (the deadlock a handler calling Event.set hits: tests/core/test_core_faults.py saw a
SIGTERMed core hang this way under load)."""

import signal
import subprocess
import sys

import pytest

SCRIPT = """
import os, signal, threading, time
from tritonkv.server.stop_signals import StopSignals
event = threading.Event()
signals = StopSignals(event)
with event._cond:  # what Event.wait holds for a moment: the handler must not need it
    os.kill(os.getpid(), signal.{name})
    for _ in range(1000):  # bytecodes for the Python-level handler to run between
        time.sleep(0.0005)
print(event.wait(10), signals.received, flush=True)
"""


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_while_the_event_lock_is_held_still_sets_the_event(name):
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(name=name)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", name]


def test_a_second_signal_keeps_the_first_name():
    script = SCRIPT.replace("print(", "os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2); print(")
    proc = subprocess.run([sys.executable, "-c", script.format(name="SIGHUP")], capture_output=True, text=True,
                          timeout=30)
    assert proc.stdout.split() == ["True", "SIGHUP"], proc.stderr
