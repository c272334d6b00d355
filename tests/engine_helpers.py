"""Drive an Engine synchronously in tests (no Triton, no thread)."""

from __future__ import annotations

import os

import torch

from tritonkv.config import EngineConfig
from tritonkv.engine.factory import build_engine
from tritonkv.engine.requests import SamplingParams
from tritonkv.ops.attention_batch import AttentionBatch
from tritonkv.ops.kv_swap import run_swaps


# The same tests run on a GPU (kernels instead of torch references) with TRITONKV_TEST_DEVICE=cuda.
TEST_DEVICE = os.environ.get("TRITONKV_TEST_DEVICE", "cpu")


def make_engine(checkpoint: str, **overrides):
    # the host tier only where a test asks for it (auto would turn it on under CUDA and change
    # which victims are preempted)
    settings = {"block_size": 4, "num_blocks": 256, "device": TEST_DEVICE, "dtype": "float32",
                "kv_host_memory_gb": 0, **overrides}
    cfg = EngineConfig(checkpoint=checkpoint, **settings)
    return build_engine(cfg)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


class Collector:
    """Gathers one turn's streamed outputs."""

    def __init__(self):
        self.outputs = []

    def __call__(self, out):
        self.outputs.append(out)

    @property
    def token_ids(self):
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def text(self):
        return "".join(o.text for o in self.outputs)

    @property
    def final(self):
        assert self.outputs and self.outputs[-1].finished, "turn did not finish"
        assert sum(o.finished for o in self.outputs) == 1
        return self.outputs[-1]


def run_turn(engine, corr_id, prompt_ids, max_tokens, *, start, end, **kw) -> Collector:
    c = Collector()
    engine.submit(corr_id, prompt_ids, greedy(max_tokens), c, start=start, end=end, **kw)
    engine.run_until_idle()
    return c


def run_conversations(engine, prompts, max_tokens) -> list[Collector]:
    """One single-turn conversation per prompt (ids 0, 1, ...), all submitted before the
    engine runs, so they share steps; ``max_tokens``: one value, or one per prompt."""
    counts = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    collectors = [Collector() for _ in prompts]
    for i, (p, n, c) in enumerate(zip(prompts, counts, collectors)):
        engine.submit(i, p, greedy(n), c, start=True, end=True)
    engine.run_until_idle()
    return collectors


def engine_prefill_logits(engine, ids):
    """The engine's first step over a whole prompt, run through the model directly: logits of
    every prompt token (the sequence's blocks are released after)."""
    engine.kv.start("probe", ids)
    assert engine.kv.grow("probe", len(ids))
    run_swaps(engine.kv, engine.swapper)  # tier copies the lookup or growth queued, before any write
    table, bs, dev = engine.kv.block_table("probe"), engine.pool.block_size, engine.device
    batch = AttentionBatch(
        positions=torch.arange(len(ids), device=dev),
        slot_mapping=torch.tensor([table[p // bs] * bs + p % bs for p in range(len(ids))], device=dev),
        block_tables=torch.tensor([table], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([len(ids)], dtype=torch.int32, device=dev),
        query_start_loc=torch.tensor([0, len(ids)], dtype=torch.int32, device=dev),
        max_query_len=len(ids), sliding_window=engine.model_config.sliding_window)
    logits = engine.model.logits(engine.model(torch.tensor(ids, device=dev), batch, engine.kv_caches)).cpu()
    engine.kv.release("probe")
    return logits
