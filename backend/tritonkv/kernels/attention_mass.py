"""H2O attention mass: for each decode row, every key's softmax probability summed over the
query heads, ``[num_seqs, max_len]`` float32, a side output of decode attention.

Reference: ``tritonkv.ops.attention_mass.attention_mass_reference``.

One program per (sequence, tile of BLOCK_N keys) recomputes the scores of its keys for every
query head (one extra K pass) and normalises them with the final log-sum-exp that
``decode_attention_triton(..., return_lse=True)`` returns; or, when the decode kernel stored
its scores (``logits=``), reads those (4 bytes per key and query head instead of K), every
query head in one load (the program is latency-bound: one round trip, not one per KV head).

Rules:
- a tile wholly at or past its sequence's length exits at once (the output was zeroed, or
  holds the caller's sums): the grid spans the block table's width (frozen in a CUDA graph),
  the work only the keys a sequence has;
- ``block_mass=`` (the engine's H2O path): the per-key mass is not materialised; each tile sums
  its keys per cache block (BLOCK_N is a multiple of the page) and adds them into
  ``block_mass[seq, table block]`` (read-modify-write: each (seq, block) belongs to one
  program, and launches on one stream are ordered, so layers add up without atomics and
  deterministically). One launch per layer instead of four (zero, mass, sum per block, add).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritonkv.kernels.jit_helpers import (LOG2E, TL_DTYPE, dot_f32, kv_cast, mma, query_rows,
                                          scale_strides)
from tritonkv.cache.quant_format import is_quantized


@triton.jit
def _attention_mass_kernel(
    q_ptr, k_cache_ptr, k_scale_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, lse_ptr, mass_ptr,
    sm_scale2,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_ksb, stride_kss, stride_ksh,
    stride_bt, stride_mass, max_len, num_heads, num_kv_heads, window, num_sinks,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, KV_QUANT: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_F32: tl.constexpr, COMPUTE: tl.constexpr,
    logits_ptr, stride_lt, stride_lh, FROM_LOGITS: tl.constexpr,
    ADD_BLOCKS: tl.constexpr = False, BLOCK_H: tl.constexpr = 16,
):
    """mass[seq, p] = sum over query heads of softmax prob of key p (0 where p >= seq_len or
    invisible). Recomputes the scores against the final log-sum-exp (one extra K pass), or
    (FROM_LOGITS) reads the scores the decode kernel stored."""
    seq, tile = tl.program_id(0), tl.program_id(1)  # tile: BLOCK_N keys from tile * BLOCK_N
    t, q_len = query_rows(qsl_ptr, seq)
    if q_len == 0:
        return
    t64 = t.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    if tile * BLOCK_N >= seq_len:  # no key here: nothing to add (rule in the module docstring)
        return
    offs = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs < seq_len
    vis = nmask
    if HAS_WINDOW:
        vis = vis & ((offs > seq_len - 1 - window) | (offs < num_sinks))
    blk = tl.load(bt_ptr + seq * stride_bt + offs // PAGE, mask=nmask, other=0).to(tl.int64)
    slot = offs % PAGE
    g = tl.arange(0, BLOCK_G)
    gmask = g < GROUP
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    if FROM_LOGITS:  # every query head in one [BLOCK_H, BLOCK_N] load: no loop of dependent
        # latencies (the program is latency-bound: a few KB of scores)
        hh = tl.arange(0, BLOCK_H)
        hmask = hh < num_heads
        s = tl.load(logits_ptr + t64 * stride_lt + hh[:, None] * stride_lh + offs[None, :],
                    mask=hmask[:, None] & vis[None, :], other=float("-inf"))
        lse = tl.load(lse_ptr + t64 * num_heads + hh, mask=hmask, other=0.0)
        p = tl.where(hmask[:, None] & vis[None, :], tl.exp2(s - lse[:, None]), 0.0)
        total = tl.sum(p, axis=0)
    else:
        total = tl.zeros([BLOCK_N], tl.float32)
        for kvh in range(0, num_kv_heads):
            heads = kvh * GROUP + g
            q = tl.load(q_ptr + t64 * stride_qt + heads[:, None] * stride_qh + d[None, :],
                        mask=gmask[:, None] & dmask[None, :], other=0.0)
            if KV_QUANT:
                q = q.to(COMPUTE)
            k = tl.load(k_cache_ptr + blk[:, None] * stride_kb + slot[:, None] * stride_ks
                        + kvh * stride_kh + d[None, :], mask=vis[:, None] & dmask[None, :], other=0.0)
            if KV_QUANT:
                ksc = tl.load(k_scale_ptr + blk * stride_ksb + slot * stride_kss + kvh * stride_ksh,
                              mask=vis, other=0.0)
                k = kv_cast(k, q.dtype)
                s = mma(q, tl.trans(k), DOT_F32) * (ksc * sm_scale2)[None, :]
            else:
                s = mma(q, tl.trans(k), DOT_F32) * sm_scale2
            lse = tl.load(lse_ptr + t64 * num_heads + heads, mask=gmask, other=0.0)
            p = tl.exp2(s - lse[:, None])
            p = tl.where(gmask[:, None] & vis[None, :], p, 0.0)
            total += tl.sum(p, axis=0)
    if ADD_BLOCKS:  # mass_ptr: block_mass [seqs, table blocks]; += this tile's blocks
        per_block = tl.sum(tl.reshape(total, [BLOCK_N // PAGE, PAGE]), axis=1)
        bidx = tile * (BLOCK_N // PAGE) + tl.arange(0, BLOCK_N // PAGE)
        bmask = bidx * PAGE < seq_len
        ptrs = mass_ptr + seq * stride_mass + bidx
        tl.store(ptrs, tl.load(ptrs, mask=bmask, other=0.0) + per_block, mask=bmask)
    else:
        tl.store(mass_ptr + seq * stride_mass + offs, total, mask=offs < max_len)


def attention_mass_triton(
    q, k_cache, block_tables, seq_lens, query_start_loc, scale, lse,
    sliding_window=None, num_sink_tokens=0, *, k_scale=None, max_len=None, block_n=64,
    logits=None, block_mass=None,
):
    """Per-key attention probability summed over query heads, ``[num_seqs, max_len]`` float32
    (``max_len`` defaults to the block-table width in tokens). Needs ``lse`` from
    ``decode_attention_triton(..., return_lse=True)``; with ``logits`` (the scores that call
    stored, ``decode_attention_triton(..., logits=)``) K is not read again.

    ``block_mass`` (float32 ``[num_seqs, >= table blocks]``, last dim contiguous): add each
    table block's mass into it instead (``block_mass[s, b] += mass[s, b*page:(b+1)*page].sum()``)
    and return it; needs a power-of-two page."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    _, page, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if max_len is None:
        max_len = block_tables.shape[1] * page
    if block_mass is not None:
        if page & (page - 1) or block_mass.stride(1) != 1:
            raise ValueError("block_mass needs a power-of-two page and a contiguous last dimension")
        block_n = max(block_n, page)  # whole pages per tile
        mass = block_mass
    else:
        mass = torch.zeros(num_seqs, max_len, dtype=torch.float32, device=q.device)
    if num_seqs == 0 or max_len == 0:
        return mass
    quant = is_quantized(k_cache.dtype)
    cd = q.dtype
    ks = scale_strides(k_scale)
    has_window = sliding_window is not None and sliding_window > 0
    _attention_mass_kernel[(num_seqs, triton.cdiv(max_len, block_n))](
        q, k_cache, k_scale if k_scale is not None else seq_lens, block_tables, seq_lens,
        query_start_loc, lse, mass, float(scale) * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *ks, block_tables.stride(0), mass.stride(0), max_len, num_heads, num_kv_heads,
        int(sliding_window) if has_window else 0, int(num_sink_tokens),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=block_n, PAGE=page,
        KV_QUANT=quant, HAS_WINDOW=has_window, DOT_F32=dot_f32(q.dtype if not quant else cd),
        COMPUTE=TL_DTYPE[cd],
        logits_ptr=logits if logits is not None else lse,
        stride_lt=logits.stride(0) if logits is not None else 0,
        stride_lh=logits.stride(1) if logits is not None else 0, FROM_LOGITS=logits is not None,
        ADD_BLOCKS=block_mass is not None, BLOCK_H=max(16, triton.next_power_of_2(num_heads)), num_warps=4,
    )
    return mass
