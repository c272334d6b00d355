"""On a CUDA machine: a real tritonserver with 2 GPU instances per model on one shared pool
(CUDA IPC KV storage + weights). A 1,024-token system prompt computed by llm_stateless is a
cache hit for a conversation on llm; greedy tokens equal the cold path's. Prints a table.

Run on the device (after `source .gpu-carry/device_env.sh`): python3 bench/gpu_shared_pool_check.py
"""

import os
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "backend"), os.path.join(ROOT, "tests", "e2e")]

from triton_calls import StreamClient  # noqa: E402
from tritonkv.cache.pool_admin import pool_snapshot  # noqa: E402
from tritonkv.server.launcher import launch  # noqa: E402

SYSTEM = [256] + [(i * 37) % 256 for i in range(1023)]
GREEDY = dict(temperature=0.0, ignore_eos=True)


def timed_turn(client, **kw):
    t0 = time.perf_counter()
    turn = client.turn(**kw)
    return turn, (time.perf_counter() - t0) * 1000


def main():
    pool = f"gpucheck-{uuid.uuid4().hex[:6]}"
    server = launch(instances=2, instance_kind="KIND_GPU",
                    extra_params={"pool_name": pool, "kv_cache_memory_mb": "512", "max_model_len": "2048"})
    rows = []
    try:
        stateless = StreamClient(server.grpc_url, "llm_stateless")
        cold, cold_ms = timed_turn(stateless, ids=SYSTEM + [65, 66], max_tokens=1, **GREEDY)
        conv = StreamClient(server.grpc_url, "llm")
        warm, warm_ms = timed_turn(conv, seq_id=31, start=True, ids=SYSTEM + [65, 66], max_tokens=1, **GREEDY)
        more, _ = timed_turn(conv, seq_id=31, end=True, ids=[67], max_tokens=8, **GREEDY)
        salted, salted_ms = timed_turn(stateless, ids=SYSTEM + [65, 66], max_tokens=1,
                                       parameters={"cache_salt": "tenant-b"}, **GREEDY)
        rows = [("cold, llm_stateless", cold.cached_tokens, cold.ids, cold_ms, cold.error),
                ("warm, llm (other instance/model)", warm.cached_tokens, warm.ids, warm_ms, warm.error),
                ("turn 2 on llm", more.cached_tokens, more.ids, None, more.error),
                ("other cache_salt", salted.cached_tokens, salted.ids, salted_ms, salted.error)]
        stateless.close()
        conv.close()
        time.sleep(1.0)
        snap = pool_snapshot(f"{pool}-cuda0")
    finally:
        server.stop(timeout_s=20)
    print("| request | cached_tokens | first ids | round trip ms | error |")
    print("|---|---:|---|---:|---|")
    for name, cached, ids, ms, err in rows:
        print(f"| {name} | {cached} | {ids[:8]} | {'' if ms is None else f'{ms:.1f}'} | {err or ''} |")
    print("pool after the requests:", {k: snap[k] for k in ("total", "used", "cached", "refcounts_consistent")} if snap else snap)
    print("same greedy token cold vs warm:", rows[0][2] == rows[1][2])


if __name__ == "__main__":
    main()
