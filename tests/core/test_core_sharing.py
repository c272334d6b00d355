"""One engine core serves every frontend of its pool: two frontends (CoreClients, as two
Triton instances would be) share one prefix cache under the salt rules; a frontend with other
engine settings is refused naming both sides; a frontend SIGKILLed mid-stream has its turns
cancelled and blocks freed while the other's streams stay exact; the core leaves nothing
behind once its frontends are gone."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import msgspec
import pytest

from core_helpers import core_config, turn, used_blocks, wait_core_gone
from polling import wait_until
from tiny_models import hf_greedy
from tritonkv.core.client import CoreClient, CoreUnavailable

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEM = [1] + [(7 * i) % 90 + 3 for i in range(15)]  # 16 tokens = 4 full blocks of 4


@pytest.fixture(scope="module")
def pair(tiny):
    config = core_config(tiny[0])
    a, b = CoreClient(config), CoreClient(config)
    a.connect()
    b.connect()
    yield a, b, tiny[1]
    a.close()
    b.close()
    wait_core_gone(a)


def test_both_frontends_attach_one_core(pair):
    a, b, _ = pair
    assert a.welcome.core_pid == b.welcome.core_pid != os.getpid()
    assert open(f"/proc/{a.welcome.core_pid}/cmdline", "rb").read().split(b"\0")[0] == \
        f"tritonkv-core {a.name}".encode()
    assert os.getsid(a.welcome.core_pid) == a.welcome.core_pid  # its own session


def test_prefix_computed_for_one_frontend_is_a_hit_for_the_other(pair):
    a, b, hf = pair
    first = turn(a, 1, SYSTEM + [50], 4, stateless=True)
    assert first.final.cached_tokens == 0 and first.token_ids == hf_greedy(hf, SYSTEM + [50], 4)[0]
    second = turn(b, 1, SYSTEM + [60, 61], 5)
    assert second.final.cached_tokens == 16 and second.final.prompt_tokens == 18
    assert second.token_ids == hf_greedy(hf, SYSTEM + [60, 61], 5)[0]


def test_cache_salt_keeps_tenants_apart_across_frontends(pair):
    a, b, hf = pair
    prompt = [1] + [(5 * i) % 80 + 10 for i in range(11)] + [70]  # 3 full blocks before the last token
    salt1, salt2 = (("cache_salt", "tenant-1"),), (("cache_salt", "tenant-2"),)
    assert turn(a, 2, prompt, 2, extra_keys=salt1).final.cached_tokens == 0
    assert turn(b, 2, prompt, 2, extra_keys=salt2).final.cached_tokens == 0
    assert turn(b, 3, prompt, 2).final.cached_tokens == 0  # unsalted is a namespace of its own
    hit = turn(b, 4, prompt, 3, extra_keys=salt1)
    assert hit.final.cached_tokens == 12 and hit.token_ids == hf_greedy(hf, prompt, 3)[0]


def test_conversations_are_per_frontend(pair):
    """Two servers may use one correlation id: each frontend's conversation is its own."""
    a, b, hf = pair
    ta = turn(a, 77, [1, 20, 21], 3, end=False)
    tb = turn(b, 77, [1, 30, 31], 3, end=False)
    assert ta.final.error is None and tb.final.error is None
    ta2 = turn(a, 77, [22], 2, start=False)
    assert ta2.token_ids == hf_greedy(hf, [1, 20, 21] + ta.token_ids + [22], 2)[0]
    assert turn(b, 77, [], 1, start=False, close_only=True).final.finish_reason == "closed"


def test_other_settings_are_refused_naming_both_sides(pair):
    a, _, _ = pair
    other = CoreClient(dataclasses.replace(a.config, kv_cache_dtype="int8"))
    with pytest.raises(CoreUnavailable, match=r"kv_cache_dtype='auto' \(core\) vs kv_cache_dtype='int8' "
                                              r"\(this instance\)"):
        other.connect(timeout_s=60)
    # per-frontend settings may differ
    same = CoreClient(dataclasses.replace(a.config, default_max_tokens=7, stream_interval=3))
    assert same.connect(timeout_s=60).core_pid == a.welcome.core_pid
    same.close()


def test_sigkilled_frontend_mid_stream_frees_its_blocks_and_others_stay_exact(tiny, tmp_path, monkeypatch):
    # a core of its own, slowed by the fault hook (server/fault_injection.py): each loop
    # iteration sleeps 0.05 s, so the stub's 300-token streams last ~15 s and are certainly in
    # flight when it is killed (unslowed, a tiny model on the CPU could finish them before the
    # half-second stats showed their blocks: a flake under load)
    monkeypatch.setenv("TRITONKV_TEST_FAULT_DIR", str(tmp_path))
    path, hf = tiny
    a = CoreClient(core_config(path))
    (tmp_path / f"slow-{a.connect().core_pid}").touch()
    try:
        _sigkill_a_streaming_stub(a, hf)
    finally:
        a.close()
        wait_core_gone(a)


def _sigkill_a_streaming_stub(a, hf):
    assert wait_until(lambda: used_blocks(a) == 0, 10)
    stub = subprocess.Popen([sys.executable, os.path.join(HERE, "frontend_stub.py"),
                             msgspec.json.encode(a.config).decode(), json.dumps(SYSTEM), "3", "300"],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert stub.stdout.readline().strip() == "streaming"
        mine = [turn(a, 500 + i, [1, 40 + i, 41], 30, wait=False) for i in range(2)]
        assert wait_until(lambda: used_blocks(a) > 3 * 5, 10)  # the stub's streams hold blocks
        os.kill(stub.pid, signal.SIGKILL)
        stub.wait()
        for i, t in enumerate(mine):
            assert t.wait().token_ids == hf_greedy(hf, [1, 40 + i, 41], 30)[0]
        assert wait_until(lambda: used_blocks(a) == 0 and a.stats.get("live_sequences") == 0, 10), a.stats
    finally:
        if stub.poll() is None:
            stub.kill()
            stub.wait()
