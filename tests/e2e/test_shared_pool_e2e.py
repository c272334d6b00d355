"""A real tritonserver with instance_group count 2 for llm and llm_stateless: all four
instances are frontends of one engine core (core/), which holds the one int8 KV pool. A
system prompt computed for one instance is a cache hit for another (cached_tokens, lower
TTFT); a SIGKILLed stub's requests are cancelled by the core and the pool returns to its
baseline; stopping the server leaves no core process, socket or lock file."""

import contextlib
import os
import re
import signal
import statistics
import time
import urllib.request
import uuid

import pytest

from polling import wait_until
from triton_calls import StreamClient, http_generate, inputs_for
from tritonkv.core.runtime_dir import core_paths, core_pid
from tritonkv.server.launcher import launch

GREEDY = dict(temperature=0.0, ignore_eos=True)
SYSTEM = [256] + [(i * 37) % 256 for i in range(1023)]  # 1,024 tokens = 64 blocks of 16
POOL = f"e2e-{uuid.uuid4().hex[:8]}"
CORE = f"{POOL}-cpu0"  # the core's name: pool and device


def core_processes() -> list[int]:
    """Live engine core processes of CORE (by their process title)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            state = open(f"/proc/{pid}/stat", "rb").read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if cmd[0] == f"tritonkv-core {CORE}".encode() and state != b"Z":  # (its process title)
            found.append(int(pid))
    return found


def core_left_nothing() -> bool:
    paths = core_paths(CORE)
    return not core_processes() and not os.path.lexists(paths.socket) and not os.path.lexists(paths.lock)


@pytest.fixture(scope="module")
def server():
    params = {"pool_name": POOL, "kv_cache_memory_mb": "64", "max_model_len": "2048", "kv_cache_dtype": "int8"}
    s = launch(instances=2, extra_params=params, instance_kind="KIND_CPU")
    try:
        yield s
    finally:
        # with a stub killed, tritonserver 2.51 waits out its unload timeout for that model;
        # 10 s is enough for the others to finalize
        s.stop(timeout_s=10)
        with contextlib.suppress(ProcessLookupError):  # stubs of a force-stopped server
            os.killpg(s.process.pid, signal.SIGKILL)
        # the core notices its frontends are gone and exits after its grace period, removing
        # its socket and lock file
        assert wait_until(core_left_nothing, 15), (core_processes(), os.listdir(os.path.dirname(core_paths(CORE).lock)))


def per_instance(server, name) -> dict[str, float]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(rf'^{name}{{[^}}]*instance="([^"]+)"[^}}]*}} (\S+)$', text, flags=re.M)}


def llm_turn(server, seq_id, ids, **kw):
    client = StreamClient(server.grpc_url)
    try:
        t0 = time.perf_counter()
        turn = client.turn(seq_id=seq_id, start=True, end=True, ids=ids, max_tokens=1, **GREEDY, **kw)
        return turn, (time.perf_counter() - t0) * 1e3
    finally:
        client.close()


def test_all_instances_are_frontends_of_one_core(server):
    pids = core_processes()
    assert len(pids) == 1 and core_pid(CORE) == pids[0], (pids, core_pid(CORE))
    assert open(f"/proc/{pids[0]}/comm").read().startswith("tritonkv-core")
    assert os.getsid(pids[0]) == pids[0]  # a session of its own: a terminal's SIGHUP is not its business
    # demo model, int8: 2 (K, V) x 6 layers x 2 KV heads x (64 codes + a 4-byte scale)
    blocks = 64 * 2**20 // (16 * 1632)
    assert wait_until(lambda: per_instance(server, "tritonkv_kv_bytes_per_token") == dict.fromkeys(
        per_instance(server, "tritonkv_kv_blocks_total"), 1632.0), 5)
    assert set(per_instance(server, "tritonkv_kv_blocks_total").values()) == {float(blocks)}
    assert set(per_instance(server, "tritonkv_kv_capacity_tokens").values()) == {16.0 * blocks}
    assert len(per_instance(server, "tritonkv_kv_bytes_per_token")) == 4
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        evicted = re.findall(r'^tritonkv_kv_evicted_blocks_total{[^}]*instance="([^"]+)"[^}]*reason="prefix_lru"',
                             r.read().decode(), flags=re.M)
    assert sorted(evicted) == sorted(per_instance(server, "tritonkv_kv_blocks_total"))


def test_system_prompt_from_one_instance_is_a_hit_on_the_others(server):
    # llm_stateless computes the system prompt (another process than any llm instance)
    code, body = http_generate(server.http_url, "llm_stateless",
                               {"input_ids": SYSTEM + [10], "max_tokens": 1, **GREEDY})
    assert code == 200 and body["cached_tokens"] == 0, body
    before = per_instance(server, "tritonkv_generated_tokens_total")
    served_by, cold, warm = set(), [], []
    for i in range(8):  # until both llm instances have served a conversation
        question = [20 + i, 30 + i, 40 + i]
        salted, ms = llm_turn(server, 600 + 2 * i, SYSTEM + question, parameters={"cache_salt": f"cold-{i}"})
        assert salted.error is None and salted.cached_tokens == 0
        cold.append(ms)
        turn, ms = llm_turn(server, 601 + 2 * i, SYSTEM + question)
        assert turn.error is None and turn.cached_tokens == 1024, turn.cached_tokens
        warm.append(ms)
        now = per_instance(server, "tritonkv_generated_tokens_total")
        served_by = {k for k, v in now.items() if k.startswith("llm_") and not k.startswith("llm_stateless")
                     and v > before.get(k, 0)}
        if len(served_by) == 2 and i >= 2:
            break
    assert len(served_by) == 2, f"only {served_by} served llm conversations"
    assert statistics.median(warm) * 3 < statistics.median(cold), (warm, cold)
    # a pool-wide counter, reported alike by every instance (published every 0.5 s)
    assert wait_until(lambda: min(per_instance(server, "tritonkv_prefix_hit_blocks_total").values())
                      >= 64 * len(warm), 5)


def test_killed_stub_leaves_server_answering_and_pool_leak_free(server):
    stubs = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if any(server.workdir.encode() in c for c in cmd) and b"llm_0_1" in cmd:
                stubs[int(pid)] = cmd
    assert len(stubs) == 1, stubs
    victim = next(iter(stubs))
    # give the victim work that holds blocks, then kill it mid-way
    client = StreamClient(server.grpc_url)
    for i in range(4):
        client.client.async_stream_infer(model_name="llm", inputs=inputs_for(
            ids=SYSTEM[:300] + [i], max_tokens=300, **GREEDY), sequence_id=7700 + i, sequence_start=True,
            sequence_end=True)
    time.sleep(1.0)
    os.kill(victim, signal.SIGKILL)
    client.client.stop_stream(cancel_requests=True)
    client.client.close()
    # still answering, on both models
    code, body = http_generate(server.http_url, "llm_stateless", {"input_ids": SYSTEM + [11], "max_tokens": 2,
                                                                  **GREEDY})
    assert code == 200 and body["cached_tokens"] == 1024
    ok = [llm_turn(server, 7800 + i, [256, 65, 66])[0].error is None for i in range(4)]
    assert any(ok), "no llm conversation succeeded after the kill"

    # the core cancelled the dead frontend's turns: every block is back (a pool-wide gauge,
    # reported alike by the surviving instances), and it is still the one core
    def used():  # (the dead stub's series may stay behind, frozen)
        return {k: v for k, v in per_instance(server, "tritonkv_kv_blocks_used").items() if k != "llm_0_1"}
    assert wait_until(lambda: len(used()) == 3 and set(used().values()) == {0.0}, 30), used()
    assert core_processes() == [core_pid(CORE)]


def test_a_second_tritonserver_on_the_pool_name_attaches_the_same_core_and_hits(server):
    """Two tritonservers naming one pool: one engine core, one prefix cache (issue 23)."""
    params = {"pool_name": POOL, "kv_cache_memory_mb": "64", "max_model_len": "2048", "kv_cache_dtype": "int8"}
    core = core_pid(CORE)
    code, body = http_generate(server.http_url, "llm_stateless", {"input_ids": SYSTEM + [12], "max_tokens": 1,
                                                                  **GREEDY})
    assert code == 200, body
    other = launch(instances=1, extra_params=params, instance_kind="KIND_CPU")
    try:
        assert core_processes() == [core]  # attached, not started
        code, body = http_generate(other.http_url, "llm_stateless", {"input_ids": SYSTEM + [13], "max_tokens": 2,
                                                                     **GREEDY})
        assert code == 200 and body["cached_tokens"] == 1024, body
        ref_code, ref = http_generate(server.http_url, "llm_stateless", {"input_ids": SYSTEM + [13], "max_tokens": 2,
                                                                         **GREEDY})
        assert ref_code == 200 and ref["output_ids"] == body["output_ids"]
    finally:
        other.stop()
    assert core_processes() == [core]  # the first server's frontends keep it
