"""The model runner: owns every tensor of a step and runs the model over the paged cache.

Rules:
- Step inputs live in one packed buffer sized at load (``max_num_batched_tokens`` tokens,
  ``max_num_seqs`` rows of ``max_model_len / block_size`` block ids, sampling settings;
  engine/step_inputs.py). Each step fills its host side with numpy and reaches the device in
  one copy (pinned, non-blocking on CUDA); nothing is rebuilt from Python lists on the device.
- Decode steps (every scheduled sequence computes exactly one token) replay a CUDA graph
  captured at load for the smallest captured batch size >= the step's; padded rows write no
  KV (slot -1) and attend to one token of block 0; their outputs are never read. Prefill and
  mixed steps run eagerly. The decode kernel sizes its split of the keys from a bound on the
  context length (``max_seq_len``), frozen at capture: batches of up to
  ``SPLIT_BUCKET_MAX_BATCH`` sequences (whose kernels split the keys) get one graph per
  context bucket (``context_buckets``) and replay the smallest bucket that holds the step's
  longest context; larger batches (one split per sequence) get one graph at ``max_model_len``.
- A step's logits exist only for the rows that sample; sampling is batched
  (engine/sampler.py) and its ids come back in one asynchronous device-to-host copy:
  ``launch`` returns at once, ``collect`` waits. A decode graph ends with the argmax of its
  rows, so a greedy graph step (no penalties, grammar or logprobs) samples nothing outside it.
- Every launch that samples leaves its ids, in sample order, in ``last_ids`` (fixed address).
  A row may take its input token from there (``from_prev``: the previous launch's sample
  number), inside the graph, so a decode step can be launched before the host has seen the
  tokens it continues (engine overlap).
- A row's ``start`` is a cache index (where its first token lands in its block table); its
  tokens are rotated at ``cache index + angle_shift`` (cache/kv_cache_manager.py: evicted
  blocks leave the table dense, the angles keep the distances the policy defines).
- ``collect_mass`` (h2o): each step also sums, per row and table block, the attention mass
  the row's last query gives (every layer and head), and brings it back with the ids.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from tritonkv.engine.requests import SamplingParams
from tritonkv.engine.sampler import GREEDY_BELOW, PenaltyRows, RowSettings, sample_ids, uses_filter, uses_min_p
from tritonkv.engine.step_inputs import StepInputs
from tritonkv.ops import dispatch
from tritonkv.ops.attention_batch import AttentionBatch
from tritonkv.sampling import logprobs as lp
from tritonkv.sampling.grammar import GrammarState, apply_masks
from tritonkv.sampling.penalty_state import PenaltyState, PenaltyTable

log = logging.getLogger("tritonkv.runner")


SPLIT_BUCKET_MAX_BATCH = 8
FIRST_CONTEXT_BUCKET = 512


def context_buckets(max_model_len: int) -> list[int]:
    """512, 2048, 8192, ... below ``max_model_len``, then ``max_model_len``."""
    buckets, b = [], FIRST_CONTEXT_BUCKET
    while b < max_model_len:
        buckets.append(b)
        b *= 4
    return buckets + [max_model_len]


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, then steps of 16 up to ``max_num_seqs`` (which is always included)."""
    sizes = [b for b in (1, 2, 4, 8, 16) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))[1:] if max_num_seqs > 16 else []
    return sorted(set(sizes + [max_num_seqs]))


@dataclass
class StepTimes:
    """Host seconds of one launch: filling and uploading inputs, launching the forward (a graph
    replay or eager kernels), launching the sampler; none of them waits for the GPU."""

    prepare: float = 0.0
    forward: float = 0.0
    sample: float = 0.0
    graph: bool = False
    h2d_copies: int = 0  # host-to-device copies of the step's inputs (one: engine/step_inputs.py)


@dataclass
class StepRow:
    """One scheduled sequence of a step, as the runner needs it."""

    token_ids: list[int]  # the tokens computed this step
    start: int  # position of the first of them
    block_table: list[int]
    sample: bool
    params: SamplingParams | None = None
    generator: torch.Generator | None = None
    from_prev: int = -1  # >= 0: the one input token is sample number ``from_prev`` of the
    # previous launch (still on the device); ``token_ids`` then holds a placeholder
    angle_shift: int = 0  # rotary position = cache index + angle_shift
    penalty: PenaltyState | None = None  # the turn's token state (sampling/penalty_state.py)
    # prompt logprobs: per computed token, the id whose logprob its logits give (the next
    # prompt token) or -1 (none wanted); the row then runs eagerly (sampling/logprobs.py)
    prompt_targets: list[int] | None = None
    grammar: GrammarState | None = None  # structured output: its token mask applies to this row


@dataclass
class StepHandle:
    """A launched step: its sampled ids arrive in ``host`` once ``done`` has fired."""

    sampled: torch.Tensor | None  # device ids [num_samples]; a view of last_ids on greedy graph
    # steps: valid for work queued before the next launch
    host: torch.Tensor | None
    done: torch.cuda.Event | None
    num_samples: int
    times: StepTimes | None = None
    mass: torch.Tensor | None = None  # [rows, table blocks] float32 (collect_mass), host
    logprobs: lp.LogprobBatch | None = None  # host, for the sampled rows that asked
    prompt_logprobs: dict[int, list[tuple | None]] | None = None  # row -> per token (prompt_targets)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches, *, block_size: int, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int, device: torch.device,
                 enable_cuda_graphs: bool = True, collect_mass: bool = False):
        self.model = model
        self.dtype = next(model.parameters()).dtype
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.device = device
        self.max_seqs = max_num_seqs
        self.max_tokens = max(max_num_batched_tokens, max_num_seqs)
        self.max_blocks = -(-max_model_len // block_size)
        cuda = device.type == "cuda"
        # every per-step input in one packed buffer, one copy per step (engine/step_inputs.py)
        self.inputs = StepInputs(self.max_tokens, self.max_seqs, self.max_blocks, device)
        self.penalties = PenaltyTable(model.config.vocab_size, device)
        # the last launch's sampled ids, in sample order, at a fixed address: a row fed from the
        # previous launch (``from_prev``) gathers its token from here, inside the decode graph
        self.last_ids = torch.zeros(self.max_seqs, dtype=torch.int64, device=device)
        # sampled ids come back into one of two pinned buffers, alternating (a step's ids are
        # read while the next step's copy is in flight)
        pin = dict(pin_memory=True) if cuda else {}
        self._h_out = [torch.zeros(self.max_seqs, dtype=torch.int64, **pin) for _ in range(2)]
        self._out_turn = 0
        self.block_mass = torch.zeros((self.max_seqs, self.max_blocks), dtype=torch.float32, device=device) \
            if collect_mass else None
        self._h_mass = [torch.zeros((self.max_seqs, self.max_blocks), dtype=torch.float32, **pin)
                        for _ in range(2)] if collect_mass and cuda else None
        # (batch size, context bound) -> (graph, its logits)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_pool = None
        self._last_launch: StepHandle | None = None  # the last launch that sampled (its ids: last_ids)
        if cuda and enable_cuda_graphs:
            self.capture_graphs()

    # -- inputs ------------------------------------------------------------------------------
    def _fill(self, rows: list[StepRow], pad_to: int) -> tuple[int, int, int, list[int], int]:
        """Write the step into the packed host buffer (engine/step_inputs.py), sampling settings
        included; returns (tokens, max_query_len, max_seq_len, sample row indices, rows fed
        from the previous launch). Rows past ``len(rows)`` up to ``pad_to`` become padding."""
        samplers = [r for r in rows if r.sample]
        penalised = [j for j, r in enumerate(samplers) if r.penalty is not None]
        settings = penalised or any(r.params is not None and r.params.temperature >= GREEDY_BELOW for r in samplers)
        tokens = sum(len(r.token_ids) for r in rows) + pad_to - len(rows)
        v = self.inputs.begin(self.inputs.sizes(tokens, pad_to, len(samplers), len(samplers) if settings else 0,
                                                len(penalised) if settings else 0))
        ids, pos, src, slots, lens, qsl, tables = (v[k] for k in ("ids", "positions", "prev_src", "slots", "seq_lens",
                                                                  "query_start_loc", "block_tables"))
        tables.fill(0)  # entries past a row's table read block 0, never stale bytes
        src.fill(-1)
        num_prev = 0
        bs = self.block_size
        t = 0
        max_q = max_len = 0
        sample_at = []
        qsl[0] = 0
        for i, row in enumerate(rows):
            n = len(row.token_ids)
            end = row.start + n
            table = row.block_table
            if row.from_prev >= 0:
                src[t] = row.from_prev
                num_prev += 1
            if n == 1:
                ids[t] = row.token_ids[0]
                pos[t] = row.start + row.angle_shift
                slots[t] = table[row.start // bs] * bs + row.start % bs
            else:
                p = np.arange(row.start, end)
                ids[t:t + n] = row.token_ids
                pos[t:t + n] = p + row.angle_shift
                slots[t:t + n] = np.asarray(table, dtype=np.int64)[p // bs] * bs + p % bs
            tables[i, :len(table)] = table
            lens[i] = end
            t += n
            qsl[i + 1] = t
            max_q = max(max_q, n)
            max_len = max(max_len, end)
            if row.sample:
                sample_at.append(t - 1)
        for i in range(len(rows), pad_to):  # graph padding: one query row, no KV write
            ids[t] = 0
            pos[t] = 0
            slots[t] = -1
            lens[i] = 1
            t += 1
            qsl[i + 1] = t
        v["sample_rows"][:] = sample_at
        if settings:
            self._fill_settings(v, samplers, penalised)
        return t, max_q, max_len, sample_at, num_prev

    @staticmethod
    def _fill_settings(v: dict[str, np.ndarray], samplers: list[StepRow], penalised: list[int]) -> None:
        """Per sampling row: temperature, top-k, top-p, min-p; per penalised row (index among
        the sampling rows): its slot and penalties."""
        for i, r in enumerate(samplers):
            p = r.params
            v["temperature"][i], v["top_k"][i], v["top_p"][i], v["min_p"][i] = p.temperature, p.top_k, p.top_p, p.min_p
        for j, i in enumerate(penalised):
            p = samplers[i].params
            v["penalty_rows"][j], v["penalty_slots"][j] = i, samplers[i].penalty.slot
            v["repetition"][j], v["presence"][j], v["frequency"][j], v["min_tokens"][j] = (
                p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.min_tokens)

    def _input_ids(self, v: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step's token ids, rows fed from the previous launch taking its sampled id from
        ``last_ids`` (graph-capturable: fixed shapes, no host sync)."""
        src = v["prev_src"]
        return torch.where(src >= 0, self.last_ids.index_select(0, src.clamp(min=0)), v["ids"])

    def _batch(self, v: dict[str, torch.Tensor], num_seqs: int, max_q: int, max_len: int) -> AttentionBatch:
        """The step's attention metadata, made once for every layer (the decode plan included)."""
        batch = AttentionBatch(
            positions=v["positions"], slot_mapping=v["slots"], block_tables=v["block_tables"],
            seq_lens=v["seq_lens"], query_start_loc=v["query_start_loc"], max_query_len=max_q,
            max_seq_len=max_len, block_mass=None if self.block_mass is None else self.block_mass[:num_seqs],
            sliding_window=self.model.config.sliding_window)
        k_cache, v_cache = self.kv_caches[0][:2]
        return dispatch.plan_step(batch, k_cache, v_cache, self.dtype)

    # -- one step ----------------------------------------------------------------------------
    def launch(self, rows: list[StepRow], prev: StepHandle | None = None) -> StepHandle:
        """Queue one step on the device and return without waiting for it. Rows with
        ``from_prev`` read their input token from the sampled ids of ``prev``, which must be
        the last launch (its ids wait in ``last_ids``)."""
        t0 = time.perf_counter()
        n = len(rows)
        decode = all(len(r.token_ids) == 1 and r.prompt_targets is None for r in rows)
        key = self._graph_key(n, max(r.start + 1 for r in rows)) if decode and rows else None
        graph_bs = key[0] if key else None
        tokens, max_q, max_len, sample_at, num_prev = self._fill(rows, graph_bs or n)
        if num_prev and (prev is None or prev is not self._last_launch):
            raise ValueError("rows fed from the previous launch need that launch, the last one, as prev")
        uploads = self.inputs.h2d_copies
        self.inputs.upload()
        v = self.inputs.views()
        samplers = [r for r in rows if r.sample]
        params = [r.params for r in samplers]
        settings = self._row_settings(params, v)
        t1 = time.perf_counter()
        if self.block_mass is not None:
            self.block_mass.zero_()
        # greedy rows of a graph step take the argmax the graph computed into last_ids
        in_graph = (key is not None and len(sample_at) == n and settings is None
                    and all(r.grammar is None and r.params.logprobs is None for r in samplers))
        if key is not None:
            graph, logits = self.graphs[key]
            graph.replay()
            logits = logits[:n] if len(sample_at) == n else logits[v["sample_rows"]]
        else:
            ids = self._input_ids(v) if num_prev else v["ids"]
            hidden = self.model(ids, self._batch(v, n, max_q, max_len), self.kv_caches)
            logits = self.model.logits(hidden[v["sample_rows"]]) if sample_at else None
        t2 = time.perf_counter()
        handle = StepHandle(None, None, None, len(sample_at))
        if key is None and any(r.prompt_targets is not None for r in rows):
            handle.prompt_logprobs = self._prompt_logprobs(hidden, rows)
        if self.block_mass is not None:
            if self._h_mass is not None:
                handle.mass = self._h_mass[self._out_turn][:n]
                handle.mass.copy_(self.block_mass[:n], non_blocking=True)
            else:
                handle.mass = self.block_mass[:n].clone()
        if sample_at:
            if in_graph:
                handle.sampled = self.last_ids[:n]
            else:
                guided = apply_masks(logits, [r.grammar for r in samplers], self.model.config.vocab_size)
                handle.sampled = sample_ids(guided, params, [r.generator for r in samplers], settings)
                self.last_ids[:len(sample_at)].copy_(handle.sampled)  # for the next launch's from_prev rows
            asked = [j for j, p in enumerate(params) if p.logprobs is not None]
            if asked:  # of the raw logits (sampling/logprobs.py)
                batch = lp.compute(logits, handle.sampled, asked, max(params[j].logprobs for j in asked))
                handle.logprobs = batch.to_host(pinned=self.device.type == "cuda")
            if self.device.type == "cuda":
                handle.host = self._h_out[self._out_turn][:len(sample_at)]
                self._out_turn ^= 1
                handle.host.copy_(handle.sampled, non_blocking=True)  # the step's one device-to-host copy
                handle.done = torch.cuda.Event()
                handle.done.record()
            else:
                handle.host = handle.sampled
            self._last_launch = handle
        elif handle.mass is not None and self.device.type == "cuda":
            handle.done = torch.cuda.Event()
            handle.done.record()
        handle.times = StepTimes(t1 - t0, t2 - t1, time.perf_counter() - t2, graph_bs is not None,
                                 self.inputs.h2d_copies - uploads)
        return handle

    def collect(self, handle: StepHandle) -> list[int]:
        """Wait for a launched step; its sampled ids in row order (``handle.mass`` is then
        readable too)."""
        if handle.done is not None:
            handle.done.synchronize()
        if handle.num_samples == 0:
            return []
        return handle.host.tolist()

    @staticmethod
    def collect_logprobs(handle: StepHandle) -> list[tuple | None]:
        """After ``collect``: per sampled row, (chosen logprob, rank, top ids, top logprobs) or
        None where the row did not ask."""
        return lp.per_row(handle.logprobs, handle.num_samples)

    def _prompt_logprobs(self, hidden: torch.Tensor, rows: list[StepRow]) -> dict[int, list[tuple | None]]:
        """Rows with ``prompt_targets``: the logits of each of their tokens (only these rows'),
        log_softmax'ed against the target (sampling/logprobs.py: ``prompt_logprobs``). Waits for
        the device (prompt logprobs are a prefill-time, opt-in cost)."""
        out, t = {}, 0
        for i, row in enumerate(rows):
            n = len(row.token_ids)
            if row.prompt_targets is not None:
                out[i] = lp.prompt_logprobs(self.model.logits, hidden[t:t + n], row.prompt_targets,
                                            row.params.prompt_logprobs or 0)
            t += n
        return out

    def _row_settings(self, params: list[SamplingParams], v: dict[str, torch.Tensor]) -> RowSettings | None:
        """The sampler's per-row settings, device views of what ``_fill`` packed; None where
        every sampling row is greedy and unpenalised (nothing was packed)."""
        if not v["temperature"].shape[0]:
            return None
        m = v["penalty_rows"].shape[0]
        penalties = PenaltyRows(self.penalties, *(v[k] for k in ("penalty_rows", "penalty_slots", "repetition",
                                                                 "presence", "frequency", "min_tokens"))) if m else None
        return RowSettings(v["temperature"], v["top_k"], v["top_p"], uses_filter(params),
                           v["min_p"] if uses_min_p(params) else None, penalties)

    def _graph_key(self, n: int, max_len: int) -> tuple[int, int] | None:
        """The captured graph for ``n`` sequences whose longest context is ``max_len``."""
        best = None
        for bs, bound in self.graphs:
            if bs >= n and bound >= max_len and (best is None or (bs, bound) < best):
                best = (bs, bound)
        return best

    # -- CUDA graphs -------------------------------------------------------------------------
    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Capture the decode graphs (largest first, one shared memory pool)."""
        keys = [(bs, bound) for bs in graph_batch_sizes(self.max_seqs)
                for bound in (context_buckets(self.max_model_len) if bs <= SPLIT_BUCKET_MAX_BATCH
                              else [self.max_model_len])]
        t0 = time.perf_counter()
        free0 = torch.cuda.mem_get_info(self.device)[0]
        self.graph_pool = torch.cuda.graph_pool_handle()
        for bs, bound in sorted(keys, reverse=True):
            self._fill([], bs)
            self.inputs.upload()
            v = self.inputs.views()  # the addresses every replay for batch bs reads
            batch = self._batch(v, bs, 1, bound)

            def decode_step():  # from-previous ids in, greedy ids out (into last_ids)
                logits = self.model.logits(self.model(self._input_ids(v), batch, self.kv_caches))
                torch.argmax(logits, dim=-1, out=self.last_ids[:bs])
                return logits

            for _ in range(2):  # compile the Triton kernels and warm cuBLAS outside the capture
                decode_step()
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                logits = decode_step()
            self.graphs[(bs, bound)] = (graph, logits)
            log.debug("captured decode CUDA graph: batch %d, context <= %d", bs, bound)
        torch.cuda.synchronize(self.device)
        used = free0 - torch.cuda.mem_get_info(self.device)[0]
        log.info("captured %d decode CUDA graphs (batch 1..%d, context buckets %s) in %.1f s, %.0f MiB",
                 len(keys), self.max_seqs, context_buckets(self.max_model_len), time.perf_counter() - t0,
                 used / 2**20)
