"""Paged decode attention (one query token per sequence), split-KV with a reduce step.

Reference: ``tritonkv.ops.paged_attention.paged_attention_reference`` (and
``tritonkv.ops.quant.paged_attention_quant_reference`` for FP8/INT8 caches). The H2O
attention mass, computed from this kernel's log-sum-exp, is in kernels/attention_mass.py.

Design
- Grid of stage 1: (num_seqs, num_kv_heads, num_splits). A program loads its KV head's
  whole query-head group (GQA/MQA: each KV byte is read once per group) as a
  ``[BLOCK_G, D]`` tile (BLOCK_G >= 16 rows so that ``tl.dot`` can be used; padding rows are
  zero) and walks its share of the sequence's visible keys in tiles of BLOCK_N tokens,
  gathering rows through the block table (online softmax, exp2 domain).
- With one split it writes the output directly (and, when asked, the log-sum-exp that the H2O
  mass needs: no split is forced for it); with several it writes a normalised partial
  output and its log-sum-exp per (token, head, split) and a second kernel merges them.
- Quantised caches: fp8/int8 values are cast to the query dtype (exact) and the per-token
  (or per-block) scale is applied to the scores (K) and the probabilities (V), so no
  ``[N, D]`` multiply is needed.
- Block ids: per tile from the block table, or (BT_GATHER) the split's whole slice loaded
  once before the loop and picked with ``tl.gather``: K/V addresses that depend on a load in
  the same iteration get a single pipeline buffer from Triton, gathered ids get num_stages - 1
  (bench/NOTES_kernels.md, runs 5-9).
- V of an fp8/int8 cache is token-minor (cache/layout.py) and read in whole pages
  (kernels/paged_tiles.py), so the 8-bit V tile reaches the MMA without byte-wise shared
  memory reads; only the tile holding the sequence end zeroes V past it (stale slots).
- Sliding window w: only keys in ``(pos - w, pos]`` are walked (split over that range);
  ``num_sink_tokens`` extra keys ``[0, s)`` are walked by split 0 before its range.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritonkv.cache.layout import v_token_minor
from tritonkv.kernels.decode_plan import DecodePlan, plan_decode
from tritonkv.kernels.jit_helpers import LOG2E, TL_DTYPE, dot_f32, query_rows, scale_strides
from tritonkv.kernels.paged_tiles import (load_token_major, load_v_tile, score_tile,
                                         softmax_step, tile_keys)
from tritonkv.cache.quant_format import is_quantized


@triton.jit
def _decode_tile(
    acc, m_i, l_i, q, n0, hi, kv_lo_vis, num_sinks, kvh, seq, cache, bt_vec, page0, sm_scale2,
    d, dmask, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, KV_QUANT: tl.constexpr,
    DOT_F32: tl.constexpr, V_T: tl.constexpr, V_VEC: tl.constexpr, V_PAGES: tl.constexpr,
    CHECK_LO: tl.constexpr, MASKED: tl.constexpr, BT_GATHER: tl.constexpr, ZERO_V: tl.constexpr,
    lg, STORE_S: tl.constexpr,
):
    # cache: the kernel's block-table, K/V cache and scale pointers and strides in one tuple
    # lg (STORE_S): (logits pointer, its token and head strides, token, heads, head mask)
    (bt_ptr, stride_bt, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
     stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd,
     stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh) = cache
    # MASKED=False: a full tile of keys all < hi, and HEAD_DIM == BLOCK_D (no masks at all)
    offs, slot, page = tile_keys(n0, BLOCK_N, PAGE)  # (n0 is a multiple of BLOCK_N)
    nmask = offs < hi
    # V_T: every token of a page gets the page's block id (a page is loaded whole)
    if V_T:
        bmask = (offs - slot) < hi
    else:
        bmask = nmask
    if BT_GATHER:  # block ids from the split's slice of the table, loaded before the loop.
        # Clamped: the pipeliner computes addresses of prefetched tiles past the loop's end
        # (their loads are predicated off, but the register gather itself is not).
        idx = tl.minimum(page - page0, bt_vec.shape[0] - 1)
        blk = tl.gather(bt_vec, idx, 0).to(tl.int64)
    elif MASKED:
        blk = tl.load(bt_ptr + seq * stride_bt + page, mask=bmask, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_ptr + seq * stride_bt + page).to(tl.int64)
    lmask = nmask[:, None] & dmask[None, :]
    k = load_token_major(k_cache_ptr, blk, slot, kvh, d, lmask, stride_kb, stride_ks, stride_kh,
                         MASKED)
    pblk = blk
    if V_T and V_PAGES:  # one block id per page of the tile (BLOCK_N % PAGE == 0)
        pg = n0 // PAGE + tl.arange(0, BLOCK_N // PAGE)
        if BT_GATHER:
            pblk = tl.gather(bt_vec, tl.minimum(pg - page0, bt_vec.shape[0] - 1), 0).to(tl.int64)
        else:
            pblk = tl.load(bt_ptr + seq * stride_bt + pg, mask=pg * PAGE < hi, other=0).to(tl.int64)
    v = load_v_tile(v_cache_ptr, blk, pblk, slot, kvh, d, lmask, stride_vb, stride_vs, stride_vh,
                    stride_vd, MASKED, V_T, V_PAGES, V_VEC, PAGE, BLOCK_N)
    # V_T: whole pages were loaded, V of keys >= hi is zeroed (only the tile holding hi has any)
    s, v, vsc = score_tile(q, k, v, cache, blk, slot, kvh, nmask, sm_scale2, KV_QUANT, MASKED,
                           V_T and ZERO_V, DOT_F32)
    if MASKED:
        vis = nmask
        if CHECK_LO:  # window: keys below kv_lo_vis are invisible unless they are sinks
            vis = vis & ((offs >= kv_lo_vis) | (offs < num_sinks))
        s = tl.where(vis[None, :], s, float("-inf"))
    if STORE_S:  # the scaled scores, for H2O's attention mass (kernels/attention_mass.py)
        (lg_ptr, stride_lt, stride_lh, t64, heads, gmask) = lg
        tl.store(lg_ptr + t64 * stride_lt + heads[:, None] * stride_lh + offs[None, :], s,
                 mask=gmask[:, None] & nmask[None, :])
    return softmax_step(acc, m_i, l_i, s, v, vsc, KV_QUANT, True, DOT_F32)


@triton.jit
def _decode_stage1_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
    bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    sm_scale2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
    stride_bt,
    stride_pot, stride_poh, stride_pos, stride_plt, stride_plh,
    window, num_sinks, split_size, bt_cols,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr, KV_QUANT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_F32: tl.constexpr, COMPUTE: tl.constexpr,
    EVEN: tl.constexpr = False,
    BT_GATHER: tl.constexpr = False, BT_PAGES: tl.constexpr = 1, V_T: tl.constexpr = False,
    V_VEC: tl.constexpr = 16, V_PAGES: tl.constexpr = False, WRITE_LSE: tl.constexpr = False,
    logits_ptr=None, stride_lt=0, stride_lh=0, STORE_S: tl.constexpr = False,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    t, q_len = query_rows(qsl_ptr, seq)
    if q_len == 0:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)  # position seq_len-1 sees (pos - w, pos]
    kv_lo_vis = lo
    lo = (lo // BLOCK_N) * BLOCK_N
    start = lo + split * split_size
    end = tl.minimum(start + split_size, seq_len)

    g = tl.arange(0, BLOCK_G)
    gmask = g < GROUP
    heads = kvh * GROUP + g
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    t64 = t.to(tl.int64)
    q = tl.load(q_ptr + t64 * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    if KV_QUANT:
        q = q.to(COMPUTE)  # fp8/int8 K/V are cast to COMPUTE (exact) and dotted with q

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # BT_GATHER: the split's block ids are loaded once, up front. A K/V address that depends on
    # a load inside the loop limits Triton's software pipeliner (3.6) to one tile in flight;
    # with the ids in registers every K/V tile is prefetched num_stages - 1 tiles ahead.
    page0 = start // PAGE
    pg = page0 + tl.arange(0, BT_PAGES)
    # Rule: a block-table entry past the sequence is never dereferenced (the engine pads with 0,
    # a caller may pad with -1 or anything): ids of pages at or past seq_len become 0 here, and
    # whole-page V loads (V_T) of pages past the end read block 0, zeroed afterwards.
    bt_vec = tl.load(bt_ptr + seq * stride_bt + pg,
                     mask=(pg < bt_cols) & (pg * PAGE < seq_len) & BT_GATHER, other=0)

    cache = (bt_ptr, stride_bt, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
             stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd,
             stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh)
    lg = (logits_ptr, stride_lt, stride_lh, t64, heads, gmask)
    if HAS_WINDOW:
        if split == 0:
            sink_hi = tl.minimum(num_sinks, lo)  # keys >= lo are walked below
            for n0 in range(0, sink_hi, BLOCK_N):
                acc, m_i, l_i = _decode_tile(
                    acc, m_i, l_i, q, n0, sink_hi, 0, num_sinks, kvh, seq, cache, bt_vec, page0,
                    sm_scale2, d, dmask, PAGE, BLOCK_N, KV_QUANT, DOT_F32, V_T, V_VEC, V_PAGES,
                    False, True, False, True, lg, STORE_S)
    if EVEN or V_T:  # full tiles (every key < end), then one tail tile. EVEN (no window,
        # HEAD_DIM == BLOCK_D): full tiles without masks. V_T: only the tail zeroes stale V.
        n_full = start + (tl.maximum(end - start, 0) // BLOCK_N) * BLOCK_N
        for n0 in range(start, n_full, BLOCK_N):
            acc, m_i, l_i = _decode_tile(
                acc, m_i, l_i, q, n0, end, kv_lo_vis, num_sinks, kvh, seq, cache, bt_vec, page0,
                sm_scale2, d, dmask, PAGE, BLOCK_N, KV_QUANT, DOT_F32, V_T, V_VEC, V_PAGES,
                HAS_WINDOW, not EVEN, BT_GATHER, False, lg, STORE_S)
        if n_full < end:
            acc, m_i, l_i = _decode_tile(
                acc, m_i, l_i, q, n_full, end, kv_lo_vis, num_sinks, kvh, seq, cache, bt_vec,
                page0, sm_scale2, d, dmask, PAGE, BLOCK_N, KV_QUANT, DOT_F32, V_T, V_VEC,
                V_PAGES, HAS_WINDOW, True, BT_GATHER, True, lg, STORE_S)
    else:
        for n0 in range(start, end, BLOCK_N):
            acc, m_i, l_i = _decode_tile(
                acc, m_i, l_i, q, n0, end, kv_lo_vis, num_sinks, kvh, seq, cache, bt_vec, page0,
                sm_scale2, d, dmask, PAGE, BLOCK_N, KV_QUANT, DOT_F32, V_T, V_VEC, V_PAGES,
                HAS_WINDOW, True, BT_GATHER, True, lg, STORE_S)

    omask = gmask[:, None] & dmask[None, :]
    if SPLIT:
        valid = l_i > 0
        o = acc / tl.where(valid, l_i, 1.0)[:, None]
        lse = tl.where(valid, m_i + tl.log2(tl.where(valid, l_i, 1.0)), float("-inf"))
        tl.store(part_o_ptr + t64 * stride_pot + heads[:, None] * stride_poh
                 + split * stride_pos + d[None, :], o, mask=omask)
        tl.store(part_lse_ptr + t64 * stride_plt + heads * stride_plh + split, lse, mask=gmask)
    else:
        o = acc / l_i[:, None]
        tl.store(out_ptr + t64 * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=omask)
        if WRITE_LSE:  # one split: the final log-sum-exp (H2O's attention mass needs it)
            tl.store(part_lse_ptr + t64 * stride_plt + heads * stride_plh, m_i + tl.log2(l_i), mask=gmask)


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, qsl_ptr, out_ptr, lse_out_ptr,
    stride_pot, stride_poh, stride_pos, stride_plt, stride_plh, stride_ot, stride_oh,
    num_heads, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    seq = tl.program_id(0)
    h = tl.program_id(1)
    t, q_len = query_rows(qsl_ptr, seq)
    if q_len == 0:
        return
    t64 = t.to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    smask = s < num_splits
    lse = tl.load(part_lse_ptr + t64 * stride_plt + h * stride_plh + s, mask=smask,
                  other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - m)
    w_sum = tl.sum(w, axis=0)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    po = tl.load(part_o_ptr + t64 * stride_pot + h * stride_poh + s[:, None] * stride_pos
                 + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    o = tl.sum(po * w[:, None], axis=0) / w_sum
    tl.store(out_ptr + t64 * stride_ot + h * stride_oh + d, o.to(out_ptr.dtype.element_ty),
             mask=dmask)
    if WRITE_LSE:
        tl.store(lse_out_ptr + t64 * num_heads + h, m + tl.log2(w_sum))


def decode_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
    sliding_window: int | None = None, num_sink_tokens: int = 0, *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    max_seq_len: int | None = None,
    compute_dtype: torch.dtype | None = None,
    even: bool | None = None,
    gather_ids: bool | None = None,
    v_pages: bool | None = None,
    logits: torch.Tensor | None = None,
    plan: DecodePlan | None = None,
):
    """Decode attention: every sequence has exactly one (or zero) query rows.

    Returns ``out`` ``[num_tokens, num_heads, head_dim]`` (q's dtype), or ``(out, lse)`` with
    ``lse`` float32 ``[num_tokens, num_heads]`` in log2 units of the scaled scores when
    ``return_lse``. ``max_seq_len`` (optional, host int) bounds the split size; without it the
    block table width is used (no device sync). ``logits`` (optional, float32 ``[num_tokens,
    num_heads, >= max_seq_len]``): receives every visited key's scaled score (log2 units, the
    ones ``lse`` normalises), for ``attention_mass_triton(..., logits=)``. ``plan``: the
    step's launch plan (``plan_decode``, made once per step for every layer); without it one is
    made here from the tuning arguments (tests, benchmarks)."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    _, page, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    quant = is_quantized(k_cache.dtype)
    if quant and (k_scale is None or v_scale is None):
        raise ValueError("a quantised KV cache needs k_scale and v_scale")
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1
    v_t = v_token_minor(v_cache)  # (refuses token-minor pages with a non-power-of-two size)
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0:
        return (out, torch.empty(0, num_heads, device=q.device)) if return_lse else out

    block_g = max(16, triton.next_power_of_2(group))
    block_d = triton.next_power_of_2(head_dim)
    has_window = sliding_window is not None and sliding_window > 0
    if plan is None:
        plan = plan_decode(q.dtype, k_cache, v_cache, num_seqs, block_tables.shape[1], sliding_window, max_seq_len,
                           q.device, num_splits=num_splits, block_n=block_n, num_warps=num_warps,
                           num_stages=num_stages, compute_dtype=compute_dtype, even=even, gather_ids=gather_ids,
                           v_pages=v_pages)
    block_n, num_splits, split_size, compute_dtype = plan.block_n, plan.num_splits, plan.split_size, plan.compute_dtype
    use_split = num_splits > 1
    dev = q.device
    if use_split:
        part_o = torch.empty(num_tokens, num_heads, num_splits, head_dim, dtype=torch.float32,
                             device=dev)
        part_lse = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32,
                               device=dev)
    else:
        part_o = out
        # one split writes the final lse itself
        part_lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=dev) if return_lse else None
    ks, vs = scale_strides(k_scale), scale_strides(v_scale)
    dummy = seq_lens
    sm_scale2 = float(scale) * LOG2E
    _decode_stage1_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache,
        k_scale if k_scale is not None else dummy, v_scale if v_scale is not None else dummy,
        block_tables, seq_lens, query_start_loc, out, part_o,
        part_lse if part_lse is not None else dummy,
        sm_scale2,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        *ks, *vs,
        block_tables.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2) if use_split else 0,
        part_lse.stride(0) if part_lse is not None else 0, part_lse.stride(1) if part_lse is not None else 0,
        int(sliding_window) if has_window else 0, int(num_sink_tokens), split_size,
        block_tables.shape[1],
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n,
        PAGE=page, SPLIT=use_split, KV_QUANT=quant, HAS_WINDOW=has_window,
        DOT_F32=dot_f32(q.dtype if not quant else compute_dtype), COMPUTE=TL_DTYPE[compute_dtype],
        EVEN=plan.even,
        BT_GATHER=plan.gather_ids, BT_PAGES=plan.bt_pages, V_T=v_t, V_VEC=min(page, block_n),
        V_PAGES=plan.v_pages, WRITE_LSE=return_lse and not use_split,
        logits_ptr=logits if logits is not None else dummy,
        stride_lt=logits.stride(0) if logits is not None else 0,
        stride_lh=logits.stride(1) if logits is not None else 0, STORE_S=logits is not None,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    lse_out = part_lse if not use_split else None
    if use_split:
        if return_lse:
            lse_out = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=dev)
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_o, part_lse, query_start_loc, out, lse_out if lse_out is not None else dummy,
            part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1),
            num_heads, num_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
            WRITE_LSE=return_lse, num_warps=4 if head_dim >= 128 else 2,
        )
    return (out, lse_out) if return_lse else out
