"""``tritonkv capacity`` is the server: its table, the "KV capacity:" line an engine logs at
start, the capacity gauges, and the blocks a real engine holds under a bound."""

import json
import logging

import pytest

from bounded_models import build_checkpoint, prompt, run_tracking_blocks, single_thread  # noqa: F401
from engine_helpers import TEST_DEVICE, make_engine
from tritonkv.cache.capacity import kv_capacity
from tritonkv.server.cli import main as cli
from tritonkv.server.gauges import capacity_gauges

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
             "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192, "rope_theta": 500000.0, "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_8k"))
    build_checkpoint(path, max_position_embeddings=8192)
    return path


def test_cli_prints_the_servers_dtype_on_this_device(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))  # no weights: config.json is enough
    assert cli(["capacity", str(tmp_path), "--memory-gb", "16", "--context", "8000", "--param", "device=cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "KV budget 16.00 GiB (--memory-gb); context 8,000 tokens per sequence; device cpu"
    assert out[2] == "bound: none (each sequence holds its whole context)"
    # the CPU server runs float32: 2 x 32 layers x 8 heads x 128 x 4 B = 256 KiB a token, 4 MiB a
    # block, 4096 blocks in 16 GiB; 8000 tokens = 500 blocks = 1.95 GiB: 8 sequences
    assert out[-6:-1] == ["|---|---:|---:|---:|---:|---:|---:|---:|---:|",
                          "| float32 (server) | 262,144 | 0 | 4,096 | 65,536 | 1.95 GiB | 8 | 1.95 GiB | 8 |",
                          "| fp8 | 67,584 | 2,048 | 15,887 | 254,192 | 515.62 MiB | 31 | 515.62 MiB | 31 |",
                          "| int8 | 67,584 | 2,048 | 15,887 | 254,192 | 515.62 MiB | 31 | 515.62 MiB | 31 |", ""]
    assert out[-1] == ("the server logs: KV capacity: 262,144 B/token (float32), 4,096 blocks x 16 = 65,536 tokens; "
                       "8 sequences of 8,000 tokens fit")
    assert cli(["capacity", str(tmp_path), "--memory-gb", "16", "--context", "8000", "--param", "device=cpu",
                "--param", "dtype=bfloat16"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| bfloat16")]
    assert rows == ["| bfloat16 (server) | 131,072 | 0 | 8,192 | 131,072 | 1000.00 MiB | 16 | 1000.00 MiB | 16 |"]
    assert cli(["capacity", str(tmp_path), "--param", "device=cpu", "--param", "kv_cache_dtype=int8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in out if "(server)" in line] == ["| int8 (server)"]


def test_cli_marks_what_the_engine_refuses(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert cli(["capacity", str(tmp_path), "--param", "device=cpu", "--param", "kv_eviction=streaming",
                "--param", "kv_window=2048", "--param", "kv_window_stride=256", "--memory-gb", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == ("bound: streaming: 4 sinks + kv_window 2048 (window start moves by 256 tokens) -> at most 146 "
                      "blocks per sequence")
    # 8-bit KV with eviction is refused by the engine: no bounded figures for it
    assert out[-5].startswith("| int8 | 67,584 | 2,048 | 992 |") and out[-5].endswith("| refused (1) | - |")
    assert out[-3] == ("(1) the engine refuses this KV dtype with these parameters: parameter 'kv_cache_dtype' = "
                       "'fp8': fp8 / int8 KV is not supported with kv_eviction='streaming' (evicting re-rotates "
                       "cached keys); use kv_cache_dtype auto")
    # what the engine checks at start: 1 + 256 + 1 blocks and the sink's original do not fit 64
    # float32 blocks (256 MiB); with --memory-gb 16 they do, but not within half of 8192 positions
    assert cli(["capacity", str(tmp_path), "--param", "device=cpu", "--param", "kv_eviction=streaming",
                "--param", "kv_window=4096"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "the server refuses these settings: parameter 'kv_window': one sequence keeps up to 259 KV blocks of 16 "
        "tokens (attention sinks and heavy hitters with their originals, recent window) but the pool has 64; "
        "lower it or raise num_blocks / kv_cache_memory_mb")
    assert cli(["capacity", str(tmp_path), "--param", "device=cpu", "--param", "kv_eviction=streaming",
                "--param", "kv_window=4096", "--memory-gb", "16"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        "the server refuses these settings: parameter 'kv_window': the kept cache (258 blocks x 16 tokens) must be "
        "at most half the model's 8192 positions")


def test_cli_names_what_is_wrong(tmp_path, capsys):
    assert cli(["capacity", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert cli(["capacity", str(tmp_path), "--context", "0"]) == 2
    assert "--context 0: must be > 0 tokens" in capsys.readouterr().err
    assert cli(["capacity", str(tmp_path), "--param", "block_size=3"]) == 2
    assert "parameter 'block_size' = 3: must be a positive power of two" in capsys.readouterr().err
    assert cli(["capacity", str(tmp_path), "--param", "blok_size=16"]) == 2
    assert "unknown parameter 'blok_size'" in capsys.readouterr().err


def test_startup_line_cli_and_gauges_are_one_figure(tiny, caplog, capsys):
    params = {"device": TEST_DEVICE, "kv_cache_memory_mb": "3", "max_model_len": "1000"}
    with caplog.at_level(logging.INFO, logger="tritonkv"):
        engine = make_engine(tiny, dtype="auto", num_blocks=0, block_size=16,
                             **{k: (int(v) if v.isdigit() else v) for k, v in params.items()})
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("KV capacity: ")]
    assert cli(["capacity", tiny, *(f"--param={k}={v}" for k, v in params.items())]) == 0
    assert logged == [capsys.readouterr().out.splitlines()[-1].removeprefix("the server logs: ")]
    # the tiny model in float32 (dtype auto on CPU; the checkpoint's float32 on CUDA): 2 x 2 layers
    # x 2 KV heads x 16 dims x 4 B = 512 B a token; 3 MiB / (16 x 512) = 384 blocks
    assert engine.pool.num_blocks == 384 and engine.max_model_len == 1000
    assert capacity_gauges(engine) == {"tritonkv_kv_bytes_per_token": 512.0, "tritonkv_kv_capacity_tokens": 6144.0,
                                       "tritonkv_kv_max_len_sequences": 384 // 63}


def test_the_bound_is_what_a_real_engine_holds(tiny):
    # issue 22 item 7: window 2048, 4 sinks, stride 256 (blocks of 16)
    engine = make_engine(tiny, block_size=16, num_blocks=160, max_num_batched_tokens=512, kv_eviction="streaming",
                         kv_window=2048, attention_sinks=4, kv_window_stride=256)
    bound = kv_capacity(engine.model_config, engine.config, engine.device.type,
                        num_blocks=engine.pool.num_blocks).bound_blocks
    _, most, _ = run_tracking_blocks(engine, "s", prompt(2600, 1), 4)
    assert most == bound == 146
    assert engine.pool.counts()["used"] == 0
