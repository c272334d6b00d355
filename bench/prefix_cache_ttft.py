"""Time to first token with a 1,024-token prefix cached by ANOTHER instance, against cold.

Two frontends (core clients, as two Triton instances are) attach one engine core (the shape
Triton gives with instance_group count 2): frontend A prefills a 1,024-token system prompt;
frontend B then sends system prompt + a fresh 32-token question. Cold requests send
the same token count under a fresh cache_salt (same compute, guaranteed miss).

    python bench/prefix_cache_ttft.py [--checkpoint DIR] [--repeats 5]

Prints a table and writes bench/results/prefix_cache_ttft.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "backend"))

PREFIX_TOKENS = 1024
QUESTION_TOKENS = 32


def settings(checkpoint, pool_name):
    from tritonkv.config import EngineConfig

    return EngineConfig(checkpoint=checkpoint, device="cpu", dtype="float32", block_size=16,
                        kv_cache_memory_mb=256, max_num_batched_tokens=2048, pool_name=pool_name)


def ttft_ms(client, corr_id, ids, extra_keys=()):
    """Submit a 1-token turn through a frontend and wait for it: its wall time."""
    import threading

    from tritonkv.engine.requests import SamplingParams

    outs, done = [], threading.Event()

    def emit(out):
        outs.append(out)
        if out.finished:
            done.set()
    t0 = time.perf_counter()
    client.submit(corr_id, ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), emit,
                  start=True, end=True, extra_keys=extra_keys)
    assert done.wait(600) and outs[-1].error is None, outs[-1].error
    return (time.perf_counter() - t0) * 1e3, outs[-1].cached_tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "prefix_cache_ttft.md"))
    args = ap.parse_args()

    import torch

    from tritonkv.core.client import CoreClient
    from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint

    checkpoint = args.checkpoint or ensure_demo_checkpoint()
    rng = random.Random(0)
    system = [256] + [rng.randrange(0, 256) for _ in range(PREFIX_TOKENS - 1)]
    config = settings(checkpoint, f"bench-{uuid.uuid4().hex[:8]}")
    a, b = CoreClient(config), CoreClient(config)
    a.connect()
    b.connect()
    try:
        ttft_ms(a, 1, system + [65])
        ttft_ms(b, 2, [256] + [7] * 64, (("cache_salt", "warmup"),))
        cold, warm, hits = [], [], []
        for i in range(args.repeats):
            question = [rng.randrange(0, 256) for _ in range(QUESTION_TOKENS)]
            ms, cached = ttft_ms(b, 100 + i, system + question, (("cache_salt", uuid.uuid4().hex),))
            assert cached == 0
            cold.append(ms)
            ms, cached = ttft_ms(b, 200 + i, system + question)
            warm.append(ms)
            hits.append(cached)
    finally:
        a.close()
        b.close()

    c, w = statistics.median(cold), statistics.median(warm)
    rows = [("cold (no cached prefix)", c, min(cold), 0),
            ("1,024-token prefix cached by the other instance", w, min(warm), hits[0])]
    cpu = platform.processor() or platform.machine()
    header = (f"| request ({PREFIX_TOKENS} + {QUESTION_TOKENS} prompt tokens) | median TTFT ms | best ms | "
              "cached tokens |\n|---|---:|---:|---:|")
    table = "\n".join([header] + [f"| {n} | {m:.1f} | {b_:.1f} | {h} |" for n, m, b_, h in rows])
    speedup = c / w
    text = (f"# Prefix-cache time to first token\n\n"
            f"Command: `{' '.join(['python bench/prefix_cache_ttft.py', *sys.argv[1:]])}`\n\n"
            f"Machine: {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}; demo Llama "
            f"checkpoint (6 layers, hidden 384, fp32); block_size 16; two frontends of one engine "
            f"core (frontend A computed the prefix, frontend B measured, end to end through the "
            f"core's transport).\n\n"
            f"{table}\n\n**Speed-up: {speedup:.1f}x lower TTFT with the cached prefix** "
            f"(goal: >= 5x).\n")
    print(table)
    print(f"speed-up {speedup:.1f}x")
    with open(args.out, "w") as f:
        f.write(text)
    return 0 if all(h == PREFIX_TOKENS for h in hits) else 1


if __name__ == "__main__":
    sys.exit(main())
