"""One entry per cache op: Triton kernel on CUDA tensors, torch reference elsewhere.

The engine calls only these functions; kernels/ and the references share the layout rules
stated in ops/paged_attention.py.
"""

from __future__ import annotations

import torch

from tritonkv.ops.paged_attention import paged_attention_reference, write_kv_reference


def write_kv(k_cache, v_cache, key, value, slot_mapping) -> None:
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
) -> torch.Tensor:
    return paged_attention_reference(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
        sliding_window, num_sink_tokens,
    )
