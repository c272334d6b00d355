"""``tritonkv capacity [CHECKPOINT] [--memory-gb N] [--context N] [--param K=V ...]``: KV bytes
per token (bf16 / fp8 / int8), blocks in a memory budget, and how many sequences of a context
fit, without and with the window / eviction bounds.

Reads the checkpoint's config.json only (never the weights). The arithmetic is
cache/allocate.py's, the same the engine sizes its pool with:
- bytes per token = 2 (K, V) x layers x KV heads x (head_dim x element size + 4 bytes of
  float32 scale for fp8 / int8);
- blocks = budget // bytes per block (``num_blocks`` given as --param wins), as
  ``resolve_num_blocks``; the budget is --memory-gb GiB (2^30 bytes, as kv_cache_memory_mb
  counts MiB), else the engine's kv_cache_memory_mb;
- a sequence holds ceil(context / block_size) blocks, or its bound's blocks under a model
  sliding window or ``kv_eviction`` streaming / h2o (``sequence_block_bound``).
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from tritonkv.cache.allocate import capacity_figures, eviction_settings, resolve_num_blocks
from tritonkv.cache.host_tier import describe_tier
from tritonkv.config import EngineConfig
from tritonkv.model.model_config import ModelConfig

REPORT_DTYPES = (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn), ("int8", torch.int8))
# eviction parameters read here even when this EngineConfig does not define them yet
EVICTION_PARAMETERS = {"kv_eviction": str, "attention_sinks": int, "kv_window": int, "heavy_hitter_tokens": int}
KV_EVICTIONS = ("none", "streaming", "h2o")
GIB = 2**30


def parse_parameters(pairs: list[str]) -> tuple[EngineConfig, dict]:
    """``K=V`` strings -> the EngineConfig and the eviction settings. A bad or unknown
    parameter raises ValueError naming it."""
    params = dict(p.split("=", 1) for p in pairs)
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    engine_params = {k: v for k, v in params.items() if k in fields or k not in EVICTION_PARAMETERS}
    config = EngineConfig.from_parameters(engine_params)
    eviction = eviction_settings(config)
    for name, kind in EVICTION_PARAMETERS.items():
        if name in params and name not in fields:
            try:
                eviction[name] = kind(params[name].strip())
            except ValueError:
                raise ValueError(f"parameter {name!r} = {params[name]!r}: expected {kind.__name__}") from None
    if eviction["kv_eviction"] not in KV_EVICTIONS:
        raise ValueError(f"parameter 'kv_eviction' = {eviction['kv_eviction']!r}: must be one of {KV_EVICTIONS}")
    for name in ("attention_sinks", "kv_window", "heavy_hitter_tokens"):
        if eviction[name] < 0:
            raise ValueError(f"parameter {name!r} = {eviction[name]}: must be >= 0")
    if eviction["kv_eviction"] != "none" and eviction["kv_window"] <= 0:
        raise ValueError(f"parameter 'kv_window' = {eviction['kv_window']}: kv_eviction "
                         f"{eviction['kv_eviction']!r} needs a window of > 0 tokens")
    return config, eviction


def unsupported_reason(config: EngineConfig, label: str) -> str | None:
    """Why the engine refuses this config with ``kv_cache_dtype`` = ``label`` (None: it accepts it)."""
    try:
        dataclasses.replace(config, kv_cache_dtype="auto" if label == "bf16" else label)
    except ValueError as exc:
        return str(exc)
    return None


def capacity_rows(model_config: ModelConfig, config: EngineConfig, budget_bytes: int | None, context: int,
                  eviction: dict) -> list[dict]:
    """``capacity_figures`` for each of REPORT_DTYPES in the same budget, with ``label``,
    ``scale_bytes`` (per token) and ``bound_refused`` (why the engine refuses the bound with this
    KV dtype, or None) added."""
    rows = []
    for label, dtype in REPORT_DTYPES:
        blocks = resolve_num_blocks(config, model_config, dtype, budget_bytes)
        f = capacity_figures(model_config, config, dtype, blocks, context, eviction)
        scale_bytes = 2 * model_config.num_layers * model_config.num_kv_heads * 4 if dtype.itemsize == 1 else 0
        rows.append({**f, "label": label, "scale_bytes": scale_bytes,
                     "bound_refused": unsupported_reason(config, label)})
    return rows


def bound_text(model_config: ModelConfig, eviction: dict, rows: list[dict]) -> str:
    parts = []
    if model_config.sliding_window:
        parts.append(f"model sliding_window {model_config.sliding_window}")
    if eviction["kv_eviction"] == "streaming":
        parts.append(f"streaming: {eviction['attention_sinks']} sinks + kv_window {eviction['kv_window']}")
    elif eviction["kv_eviction"] == "h2o":
        parts.append(f"h2o: {eviction['attention_sinks']} sinks + {eviction['heavy_hitter_tokens']} heavy hitters "
                     f"+ kv_window {eviction['kv_window']}")
    if not parts:
        return "bound: none (each sequence holds its whole context)"
    return f"bound: {'; '.join(parts)} -> at most {rows[0]['bound_blocks']} blocks per sequence"


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_report(name: str, model_config: ModelConfig, config: EngineConfig, budget_bytes: int | None,
                  context: int, eviction: dict) -> str:
    rows = capacity_rows(model_config, config, budget_bytes, context, eviction)
    c = model_config
    if config.num_blocks:
        budget = f"{config.num_blocks:,} blocks (num_blocks)"
    elif budget_bytes is not None:
        budget = f"{human_bytes(budget_bytes)} (--memory-gb)"
    else:
        budget = f"{config.kv_cache_memory_mb} MiB (kv_cache_memory_mb)"
    lines = [f"{name} ({c.architecture}): {c.num_layers} layers x {c.num_kv_heads} KV heads x {c.head_dim} dims, "
             f"block_size {config.block_size}",
             f"KV budget {budget}; context {context:,} tokens per sequence",
             bound_text(c, eviction, rows), "",
             "| KV dtype | bytes/token | of which scales | blocks | tokens | KV per sequence | sequences "
             "| bounded KV per sequence | bounded sequences |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    refused = []
    for r in rows:
        block_bytes = r["bytes_per_token"] * r["block_size"]
        bounded = (f"{human_bytes(r['blocks_per_sequence_bounded'] * block_bytes)} | {r['sequences_bounded']:,}"
                   if r["bound_refused"] is None else "refused (1) | -")
        refused += [r["bound_refused"]] if r["bound_refused"] else []
        lines.append(f"| {r['label']} | {r['bytes_per_token']:,} | {r['scale_bytes']:,} | {r['num_blocks']:,} "
                     f"| {r['capacity_tokens']:,} | {human_bytes(r['blocks_per_sequence'] * block_bytes)} "
                     f"| {r['sequences']:,} | {bounded} |")
    if refused:
        lines += ["", f"(1) the engine refuses this KV dtype with these parameters: {refused[0]}"]
    if config.kv_host_memory_gb > 0:  # the host tier (cache/host_tier.py), same arithmetic
        lines.append("")
        for r in rows:
            block_bytes = r["bytes_per_token"] * r["block_size"]
            lines.append(describe_tier(f"{r['label']} host tier (kv_host_memory_gb {config.kv_host_memory_gb})",
                                       int(config.kv_host_memory_gb * GIB) // block_bytes, block_bytes,
                                       r["block_size"], r["context"], r["blocks_per_sequence_bounded"],
                                       r["num_blocks"]))
    return "\n".join(lines)


def run(args) -> int:
    """The ``capacity`` subcommand (server/cli.py). 0, or 2 with a message on stderr."""
    try:
        config, eviction = parse_parameters(args.param)
        if args.memory_gb is not None and args.memory_gb <= 0:
            raise ValueError(f"--memory-gb {args.memory_gb}: must be > 0")
        if args.context is not None and args.context <= 0:
            raise ValueError(f"--context {args.context}: must be > 0 tokens")
        checkpoint = args.checkpoint or config.checkpoint
        if not checkpoint:
            from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint

            checkpoint = ensure_demo_checkpoint()
        model_config = ModelConfig.from_checkpoint(checkpoint)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tritonkv capacity: {exc}", file=sys.stderr)
        return 2
    budget = None if args.memory_gb is None else int(args.memory_gb * GIB)
    context = args.context or config.max_model_len or model_config.max_position_embeddings
    print(format_report(checkpoint, model_config, config, budget, context, eviction))
    return 0
