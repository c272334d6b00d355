"""The decode kernel's launch plan: tile size, warps, stages, how many splits of the keys,
whether block ids are gathered up front. It depends only on the step (sequences, context
bound, window) and the cache's shape and dtype, never on the layer: the model runner makes it
once per step (ops/dispatch.plan_step) and every layer's launch reuses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from tritonkv.cache.layout import v_token_minor
from tritonkv.cache.quant_format import is_quantized


def default_num_splits(num_seqs: int, num_kv_heads: int, max_kv_len: int, block_n: int,
                       num_sms: int = 132, target_waves: float = 4.0,
                       min_tiles_per_split: int = 4) -> int:
    """Enough (seq, kv_head, split) programs for ``target_waves`` x num_sms, but each split
    keeps at least ``min_tiles_per_split`` tiles of keys."""
    base = num_seqs * num_kv_heads
    want = max(1, math.ceil(target_waves * num_sms / max(base, 1)))
    cap = max(1, max_kv_len // (block_n * min_tiles_per_split))
    return int(min(want, cap, 256))


def default_decode_config(num_seqs: int, num_kv_heads: int, max_kv_len: int, quant: bool,
                          num_sms: int = 132):
    """(block_n, num_warps, num_stages, num_splits, gather_ids), from the H100 sweeps in
    bench/NOTES_kernels.md (runs 3, 6, 10-12 and 18-20):
    - many (seq, kv-head) pairs (>= 2 per SM): one split; bf16 64-token tiles, ids per tile
      (2-6 pairs per SM: 32-token tiles 4 deep, runs 18-20); fp8/int8 128-token
      tiles, ids gathered;
    - about one pair per SM (>= 0.8): one split, block ids gathered up front so that the K/V
      tiles pipeline num_stages - 1 deep (bf16 64-token tiles; fp8/int8 128-token; 4 stages);
    - fewer: split each pair's keys so that the programs fill the SMs once (one program per
      SM, no more than 256 splits, at least 4 tiles each), 128-token tiles, 3 stages, ids
      gathered; a small reduce kernel merges the splits."""
    base = num_seqs * num_kv_heads
    if base >= 2 * num_sms:
        if quant:
            return 128, 4, 3, 1, True
        return (64, 4, 3, 1, False) if base >= 6 * num_sms else (32, 4, 4, 1, False)
    if base >= 0.8 * num_sms:
        return (128, 4, 4, 1, True) if quant else (64, 4, 4, 1, True)
    splits = max(1, min(num_sms // max(base, 1), max_kv_len // (128 * 4), 256))
    return 128, 4, 3, splits, True


_SM_COUNT: dict = {}


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


# Smallest key tile: P @ V is a tl.dot with K = BLOCK_N, and Triton's NVIDIA backend needs
# K >= 16 for 16-bit operands (fp8/int8 K/V are cast to 16 bits first); the interpreter has no
# such bound, so a smaller tile passed on CPU and failed to compile on the H200 (triton 3.6).
MIN_BLOCK_N = 16

# Largest block-table slice (pages) one split holds in registers with BT_GATHER; longer
# ranges get more splits (1024 ids = 8 registers per thread at 4 warps).
MAX_SPLIT_PAGES = 1024


@dataclass(frozen=True)
class DecodePlan:
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int
    num_splits: int  # programs per (sequence, KV head) walking a share of its keys
    split_size: int  # keys one split walks (a multiple of block_n)
    gather_ids: bool  # the split's block ids loaded once, up front
    bt_pages: int  # block ids one split holds when gathered
    even: bool  # unmasked full tiles
    v_pages: bool  # token-minor V read in whole pages
    compute_dtype: torch.dtype  # what fp8 / int8 K, V and q are cast to


def plan_decode(q_dtype: torch.dtype, k_cache: torch.Tensor, v_cache: torch.Tensor, num_seqs: int, table_width: int,
                sliding_window: int | None, max_seq_len: int | None, device, *, num_splits: int | None = None,
                block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                compute_dtype: torch.dtype | None = None, even: bool | None = None,
                gather_ids: bool | None = None, v_pages: bool | None = None) -> DecodePlan:
    """The plan for ``num_seqs`` decode rows whose contexts are at most ``max_seq_len`` (None:
    the block table's ``table_width`` pages). The keyword arguments override the tuned
    choices (benchmarks, tests)."""
    _, page, num_kv_heads, head_dim = k_cache.shape
    quant = is_quantized(k_cache.dtype)
    v_t = v_token_minor(v_cache)
    # fp8/int8 K/V are cast to compute_dtype (exact) and q too. An fp8 e4m3 cache computes in
    # fp16 (e4m3 -> fp16 is one cvt per pair on sm_90; q is cast to fp16, fine for
    # |q| < 65504): measured faster than bf16 (bench/NOTES_kernels.md, run 5).
    if compute_dtype is None:
        compute_dtype = torch.float16 if k_cache.dtype == torch.float8_e4m3fn else q_dtype
    has_window = sliding_window is not None and sliding_window > 0
    if even is None:  # unmasked full tiles (EVEN) only for fp8 computed in fp16: measured
        # faster there, slower for bf16 (bench/NOTES_kernels.md, runs 2 and 5); token-minor V
        # (V_T) splits full and tail tiles in any case
        even = quant and compute_dtype == torch.float16
    even = bool(even) and not has_window and head_dim == triton.next_power_of_2(head_dim)
    max_kv = max_seq_len if max_seq_len is not None else table_width * page
    kv_range0 = min(max_kv, sliding_window + 128) if has_window else max_kv
    sms = _num_sms(device)
    bn0, nw0, ns0, splits0, gather0 = default_decode_config(num_seqs, num_kv_heads, kv_range0, quant, sms)
    if head_dim > 128:
        bn0 = min(bn0, 32)
    block_n = block_n or bn0
    if block_n < MIN_BLOCK_N or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= {MIN_BLOCK_N} (the K of P @ V in tl.dot), got {block_n}")
    num_warps = num_warps or nw0
    num_stages = num_stages or ns0
    kv_range = min(max_kv, sliding_window + block_n) if has_window else max_kv
    # V of an 8-bit cache is token-minor: read it in whole pages when a tile holds whole pages
    v_pages = v_t and block_n % page == 0 and (v_pages is None or bool(v_pages))
    if num_splits is None:
        num_splits = splits0 if block_n == bn0 else default_num_splits(num_seqs, num_kv_heads, kv_range, block_n, sms)
    gather_ids = gather0 if gather_ids is None else bool(gather_ids)
    # kv_range bounds the walked range: seq_len without a window; with one, the window plus
    # less than a tile (its start is aligned down to a tile).
    split_size = triton.cdiv(triton.cdiv(kv_range, num_splits), block_n) * block_n
    if gather_ids and triton.cdiv(split_size, page) > MAX_SPLIT_PAGES:  # bound the id vector
        num_splits = triton.cdiv(kv_range, MAX_SPLIT_PAGES * page)
        split_size = triton.cdiv(triton.cdiv(kv_range, num_splits), block_n) * block_n
    # block ids one split walks (+1: a window start aligned to block_n may be mid-page)
    bt_pages = (triton.next_power_of_2(triton.cdiv(split_size, page) + (page > block_n))
                if gather_ids else 1)
    return DecodePlan(block_n, num_warps, num_stages, num_splits, split_size, gather_ids, bt_pages, even, v_pages,
                      compute_dtype)
