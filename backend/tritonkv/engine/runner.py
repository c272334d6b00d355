"""The model runner: owns every tensor of a step and runs the model over the paged cache.

Rules:
- Step inputs live in persistent buffers sized at load (``max_num_batched_tokens`` tokens,
  ``max_num_seqs`` rows of ``max_model_len / block_size`` block ids). Each step fills the
  host side with numpy and copies each buffer to the device once (pinned, non-blocking on
  CUDA); nothing is rebuilt from Python lists on the device.
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
  ``launch`` returns at once, ``collect`` waits. A row may take its input token from the
  previous launch's sampled ids on the device (``from_prev``), so a decode step can be
  launched before the host has seen the tokens it continues (engine overlap).
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

    sampled: torch.Tensor | None  # device ids [num_samples]
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
        pin = dict(pin_memory=True) if cuda else {}

        def host(shape, dtype):
            return torch.zeros(shape, dtype=dtype, **pin)

        self._h_ids = host(self.max_tokens, torch.int64)
        self._h_pos = host(self.max_tokens, torch.int64)
        self._h_slots = host(self.max_tokens, torch.int64)
        self._h_rows = host(self.max_tokens, torch.int64)
        self._h_lens = host(self.max_seqs, torch.int32)
        self._h_qsl = host(self.max_seqs + 1, torch.int32)
        self._h_tables = host((self.max_seqs, self.max_blocks), torch.int32)
        self._h_src = host(self.max_seqs, torch.int64)  # from_prev: sample index in the last launch
        self._h_dst = host(self.max_seqs, torch.int64)  # from_prev: token index in this launch
        self._host = [self._h_ids, self._h_pos, self._h_slots, self._h_rows, self._h_lens, self._h_qsl,
                      self._h_tables, self._h_src, self._h_dst]
        # per-row sampling settings (uploaded only when a row samples at temperature > 0)
        self._h_temp = host(self.max_seqs, torch.float32)
        self._h_topk = host(self.max_seqs, torch.int64)
        self._h_topp = host(self.max_seqs, torch.float32)
        self._h_minp = host(self.max_seqs, torch.float32)
        # rows with a PenaltyState: batch row, slot, repetition / presence / frequency, min_tokens
        self._h_prow = host(self.max_seqs, torch.int64)
        self._h_pslot = host(self.max_seqs, torch.int64)
        self._h_rep = host(self.max_seqs, torch.float32)
        self._h_pres = host(self.max_seqs, torch.float32)
        self._h_freq = host(self.max_seqs, torch.float32)
        self._h_mintok = host(self.max_seqs, torch.int32)
        self._settings_host = [self._h_temp, self._h_topk, self._h_topp, self._h_minp, self._h_prow,
                               self._h_pslot, self._h_rep, self._h_pres, self._h_freq, self._h_mintok]
        self.penalties = PenaltyTable(model.config.vocab_size, device)
        self._settings_dev = [torch.zeros_like(t, device=device) for t in self._settings_host] \
            if cuda else self._settings_host
        # sampled ids come back into one of two pinned buffers, alternating (a step's ids are
        # read while the next step's copy is in flight)
        self._h_out = [host(self.max_seqs, torch.int64) for _ in range(2)]
        self._out_turn = 0
        self.block_mass = torch.zeros((self.max_seqs, self.max_blocks), dtype=torch.float32, device=device) \
            if collect_mass else None
        self._h_mass = [host((self.max_seqs, self.max_blocks), torch.float32) for _ in range(2)] \
            if collect_mass and cuda else None
        self._np = [t.numpy() for t in self._host]
        if cuda:
            self._dev = [torch.zeros_like(t, device=device) for t in self._host]
        else:
            self._dev = self._host  # the CPU path reads the host buffers directly
        (self.ids, self.positions, self.slots, self.sample_rows, self.seq_lens, self.query_start_loc,
         self.block_tables, self.prev_src, self.prev_dst) = self._dev
        # (batch size, context bound) -> (graph, its logits)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_pool = None
        # pinned inputs are rewritten each step: wait until the last step's copies were done
        self._uploaded = torch.cuda.Event() if cuda else None
        if cuda and enable_cuda_graphs:
            self.capture_graphs()

    # -- inputs ------------------------------------------------------------------------------
    def _fill(self, rows: list[StepRow], pad_to: int) -> tuple[int, int, int, list[int], int]:
        """Write the step into the host buffers; returns (tokens, max_query_len, max_seq_len,
        sample row indices, rows fed from the previous launch). Rows past ``len(rows)`` up to
        ``pad_to`` become padding."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
        ids, pos, slots, srows, lens, qsl, tables, src, dst = self._np
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
                src[num_prev] = row.from_prev
                dst[num_prev] = t
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
            tables[i, 0] = 0
            lens[i] = 1
            t += 1
            qsl[i + 1] = t
        srows[:len(sample_at)] = sample_at
        return t, max_q, max_len, sample_at, num_prev

    def _upload(self, num_tokens: int, num_seqs: int, num_samples: int, num_prev: int = 0) -> None:
        if self._dev is self._host:
            return
        sizes = [num_tokens, num_tokens, num_tokens, num_samples, num_seqs, num_seqs + 1, num_seqs,
                 num_prev, num_prev]
        for d, h, n in zip(self._dev, self._host, sizes):
            d[:n].copy_(h[:n], non_blocking=True)

    def _batch(self, num_tokens: int, num_seqs: int, max_q: int, max_len: int) -> AttentionBatch:
        """The step's attention metadata, made once for every layer (the decode plan included)."""
        batch = AttentionBatch(
            positions=self.positions[:num_tokens], slot_mapping=self.slots[:num_tokens],
            block_tables=self.block_tables[:num_seqs], seq_lens=self.seq_lens[:num_seqs],
            query_start_loc=self.query_start_loc[:num_seqs + 1], max_query_len=max_q,
            max_seq_len=max_len, block_mass=None if self.block_mass is None else self.block_mass[:num_seqs],
            sliding_window=self.model.config.sliding_window)
        k_cache, v_cache = self.kv_caches[0][:2]
        return dispatch.plan_step(batch, k_cache, v_cache, self.dtype)

    # -- one step ----------------------------------------------------------------------------
    def launch(self, rows: list[StepRow], prev: StepHandle | None = None) -> StepHandle:
        """Queue one step on the device and return without waiting for it. Rows with
        ``from_prev`` read their input token from ``prev``'s sampled ids."""
        t0 = time.perf_counter()
        n = len(rows)
        decode = all(len(r.token_ids) == 1 and r.prompt_targets is None for r in rows)
        key = self._graph_key(n, max(r.start + 1 for r in rows)) if decode and rows else None
        graph_bs = key[0] if key else None
        tokens, max_q, max_len, sample_at, num_prev = self._fill(rows, graph_bs or n)
        self._upload(tokens, graph_bs or n, len(sample_at), num_prev)
        if num_prev:
            self.ids.index_copy_(0, self.prev_dst[:num_prev], prev.sampled.index_select(0, self.prev_src[:num_prev]))
        samplers = [r for r in rows if r.sample]
        params = [r.params for r in samplers]
        settings = self._row_settings(params, [r.penalty for r in samplers]) if samplers else None
        if self._uploaded is not None:
            self._uploaded.record()  # every pinned input of this step is now queued for copy
        t1 = time.perf_counter()
        if self.block_mass is not None:
            self.block_mass.zero_()
        if key is not None:
            graph, logits = self.graphs[key]
            graph.replay()
            logits = logits[:n] if len(sample_at) == n else logits[self.sample_rows[:len(sample_at)]]
        else:
            hidden = self.model(self.ids[:tokens], self._batch(tokens, n, max_q, max_len), self.kv_caches)
            logits = self.model.logits(hidden[self.sample_rows[:len(sample_at)]]) if sample_at else None
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
            guided = apply_masks(logits, [r.grammar for r in samplers], self.model.config.vocab_size)
            handle.sampled = sample_ids(guided, params, [r.generator for r in samplers], settings)
            asked = [j for j, p in enumerate(params) if p.logprobs is not None]
            if asked:  # of the raw logits (sampling/logprobs.py)
                batch = lp.compute(logits, handle.sampled, asked, max(params[j].logprobs for j in asked))
                handle.logprobs = batch.to_host(pinned=self.device.type == "cuda")
            if self.device.type == "cuda":
                handle.host = self._h_out[self._out_turn][:len(sample_at)]
                self._out_turn ^= 1
                handle.host.copy_(handle.sampled, non_blocking=True)
                handle.done = torch.cuda.Event()
                handle.done.record()
            else:
                handle.host = handle.sampled
        elif handle.mass is not None and self.device.type == "cuda":
            handle.done = torch.cuda.Event()
            handle.done.record()
        handle.times = StepTimes(t1 - t0, t2 - t1, time.perf_counter() - t2, graph_bs is not None)
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

    def _row_settings(self, params: list[SamplingParams], states: list[PenaltyState | None]) -> RowSettings | None:
        penalised = [i for i, s in enumerate(states) if s is not None]
        if not penalised and all(p.temperature < GREEDY_BELOW for p in params):
            return None
        n, m = len(params), len(penalised)
        temp, topk, topp, minp, prow, pslot, rep, pres, freq, mintok = (t.numpy() for t in self._settings_host)
        for i, p in enumerate(params):
            temp[i], topk[i], topp[i], minp[i] = p.temperature, p.top_k, p.top_p, p.min_p
        for j, i in enumerate(penalised):
            p = params[i]
            prow[j], pslot[j] = i, states[i].slot
            rep[j], pres[j], freq[j], mintok[j] = (p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
                                                   p.min_tokens)
        dev = self._settings_dev
        if dev is not self._settings_host:
            for k, (d, h) in enumerate(zip(dev, self._settings_host)):
                size = n if k < 4 else m
                d[:size].copy_(h[:size], non_blocking=True)
        penalties = PenaltyRows(self.penalties, *(d[:m] for d in dev[4:])) if m else None
        return RowSettings(dev[0][:n], dev[1][:n], dev[2][:n], uses_filter(params),
                           dev[3][:n] if uses_min_p(params) else None, penalties)

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
            tokens, _, _, _, _ = self._fill([], bs)
            self._upload(tokens, bs, 0)
            batch = self._batch(bs, bs, 1, bound)
            for _ in range(2):  # compile the Triton kernels and warm cuBLAS outside the capture
                self.model.logits(self.model(self.ids[:bs], batch, self.kv_caches))
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                logits = self.model.logits(self.model(self.ids[:bs], batch, self.kv_caches))
            self.graphs[(bs, bound)] = (graph, logits)
            log.debug("captured decode CUDA graph: batch %d, context <= %d", bs, bound)
        torch.cuda.synchronize(self.device)
        used = free0 - torch.cuda.mem_get_info(self.device)[0]
        log.info("captured %d decode CUDA graphs (batch 1..%d, context buckets %s) in %.1f s, %.0f MiB",
                 len(keys), self.max_seqs, context_buckets(self.max_model_len), time.perf_counter() - t0,
                 used / 2**20)
