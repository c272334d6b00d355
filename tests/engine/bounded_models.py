"""Tiny checkpoints and drivers for the bounded-KV tests (sliding window, streaming, h2o)."""

from __future__ import annotations

import os
import random

import pytest
import torch

from dense_policy_reference import NEAR_TIE
from engine_helpers import TEST_DEVICE, Collector, greedy
from tiny_models import BASE


def build_checkpoint(path: str, arch: str = "LlamaForCausalLM", seed: int = 0, **overrides):
    """An HF checkpoint with the shared tiny shape (tests/tiny_models.py) plus ``overrides``
    (e.g. ``sliding_window``, ``max_position_embeddings``); returns the HF model (fp32, eager
    attention, eval)."""
    import transformers

    spec = {**BASE, "architectures": [arch], **overrides}
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**spec)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).float().eval()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return model


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 96) for _ in range(n - 1)]


@torch.no_grad()
def assert_hf_greedy(model, context: list[int], generated: list[int]) -> None:
    """A generated stream equals HF greedy decoding iff each token is HF's choice after the
    tokens before it (induction over the stream; one full forward pass). On CUDA (another summation
    order) a token whose HF logit is within NEAR_TIE of HF's best is a tie, not a difference."""
    rows = model(torch.tensor([context + generated])).logits[0][len(context) - 1: len(context) - 1 + len(generated)]
    expected = rows.argmax(-1).tolist()
    if TEST_DEVICE == "cpu":
        bad = [i for i, (a, b) in enumerate(zip(generated, expected)) if a != b]
    else:
        chosen = rows[torch.arange(len(generated)), torch.tensor(generated)]
        bad = (chosen < rows.max(-1).values - NEAR_TIE).nonzero().flatten().tolist()
    first_bad = bad[0] if bad else None
    assert first_bad is None, f"token {first_bad}: engine {generated[first_bad]} != HF {expected[first_bad]}"


def run_tracking_blocks(engine, corr_id, prompt_ids, max_tokens, *, start=True, end=True):
    """Run one turn step by step; returns (collector, most pool blocks the sequence held,
    most blocks in its table)."""
    c = Collector()
    engine.submit(corr_id, prompt_ids, greedy(max_tokens), c, start=start, end=end)
    most = table = 0
    for _ in range(1_000_000):
        engine._drain()
        if not engine._seqs or all(s.status.value != "running" for s in engine._seqs.values()):
            break
        engine.step()
        for seq_id in engine.kv.live_sequences():
            most = max(most, engine.kv.held_blocks(seq_id))
            table = max(table, len(engine.kv.block_table(seq_id)))
    engine.run_until_idle()
    return c, most, table


def one_thread():
    """Tiny ops on a loaded 2-core machine: one intra-op thread avoids OpenMP barrier waits
    (a test fixture restores the setting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    return before


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Module fixture (import it into a test module): one torch thread while it runs."""
    before = one_thread()
    yield
    torch.set_num_threads(before)
