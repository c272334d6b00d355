"""H2O attention mass: for each decode row, every key's softmax probability summed over the
query heads, ``[num_seqs, max_len]`` float32, a side output of decode attention.

Reference: ``tritonkv.ops.attention_mass.attention_mass_reference``.

One program per (sequence, tile of BLOCK_N keys) recomputes the scores of its keys for every
query head (one extra K pass) and normalises them with the final log-sum-exp that
``decode_attention_triton(..., return_lse=True)`` returns; or, when the decode kernel stored
its scores (``logits=``), reads those (4 bytes per key and query head instead of K).
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
    total = tl.zeros([BLOCK_N], tl.float32)
    for kvh in range(0, num_kv_heads):
        heads = kvh * GROUP + g
        if FROM_LOGITS:
            s = tl.load(logits_ptr + t64 * stride_lt + heads[:, None] * stride_lh + offs[None, :],
                        mask=gmask[:, None] & vis[None, :], other=float("-inf"))
        else:
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
    tl.store(mass_ptr + seq * stride_mass + offs, total, mask=offs < max_len)


def attention_mass_triton(
    q, k_cache, block_tables, seq_lens, query_start_loc, scale, lse,
    sliding_window=None, num_sink_tokens=0, *, k_scale=None, max_len=None, block_n=64,
    logits=None,
):
    """Per-key attention probability summed over query heads, ``[num_seqs, max_len]`` float32
    (``max_len`` defaults to the block-table width in tokens). Needs ``lse`` from
    ``decode_attention_triton(..., return_lse=True)``; with ``logits`` (the scores that call
    stored, ``decode_attention_triton(..., logits=)``) K is not read again."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    _, page, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if max_len is None:
        max_len = block_tables.shape[1] * page
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
        num_warps=4,
    )
    return mass
