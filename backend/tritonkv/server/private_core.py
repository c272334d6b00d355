"""The engine cores of a server's private KV pool end with the server.

Rules:
- A launch without a ``pool_name`` gives its models a pool of their own (``server-<token>``);
  its cores (one per device: ``<pool>-cpu0``, ``<pool>-cuda<N>``) serve no other server.
- A core exits by itself ``grace_s`` after its last frontend left (core/proc.py): left alone
  it would outlive the stop by that long. So once the server's processes are gone, the
  launcher sends each core of its private pool SIGTERM and waits for it to exit, at most
  ``wait_s``; a core still there then is SIGKILLed and its files removed.
- A core is signalled only while its command line names it (``tritonkv-core <name>``, or
  ``--name <name>`` before setproctitle): a pid written in a lock file may be reused.
- A named pool's core may serve other servers: it is left to its grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from tritonkv.core.runtime_dir import core_paths, core_pid, runtime_dir
from tritonkv.core.spawn import remove_stale
from tritonkv.server.process_tree import process_stat


def pool_cores(pool: str) -> list[str]:
    """Names of the cores of ``pool`` that have a lock file (running, starting or killed)."""
    try:
        names = os.listdir(runtime_dir())
    except OSError:
        return []
    return sorted(n[:-len(".lock")] for n in names if n.startswith(pool + "-") and n.endswith(".lock"))


def is_core(pid: int, name: str) -> bool:
    """Whether live process ``pid`` is the core ``name`` (not a zombie, not a reused pid)."""
    stat = process_stat(pid)
    if stat is None or stat[0] == "Z":
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().replace(b"\0", b" ").split()
    except OSError:
        return False
    word = name.encode()
    return (argv[:2] == [b"tritonkv-core", word]) or any(
        a == b"--name" and b == word for a, b in zip(argv, argv[1:]))


def end_pool_cores(pool: str, wait_s: float = 5.0) -> None:
    """SIGTERM every core of ``pool`` and wait until each has exited (see the rules)."""
    for name in pool_cores(pool):
        end_core(name, wait_s)


def end_core(name: str, wait_s: float) -> None:
    lock = core_paths(name).lock
    deadline = time.monotonic() + wait_s
    signalled = None
    while os.path.lexists(lock):  # the core removes it on its way out
        pid = core_pid(name)  # None while a core still starts
        if pid is not None and not is_core(pid, name):
            break  # gone without removing its files (killed): remove them below
        if time.monotonic() >= deadline:
            if pid is not None:
                kill(pid, signal.SIGKILL)
                _wait_gone(pid, name, deadline + 2)
            break
        if pid is not None and pid != signalled:
            kill(pid, signal.SIGTERM)  # the core's own stop
            signalled = pid
        time.sleep(0.02)
    if signalled is not None:
        _wait_gone(signalled, name, deadline + 2)  # it removed its files: now its exit
    if os.path.lexists(lock):
        remove_stale(name)


def _wait_gone(pid: int, name: str, until: float) -> None:
    """Until process ``pid`` is no longer core ``name`` (it exited), or ``until`` (monotonic)."""
    while is_core(pid, name) and time.monotonic() < until:
        time.sleep(0.02)


def kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
