"""One entry per cache op: Triton kernel on CUDA tensors, torch elsewhere.

``impl`` (tests and benchmarks force one; None = 'triton' on CUDA tensors, 'cpu' elsewhere):
- 'triton': the kernels (kernels/);
- 'cpu': the torch serving path (paged attention batched, ops/cpu_attention.py; the
  references for everything else); runs on any device;
- 'reference': the plain torch oracles (ops/paged_attention.py, ops/quant.py,
  ops/attention_mass.py).

The engine calls only these functions; kernels/ and the references share the layout rules
stated in ops/paged_attention.py.

Quantised KV cache (optional): allocate ``k_cache``/``v_cache`` as ``torch.float8_e4m3fn``
(FP8 e4m3) or ``torch.int8`` and pass float32 ``k_scale``/``v_scale`` to both ``write_kv``
and ``paged_attention``:
- ``[num_blocks, block_size, num_kv_heads]``: per token-head scales, computed by
  ``write_kv`` from each written token (amax / 448 for fp8, amax / 127 for int8);
- ``[num_blocks, num_kv_heads]``: per-block static scales (e.g. a calibrated per-layer scale
  broadcast with ``expand``); ``write_kv`` reads them and saturates, never updates them.
Dequantised value = stored value * scale. See ops/quant.py for the exact rules.
"""

from __future__ import annotations

import torch

from tritonkv.cache.quant_format import is_quantized
from tritonkv.ops.attention_batch import AttentionBatch
from tritonkv.ops.attention_mass import attention_mass_reference, last_query_mass as _last_query_mass
from tritonkv.ops.cpu_attention import paged_attention_cpu
from tritonkv.ops.paged_attention import paged_attention_reference, write_kv_reference
from tritonkv.ops.quant import (
    dequantize_cache,
    paged_attention_quant_reference,
    write_kv_quant_reference,
)

IMPLS = ("triton", "cpu", "reference")


def _use_kernel(t: torch.Tensor, impl: str | None) -> bool:
    if impl is None:
        return t.is_cuda
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
    return impl == "triton"


def write_kv(
    k_cache,
    v_cache,
    key,
    value,
    slot_mapping,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    impl: str | None = None,
) -> None:
    """Scatter ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into the cache slots
    ``slot_mapping`` (int, -1 = skip). ``k_scale``/``v_scale``: required for an fp8/int8 cache
    (see the module docstring). ``impl``: module docstring ('cpu' and 'reference' are the
    same function here)."""
    if _use_kernel(k_cache, impl):
        from tritonkv.kernels.kv_write import write_kv_triton

        write_kv_triton(k_cache, v_cache, key, value, slot_mapping, k_scale, v_scale)
    elif is_quantized(k_cache.dtype):
        if k_scale is None or v_scale is None:
            raise ValueError("a quantised KV cache needs k_scale and v_scale")
        write_kv_quant_reference(k_cache, v_cache, key, value, slot_mapping, k_scale, v_scale)
    else:
        write_kv_reference(k_cache, v_cache, key, value, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    num_sink_tokens: int = 0,
    max_query_len: int | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    return_attention_mass: bool = False,
    block_mass: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    impl: str | None = None,
    decode_plan=None,
):
    """Attention of ``q`` ``[num_tokens, num_heads, head_dim]`` over the paged cache
    (layout: ops/paged_attention.py). Returns ``[num_tokens, num_heads, head_dim]`` in q's
    dtype.

    On CUDA: the decode kernel when every sequence has at most one query token
    (``max_query_len == 1``), the extend kernel otherwise (mixed decode + extend batches
    included). ``max_query_len`` should be passed by the engine (host int); when None it is
    read from ``query_start_loc`` (one device sync).

    Optional keyword arguments:
    - ``k_scale``/``v_scale``: float32 scales of an fp8/int8 cache (module docstring).
    - ``return_attention_mass``: decode only; also return ``mass`` float32
      ``[num_seqs, max_blocks * block_size]``, each key's softmax probability summed over all
      query heads (0 past ``seq_lens``/outside the window), for H2O heavy-hitter eviction.
      Returns ``(out, mass)`` then. The 'cpu' path takes it from the attention's own
      probabilities.
    - ``block_mass``: decode only (the engine's H2O path); float32 ``[num_seqs, >= table
      blocks]``: each sequence's mass summed per table block is *added* into it, and only
      ``out`` is returned. On CUDA (power-of-two page) the mass kernel adds it directly: no
      per-key mass tensor, one launch per layer (kernels/attention_mass.py).
    - ``max_seq_len``: host int bound on ``seq_lens`` (sizes decode's split-KV); default the
      block table's width.
    - ``out``: preallocated output; ``impl``: None (auto) / 'triton' / 'cpu' (the batched
      CPU path, ops/cpu_attention.py) / 'reference' (the plain oracle); a quantised cache has
      one torch path, the dequantising reference.
    - ``decode_plan``: the decode kernel's launch plan for the step (``plan_step``).
    """
    quant = is_quantized(k_cache.dtype)
    if quant and (k_scale is None or v_scale is None):
        raise ValueError("a quantised KV cache needs k_scale and v_scale")
    page = k_cache.shape[1]
    if block_mass is not None and (not _use_kernel(q, impl) or page & (page - 1)):
        res, mass = paged_attention(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window,
            num_sink_tokens, max_query_len, k_scale=k_scale, v_scale=v_scale, return_attention_mass=True,
            max_seq_len=max_seq_len, out=out, impl=impl, decode_plan=decode_plan)
        per_block = mass.view(mass.shape[0], -1, page).sum(-1)
        block_mass[:, :per_block.shape[1]] += per_block
        return res
    if not _use_kernel(q, impl):
        if quant:
            res = paged_attention_quant_reference(
                q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                sliding_window, num_sink_tokens, k_scale=k_scale, v_scale=v_scale)
        elif impl == "reference":
            res = paged_attention_reference(
                q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                sliding_window, num_sink_tokens)
        elif return_attention_mass:  # the mass from the attention's own probabilities
            _check_decode_only(query_start_loc, max_query_len)
            res, mass = paged_attention_cpu(
                q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                sliding_window, num_sink_tokens, return_attention_mass=True)
            if out is not None:
                out.copy_(res)
                res = out
            return res, mass
        else:
            res = paged_attention_cpu(
                q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                sliding_window, num_sink_tokens)
        if out is not None:
            out.copy_(res)
            res = out
        if return_attention_mass:
            _check_decode_only(query_start_loc, max_query_len)
            mass = attention_mass_reference(
                q, k_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window,
                num_sink_tokens, k_dequant=dequantize_cache(k_cache, k_scale) if quant else None)
            return res, mass
        return res

    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item()) \
            if seq_lens.numel() else 0
    if max_query_len <= 1:
        from tritonkv.kernels.attention_mass import attention_mass_triton
        from tritonkv.kernels.decode_attention import decode_attention_triton

        if not return_attention_mass and block_mass is None:
            return decode_attention_triton(
                q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                sliding_window, num_sink_tokens, k_scale=k_scale, v_scale=v_scale, out=out,
                max_seq_len=max_seq_len, plan=decode_plan)
        # the decode kernel keeps its scores, so the mass does not read K again
        logits = torch.empty(q.shape[0], q.shape[1], block_tables.shape[1] * k_cache.shape[1],
                             dtype=torch.float32, device=q.device)
        res, lse = decode_attention_triton(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
            sliding_window, num_sink_tokens, k_scale=k_scale, v_scale=v_scale, out=out,
            max_seq_len=max_seq_len, return_lse=True, logits=logits, plan=decode_plan)
        mass = attention_mass_triton(
            q, k_cache, block_tables, seq_lens, query_start_loc, scale, lse, sliding_window,
            num_sink_tokens, k_scale=k_scale, logits=logits, block_mass=block_mass)
        return res if block_mass is not None else (res, mass)

    if return_attention_mass or block_mass is not None:
        raise NotImplementedError("return_attention_mass is for decode batches only")
    from tritonkv.kernels.extend_attention import extend_attention_triton

    return extend_attention_triton(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window,
        num_sink_tokens, max_query_len=max_query_len, k_scale=k_scale, v_scale=v_scale, out=out)


def _check_decode_only(query_start_loc, max_query_len):
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item()) \
            if query_start_loc.numel() > 1 else 0
    if max_query_len > 1:
        raise NotImplementedError("return_attention_mass is for decode batches only")


def plan_step(batch: AttentionBatch, k_cache: torch.Tensor, v_cache: torch.Tensor, q_dtype: torch.dtype,
              impl: str | None = None) -> AttentionBatch:
    """Once per step, for every layer: the decode kernel's launch plan when this step runs it
    (CUDA, one query per sequence). Returns ``batch``."""
    if _use_kernel(k_cache, impl) and batch.max_query_len <= 1:
        from tritonkv.kernels.decode_plan import plan_decode

        batch.decode_plan = plan_decode(q_dtype, k_cache, v_cache, batch.seq_lens.shape[0],
                                        batch.block_tables.shape[1], batch.sliding_window, batch.max_seq_len,
                                        k_cache.device)
    return batch


def write_layer_kv(layer_cache, key, value, batch: AttentionBatch) -> None:
    """One layer's new K/V of the step into its cache: ``layer_cache`` is ``(k_cache,
    v_cache)`` or, for fp8 / int8, ``(k_cache, v_cache, k_scale, v_scale)``."""
    write_kv(*layer_cache[:2], key, value, batch.slot_mapping, **dict(zip(("k_scale", "v_scale"), layer_cache[2:])))


def attend(q: torch.Tensor, layer_cache, batch: AttentionBatch, scale: float) -> torch.Tensor:
    """One layer's attention of the step over its paged cache, from the step's metadata. When
    the step collects attention mass (``batch.block_mass``, the h2o policy) each sequence's
    last query adds its mass per table block: on a decode step from the attention itself,
    otherwise from the torch reference of the last rows."""
    k_cache, v_cache = layer_cache[:2]
    scales = dict(zip(("k_scale", "v_scale"), layer_cache[2:]))
    decode_mass = batch.block_mass is not None and batch.max_query_len <= 1
    out = paged_attention(q, k_cache, v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, scale,
                          sliding_window=batch.sliding_window, max_query_len=batch.max_query_len,
                          max_seq_len=batch.max_seq_len, block_mass=batch.block_mass if decode_mass else None,
                          decode_plan=batch.decode_plan, **scales)
    if batch.block_mass is not None and not decode_mass:
        mass = last_query_mass(q, k_cache, batch, scale)
        per_block = mass.view(mass.shape[0], -1, k_cache.shape[1]).sum(-1)
        batch.block_mass[:, :per_block.shape[1]] += per_block
    return out


def last_query_mass(q, k_cache, batch, scale) -> torch.Tensor:
    """Attention mass of each sequence's last query row (any batch, any device; torch):
    ``[num_seqs, n * block_size]`` over the first ``n`` table blocks that hold
    ``batch.max_seq_len`` tokens (the whole table when unknown). No window: for h2o."""
    block_size = k_cache.shape[1]
    width = batch.block_tables.shape[1]
    n = width if batch.max_seq_len is None else min(width, -(-batch.max_seq_len // block_size))
    return _last_query_mass(q, k_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, scale, n)
