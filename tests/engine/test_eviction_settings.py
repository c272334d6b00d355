"""Bad eviction settings fail at load (EngineConfig) or engine construction, naming the
parameter to change."""

import re

import pytest

from bounded_models import build_checkpoint
from engine_helpers import make_engine
from tritonkv.config import EngineConfig


@pytest.mark.parametrize("settings, parameter, words", [
    (dict(kv_eviction="lru"), "kv_eviction", "must be one of"),
    (dict(kv_eviction="streaming", kv_window=0), "kv_window", "must be > 0 tokens"),
    (dict(kv_eviction="h2o", kv_window=-4, heavy_hitter_tokens=8), "kv_window", "must be >= 0"),
    (dict(kv_eviction="streaming", kv_window=16, attention_sinks=32), "attention_sinks", "must not exceed kv_window (16)"),
    (dict(kv_eviction="streaming", kv_window=16, attention_sinks=-1), "attention_sinks", "must be >= 0"),
    (dict(kv_eviction="h2o", kv_window=16), "heavy_hitter_tokens", "must be > 0 with kv_eviction='h2o'"),
    (dict(kv_eviction="streaming", kv_window=16, kv_cache_dtype="fp8"), "kv_cache_dtype", "not supported"),
    (dict(kv_eviction="streaming", kv_window=16, kv_window_stride=-8), "kv_window_stride", "must be >= 0"),
])
def test_bad_settings_fail_at_load_naming_the_parameter(settings, parameter, words):
    with pytest.raises(ValueError, match=rf"parameter '{parameter}'.*{re.escape(words)}"):
        EngineConfig(**settings)
    # the same through config.pbtxt's string parameters
    with pytest.raises(ValueError, match=rf"parameter '{parameter}'"):
        EngineConfig.from_parameters({k: str(v) for k, v in settings.items()})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    llama = str(tmp_path_factory.mktemp("llama"))
    mistral = str(tmp_path_factory.mktemp("mistral"))
    build_checkpoint(llama, max_position_embeddings=128)
    build_checkpoint(mistral, "MistralForCausalLM", sliding_window=8)
    return llama, mistral


def test_h2o_on_a_pool_too_small_for_its_budget_fails_construction(checkpoints):
    llama, _ = checkpoints
    # 1 sink block + 8 heavy (each with its written original) + 5 window blocks = 23 > 20
    with pytest.raises(ValueError, match=r"parameter 'heavy_hitter_tokens'.*up to 23 KV blocks.*the pool has 20"):
        make_engine(llama, block_size=4, num_blocks=20, kv_eviction="h2o", kv_window=16, heavy_hitter_tokens=32)
    engine = make_engine(llama, block_size=4, num_blocks=23, kv_eviction="h2o", kv_window=16, heavy_hitter_tokens=32)
    assert engine.policy.blocks_per_sequence(1024) == 23 and engine.policy.kept_blocks() == 14


def test_kept_cache_must_fit_half_the_rotary_positions(checkpoints):
    llama, _ = checkpoints
    with pytest.raises(ValueError, match=r"parameter 'kv_window'.*at most half the model's 128 positions"):
        make_engine(llama, block_size=4, num_blocks=64, kv_eviction="streaming", kv_window=64)


def test_eviction_on_a_sliding_window_model_is_refused(checkpoints):
    _, mistral = checkpoints
    with pytest.raises(ValueError, match=r"parameter 'kv_eviction' = 'streaming'.*sliding window of 8 tokens"):
        make_engine(mistral, kv_eviction="streaming", kv_window=16)
    assert make_engine(mistral).policy.name == "window"


def test_qwen2_window_follows_max_window_layers_as_hf():
    from tritonkv.model.model_config import ModelConfig

    base = dict(architectures=["Qwen2ForCausalLM"], vocab_size=8, hidden_size=8, intermediate_size=8,
                num_hidden_layers=4, num_attention_heads=2, sliding_window=16, use_sliding_window=True)
    assert ModelConfig.from_dict({**base, "max_window_layers": 0}).sliding_window == 16
    # HF slides only layers >= max_window_layers: none here (the Qwen2 default is 28)
    assert ModelConfig.from_dict(base).sliding_window is None
    assert ModelConfig.from_dict({**base, "use_sliding_window": False, "max_window_layers": 0}).sliding_window is None
    with pytest.raises(ValueError, match="slides a window on 2 of its 4 layers"):
        ModelConfig.from_dict({**base, "max_window_layers": 2})
