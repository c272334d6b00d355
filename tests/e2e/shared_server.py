"""The one tritonserver the e2e and client tests share (started by the first test that asks,
stopped at the end of the session): the demo model, every endpoint (HTTP, gRPC, metrics,
OpenAI), default security settings. A server start is the expensive part of an e2e test;
tests that need other settings (another checkpoint, a fault hook, a tiny slot count) start
their own. Every test leaves the pool at baseline, so the next one starts from it."""

from __future__ import annotations

import os

MAX_MODEL_LEN = 4096  # the demo model's own limit
SETTINGS = dict(extra_params={"max_model_len": str(MAX_MODEL_LEN), "kv_cache_memory_mb": "64",
                              "pool_name": f"e2e-shared-{os.getpid()}"},
                openai_port=0)

_server = None


def shared_server():
    global _server
    if _server is None:
        from tritonkv.server.launcher import launch

        _server = launch(**SETTINGS)
    return _server


def stop_shared_server() -> None:
    global _server
    if _server is not None:
        server, _server = _server, None
        keep_logs(server)
        server.stop()


def keep_logs(server) -> None:
    """Copy the server's logs (tritonserver with its stubs and engine core; the OpenAI frontend)
    into $TRITONKV_TEST_LOG_DIR/<pid>/ when it is set: the GPU recipe keeps them, the work
    directory goes with the server."""
    dest = os.environ.get("TRITONKV_TEST_LOG_DIR")
    if not dest:
        return
    import shutil

    dest = os.path.join(dest, str(os.getpid()))
    os.makedirs(dest, exist_ok=True)
    for name in ("server.log", "openai.log"):
        src = os.path.join(server.workdir, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(dest, name))
