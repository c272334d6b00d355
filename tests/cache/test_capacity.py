"""KV capacity arithmetic (cache/allocate.py) and the ``tritonkv capacity`` report, checked
against the founding documents' worked figures. Built from config.json dicts only."""

import json

import pytest
import torch

from tritonkv.cache.allocate import (capacity_figures, kv_bytes_per_token, resolve_num_blocks,
                                     sequence_block_bound, sequence_blocks)
from tritonkv.cache.capacity_report import capacity_rows, parse_parameters, unsupported_reason
from tritonkv.cache.eviction.choose import policy_for
from tritonkv.config import EngineConfig
from tritonkv.model.model_config import ModelConfig
from tritonkv.server.cli import main as cli

GIB = 2**30
# blocks a streaming sequence (4 sinks, kv_window 2048, blocks of 16) holds: the engine's rule
BOUND_2048 = sequence_block_bound(16, kv_eviction="streaming", attention_sinks=4, kv_window=2048)
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
    assert kv_bytes_per_token(mha, torch.bfloat16) == 2 * 80 * 8192 * 2 == 2_621_440 == int(2.5 * 2**20)
    # "a single 4096-token context costs ~10 GB; 100 such contexts ... a terabyte"
    assert 4096 * kv_bytes_per_token(mha, torch.bfloat16) == 10 * GIB
    assert 100 * 10 * GIB == 1_073_741_824_000
    # with Llama-2-70B's GQA (8 KV heads) it is 8x less; 8-bit codes halve it again, plus scales
    gqa = ModelConfig.from_dict({**LLAMA_70B_MHA, "num_key_value_heads": 8})
    assert kv_bytes_per_token(gqa, torch.bfloat16) == 327_680
    assert kv_bytes_per_token(gqa, torch.int8) == 2 * 80 * 8 * (128 + 4) == 168_960


def test_seed_003_llama3_8b_8k_context_batch_16():
    c = ModelConfig.from_dict(LLAMA3_8B)
    config = EngineConfig(block_size=16)
    per_token = {name: kv_bytes_per_token(c, d) for name, d in
                 (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn), ("int8", torch.int8))}
    assert per_token == {"bf16": 131_072, "fp8": 67_584, "int8": 67_584}  # 128 KiB; 66 KiB with scales
    batch = {name: 16 * sequence_blocks(8000, 16) * 16 * b for name, b in per_token.items()}
    # bf16: 15.6 GiB, the size of the bf16 weights (8.03 B params x 2 bytes = 16.06 GB), as the
    # seed's "roughly equivalent to ... the entire weights"; its "about 8GB" is the 8-bit figure
    assert batch["bf16"] == 16_777_216_000 and round(batch["bf16"] / GIB, 1) == 15.6
    assert round(batch["int8"] / GIB, 2) == 8.06 and batch["fp8"] == batch["int8"]
    # so 16 GiB of bf16 KV admits exactly that batch; 8 GiB of int8 KV one sequence fewer
    for dtype, gib, fit in ((torch.bfloat16, 16, 16), (torch.int8, 8, 15), (torch.bfloat16, 8, 8)):
        blocks = resolve_num_blocks(config, c, dtype, budget_bytes=gib * GIB)
        assert capacity_figures(c, config, dtype, blocks, context=8000)["sequences"] == fit


def test_sequence_block_bounds_are_the_engines_eviction_policy():
    assert sequence_block_bound(16) is None
    assert sequence_block_bound(16, kv_eviction="none", kv_window=64) is None
    cases = [dict(sliding_window=4096),
             dict(kv_eviction="streaming", attention_sinks=4, kv_window=1020),
             dict(kv_eviction="h2o", attention_sinks=4, heavy_hitter_tokens=100, kv_window=64)]
    for case in cases:
        settings = {k: v for k, v in case.items() if k != "sliding_window"}
        policy = policy_for(EngineConfig(block_size=16, **settings), case.get("sliding_window"))
        assert sequence_block_bound(16, **case) == policy.blocks_per_sequence(1)
    # and what any correct policy must keep: a run of w tokens spans up to ceil(w / 16) + 1
    # blocks; streaming keeps 1 sink block + a 1020-token window; h2o 7 heavy blocks more
    assert 257 <= sequence_block_bound(16, sliding_window=4096) <= 260
    assert 1 + 65 <= sequence_block_bound(16, **cases[1]) <= 2 * 1 + 65
    assert 1 + 7 + 5 <= sequence_block_bound(16, **cases[2]) <= 2 * (1 + 7) + 5
    assert sequence_blocks(8192, 16) == 512 and sequence_blocks(8192, 16, 66) == 66
    assert sequence_blocks(100, 16, 66) == 7


def test_mistral_window_from_config_json_bounds_the_sequences():
    c = ModelConfig.from_dict({**LLAMA3_8B, "architectures": ["MistralForCausalLM"], "sliding_window": 4096,
                               "max_position_embeddings": 32768})
    f = capacity_figures(c, EngineConfig(block_size=16), torch.bfloat16, num_blocks=10_000)
    assert (f["context"], f["blocks_per_sequence"], f["sequences"]) == (32768, 2048, 4)
    bound = sequence_block_bound(16, sliding_window=4096)
    assert (f["bound_blocks"], f["blocks_per_sequence_bounded"]) == (bound, bound)
    assert f["sequences_bounded"] == 10_000 // bound
    assert f["sequences_bounded"] in (38, 39)
    assert f["capacity_tokens"] == 160_000 and f["bytes_per_token"] == 131_072


def test_eviction_parameters_are_read_and_checked():
    config, ev = parse_parameters(["block_size=32", "kv_eviction=streaming", "kv_window=512", "attention_sinks=8"])
    assert config.block_size == 32
    assert ev == {"kv_eviction": "streaming", "attention_sinks": 8, "kv_window": 512, "heavy_hitter_tokens": 0}
    with pytest.raises(ValueError, match="'kv_eviction' = 'lru'"):
        parse_parameters(["kv_eviction=lru"])
    with pytest.raises(ValueError, match="'kv_window' = 0: "):
        parse_parameters(["kv_eviction=h2o", "heavy_hitter_tokens=64"])
    with pytest.raises(ValueError, match="'attention_sinks' = 'four': expected int"):
        parse_parameters(["attention_sinks=four"])
    with pytest.raises(ValueError, match="unknown parameter 'blok_size'"):
        parse_parameters(["blok_size=16"])


def test_capacity_rows_share_one_budget():
    c = ModelConfig.from_dict(LLAMA3_8B)
    config, ev = parse_parameters(["kv_eviction=streaming", "kv_window=2048"])
    rows = capacity_rows(c, config, 16 * GIB, 8192, ev)
    assert [(r["label"], r["num_blocks"], r["sequences"], r["sequences_bounded"], r["scale_bytes"]) for r in rows] == [
        ("bf16", 8192, 16, 8192 // BOUND_2048, 0), ("fp8", 15887, 31, 15887 // BOUND_2048, 2048),
        ("int8", 15887, 31, 15887 // BOUND_2048, 2048)]
    assert 8192 // BOUND_2048 in (62, 63)  # 129 to 131 blocks per sequence


def test_cli_prints_the_table(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))  # no weights: config.json is enough
    assert cli(["capacity", str(tmp_path), "--memory-gb", "16", "--context", "8000"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "KV budget 16.00 GiB (--memory-gb); context 8,000 tokens per sequence"
    assert out[2] == "bound: none (each sequence holds its whole context)"
    assert out[-3:] == ["| bf16 | 131,072 | 0 | 8,192 | 131,072 | 1000.00 MiB | 16 | 1000.00 MiB | 16 |",
                        "| fp8 | 67,584 | 2,048 | 15,887 | 254,192 | 515.62 MiB | 31 | 515.62 MiB | 31 |",
                        "| int8 | 67,584 | 2,048 | 15,887 | 254,192 | 515.62 MiB | 31 | 515.62 MiB | 31 |"]
    assert cli(["capacity", str(tmp_path), "--param", "kv_eviction=streaming", "--param", "kv_window=2048"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "KV budget 256 MiB (kv_cache_memory_mb); context 8,192 tokens per sequence"
    assert out[2] == f"bound: streaming: 4 sinks + kv_window 2048 -> at most {BOUND_2048} blocks per sequence"
    rows = {line.split(" | ")[0]: line for line in out if line.startswith("| ")}
    assert rows["| bf16"] == f"| bf16 | 131,072 | 0 | 128 | 2,048 | 1.00 GiB | 0 | {BOUND_2048 * 2:.2f} MiB | 0 |"
    # a KV dtype the engine refuses with this policy has no bounded figures, and the reason is given
    config, _ = parse_parameters(["kv_eviction=streaming", "kv_window=2048"])
    reason = unsupported_reason(config, "int8")
    assert rows["| int8"].endswith("| refused (1) | - |" if reason else
                                   f"| {BOUND_2048 * 16 * 67584 / 2**20:.2f} MiB | {248 // BOUND_2048} |")
    assert (f"(1) the engine refuses this KV dtype with these parameters: {unsupported_reason(config, 'fp8')}"
            in out) == bool(reason)
    assert unsupported_reason(EngineConfig(), "int8") is None


def test_cli_names_what_is_wrong(tmp_path, capsys):
    assert cli(["capacity", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert cli(["capacity", str(tmp_path), "--context", "0"]) == 2
    assert "--context 0: must be > 0 tokens" in capsys.readouterr().err
    assert cli(["capacity", str(tmp_path), "--param", "block_size=3"]) == 2
    assert "parameter 'block_size' = 3: must be a positive power of two" in capsys.readouterr().err
