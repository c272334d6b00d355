"""A tritonkv server for load tests, benchmarks and client tests: the launcher's
``start_server`` plus two guards.

- its own KV pool name: pools are shared by name across processes on one device, and
  another server on the machine may hold the default pool with another geometry;
- after stop, whatever is left of the server's process group is killed and the files of its
  pool are removed. ``Server.stop`` already does both (tritonserver 2.51 waits for every open
  conversation until its exit timeout and leaves its Python stubs behind, so the launcher kills
  the group and removes the pool and the server's Python backend regions); this is a second
  guard for a stop that raised half-way.
"""

from __future__ import annotations

import contextlib
import os
import signal


@contextlib.contextmanager
def managed_server(checkpoint: str | None = None, *, pool_name: str, extra_params: dict | None = None, **kwargs):
    from tritonkv.server.launcher import start_server

    params = {"pool_name": pool_name, **(extra_params or {})}
    server = None
    try:
        with start_server(checkpoint, extra_params=params, **kwargs) as server:
            yield server
    finally:
        if server is not None:
            kill_leftovers(server.process.pid)


def kill_leftovers(pgid: int) -> None:
    """SIGKILL what remains of a stopped server's process group (the launcher starts the server
    in a session of its own, so the group is exactly the server and its stubs)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
