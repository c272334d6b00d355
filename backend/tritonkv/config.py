"""Engine settings: one validated dataclass, filled from config.pbtxt ``parameters``.

Every field may be set as a config.pbtxt parameter of the same name (string value).
A bad value fails model load with a message naming the parameter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tritonkv.cache.eviction.choose import KV_EVICTION_POLICIES

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "fp8", "int8")
KV_EVICTIONS = tuple(KV_EVICTION_POLICIES)


@dataclass(frozen=True)
class EngineConfig:
    checkpoint: str = ""  # HF-format checkpoint directory; "" serves the generated demo model
    device: str = "auto"  # auto: cuda when the instance is a GPU instance and CUDA is there
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's dtype on GPU
    kv_cache_dtype: str = "auto"  # auto: the model dtype; fp8 (e4m3) / int8 with per token-head scales
    block_size: int = 16  # tokens per KV block
    num_blocks: int = 0  # KV blocks in the pool; 0 derives it from kv_cache_memory_mb
    kv_cache_memory_mb: int = 256  # KV pool size when num_blocks is 0
    max_model_len: int = 0  # longest context served (prompt + output); 0: the model's limit
    max_num_batched_tokens: int = 1024  # token budget of one engine step (decode + prefill chunks)
    max_num_seqs: int = 64  # sequences in one engine step
    sequence_idle_timeout_s: float = 600.0  # a live conversation idle this long is released
    default_max_tokens: int = 128  # max_tokens when a request sets none
    enable_prefix_caching: bool = True
    pool_name: str = ""  # shared pool name; "" keeps the pool private to this instance
    stream_interval: int = 1  # tokens per streamed response after the first (as vLLM's)
    enable_cuda_graphs: bool = True  # CUDA: decode steps replay graphs captured at load
    # CUDA: linear layers at <= 16 rows run the Triton skinny GEMM where the committed table
    # measured it faster than cuBLASLt on this GPU (kernels/skinny_gemm_table.py); a GPU, shape
    # or row count not in it runs torch. On: the H100's batch-1 decode step 5.95 -> 5.75 ms
    # (bench/results/profile_step_h100_skinny.md)
    skinny_gemm: bool = True
    # CUDA: > 0 sizes the KV pool so that weights + activations + graphs + KV use this fraction
    # of the device's total memory (as vLLM's); 0 keeps kv_cache_memory_mb
    gpu_memory_utilization: float = 0.0
    # bounded KV per sequence (cache/eviction/): none | streaming (StreamingLLM: attention
    # sinks + recent window) | h2o (sinks + heavy hitters by attention mass + recent window);
    # a conversation may then run past the pool's capacity and past max_model_len
    kv_eviction: str = "none"
    attention_sinks: int = 4  # tokens kept from the start (rounded up to whole blocks)
    kv_window: int = 0  # recent tokens kept (streaming / h2o; rounded up to whole blocks)
    heavy_hitter_tokens: int = 0  # h2o: tokens kept for their accumulated attention mass
    # streaming / h2o: tokens the window start moves at a time (rounded up to blocks; 0: one
    # block). A prefill past the window runs in chunks of this size (one block otherwise), for
    # up to this many more tokens kept per sequence; e.g. kv_window / 8
    kv_window_stride: int = 0
    # host tier (cache/host_tier.py): GiB of host memory that idle conversations' KV blocks swap
    # to instead of being recomputed (pinned on CUDA); 0 = off (the default until the tier's GPU
    # run is recorded); -1 = auto: on a GPU device 40% of the available RAM split over the
    # host's GPUs, at most 4x the device pool; on CPU off
    kv_host_memory_gb: float = 0.0
    # disk tier: conversations the host tier drops spill to one file per server run in this
    # directory (removed at exit); kv_disk_gb GiB of it; 0 = off
    kv_disk_path: str = ""
    kv_disk_gb: float = 0.0

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"parameter {name!r} = {getattr(self, name)!r}: {why}")

        if self.device not in DEVICES:
            bad("device", f"must be one of {DEVICES}")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {DTYPES}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            bad("kv_cache_dtype", f"must be one of {KV_CACHE_DTYPES}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            bad("block_size", "must be a positive power of two")
        if self.num_blocks < 0:
            bad("num_blocks", "must be >= 0 (0 derives it from kv_cache_memory_mb)")
        if self.kv_cache_memory_mb <= 0:
            bad("kv_cache_memory_mb", "must be > 0")
        if self.max_model_len < 0:
            bad("max_model_len", "must be >= 0 (0 uses the model's max_position_embeddings)")
        if self.max_num_batched_tokens < self.block_size:
            bad("max_num_batched_tokens", f"must be >= block_size ({self.block_size})")
        if self.max_num_seqs <= 0:
            bad("max_num_seqs", "must be > 0")
        if self.sequence_idle_timeout_s <= 0:
            bad("sequence_idle_timeout_s", "must be > 0 seconds")
        if not 0.0 <= self.gpu_memory_utilization < 1.0:
            bad("gpu_memory_utilization", "must be in [0, 1) (0 keeps kv_cache_memory_mb)")
        if self.stream_interval <= 0:
            bad("stream_interval", "must be >= 1 (tokens per streamed response)")
        if self.default_max_tokens <= 0:
            bad("default_max_tokens", "must be > 0")
        if self.kv_host_memory_gb < 0 and self.kv_host_memory_gb != -1:
            bad("kv_host_memory_gb", "must be >= 0 GiB (0: no host tier) or -1 (auto)")
        if self.kv_disk_gb < 0:
            bad("kv_disk_gb", "must be >= 0 GiB (0: no disk tier)")
        if self.kv_disk_gb > 0 and not self.kv_disk_path:
            bad("kv_disk_gb", "needs kv_disk_path (a directory for the disk tier's file)")
        self._check_eviction(bad)

    def _check_eviction(self, bad):
        if self.kv_eviction not in KV_EVICTIONS:
            bad("kv_eviction", f"must be one of {KV_EVICTIONS}")
        if self.attention_sinks < 0:
            bad("attention_sinks", "must be >= 0 (tokens kept from the start)")
        if self.kv_window < 0:
            bad("kv_window", "must be >= 0 tokens")
        if self.heavy_hitter_tokens < 0:
            bad("heavy_hitter_tokens", "must be >= 0 tokens")
        if self.kv_window_stride < 0:
            bad("kv_window_stride", "must be >= 0 tokens (0: one block)")
        KV_EVICTION_POLICIES[self.kv_eviction].check_settings(self, bad)

    @classmethod
    def from_parameters(cls, params: dict[str, str], **overrides) -> "EngineConfig":
        """Build from string-valued parameters; unknown keys are an error (typos matter)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for name, raw in params.items():
            if name not in fields:
                raise ValueError(f"unknown parameter {name!r}; known: {', '.join(sorted(fields))}")
            values[name] = _parse(name, fields[name].type, raw)
        values.update(overrides)
        return cls(**values)


def _parse(name: str, type_name, raw):
    if not isinstance(raw, str):
        return raw
    raw = raw.strip()
    try:
        if type_name in ("int", int):
            return int(raw)
        if type_name in ("float", float):
            return float(raw)
        if type_name in ("bool", bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        raise ValueError(f"parameter {name!r} = {raw!r}: expected {type_name}") from None
    return raw
