"""TEST-ONLY fault injection, off unless ``$TRITONKV_TEST_FAULT_DIR`` is set in the server's
environment (never set it in a deployment). Used by tests/e2e/test_fault.py to keep streams
in flight and to make an engine stop stepping, deterministically.

When the variable names a directory, the engine thread of the engine core with process id
PID (core/proc.py), at the end of a loop iteration (so within about a second, idle or busy):
- sleeps 0.05 s while the file ``<dir>/slow-PID`` exists (streams that stay in flight);
- blocks for good once the file ``<dir>/hang-PID`` exists (an engine that stops stepping).
Files name a process, not a pool, so a restarted core runs clean.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

ENV = "TRITONKV_TEST_FAULT_DIR"


def fault_hook() -> Callable[[], None] | None:
    """The hook to call on the engine thread after each loop iteration, or None (the default:
    the variable is not set)."""
    directory = os.environ.get(ENV)
    if not directory:
        return None
    slow = os.path.join(directory, f"slow-{os.getpid()}")
    hang = os.path.join(directory, f"hang-{os.getpid()}")

    def hook() -> None:
        if os.path.exists(slow):
            time.sleep(0.05)
        if os.path.exists(hang):
            threading.Event().wait()  # never returns: the engine thread is stuck

    return hook
