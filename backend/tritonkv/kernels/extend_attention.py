"""Paged prefill / extend attention: a chunk of new query tokens per sequence against the
sequence's cached blocks (prefix) plus causal attention within the chunk.

Reference: ``tritonkv.ops.paged_attention.paged_attention_reference`` (and
``tritonkv.ops.quant.paged_attention_quant_reference`` for FP8/INT8 caches).

Layout rule used: the chunk's own K/V are already in the cache (written by ``write_kv``), so
every key, prefix or chunk, is read through the block table; the causal mask is the rule
"key position <= query position" with query row j at position ``seq_len - q_len + j``.

Design (FlashAttention-2 style, one program per (query tile, sequence, KV head)):
- GQA packing: a tile has BLOCK_M rows = BLOCK_Q tokens x G_PAD query heads of one KV head
  (row r is token r // G_PAD, head r % G_PAD), so each K/V tile is loaded once for the whole
  group and feeds one ``tl.dot`` of BLOCK_M rows.
- Keys before the tile's first query position need no mask (walked without masks); the
  diagonal tiles are masked. With a sliding window only the window's tiles are walked (plus
  the sink tiles); every tile is masked then.
- Query tiles are issued last-first (heaviest first) for causal load balance.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritonkv.cache.layout import v_token_minor
from tritonkv.kernels.jit_helpers import LOG2E, dot_f32, query_rows, scale_strides
from tritonkv.kernels.paged_tiles import load_token_major, load_v_tile, score_tile, softmax_step
from tritonkv.cache.quant_format import is_quantized


@triton.jit
def _extend_tile(
    acc, m_i, l_i, q, n0, qpos, seq_len, window, num_sinks, kvh, seq, cache, sm_scale2, d,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, KV_QUANT: tl.constexpr,
    DOT_F32: tl.constexpr, V_T: tl.constexpr, V_VEC: tl.constexpr, V_PAGES: tl.constexpr,
    MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    # cache: the kernel's block-table, K/V cache and scale pointers and strides in one tuple
    (bt_ptr, stride_bt, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
     stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd,
     stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh) = cache
    offs = n0 + tl.arange(0, BLOCK_N)
    slot = offs % PAGE
    nmask = offs < seq_len  # (unused, and dropped, in unmasked tiles)
    if MASKED:
        if V_T:  # every token of a page gets the page's block id (V pages are loaded whole)
            bmask = (offs - slot) < seq_len
        else:
            bmask = nmask
        blk = tl.load(bt_ptr + seq * stride_bt + offs // PAGE, mask=bmask, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_ptr + seq * stride_bt + offs // PAGE).to(tl.int64)
    k = load_token_major(k_cache_ptr, blk, slot, kvh, d, nmask[:, None], stride_kb, stride_ks,
                         stride_kh, MASKED)
    pblk = blk
    if V_T and V_PAGES:  # one block id per page of the tile (BLOCK_N % PAGE == 0)
        pg = n0 // PAGE + tl.arange(0, BLOCK_N // PAGE)
        if MASKED:
            pblk = tl.load(bt_ptr + seq * stride_bt + pg, mask=pg * PAGE < seq_len, other=0)
        else:
            pblk = tl.load(bt_ptr + seq * stride_bt + pg)
        pblk = pblk.to(tl.int64)
    v = load_v_tile(v_cache_ptr, blk, pblk, slot, kvh, d, nmask[:, None], stride_vb, stride_vs,
                    stride_vh, stride_vd, MASKED, V_T, V_PAGES, V_VEC, PAGE, BLOCK_N)
    # V_T: whole pages were loaded, V of keys >= seq_len is zeroed in masked tiles
    s, v, vsc = score_tile(q, k, v, cache, blk, slot, kvh, nmask, sm_scale2, KV_QUANT, MASKED,
                           V_T and MASKED, DOT_F32)
    if MASKED:
        vis = offs[None, :] <= qpos[:, None]  # also excludes keys >= seq_len
        if HAS_WINDOW:
            vis = vis & ((offs[None, :] > qpos[:, None] - window)
                         | (offs[None, :] < num_sinks))
        s = tl.where(vis, s, float("-inf"))
    # unmasked tiles: every row sees every key, so the running max is finite
    return softmax_step(acc, m_i, l_i, s, v, vsc, KV_QUANT, MASKED, DOT_F32)


@triton.jit
def _extend_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
    bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr,
    sm_scale2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
    stride_bt, window, num_sinks,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    KV_QUANT: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_F32: tl.constexpr,
    V_T: tl.constexpr = False, V_VEC: tl.constexpr = 16, V_PAGES: tl.constexpr = False,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // G_PAD
    qb = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start, q_len = query_rows(qsl_ptr, seq)
    if qb * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len

    r = tl.arange(0, BLOCK_M)
    tok = qb * BLOCK_Q + r // G_PAD
    g = r % G_PAD
    rmask = (tok < q_len) & (g < GROUP)
    heads = kvh * GROUP + g
    qpos = prefix + tok
    d = tl.arange(0, HEAD_DIM)
    row = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + row[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=rmask[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    first_pos = prefix + qb * BLOCK_Q
    hi = tl.minimum(first_pos + BLOCK_Q, seq_len)  # one past the tile's last query position
    cache = (bt_ptr, stride_bt, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
             stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd,
             stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh)
    if HAS_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        sink_hi = tl.minimum(num_sinks, lo)
        for n0 in range(0, sink_hi, BLOCK_N):
            acc, m_i, l_i = _extend_tile(
                acc, m_i, l_i, q, n0, qpos, seq_len, window, sink_hi, kvh, seq, cache, sm_scale2,
                d, PAGE, BLOCK_N, HEAD_DIM, KV_QUANT, DOT_F32, V_T, V_VEC, V_PAGES, True, True)
        for n0 in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _extend_tile(
                acc, m_i, l_i, q, n0, qpos, seq_len, window, num_sinks, kvh, seq, cache,
                sm_scale2, d, PAGE, BLOCK_N, HEAD_DIM, KV_QUANT, DOT_F32, V_T, V_VEC, V_PAGES,
                True, True)
    else:
        full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N  # keys < full_end: visible to all
        for n0 in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _extend_tile(
                acc, m_i, l_i, q, n0, qpos, seq_len, window, num_sinks, kvh, seq, cache,
                sm_scale2, d, PAGE, BLOCK_N, HEAD_DIM, KV_QUANT, DOT_F32, V_T, V_VEC, V_PAGES,
                False, False)
        for n0 in range(full_end, hi, BLOCK_N):
            acc, m_i, l_i = _extend_tile(
                acc, m_i, l_i, q, n0, qpos, seq_len, window, num_sinks, kvh, seq, cache,
                sm_scale2, d, PAGE, BLOCK_N, HEAD_DIM, KV_QUANT, DOT_F32, V_T, V_VEC, V_PAGES,
                True, False)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + row[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


def default_extend_config(head_dim: int, group: int, quant: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for sm_90-class GPUs."""
    if head_dim <= 64:
        return 128, 64, 4, 3
    return 128, 128, 8, 3  # best of the H100 sweep at every 4k-chunk case (NOTES_kernels.md)


def extend_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
    sliding_window: int | None = None, num_sink_tokens: int = 0, *,
    max_query_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    v_pages: bool | None = None,
) -> torch.Tensor:
    """Extend / prefill attention over the paged cache (any q_len per sequence, 0 included).
    ``max_query_len`` (host int) sizes the grid; without it it is read from
    ``query_start_loc`` (a device sync)."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    _, page, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    assert head_dim == triton.next_power_of_2(head_dim), "head_dim must be a power of two"
    quant = is_quantized(k_cache.dtype)
    if quant and (k_scale is None or v_scale is None):
        raise ValueError("a quantised KV cache needs k_scale and v_scale")
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1
    v_t = v_token_minor(v_cache)  # (head_dim is a power of two here)
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())
    bm, bn, nw, ns = default_extend_config(head_dim, group, quant)
    block_m = block_m or bm
    block_n = block_n or bn
    num_warps = num_warps or nw
    num_stages = num_stages or ns
    g_pad = triton.next_power_of_2(group)
    block_m = max(block_m, 16, g_pad)
    block_q = block_m // g_pad
    assert block_q >= 1
    ks, vs = scale_strides(k_scale), scale_strides(v_scale)
    dummy = seq_lens
    has_window = sliding_window is not None and sliding_window > 0
    grid = (triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)
    _extend_kernel[grid](
        q, k_cache, v_cache,
        k_scale if k_scale is not None else dummy, v_scale if v_scale is not None else dummy,
        block_tables, seq_lens, query_start_loc, out,
        float(scale) * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        *ks, *vs,
        block_tables.stride(0), int(sliding_window) if has_window else 0, int(num_sink_tokens),
        GROUP=group, G_PAD=g_pad, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        PAGE=page, KV_QUANT=quant, HAS_WINDOW=has_window,
        DOT_F32=dot_f32(q.dtype), V_T=v_t, V_VEC=min(page, block_n),
        V_PAGES=v_t and block_n % page == 0 and (v_pages is None or bool(v_pages)),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
