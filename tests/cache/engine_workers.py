"""A second engine instance in its own process, attached to the parent's pool by name."""

from __future__ import annotations

import os

import torch

from tritonkv.config import EngineConfig
from tritonkv.engine.factory import build_engine
from tritonkv.engine.requests import SamplingParams


def engine_settings(checkpoint: str, pool_name: str, **overrides) -> EngineConfig:
    settings = dict(device="cpu", dtype="float32", block_size=4, num_blocks=128, pool_name=pool_name)
    return EngineConfig(checkpoint=checkpoint, **{**settings, **overrides})


def turn(engine, corr_id, ids, max_tokens, *, start=True, end=True, extra_keys=()):
    outs = []
    engine.submit(corr_id, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                  outs.append, start=start, end=end, extra_keys=extra_keys)
    engine.run_until_idle()
    return [t for o in outs for t in o.token_ids], outs[-1].cached_tokens


def mapped_from_pool_file(engine, suffix: str, tensors) -> bool:
    """Every tensor lies inside a mapping of the pool's shared ``suffix`` file."""
    path = engine.pool.companion_path(suffix)
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(path):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                spans.append((lo, hi))
    return bool(spans) and all(any(lo <= t.data_ptr() < hi for lo, hi in spans) for t in tensors)


def weights_mapped_from_pool_file(engine) -> bool:
    return mapped_from_pool_file(engine, "weights", engine.model.parameters())


def quantized_kv_mapped_from_pool_files(engine) -> bool:
    """Codes in the pool's ``kv`` file, scales in its ``kv_scales`` file, every layer (on
    CUDA: both exported by CUDA IPC handles in the pool's directory)."""
    if engine.device.type == "cuda":
        return all(os.path.exists(engine.pool.companion_path(f"{x}_cudaipc")) for x in ("kv", "kv_scales"))
    return (mapped_from_pool_file(engine, "kv", [t for k, v, _, _ in engine.kv_caches for t in (k, v)])
            and mapped_from_pool_file(engine, "kv_scales", [t for _, _, ks, vs in engine.kv_caches for t in (ks, vs)]))


def block_table_of(engine, corr_id) -> list[int]:
    """The KV blocks of the open conversation ``corr_id``."""
    return list(engine.kv.block_table(engine._live[corr_id].seq_id))


def block_contents(engine, blocks) -> list:
    """Per layer: the raw bytes of ``blocks`` in K's and V's codes and in the K and V scales, as
    uint8 numpy arrays (plain pickles between processes)."""
    idx = torch.tensor(blocks, device=engine.device)
    return [tuple(t[idx].contiguous().view(torch.uint8).cpu().numpy() for t in (k, v, ks, vs))
            for k, v, ks, vs in engine.kv_caches]


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


def quantized_instance(checkpoint, pool_name, kv_cache_dtype, device, prompt, prefix_blocks, results) -> None:
    """Attach to the parent's fp8 / int8 pool, run ``prompt`` holding its blocks, report what
    this process's mapping of the first ``prefix_blocks`` blocks holds, then detach."""
    engine = build_engine(engine_settings(checkpoint, pool_name, kv_cache_dtype=kv_cache_dtype, device=device))
    try:
        ids, cached = turn(engine, "q", prompt, 6, end=False)
        table = block_table_of(engine, "q")
        results.put({"created": engine.pool.created, "mapped": quantized_kv_mapped_from_pool_files(engine),
                     "tokens": ids, "cached": cached, "table": list(table[:prefix_blocks]),
                     "contents": block_contents(engine, table[:prefix_blocks])})
    except BaseException as exc:
        results.put({"error": repr(exc)})
        raise
    finally:
        engine.close()


def hold_every_block(checkpoint, pool_name, results, release) -> None:
    """Open a conversation that holds every block of the pool; end it when ``release`` is set."""
    engine = build_engine(engine_settings(checkpoint, pool_name))
    try:
        capacity = engine.pool.num_blocks * engine.pool.block_size
        turn(engine, "hog", [256] + [i % 250 for i in range(capacity - 2)], 1, end=False)
        results.put({"used": engine.pool.counts()["used"]})
        release.wait(60)
        engine.submit("hog", [], SamplingParams(max_tokens=1), lambda out: None, start=False, end=True,
                      close_only=True)
        engine.run_until_idle()
        results.put({"used": engine.pool.counts()["used"]})
    except BaseException as exc:
        results.put({"error": repr(exc)})
        raise
    finally:
        engine.close()
