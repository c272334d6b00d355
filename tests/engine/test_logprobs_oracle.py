"""Logprobs of generated tokens equal log_softmax of HF transformers' logits (CPU, fp32) within
1e-4; the top tokens are HF's most likely ones; penalties do not change them (raw logprobs)."""

import random

import pytest
import torch

from engine_helpers import TEST_DEVICE, Collector, make_engine
from tiny_models import build_tiny_checkpoint, hf_greedy
from tritonkv.sampling.params import SamplingParams

TOL = 1e-4 if TEST_DEVICE == "cpu" else 2e-2


def _built(name, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(name))
    hf = build_tiny_checkpoint(name, path)
    return hf, make_engine(path)


@pytest.fixture(scope="module", params=["llama", "qwen2_bias", "mistral_window"])
def family(request, tmp_path_factory):
    return _built(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _built("llama", tmp_path_factory)


def run(engine, ids, params, corr="lp"):
    c = Collector()
    engine.submit(corr, ids, params, c, start=True, end=True)
    engine.run_until_idle()
    return c


def test_greedy_logprobs_and_top_5_equal_hf_log_softmax(family):
    hf, engine = family
    rng = random.Random(3)
    ids = [1] + [rng.randrange(3, 96) for _ in range(12)]
    c = run(engine, ids, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=5))
    want_ids, hf_logits = hf_greedy(hf, ids, 10)
    entries = [e for o in c.outputs for e in (o.logprobs or [])]
    assert c.token_ids == want_ids and len(entries) == 10
    assert all(len(o.logprobs) == len(o.token_ids) for o in c.outputs)
    for token, entry, logits in zip(want_ids, entries, hf_logits):
        ref = torch.log_softmax(logits, -1)
        assert entry.token_id == token and entry.rank == 1  # greedy: the best token
        assert abs(entry.logprob - float(ref[token])) < TOL
        top_values, top_ids = torch.sort(ref, descending=True, stable=True)
        assert [t for t, _ in entry.top] == top_ids[:5].tolist()
        assert max(abs(v - float(r)) for (_, v), r in zip(entry.top, top_values[:5])) < TOL


def test_sampled_and_penalised_tokens_report_raw_logprobs_and_their_rank(llama):
    hf, engine = llama
    ids = [1, 17, 33, 33, 54, 80]
    params = SamplingParams(max_tokens=8, temperature=1.5, seed=9, ignore_eos=True, repetition_penalty=1.7,
                            logprobs=0)
    c = run(engine, ids, params)
    context = list(ids)
    with torch.no_grad():
        for o in c.outputs:
            for token, entry in zip(o.token_ids, o.logprobs):
                ref = torch.log_softmax(hf(torch.tensor([context])).logits[0, -1].float(), -1)
                assert abs(entry.logprob - float(ref[token])) < TOL and entry.top == []
                assert entry.rank == int((ref > ref[token]).sum()) + 1
                context.append(token)


def test_rows_without_logprobs_get_none_beside_rows_with_them(llama):
    hf, engine = llama
    a, b = Collector(), Collector()
    engine.submit("a", [1, 5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), a,
                  start=True, end=True)
    engine.submit("b", [1, 9, 8], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=20), b,
                  start=True, end=True)
    engine.run_until_idle()
    assert all(o.logprobs is None for o in a.outputs)
    assert all(len(e.top) == 20 for o in b.outputs for e in o.logprobs)
