"""The processes a launch starts and how they end.

Rules:
- every child (tritonserver, the OpenAI frontend) runs in a session of its own: its process
  group is exactly it and what it starts (tritonserver's Python stubs), so one ``killpg``
  ends all of them, and a signal to the launcher's terminal does not reach them directly;
- every child gets a parent-death signal (``PR_SET_PDEATHSIG``, SIGKILL): if the process
  that started it dies, even by SIGKILL, the kernel ends it (its own children notice their
  parent is gone: a Python stub exits when tritonserver does). The kernel ties that signal
  to the *thread* that forked, so every child is forked by one spawner thread that lives as
  long as the process (a supervisor or watchdog thread that ends must not take its
  server with it);
- ``tritonkv serve`` itself asks for SIGTERM when its own parent dies (a supervisor, a shell
  that was closed without SIGHUP), which stops the whole tree like any other signal;
- a process is "live" unless it is a zombie; one in state T (SIGSTOP, a debugger) is live
  but cannot answer: readiness is false while any member of the tree is stopped.
"""

from __future__ import annotations

import contextlib
import concurrent.futures
import ctypes
import os
import signal
import subprocess
import time

PR_SET_PDEATHSIG = 1
_libc = None
with contextlib.suppress(OSError):
    _libc = ctypes.CDLL(None, use_errno=True)
_prctl = getattr(_libc, "prctl", None)  # looked up here: a preexec_fn must not load libraries


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (thread) exits.
    Returns False where prctl is not there (not Linux)."""
    if _prctl is None:
        return False
    return _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _die_with_parent() -> None:  # runs in the child between fork and exec: nothing else here
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def spawn(cmd: list[str], *, env: dict | None = None, stdout=None, pass_fds=()) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own, umask 077 (what it creates is private to this
    user), killed by the kernel if this process dies."""
    return _SPAWNER.submit(_popen, cmd, env, stdout, pass_fds).result()


# one long-lived thread forks every child (see the rule above); it ends with the interpreter
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tritonkv-spawner")


def _popen(cmd, env, stdout, pass_fds) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT if stdout is not None else None,
                            start_new_session=True, pass_fds=pass_fds, umask=0o077, preexec_fn=_die_with_parent)


def process_stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, parent pid, process group) of ``pid``; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2])


def live_group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (an orphan's zombie waits for init)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = process_stat(int(entry))
            if stat is not None and stat[2] == pgid and stat[0] != "Z":
                pids.append(int(entry))
    return pids


def tree_members(pid: int) -> list[int]:
    """``pid`` and its descendants that are not zombies, found through the kernel's children
    lists (a few files, where ``live_group_members`` reads every process's stat: the
    supervisor's per-pass checks use this one; a stop, which must also find members that
    were reparented, uses the other)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        stat = process_stat(current)
        if stat is None or stat[0] == "Z":
            continue
        found.append(current)
        try:
            tids = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                continue
    return found


def stopped_members(pgid: int, members: list[int] | None = None) -> list[int]:
    """Members of group ``pgid`` (or of ``members``) stopped by a signal (state T) or a tracer (t)."""
    pids = live_group_members(pgid) if members is None else members
    return [pid for pid in pids if (process_stat(pid) or ("",))[0] in ("T", "t")]


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def end_group(proc: subprocess.Popen, deadline: float) -> None:
    """Wait for ``proc`` until ``deadline`` (time.monotonic), then SIGKILL its whole group and
    wait until no member of it is left (a SIGKILL lands asynchronously). A stopped member
    (SIGSTOP) is killed too: SIGKILL needs no SIGCONT."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(max(0.0, deadline - time.monotonic()))
    signal_group(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait()
    wait_group_gone(proc.pid, 10)


def wait_group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while live_group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
