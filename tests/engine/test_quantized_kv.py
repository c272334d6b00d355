"""FP8 / INT8 KV cache in the engine: per token-head scales, close to the fp32 oracle."""

import pytest
import torch

from engine_helpers import Collector, greedy, make_engine
from tiny_models import build_tiny_checkpoint, hf_greedy
from tritonkv.config import EngineConfig
from tritonkv.engine.factory import build_engine
from tritonkv.cache.layout import v_token_minor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama_q"))
    return path, build_tiny_checkpoint("llama", path)


@pytest.mark.parametrize("kv_dtype,storage,min_agree", [("int8", torch.int8, 16), ("fp8", torch.float8_e4m3fn, 6)])
def test_quantized_cache_stores_quantized_values_and_tracks_the_oracle(tiny, kv_dtype, storage, min_agree):
    path, hf = tiny
    engine = make_engine(path, kv_cache_dtype=kv_dtype)
    k_cache, v_cache, k_scale, v_scale = engine.kv_caches[0]
    assert k_cache.dtype == storage and k_scale.dtype == torch.float32
    assert v_token_minor(v_cache) and not v_token_minor(k_cache)  # 8-bit V: cache/layout.py
    prompt = [1, 17, 33, 5, 60, 8, 71, 9, 42, 13, 77]
    c = Collector()
    engine.submit("q", prompt, greedy(24), c, start=True, end=True)
    engine.run_until_idle()
    expected = hf_greedy(hf, prompt, 24)[0]
    agree = next((i for i, (a, b) in enumerate(zip(c.token_ids, expected)) if a != b), 24)
    # quantisation noise may flip a near-tie late in the run; the first tokens must agree
    assert agree >= min_agree, (kv_dtype, agree, c.token_ids, expected)
    assert (k_scale > 0).sum() > 0  # scales were written for the stored tokens


def test_quantized_cache_holds_more_blocks_in_the_same_memory(tiny):
    path, _ = tiny
    full = build_engine(EngineConfig(checkpoint=path, device="cpu", kv_cache_memory_mb=4))
    q8 = build_engine(EngineConfig(checkpoint=path, device="cpu", kv_cache_memory_mb=4, kv_cache_dtype="int8"))
    # fp32 K/V (16 dims x 4 B) vs int8 + a 4 B scale per token-head: 64 B vs 20 B
    assert q8.pool.num_blocks == full.pool.num_blocks * 64 // 20


def test_quantized_cache_with_a_shared_pool_is_refused_with_the_reason(tiny):
    with pytest.raises(ValueError, match="'kv_cache_dtype' = 'fp8' needs a private pool"):
        build_engine(EngineConfig(checkpoint=tiny[0], device="cpu", kv_cache_dtype="fp8", pool_name="qtest"))
