"""Tile helpers of the paged attention kernels (decode and extend):
- ``tile_keys``: key positions, slots and page indices of a decode tile (the extend kernel
  keeps its per-key division; its fp8 token-minor path was slower with this helper,
  bench/NOTES_kernels.md run 23);
- K and V tile loads in the cache's layout (``load_token_major`` for K, ``load_v_tile``),
  token-minor V pages included (cache/layout.py);
- ``score_tile``: a loaded K/V tile's scores (8-bit caches dequantised through their
  scales) and ``softmax_step``: the online-softmax update of one tile.
The V loads return ``[BLOCK_N, D]`` ready for ``tl.dot(p, v)``:
- ``load_v_token_minor_pages`` (tiles of whole pages, BLOCK_N % page == 0): each page of one
  KV head is one run of D * page values, so a warp reads 512 contiguous bytes;
- ``load_v_token_minor`` (tiles shorter than a page): runs of min(page, BLOCK_N) tokens.
Both read whole runs without masks. Rule for callers: every block id passed in is a real
block of the cache (ids of pages at or past the sequence end are replaced by 0 when they are
loaded, never taken from the table's padding), and the caller zeroes the values of keys past
the sequence before the product."""

from __future__ import annotations

import triton
import triton.language as tl

from tritonkv.kernels.jit_helpers import kv_cast, mma


@triton.jit
def tile_keys(n0, BLOCK_N: tl.constexpr, PAGE: tl.constexpr):
    """(key positions, slot in the page, page index) of the BLOCK_N keys from n0.
    Rule: n0 is a multiple of BLOCK_N (every walk starts at a tile-aligned key), so a tile of
    BLOCK_N >= PAGE keys holds whole pages: slots are a constant pattern and page indices a
    scalar plus a constant (no per-key division); a shorter tile lies inside one page. Both
    need one of BLOCK_N, PAGE to divide the other; other page sizes divide per key."""
    r = tl.arange(0, BLOCK_N)
    if BLOCK_N % PAGE == 0:
        slot = r % PAGE
        page = n0 // PAGE + r // PAGE
    elif PAGE % BLOCK_N == 0:
        slot = n0 % PAGE + r
        page = n0 // PAGE + r * 0
    else:  # neither divides the other (a page size that is not a power of two): per key
        slot = (n0 + r) % PAGE
        page = (n0 + r) // PAGE
    return n0 + r, slot, page


@triton.jit
def load_token_major(cache_ptr, blk, slot, kvh, d, mask, stride_b, stride_s, stride_h,
                     MASKED: tl.constexpr):
    """Tile ``[BLOCK_N, D]`` of token-major pages (K always, V of a 16/32-bit cache): one row
    per key (``mask`` when MASKED)."""
    p = cache_ptr + blk[:, None] * stride_b + slot[:, None] * stride_s + kvh * stride_h
    if MASKED:
        x = tl.load(p + d[None, :], mask=mask, other=0.0)
    else:
        x = tl.load(p + d[None, :])
    return x


@triton.jit
def load_v_token_minor(v_cache_ptr, blk, slot, kvh, d, stride_vb, stride_vh, stride_vd,
                       VEC: tl.constexpr):
    """V tile ``[BLOCK_N, D]`` from token-minor pages (physically ``[blocks, kv_heads, d, page]``,
    cache/layout.py), loaded as V^T ``[D, BLOCK_N]``. Rule: every tile starts at a multiple
    of BLOCK_N and a page's tokens share one block id, so offsets run contiguous over
    VEC = min(page, BLOCK_N) tokens. Whole runs are read unmasked (the rule above)."""
    vo = blk[None, :] * stride_vb + kvh * stride_vh + d[:, None] * stride_vd + slot[None, :]
    vo = tl.max_contiguous(tl.multiple_of(vo, [1, VEC]), [1, VEC])
    return tl.trans(tl.load(v_cache_ptr + vo))


@triton.jit
def load_v_token_minor_pages(v_cache_ptr, page_blk, kvh, stride_vb, stride_vh,
                             D: tl.constexpr, PAGE: tl.constexpr, TP: tl.constexpr):
    """The tile of ``load_v_token_minor`` read as TP whole pages: a page of one KV head is
    D*PAGE contiguous values, so a warp's lanes cover 512 contiguous bytes (instead of
    min(PAGE, BLOCK_N) bytes of 32 / TP channel rows per page)."""
    j = tl.arange(0, D * PAGE)
    vo = page_blk[:, None] * stride_vb + kvh * stride_vh + j[None, :]
    vo = tl.max_contiguous(tl.multiple_of(vo, [1, 16]), [1, D * PAGE])
    x = tl.load(v_cache_ptr + vo)  # [TP, D*PAGE]
    x = tl.reshape(x, [TP, D, PAGE])
    x = tl.permute(x, (1, 0, 2))
    return tl.trans(tl.reshape(x, [D, TP * PAGE]))


@triton.jit
def load_v_tile(v_cache_ptr, blk, pblk, slot, kvh, d, lmask, stride_vb, stride_vs, stride_vh,
                stride_vd, MASKED: tl.constexpr, V_T: tl.constexpr, V_PAGES: tl.constexpr,
                V_VEC: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """V tile ``[BLOCK_N, D]`` in the cache's layout: token-major rows (``lmask`` when MASKED),
    token-minor whole pages (``pblk``: the block id of each of the tile's pages) or runs."""
    if V_T and V_PAGES:
        v = load_v_token_minor_pages(v_cache_ptr, pblk, kvh, stride_vb, stride_vh, d.shape[0],
                                     PAGE, BLOCK_N // PAGE)
    elif V_T:
        v = load_v_token_minor(v_cache_ptr, blk, slot, kvh, d, stride_vb, stride_vh, stride_vd,
                               V_VEC)
    else:
        v = load_token_major(v_cache_ptr, blk, slot, kvh, d, lmask, stride_vb, stride_vs,
                             stride_vh, MASKED)
    return v


@triton.jit
def score_tile(q, k, v, cache, blk, slot, kvh, nmask, sm_scale2, KV_QUANT: tl.constexpr,
               MASKED: tl.constexpr, ZERO_V: tl.constexpr, DOT_F32: tl.constexpr):
    """Scores ``[M, BLOCK_N]`` of a loaded K/V tile in the exp2 domain (``sm_scale2`` = scale *
    log2(e)), V ready for the P.V product and V's scales (a placeholder for a float cache).
    KV_QUANT: 8-bit K/V are cast to q's dtype (exact) and their per-key scales (per token-head,
    or per block where the slot stride is 0) applied to the scores and, in softmax_step, to
    the probabilities; MASKED: scales of keys outside ``nmask`` read 0 (a stale scale may be
    NaN/inf, and p * NaN is NaN even for p = 0). ZERO_V: V of keys outside ``nmask`` is zeroed
    (whole pages were loaded: stale slots, maybe NaN). ``cache``: the kernel's tuple of
    block-table, cache and scale pointers and strides."""
    (bt_ptr, stride_bt, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
     stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd,
     stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh) = cache
    # a float cache has no V scales: vsc is a placeholder (Triton 3.6 cannot return None
    # inside a tuple from a jit function)
    ksc, vsc = None, sm_scale2
    if KV_QUANT:
        ksp = k_scale_ptr + blk * stride_ksb + slot * stride_kss + kvh * stride_ksh
        vsp = v_scale_ptr + blk * stride_vsb + slot * stride_vss + kvh * stride_vsh
        if MASKED:
            ksc = tl.load(ksp, mask=nmask, other=0.0)
            vsc = tl.load(vsp, mask=nmask, other=0.0)
        else:
            ksc = tl.load(ksp)
            vsc = tl.load(vsp)
        k = kv_cast(k, q.dtype)
        v = kv_cast(v, q.dtype)
    if ZERO_V:
        v = tl.where(nmask[:, None], v, 0.0)
    s = mma(q, tl.trans(k), DOT_F32)
    if KV_QUANT:
        s = s * (ksc * sm_scale2)[None, :]
    else:
        s = s * sm_scale2
    return s, v, vsc


@triton.jit
def softmax_step(acc, m_i, l_i, s, v, vsc, KV_QUANT: tl.constexpr, SAFE_MAX: tl.constexpr,
                 DOT_F32: tl.constexpr):
    """One tile of online softmax in the exp2 domain: scores ``s`` ``[M, BLOCK_N]`` (scaled,
    -inf where invisible), V ``[BLOCK_N, D]``, ``vsc`` the V scales of an 8-bit cache (ignored
    without KV_QUANT).
    SAFE_MAX: a row may have seen no visible key yet (running max -inf), so exp2 uses 0 then."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if SAFE_MAX:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if KV_QUANT:
        p = p * vsc[None, :]
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_F32)
    return acc, m_new, l_i
