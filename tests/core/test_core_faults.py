"""Faults of the engine core itself: SIGKILLed mid-stream, its frontend's requests end with
a clear error within 5 s, its files are removed, and the next request's ``connect`` starts
a new core that gives the same greedy tokens; SIGTERM / SIGINT / SIGHUP make it exit and
remove its files (it exits on its own once its frontends are gone: test_core_sharing)."""

import os
import signal
import time

import pytest

from core_helpers import core_config, turn, wait_core_gone
from polling import wait_until
from tiny_models import hf_greedy
from tritonkv.core import liveness
from tritonkv.core.client import CoreClient
from tritonkv.core.runtime_dir import core_paths

PROMPT = [1, 12, 13, 14, 15]


def test_sigkilled_core_fails_requests_within_5s_and_the_next_connect_restarts_it(tiny):
    path, hf = tiny
    client = CoreClient(core_config(path))
    first = client.connect()
    reference = turn(client, 1, PROMPT, 8).token_ids
    assert reference == hf_greedy(hf, PROMPT, 8)[0]
    streams = [turn(client, 10 + i, PROMPT + [20 + i], 400, wait=False) for i in range(3)]
    assert wait_until(lambda: all(s.outputs for s in streams), 30)
    os.kill(first.core_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    for s in streams:
        s.wait(5)
    took = time.monotonic() - killed_at
    assert took < 5, took
    for s in streams:
        assert s.final.finish_reason == "error" and f"engine core (pid {first.core_pid}) exited" in s.final.error
    assert client.down is not None
    paths = core_paths(client.name)  # the client removes the dead core's files (after the errors)
    assert wait_until(lambda: not os.path.lexists(paths.socket) and not os.path.lexists(paths.lock), 10)
    refused = turn(client, 2, PROMPT, 2)
    assert "no engine core serves this instance" in refused.final.error
    second = client.connect()
    assert second.core_pid != first.core_pid
    assert turn(client, 3, PROMPT, 8).token_ids == reference
    client.close()
    wait_core_gone(client)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signalled_core_exits_and_removes_its_files(tiny, sig):
    client = CoreClient(core_config(tiny[0]))
    w = client.connect()
    os.kill(w.core_pid, sig)
    wait_core_gone(client)
    assert wait_until(lambda: client.down is not None, 5)
    assert not liveness.alive(w.core_pid, w.core_started)
    client.close()
