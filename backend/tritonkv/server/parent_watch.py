"""A Python backend stub ends when its tritonserver is gone.

Rule: a stub whose parent process changed (tritonserver died, by SIGKILL too, and the stub was
re-parented to init or a subreaper) exits within ``PERIOD_S``. Triton's stub does not always
notice a killed server (seen on 2.51 in a private /dev/shm namespace: stubs ran on for an hour
after their server was killed, each holding its engine core). The engine core then sees its
frontend gone and frees that frontend's blocks (core/liveness.py).
The watch runs only inside a stub (never in a test process that builds the model class).
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

PERIOD_S = 1.0
STUB_NAME = "triton_python_backend_stub"


def in_stub() -> bool:
    """This process is a stub: its executable (Python is embedded there) is the stub binary."""
    try:
        exe = os.readlink("/proc/self/exe")
    except OSError:
        exe = sys.executable or ""
    return os.path.basename(exe) == STUB_NAME


def watch_parent(period_s: float = PERIOD_S, force: bool = False) -> threading.Thread | None:
    """Start the daemon thread that ends this stub when its parent changes; None outside a
    stub (``force``: anywhere, for tests)."""
    if not (force or in_stub()):
        return None
    parent = os.getppid()

    def watch():
        stop = threading.Event()
        while not stop.wait(period_s):
            if os.getppid() != parent:
                log.error("tritonserver (pid %d) is gone: this stub exits", parent)
                os._exit(1)

    t = threading.Thread(target=watch, name="tritonkv-parent-watch", daemon=True)
    t.start()
    return t
