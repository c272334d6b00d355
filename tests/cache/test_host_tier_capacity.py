"""How many idle conversations each tier holds: ``tritonkv capacity`` with kv_host_memory_gb
and the engine's startup line, on the Llama-3-8B shape (config.json only)."""

import json

from test_capacity import LLAMA3_8B

from tritonkv.cache.host_tier import describe_tier
from tritonkv.server.cli import main as cli


def test_llama3_8b_host_tier_holds_idle_8k_conversations(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert cli(["capacity", str(tmp_path), "--memory-gb", "40", "--context", "8000",
                "--param", "kv_host_memory_gb=128", "--param", "device=cuda"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "host tier" in line]
    # bf16: 128 KiB per token, 2 MiB per 16-token block; 8,000 tokens = 500 blocks = 1,000 MiB.
    # 128 GiB = 65,536 blocks -> 131 conversations; 40 GiB of device pool = 20,480 blocks -> 40
    assert lines[0] == ("bfloat16 host tier (kv_host_memory_gb 128.0): 65,536 blocks (128.00 GiB, 1,048,576 tokens) "
                        "hold 131 idle conversations of 8,000 tokens; the device pool 40")
    # int8: 66 KiB per token (scales included), 1,081,344 B per block: 127,100 blocks, 254 conversations
    assert lines[2].startswith("int8 host tier (kv_host_memory_gb 128.0): 127,100 blocks")
    assert "hold 254 idle conversations of 8,000 tokens; the device pool 79" in lines[2]


def test_describe_tier_counts_whole_conversations():
    assert describe_tier("host tier", 10, 1024, 4, 9, 3, 7) == (
        "host tier: 10 blocks (0.00 GiB, 40 tokens) hold 3 idle conversations of 9 tokens; the device pool 2")


def test_kv_host_memory_gb_is_validated_and_parsed():
    import pytest

    from tritonkv.config import EngineConfig

    assert EngineConfig().kv_host_memory_gb == 0  # off unless asked for (-1 = auto)
    assert EngineConfig.from_parameters({"kv_host_memory_gb": "-1"}).kv_host_memory_gb == -1
    assert EngineConfig.from_parameters({"kv_host_memory_gb": "0.5"}).kv_host_memory_gb == 0.5
    with pytest.raises(ValueError, match="'kv_host_memory_gb' = -2.0: must be >= 0 GiB"):
        EngineConfig(kv_host_memory_gb=-2.0)
    with pytest.raises(ValueError, match="'kv_host_memory_gb' = 'lots': expected float"):
        EngineConfig.from_parameters({"kv_host_memory_gb": "lots"})


def test_disk_tier_settings_are_validated():
    import pytest

    from tritonkv.config import EngineConfig

    with pytest.raises(ValueError, match="'kv_disk_gb' = 1.0: needs kv_disk_path"):
        EngineConfig(kv_disk_gb=1.0)
    with pytest.raises(ValueError, match="'kv_disk_gb' = -1.0: must be >= 0"):
        EngineConfig(kv_disk_gb=-1.0, kv_disk_path="/tmp")
