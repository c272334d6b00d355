"""Tile helpers of the paged attention kernels: the key positions, slots and page indices of
a decode tile (``tile_keys``; the extend kernel keeps its per-key division: with this helper
its fp8 token-minor path ran 2674 instead of 2146 us on the H100, bench/NOTES_kernels.md run
23), and V tile loads for token-minor V pages (cache/layout.py) shared by decode and
extend. The V loads return ``[BLOCK_N, D]`` ready for ``tl.dot(p, v)``:
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
        vp = v_cache_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vs + kvh * stride_vh
        if MASKED:
            v = tl.load(vp + d[None, :], mask=lmask, other=0.0)
        else:
            v = tl.load(vp + d[None, :])
    return v

