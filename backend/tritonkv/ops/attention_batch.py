"""What attention needs for one step, built once per step by the model runner and handed to
every layer (ops/paged_attention.py has the layout rules): no layer recomputes any of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AttentionBatch:
    """What attention needs for one step (see ops/paged_attention.py for the layout rules)."""

    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_query_len: int
    max_seq_len: int | None = None  # host bound on seq_lens (sizes decode splits); None: table width
    # h2o: [num_seqs, table blocks] float32; every layer adds the attention mass each sequence's
    # last query gives to each table block (summed over query heads)
    block_mass: torch.Tensor | None = None
    sliding_window: int | None = None  # the model's: query p sees keys (p - w, p]
    # the decode kernel's launch plan (kernels/decode_plan.py), made once per step by
    # ops/dispatch.plan_step when the step runs the decode kernel; None: none (or planned per call)
    decode_plan: Any = None
