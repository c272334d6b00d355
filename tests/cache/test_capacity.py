"""KV capacity (cache/capacity.py): bytes per token, blocks, and the sequences that fit, checked
against figures worked by hand (the founding documents' and the eviction policies' own
rules written out). Built from config.json dicts only."""

import pytest
import torch

from tritonkv.cache.allocate import model_dtype
from tritonkv.cache.capacity import kv_bytes_per_token, kv_capacity, server_kv_dtype
from tritonkv.config import EngineConfig
from tritonkv.model.model_config import ModelConfig

GIB = 2**30
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
             "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192, "rope_theta": 500000.0, "torch_dtype": "bfloat16"}
# seed 001's "70B-parameter model with 80 layers and hidden size 8192", every head its own K/V
LLAMA_70B_MHA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
                 "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 64, "vocab_size": 32000,
                 "max_position_embeddings": 4096}


def test_seed_001_seventy_b_without_gqa_is_2_5_mib_per_token_in_bf16():
    mha = ModelConfig.from_dict(LLAMA_70B_MHA)
    # 2 (K, V) x 80 layers x 8192 values x 2 bytes
    assert kv_bytes_per_token(mha, torch.bfloat16) == 2_621_440 == int(2.5 * 2**20)
    # "a single 4096-token context costs ~10 GB"
    assert 4096 * kv_bytes_per_token(mha, torch.bfloat16) == 10 * GIB
    # with Llama-2-70B's GQA (8 KV heads) it is 8x less; 8-bit codes halve it again, plus scales
    gqa = ModelConfig.from_dict({**LLAMA_70B_MHA, "num_key_value_heads": 8})
    assert kv_bytes_per_token(gqa, torch.bfloat16) == 327_680
    assert kv_bytes_per_token(gqa, torch.int8) == 168_960  # 2 x 80 x 8 x (128 codes + a 4-byte scale)


def test_seed_003_llama3_8b_8k_context_batch_16():
    c = ModelConfig.from_dict(LLAMA3_8B)
    config = EngineConfig(block_size=16)
    per_token = {name: kv_bytes_per_token(c, d) for name, d in
                 (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn), ("int8", torch.int8))}
    assert per_token == {"bf16": 131_072, "fp8": 67_584, "int8": 67_584}  # 128 KiB; 66 KiB with scales
    # 16 sequences of 8000 tokens = 16 x 500 blocks of 16 tokens: 15.6 GiB in bf16, the size of the
    # bf16 weights (8.03 B params x 2 bytes), as the seed says; its "about 8GB" is the 8-bit figure
    assert 16 * 500 * 16 * per_token["bf16"] == 16_777_216_000
    # so 16 GiB of bf16 KV admits exactly that batch; 8 GiB of int8 KV one sequence fewer
    for dtype, gib, fit in ((torch.bfloat16, 16, 16), (torch.int8, 8, 15), (torch.bfloat16, 8, 8)):
        f = kv_capacity(c, config, "cuda", budget_bytes=gib * GIB, context=8000, kv_dtype=dtype)
        assert (f.blocks_per_sequence, f.sequences) == (500, fit)


def test_the_dtype_is_the_servers_on_that_device():
    c = ModelConfig.from_dict(LLAMA3_8B)  # a bfloat16 checkpoint
    assert model_dtype("auto", c.torch_dtype, "cpu") == torch.float32  # the CPU server's exact oracle
    assert model_dtype("auto", c.torch_dtype, "cuda") == torch.bfloat16
    assert server_kv_dtype(EngineConfig(dtype="float16"), c, "cpu") == torch.float16
    assert server_kv_dtype(EngineConfig(kv_cache_dtype="fp8"), c, "cuda") == torch.float8_e4m3fn
    # 2 x 32 layers x 8 KV heads x 128 dims x 4 bytes; 256 MiB / (16 x that) = 64 blocks
    f = kv_capacity(c, EngineConfig(), "cpu")
    assert (f.kv_dtype, f.bytes_per_token, f.num_blocks) == ("float32", 262_144, 64)
    # without --context the figures are for the engine's max_model_len: the pool bounds it
    assert (f.context, f.sequences) == (1024, 1)
    assert kv_capacity(c, EngineConfig(), "cuda").bytes_per_token == 131_072


@pytest.mark.parametrize("settings, model_window, bound", [
    # a model window of 4096 decoding one token a step: ceil(4097 / 16) + 2 partial blocks
    ({}, 4096, 259),
    # 1 sink block + ceil(1020 / 16) = 64 window blocks + 1 (the window start moves a block at a
    # time) in the table, and the sink's written original
    (dict(kv_eviction="streaming", attention_sinks=4, kv_window=1020), None, 1 + 64 + 1 + 1),
    # h2o: 1 sink + 7 heavy (100 tokens) + 4 window + 1 in the table, the 8 originals beside
    (dict(kv_eviction="h2o", attention_sinks=4, heavy_hitter_tokens=100, kv_window=64), None, 13 + 8),
    # issue 22 item 7: window 2048, 4 sinks, stride 256: 1 + 128 + 16 in the table, + the sink's original
    (dict(kv_eviction="streaming", attention_sinks=4, kv_window=2048, kv_window_stride=256), None, 146),
])
def test_bounds_are_the_blocks_a_sequence_holds(settings, model_window, bound):
    c = ModelConfig.from_dict({**LLAMA3_8B, "max_position_embeddings": 32768,
                               **({"architectures": ["MistralForCausalLM"], "sliding_window": model_window}
                                  if model_window else {})})
    f = kv_capacity(c, EngineConfig(block_size=16, **settings), "cuda", num_blocks=10_000, context=32768)
    assert (f.bound_blocks, f.blocks_per_sequence_bounded) == (bound, bound)
    assert (f.blocks_per_sequence, f.sequences, f.sequences_bounded) == (2048, 4, 10_000 // bound)
    assert f.refused is None


def test_no_bound_holds_the_whole_context():
    f = kv_capacity(ModelConfig.from_dict(LLAMA3_8B), EngineConfig(), "cuda", num_blocks=1000, context=100)
    assert f.bound_blocks is None and f.blocks_per_sequence_bounded == f.blocks_per_sequence == 7
    assert f.sequences_bounded == f.sequences == 142


def test_settings_the_engine_refuses_are_named():
    c = ModelConfig.from_dict(LLAMA3_8B)  # 8192 positions: the kept cache must stay within 4096
    f = kv_capacity(c, EngineConfig(kv_eviction="streaming", kv_window=4096), "cuda", num_blocks=10_000)
    assert f.refused.startswith("parameter 'kv_window': the kept cache (258 blocks x 16 tokens) must be at most half")
