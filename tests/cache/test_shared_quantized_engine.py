"""fp8 / int8 KV in a shared pool: the codes and their per token-head scales live in the pool's
shared files, so a prefix computed by one process is a hit in another that reads the very same
quantised blocks, and both give the tokens of a private quantised engine."""

import multiprocessing as mp
import os

import pytest
import torch

from engine_helpers import TEST_DEVICE
from engine_workers import (block_contents, block_table_of, engine_settings, quantized_instance,
                            quantized_kv_mapped_from_pool_files, turn)
from tritonkv.cache.pool_file import pool_path
from tritonkv.cache.shared_pool import PoolMismatch
from tritonkv.engine.factory import build_engine
from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint

CTX = mp.get_context("spawn")
SYSTEM = [256] + list(range(40, 40 + 37))  # 38 tokens: 9 full blocks of 4
PREFIX_BLOCKS = 9


@pytest.fixture(scope="module")
def checkpoint():
    return ensure_demo_checkpoint()


def settings(checkpoint, pool_name, kv_dtype):
    """On CUDA too (TRITONKV_TEST_DEVICE=cuda): then codes and scales are CUDA IPC exports."""
    return engine_settings(checkpoint, pool_name, kv_cache_dtype=kv_dtype, device=TEST_DEVICE)


def assert_same_contents(a, b):
    assert len(a) == len(b)
    for layer_a, layer_b in zip(a, b):
        for x, y in zip(layer_a, layer_b):
            assert x.dtype == y.dtype and x.shape == y.shape and (x == y).all()


@pytest.mark.parametrize("kv_dtype,codes", [("int8", torch.int8), ("fp8", torch.float8_e4m3fn)])
def test_two_processes_read_the_same_quantized_prefix_blocks(checkpoint, pool_name, kv_dtype, codes):
    a = build_engine(settings(checkpoint, pool_name, kv_dtype))
    try:
        k, _, k_scale, _ = a.kv_caches[0]
        assert a.pool.created and k.dtype == codes and k_scale.dtype == torch.float32
        assert quantized_kv_mapped_from_pool_files(a)
        tokens_a, cached = turn(a, "sys", SYSTEM + [65, 66, 67], 6, end=False)  # A keeps its blocks
        assert cached == 0
        prefix = block_table_of(a, "sys")[:PREFIX_BLOCKS]
        results = CTX.Queue()
        b = CTX.Process(target=quantized_instance,
                        args=(checkpoint, pool_name, kv_dtype, TEST_DEVICE, SYSTEM + [70, 71], PREFIX_BLOCKS,
                              results), daemon=True)
        b.start()
        try:
            out = results.get(timeout=120)
        finally:
            b.join(30)
        assert "error" not in out, out
        assert (out["created"], out["mapped"]) == (False, True)
        # B hit A's 9 prefix blocks: the same block ids, and its own mapping of them holds
        # byte for byte the codes and scales A wrote
        assert out["cached"] == 4 * PREFIX_BLOCKS and out["table"] == prefix
        mine = block_contents(a, prefix)
        # every slot of the prefix blocks was written (a scale is never 0 once written)
        assert all((ks.view("float32") > 0).all() and (vs.view("float32") > 0).all() for _, _, ks, vs in mine)
        assert_same_contents(out["contents"], mine)

        # a private quantised engine computing everything itself: the same tokens, and the same
        # quantised values in its own prefix blocks
        private = build_engine(settings(checkpoint, "", kv_dtype))
        assert turn(private, "a", SYSTEM + [65, 66, 67], 6)[0] == tokens_a
        ids, cached = turn(private, "b", SYSTEM + [70, 71], 6, end=False)
        assert ids == out["tokens"] and cached == 4 * PREFIX_BLOCKS  # its own prefix, from turn "a"
        assert_same_contents(block_contents(private, block_table_of(private, "b")[:PREFIX_BLOCKS]), mine)
    finally:
        a.close()
    assert not os.path.exists(pool_path(f"{pool_name}-{a.device.type}0", "pool"))


def test_attaching_with_another_kv_dtype_is_refused_naming_both(checkpoint, pool_name):
    a = build_engine(settings(checkpoint, pool_name, "int8"))
    try:
        with pytest.raises(PoolMismatch, match=r"kv_dtype=int8.*this instance wants.*kv_dtype=float8_e4m3fn"):
            build_engine(settings(checkpoint, pool_name, "fp8"))
        assert a.pool.counts()["owners"] == 1
    finally:
        a.close()
