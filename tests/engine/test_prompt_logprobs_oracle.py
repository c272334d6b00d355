"""Prompt logprobs equal log_softmax of HF transformers' logits at each prompt position (CPU,
fp32) within 1e-4: whole prompts, chunked prefills, a later turn of a conversation, and a
prompt whose prefix sits in the prefix cache (the request takes no hit, so every position is
computed and reported)."""

import random

import pytest
import torch

from engine_helpers import TEST_DEVICE, Collector, make_engine
from tiny_models import build_tiny_checkpoint
from tritonkv.sampling.params import SamplingParams

TOL = 1e-4 if TEST_DEVICE == "cpu" else 2e-2


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    return path, build_tiny_checkpoint("llama", path)


def hf_prompt_logprobs(hf, ids):
    """log_softmax of HF's logits: row q-1 scores token q."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def run(engine, corr, ids, params, start=True, end=True):
    c = Collector()
    engine.submit(corr, ids, params, c, start=start, end=end)
    engine.run_until_idle()
    return c


def check(entries, ids, ref, k, first=0):
    """``entries`` for ids[first:]; ``ref`` rows over the whole context."""
    for q, entry in enumerate(entries, start=first):
        if q == 0:
            assert entry is None  # nothing comes before a conversation's first token
            continue
        row = ref[q - 1]
        assert entry.token_id == ids[q]
        assert abs(entry.logprob - float(row[ids[q]])) < TOL
        assert entry.rank == int((row > row[ids[q]]).sum()) + 1
        values, order = torch.sort(row, descending=True, stable=True)
        assert [t for t, _ in entry.top] == order[:k].tolist()
        assert max((abs(v - float(w)) for (_, v), w in zip(entry.top, values[:k])), default=0) < TOL


@pytest.mark.parametrize("chunk", [None, 5])
def test_prompt_logprobs_equal_hf_log_softmax(llama, chunk):
    path, hf = llama
    engine = make_engine(path, **({"max_num_batched_tokens": chunk} if chunk else {}))
    rng = random.Random(5)
    ids = [1] + [rng.randrange(3, 96) for _ in range(17)]
    c = run(engine, "p", ids, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=3))
    firsts = [o.prompt_logprobs for o in c.outputs if o.prompt_logprobs is not None]
    assert len(firsts) == 1 and c.outputs[0].prompt_logprobs is firsts[0]  # once, on the first token
    entries = firsts[0]
    assert len(entries) == len(ids)
    check(entries, ids, hf_prompt_logprobs(hf, ids), 3)


def test_a_cached_prefix_is_recomputed_for_prompt_logprobs(llama):
    path, hf = llama
    engine = make_engine(path)
    ids = [1] + list(range(10, 30))
    warm = run(engine, "w", ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    hit = run(engine, "h", ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    assert warm.outputs[-1].cached_tokens == 0 and hit.outputs[-1].cached_tokens == 20  # the cache holds it
    c = run(engine, "p", ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=0))
    assert c.outputs[-1].cached_tokens == 0
    entries = c.outputs[0].prompt_logprobs
    assert len(entries) == len(ids) and all(e is not None for e in entries[1:])
    check(entries, ids, hf_prompt_logprobs(hf, ids), 0)


def test_a_later_turn_reports_its_own_prompt_given_the_conversation(llama):
    path, hf = llama
    engine = make_engine(path)
    first = [1, 40, 41, 42, 43]
    a = run(engine, "conv", first, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), end=False)
    second = [50, 51, 52, 53, 54, 55]
    b = run(engine, "conv", second, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True,
                                                   prompt_logprobs=2), start=False)
    context = first + a.token_ids + second
    entries = b.outputs[0].prompt_logprobs
    assert len(entries) == len(second) and entries[0] is not None  # the first is scored given the history
    check(entries, context, hf_prompt_logprobs(hf, context), 2, first=len(first) + len(a.token_ids))


def test_rows_without_prompt_logprobs_get_none(llama):
    path, _ = llama
    engine = make_engine(path)
    c = run(engine, "n", [1, 5, 6, 7], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    assert all(o.prompt_logprobs is None for o in c.outputs)
