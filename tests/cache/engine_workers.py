"""A second engine instance in its own process, attached to the parent's pool by name."""

from __future__ import annotations

import os

from tritonkv.config import EngineConfig
from tritonkv.engine.factory import build_engine
from tritonkv.engine.requests import SamplingParams


def engine_settings(checkpoint: str, pool_name: str) -> EngineConfig:
    return EngineConfig(checkpoint=checkpoint, device="cpu", dtype="float32", block_size=4, num_blocks=128,
                        pool_name=pool_name)


def turn(engine, corr_id, ids, max_tokens, *, start=True, end=True, extra_keys=()):
    outs = []
    engine.submit(corr_id, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                  outs.append, start=start, end=end, extra_keys=extra_keys)
    engine.run_until_idle()
    return [t for o in outs for t in o.token_ids], outs[-1].cached_tokens


def weights_mapped_from_pool_file(engine) -> bool:
    """Every parameter lies inside a mapping of the pool's shared weights file."""
    path = engine.pool.companion_path("weights")
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(path):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                spans.append((lo, hi))
    return bool(spans) and all(any(lo <= p.data_ptr() < hi for lo, hi in spans) for p in engine.model.parameters())


def second_instance(checkpoint, pool_name, prompts, results, kill_me) -> None:
    engine = build_engine(engine_settings(checkpoint, pool_name))
    try:
        out = {"owner": engine.pool.owner, "created": engine.pool.created, "pid": os.getpid(),
               "weights_shared": weights_mapped_from_pool_file(engine)}
        out["turns"] = [turn(engine, i, p, 6, extra_keys=k) for i, (p, k) in enumerate(prompts)]
        # then open a conversation and keep its blocks until the parent kills this process
        turn(engine, "held", prompts[0][0], 2, end=False)
        out["used_while_holding"] = engine.pool.counts()["used"]
        results.put(out)
    except BaseException as exc:
        results.put({"error": repr(exc)})
        raise
    kill_me.wait(60)
    engine.close()
