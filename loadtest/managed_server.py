"""A tritonkv server for load tests, benchmarks and client tests: the launcher's
``start_server`` with a KV pool name of its own (pools are shared by name; another server on
the machine may hold the default pool with another geometry). The launcher's stop leaves
nothing behind (processes, ports, /dev/shm, work folder): no second guard is needed here.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def managed_server(checkpoint: str | None = None, *, pool_name: str, extra_params: dict | None = None, **kwargs):
    from tritonkv.server.launcher import start_server

    params = {"pool_name": pool_name, **(extra_params or {})}
    with start_server(checkpoint, extra_params=params, **kwargs) as server:
        yield server
