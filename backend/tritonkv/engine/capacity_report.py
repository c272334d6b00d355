"""``tritonkv capacity [CHECKPOINT] [--memory-gb N] [--context N] [--param K=V ...]``: KV bytes
per token, blocks in a memory budget, and how many sequences of a context fit, without and
with the window / eviction bound, for the server's own KV dtype on this machine and for the
8-bit ones beside it.

Reads the checkpoint's config.json only (never the weights). Every figure is
cache/capacity.py's ``kv_capacity``, the function the server's startup line ("KV capacity:")
and its capacity gauges use, so the report's last line is the line that server would log:
- the device is the server's (``device`` auto: cuda when CUDA is available here), and with it
  the model dtype (float32 on CPU unless ``--param dtype=...``);
- the budget is --memory-gb GiB (2^30 bytes, as kv_cache_memory_mb counts MiB), else the
  server's: gpu_memory_utilization on CUDA, else kv_cache_memory_mb (``num_blocks`` wins);
- the context is --context, else the server's max_model_len (the model's limit or
  max_model_len, bounded by the pool unless a sliding window bounds each sequence).
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from tritonkv.cache.allocate import QUANT_KV_DTYPES, model_dtype
from tritonkv.cache.capacity import KVCapacity, kv_capacity
from tritonkv.cache.host_tier import describe_tier
from tritonkv.config import EngineConfig
from tritonkv.model.model_config import ModelConfig

GIB = 2**30


def parse_parameters(pairs: list[str]) -> EngineConfig:
    """``K=V`` strings -> the EngineConfig (a bad or unknown parameter raises ValueError naming it)."""
    return EngineConfig.from_parameters(dict(p.split("=", 1) for p in pairs))


def server_device_type(config: EngineConfig) -> str:
    """The device type the server picks for ``config.device`` on this machine."""
    if config.device != "auto":
        return config.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def unsupported_reason(config: EngineConfig, kv_cache_dtype: str) -> str | None:
    """Why the engine refuses this config with ``kv_cache_dtype`` (None: it accepts it)."""
    try:
        dataclasses.replace(config, kv_cache_dtype=kv_cache_dtype)
    except ValueError as exc:
        return str(exc)
    return None


def server_budget_bytes(config: EngineConfig, model_config: ModelConfig, device_type: str) -> int | None:
    """The KV budget the server computes on CUDA under gpu_memory_utilization (None elsewhere)."""
    if device_type != "cuda" or config.gpu_memory_utilization <= 0 or config.num_blocks:
        return None
    from tritonkv.engine.factory import kv_budget_bytes

    dtype = model_dtype(config.dtype, model_config.torch_dtype, device_type)
    return kv_budget_bytes(config, model_config, dtype, torch.device("cuda"))


def capacity_rows(model_config: ModelConfig, config: EngineConfig, device_type: str, budget_bytes: int | None,
                  context: int | None) -> tuple[KVCapacity, list[dict]]:
    """The server's capacity, and a row per KV dtype (the model's, fp8, int8) in the same
    budget and context: ``label``, ``capacity``, ``scale_bytes`` per token, ``server`` (the
    server's own KV dtype) and ``bound_refused`` (why the engine refuses that KV dtype with
    these settings, or None)."""
    server = kv_capacity(model_config, config, device_type, budget_bytes=budget_bytes, context=context)
    dtype = model_dtype(config.dtype, model_config.torch_dtype, device_type)
    rows = []
    for label, kv_dtype, setting in ((str(dtype).replace("torch.", ""), dtype, "auto"),
                                     *((name, d, name) for name, d in QUANT_KV_DTYPES.items())):
        f = kv_capacity(model_config, config, device_type, budget_bytes=budget_bytes, context=server.context,
                        kv_dtype=kv_dtype)
        scale_bytes = 2 * model_config.num_layers * model_config.num_kv_heads * 4 if kv_dtype.itemsize == 1 else 0
        rows.append({"label": label, "capacity": f, "scale_bytes": scale_bytes,
                     "server": setting == config.kv_cache_dtype, "bound_refused": unsupported_reason(config, setting)})
    return server, rows


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_report(name: str, model_config: ModelConfig, config: EngineConfig, device_type: str,
                  budget_bytes: int | None, context: int | None, memory_flag: bool = False) -> str:
    server, rows = capacity_rows(model_config, config, device_type, budget_bytes, context)
    c = model_config
    if config.num_blocks:
        budget = f"{config.num_blocks:,} blocks (num_blocks)"
    elif budget_bytes is not None:
        budget = f"{human_bytes(budget_bytes)} ({'--memory-gb' if memory_flag else 'gpu_memory_utilization'})"
    else:
        budget = f"{config.kv_cache_memory_mb} MiB (kv_cache_memory_mb)"
    bound = (f"bound: {server.bound} -> at most {server.bound_blocks} blocks per sequence"
             if server.bound_blocks is not None else f"bound: {server.bound}")
    lines = [f"{name} ({c.architecture}): {c.num_layers} layers x {c.num_kv_heads} KV heads x {c.head_dim} dims, "
             f"block_size {config.block_size}",
             f"KV budget {budget}; context {server.context:,} tokens per sequence; device {device_type}", bound, "",
             "| KV dtype | bytes/token | of which scales | blocks | tokens | KV per sequence | sequences "
             "| bounded KV per sequence | bounded sequences |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    refused = []
    for r in rows:
        f = r["capacity"]
        block_bytes = f.bytes_per_token * f.block_size
        bounded = (f"{human_bytes(f.blocks_per_sequence_bounded * block_bytes)} | {f.sequences_bounded:,}"
                   if r["bound_refused"] is None else "refused (1) | -")
        refused += [r["bound_refused"]] if r["bound_refused"] else []
        label = r["label"] + (" (server)" if r["server"] else "")
        lines.append(f"| {label} | {f.bytes_per_token:,} | {r['scale_bytes']:,} | {f.num_blocks:,} "
                     f"| {f.capacity_tokens:,} | {human_bytes(f.blocks_per_sequence * block_bytes)} "
                     f"| {f.sequences:,} | {bounded} |")
    if refused:
        lines += ["", f"(1) the engine refuses this KV dtype with these parameters: {refused[0]}"]
    if server.refused:
        lines += ["", f"the server refuses these settings: {server.refused}"]
    else:
        lines += ["", f"the server logs: KV capacity: {server.describe()}"]
    if config.kv_host_memory_gb > 0:  # the host tier (cache/host_tier.py), same arithmetic
        lines.append("")
        for r in rows:
            f = r["capacity"]
            block_bytes = f.bytes_per_token * f.block_size
            lines.append(describe_tier(f"{r['label']} host tier (kv_host_memory_gb {config.kv_host_memory_gb})",
                                       int(config.kv_host_memory_gb * 2**30) // block_bytes, block_bytes,
                                       f.block_size, f.context, f.blocks_per_sequence_bounded, f.num_blocks))
    return "\n".join(lines)


def run(args) -> int:
    """The ``capacity`` subcommand (server/cli.py). 0, or 2 with a message on stderr."""
    try:
        config = parse_parameters(args.param)
        if args.memory_gb is not None and args.memory_gb <= 0:
            raise ValueError(f"--memory-gb {args.memory_gb}: must be > 0")
        if args.context is not None and args.context <= 0:
            raise ValueError(f"--context {args.context}: must be > 0 tokens")
        checkpoint = args.checkpoint or config.checkpoint
        if not checkpoint:
            from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint

            checkpoint = ensure_demo_checkpoint()
        model_config = ModelConfig.from_checkpoint(checkpoint)
        device_type = server_device_type(config)
        budget = (int(args.memory_gb * GIB) if args.memory_gb is not None
                  else server_budget_bytes(config, model_config, device_type))
    except (ValueError, FileNotFoundError) as exc:
        print(f"tritonkv capacity: {exc}", file=sys.stderr)
        return 2
    print(format_report(checkpoint, model_config, config, device_type, budget, args.context,
                        memory_flag=args.memory_gb is not None))
    return 0
