"""The inputs of one step in one packed buffer (vLLM v1's persistent input batch): every array
the forward and the sampler read for a step (token ids, positions, KV slots, from-previous
sources, lengths, block tables, sample rows, sampling settings) lies in one host buffer
(pinned on CUDA), written through numpy views, and reaches the device in ONE non-blocking copy
into a persistent device buffer of the same layout.

Rules:
- A step's layout depends on its sizes only (``sizes``: tokens, sequences, sample rows,
  rows with sampling settings, penalised rows; the block-table width is the runner's). The
  arrays a decode graph reads (``GRAPH_FIELDS``) come first and depend on (tokens, sequences)
  alone, so a graph captured for batch ``bs`` reads the same addresses at every replay of a
  step padded to ``bs``.
- Every array starts at a multiple of ``ALIGN`` bytes (Triton specialises pointer arguments
  on 16-byte alignment; the element types need 8).
- ``begin`` hands out host views that hold stale bytes: the runner writes every element a
  kernel may read (the block tables are zeroed first, so entries past a row's table are block 0).
- The host buffer is rewritten only once the previous upload has finished (an event);
  ``upload`` is the step's only host-to-device copy of its inputs (``h2d_copies`` counts them).
- On the CPU the device buffer is the host buffer: nothing is copied.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

ALIGN = 64

# name, dtype, length in units of: T tokens, S sequences, S1 sequences + 1, TB table entries
# (S x width), K sample rows, R rows with sampling settings, P penalised rows
GRAPH_FIELDS = (("ids", np.int64, "T"), ("positions", np.int64, "T"), ("prev_src", np.int64, "T"),
                ("slots", np.int64, "T"), ("seq_lens", np.int32, "S"), ("query_start_loc", np.int32, "S1"),
                ("block_tables", np.int32, "TB"))
EXTRA_FIELDS = (("sample_rows", np.int64, "K"), ("temperature", np.float32, "R"), ("top_k", np.int64, "R"),
                ("top_p", np.float32, "R"), ("min_p", np.float32, "R"), ("penalty_rows", np.int64, "P"),
                ("penalty_slots", np.int64, "P"), ("repetition", np.float32, "P"), ("presence", np.float32, "P"),
                ("frequency", np.float32, "P"), ("min_tokens", np.int32, "P"))
FIELDS = GRAPH_FIELDS + EXTRA_FIELDS
_TORCH = {np.int64: torch.int64, np.int32: torch.int32, np.float32: torch.float32}


@lru_cache(maxsize=4096)
def plan(tokens: int, seqs: int, samples: int, settings: int, penalised: int, width: int):
    """(((name, byte offset, dtype, shape), ...), total bytes) of a step of these sizes."""
    units = {"T": tokens, "S": seqs, "S1": seqs + 1, "TB": seqs * width, "K": samples, "R": settings,
             "P": penalised}
    fields, off = [], 0
    for name, dtype, unit in FIELDS:
        n = units[unit]
        shape = (seqs, width) if unit == "TB" else (n,)
        fields.append((name, off, dtype, shape))
        off += -(-n * np.dtype(dtype).itemsize // ALIGN) * ALIGN
    return tuple(fields), off


class StepInputs:
    """One packed host buffer and its device twin, sized for the largest step."""

    def __init__(self, max_tokens: int, max_seqs: int, width: int, device: torch.device):
        self.width = width
        self.capacity = plan(max_tokens, max_seqs, max_seqs, max_seqs, max_seqs, width)[1]
        cuda = device.type == "cuda"
        self.host = torch.zeros(self.capacity, dtype=torch.uint8, pin_memory=cuda)
        self.dev = torch.zeros(self.capacity, dtype=torch.uint8, device=device) if cuda else self.host
        self._host_np = self.host.numpy()
        self._uploaded = torch.cuda.Event() if cuda else None
        self._sizes: tuple | None = None
        self._host_views: dict[tuple, dict[str, np.ndarray]] = {}
        self._dev_views: dict[tuple, dict[str, torch.Tensor]] = {}
        self.h2d_copies = 0  # uploads so far (one per step that has inputs)

    def sizes(self, tokens: int, seqs: int, samples: int = 0, settings: int = 0, penalised: int = 0) -> tuple:
        return tokens, seqs, samples, settings, penalised, self.width

    def begin(self, sizes: tuple) -> dict[str, np.ndarray]:
        """The host arrays of a step of ``sizes`` (``self.sizes(...)``), once the previous
        upload has left the host buffer."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
        self._sizes = sizes
        views = self._host_views.get(sizes)
        if views is None:
            fields, _ = plan(*sizes)
            views = {name: self._host_np[off:off + int(np.prod(shape)) * np.dtype(dt).itemsize].view(dt).reshape(shape)
                     for name, off, dt, shape in fields}
            self._cache(self._host_views, sizes, views)
        return views

    def upload(self) -> None:
        """The step's one host-to-device copy (CUDA); the host buffer is free again once it ran."""
        if self.dev is self.host:
            return
        nbytes = plan(*self._sizes)[1]
        self.dev[:nbytes].copy_(self.host[:nbytes], non_blocking=True)
        self._uploaded.record()
        self.h2d_copies += 1

    def views(self, sizes: tuple | None = None) -> dict[str, torch.Tensor]:
        """The device arrays of the step begun last (or of ``sizes``): what kernels read."""
        sizes = sizes or self._sizes
        views = self._dev_views.get(sizes)
        if views is None:
            fields, _ = plan(*sizes)
            views = {}
            for name, off, dt, shape in fields:
                dtype = _TORCH[dt]
                n = int(np.prod(shape))
                views[name] = self.dev[off:off + n * dtype.itemsize].view(dtype).view(shape)
            self._cache(self._dev_views, sizes, views)
        return views

    @staticmethod
    def _cache(store: dict, key, value) -> None:
        if len(store) >= 1024:  # prefill sizes vary without bound: keep the cache bounded
            store.clear()
        store[key] = value
