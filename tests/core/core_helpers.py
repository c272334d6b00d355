"""Drive a CoreClient synchronously in tests."""

from __future__ import annotations

import os
import threading
import uuid

from polling import wait_until
from tritonkv.config import EngineConfig
from tritonkv.core import liveness
from tritonkv.core.runtime_dir import core_name, core_paths, core_pid
from tritonkv.engine.requests import SamplingParams


def core_config(checkpoint: str, **overrides) -> EngineConfig:
    settings = {"block_size": 4, "num_blocks": 128, "device": "cpu", "dtype": "float32",
                "pool_name": f"t{uuid.uuid4().hex[:10]}", **overrides}
    return EngineConfig(checkpoint=checkpoint, **settings)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


class Turn:
    """One submitted turn's outputs, with a wait for its end."""

    def __init__(self):
        self.outputs = []
        self.done = threading.Event()

    def __call__(self, out):
        self.outputs.append(out)
        if out.finished:
            self.done.set()

    def wait(self, timeout: float = 60) -> "Turn":
        assert self.done.wait(timeout), "turn did not finish"
        return self

    @property
    def token_ids(self):
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def final(self):
        return self.outputs[-1]


def turn(client, corr_id, ids, max_tokens, *, start=True, end=True, wait=True, **kw) -> Turn:
    t = Turn()
    client.submit(corr_id, ids, greedy(max_tokens), t, start=start, end=end, **kw)
    return t.wait() if wait else t


def name_of(config: EngineConfig) -> str:
    return core_name(config.pool_name, "cpu0")


def core_gone(config: EngineConfig, pid: int, started: int) -> bool:
    """The core process is gone and left no socket or lock file."""
    paths = core_paths(name_of(config))
    return not liveness.alive(pid, started) and not os.path.lexists(paths.socket) and not os.path.lexists(paths.lock)


def wait_core_gone(client) -> None:
    w = client.welcome
    assert wait_until(lambda: core_gone(client.config, w.core_pid, w.core_started), 15), \
        os.listdir(os.path.dirname(core_paths(name_of(client.config)).lock))


def used_blocks(client) -> int:
    return client.stats.get("used", -1)


__all__ = ["core_config", "core_pid", "greedy", "turn", "name_of", "wait_core_gone", "used_blocks"]
