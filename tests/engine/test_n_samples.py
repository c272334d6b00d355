"""n > 1 and best_of on one prompt's KV (engine/sample_group.py). Oracles: the same request
sent alone (n = 1, the sample's seed, no prefix cache), HF transformers (greedy tokens, and
the cumulative logprobs best_of ranks by), and block counts worked out by hand."""

import random

import pytest
import torch

from engine_helpers import Collector, make_engine
from tiny_models import build_tiny_checkpoint, hf_greedy
from tritonkv.sampling.params import ParameterError, SamplingParams, check_sampling

BS = 4  # make_engine's block size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama_n"))
    return path, build_tiny_checkpoint("llama", path)


@pytest.fixture(scope="module")
def alone(tiny):
    """The oracle engine: every request alone, nothing cached."""
    return make_engine(tiny[0], enable_prefix_caching=False)


def prompt(n, seed):
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 96) for _ in range(n - 1)]


def by_choice(outputs):
    """choice index -> its token ids, finish reason; checks the request ended once, last."""
    assert [o.finished for o in outputs].count(True) == 1 and outputs[-1].finished
    choices = {}
    for o in outputs:
        c = choices.setdefault(o.index, {"ids": [], "reason": None, "logprobs": []})
        c["ids"] += o.token_ids
        c["logprobs"] += o.logprobs or []
        if o.finish_reason is not None:
            assert c["reason"] is None, f"choice {o.index} ended twice"
            c["reason"] = o.finish_reason
    return choices


def run(engine, ids, params, corr="r", **kw):
    c = Collector()
    engine.submit(corr, ids, params, c, start=True, end=True, stateless=True, **kw)
    engine.run_until_idle()
    return c


def sampled(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.9, top_k=40, ignore_eos=True, **kw)


def test_each_seeded_sample_equals_the_request_sent_alone_with_its_seed(tiny, alone):
    engine = make_engine(tiny[0])
    ids = prompt(14, 0)
    choices = by_choice(run(engine, ids, sampled(10, seed=1234, n=4)).outputs)
    assert sorted(choices) == [0, 1, 2, 3]
    for i in range(4):
        single = run(alone, ids, sampled(10, seed=1234 + i))
        assert choices[i]["ids"] == single.token_ids, f"sample {i}"
        assert choices[i]["reason"] == "length"
    assert len({tuple(c["ids"]) for c in choices.values()}) > 1  # the seeds differ, so do the samples
    assert engine.pool.counts()["used"] == 0


def test_greedy_samples_all_equal_hf_greedy(tiny):
    path, hf = tiny
    engine = make_engine(path)
    ids = prompt(9, 1)
    choices = by_choice(run(engine, ids, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                        n=3)).outputs)
    expected, _ = hf_greedy(hf, ids, 12)
    assert [choices[i]["ids"] for i in range(3)] == [expected] * 3


def test_prompt_blocks_are_allocated_once_and_shared_by_reference(tiny):
    # a 14-token prompt, blocks of 4: the parent computes tokens 0..11 (3 whole blocks, the
    # last token is never shared); each of 4 samples holds those 3 blocks and one block of its
    # own for tokens 12, 13 (and its first outputs): 3 + 4 = 7 blocks in use, not 4 x 4
    engine = make_engine(tiny[0], enable_prefix_caching=False)
    ids = prompt(14, 2)
    c = Collector()
    engine.submit("r", ids, sampled(2, n=4), c, start=True, end=True, stateless=True)
    engine._drain()
    engine.step()  # the parent's prefill, the fork, and each sample's last two prompt tokens
    tables = [engine.kv.block_table(s.seq_id) for s in engine._seqs.values()]
    assert len(tables) == 4  # the parent ended; its samples hold its blocks
    shared = tables[0][:3]
    assert all(t[:3] == shared and len(t) == 4 for t in tables)
    assert len({t[3] for t in tables}) == 4  # a private last block each
    assert engine.pool.refcounts(shared) == [4, 4, 4]
    assert engine.pool.counts()["used"] == 7
    assert engine.kv.forked_blocks == 12  # 3 blocks x 4 samples
    assert engine.stats()["forked_blocks"] == 12
    step = engine.step_times.kinds["prefill_or_mixed"]
    assert (step.steps, step.seqs, step.tokens) == (1, 5, 12 + 4 * 2)  # one prefill of 12 tokens, 2 per sample
    engine.run_until_idle()
    assert engine.pool.counts()["used"] == 0 and engine.pool.counts()["free"] == engine.pool.num_blocks


def test_best_of_returns_the_n_best_by_cumulative_logprob_recomputed_with_hf(tiny, alone):
    path, hf = tiny
    engine = make_engine(path)
    ids = prompt(11, 3)
    params = SamplingParams(max_tokens=6, temperature=1.5, ignore_eos=True, seed=99, n=2, best_of=5)
    outputs = run(engine, ids, params).outputs
    choices = by_choice(outputs)
    assert sorted(choices) == [0, 1] and all(o.logprobs is None for o in outputs)  # (not asked)
    samples = [run(alone, ids, SamplingParams(max_tokens=6, temperature=1.5, ignore_eos=True, seed=99 + i)).token_ids
               for i in range(5)]

    def hf_cumulative(out):
        with torch.no_grad():
            logits = hf(torch.tensor([ids + out])).logits[0].float()
        logp = torch.log_softmax(logits[len(ids) - 1:-1], dim=-1)
        return float(logp[torch.arange(len(out)), torch.tensor(out)].sum())

    scores = [hf_cumulative(s) for s in samples]
    best = sorted(range(5), key=lambda i: -scores[i])[:2]
    assert best != [0, 1]  # (the ranking, not the sample order, decides)
    assert abs(scores[best[1]] - scores[sorted(range(5), key=lambda i: -scores[i])[2]]) > 1e-3  # no near tie
    assert [choices[0]["ids"], choices[1]["ids"]] == [samples[best[0]], samples[best[1]]]


def test_best_of_returns_the_asked_logprobs_summing_to_the_ranking(tiny):
    engine = make_engine(tiny[0])
    params = SamplingParams(max_tokens=5, temperature=1.2, ignore_eos=True, seed=5, n=2, best_of=4, logprobs=1)
    choices = by_choice(run(engine, prompt(10, 4), params).outputs)
    sums = [sum(e.logprob for e in choices[i]["logprobs"]) for i in (0, 1)]
    assert len(choices[0]["logprobs"]) == 5 and sums[0] >= sums[1]


@pytest.mark.parametrize("how", ["is_cancelled", "abort", "drop_owner"])
def test_cancel_mid_decode_returns_every_block(tiny, how):
    engine = make_engine(tiny[0], enable_prefix_caching=False)
    total = engine.pool.counts()["free"]
    cancelled = []
    c = Collector()
    engine.submit("r", prompt(14, 5), sampled(200, n=4), c, start=True, end=True, stateless=True,
                  is_cancelled=lambda: bool(cancelled), request_id="rid", owner="fe")
    engine._drain()
    for _ in range(4):
        engine.step()
    assert engine.pool.counts()["used"] == 3 + 4 * 2  # 3 shared, then each sample past token 16
    if how == "is_cancelled":
        cancelled.append(True)
        engine._last_cancel_poll = 0.0
    elif how == "abort":
        engine.abort("rid")
    else:
        engine.drop_owner("fe")
    engine.run_until_idle()
    assert engine.pool.counts()["used"] == 0 and engine.pool.counts()["free"] == total
    assert not engine._seqs
    if how != "drop_owner":
        finals = [o for o in c.outputs if o.finish_reason is not None]
        assert sorted(o.index for o in finals) == [0, 1, 2, 3]
        assert {o.finish_reason for o in finals} == {"cancelled"} and c.outputs[-1].finished


def test_a_prompt_within_one_block_runs_its_samples_alone(tiny, alone):
    engine = make_engine(tiny[0])
    ids = prompt(3, 6)
    choices = by_choice(run(engine, ids, sampled(5, seed=11, n=2)).outputs)
    assert engine.kv.forked_blocks == 0
    assert [choices[i]["ids"] for i in (0, 1)] == [run(alone, ids, sampled(5, seed=11 + i)).token_ids
                                                   for i in (0, 1)]


def test_penalties_are_per_sample(tiny, alone):
    engine = make_engine(tiny[0])
    ids = prompt(13, 7)
    params = sampled(8, seed=3, n=3, frequency_penalty=1.5, repetition_penalty=1.3)
    choices = by_choice(run(engine, ids, params).outputs)
    for i in range(3):
        single = sampled(8, seed=3 + i, frequency_penalty=1.5, repetition_penalty=1.3)
        assert choices[i]["ids"] == run(alone, ids, single).token_ids


def test_refusals_name_the_parameter(tiny):
    with pytest.raises(ParameterError, match=r"best_of \(1\) must be >= n \(2\)"):
        check_sampling(SamplingParams(max_tokens=4, n=2, best_of=1))
    with pytest.raises(ParameterError, match="n must be in"):
        check_sampling(SamplingParams(max_tokens=4, n=0))
    engine = make_engine(tiny[0])
    c = Collector()
    engine.submit("conv", [1, 5, 6], sampled(3, n=2), c, start=True, end=False)
    engine.run_until_idle()
    assert c.final.finish_reason == "error" and "one-shot" in c.final.error
    assert engine.pool.counts()["used"] == 0


def test_a_stop_string_ends_only_its_own_choice():
    from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint

    engine = make_engine(ensure_demo_checkpoint(), enable_prefix_caching=False)
    ids = engine.encode("Each choice stops on its own", True)
    args = dict(max_tokens=16, temperature=1.5, ignore_eos=True)
    alone = [run(engine, ids, SamplingParams(seed=13 + i, **args)).text for i in range(2)]
    stop = next(alone[0][i:i + 2] for i in range(3, 12) if alone[0][i:i + 2] not in alone[1])
    outputs = run(engine, ids, SamplingParams(seed=13, n=2, stop=(stop,), **args)).outputs
    by_choice(outputs)
    texts = ["".join(o.text for o in outputs if o.index == i) for i in range(2)]
    reasons = [next(o.finish_reason for o in outputs if o.index == i and o.finish_reason) for i in range(2)]
    assert texts == [alone[0][:alone[0].index(stop)], alone[1]]  # choice 1 never met the stop string
    assert reasons == ["stop", "length"]
    assert engine.pool.counts()["used"] == 0 and not engine._seqs


def test_prompt_logprobs_with_n_score_the_whole_prompt_in_every_sample(tiny, alone):
    # one sequence per step: the second sample prefills after the first ended, whose cached
    # blocks it must not take (it would skip the prompt positions they cover)
    engine = make_engine(tiny[0], max_num_seqs=1)
    ids = prompt(14, 9)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    ref = next(o.prompt_logprobs for o in run(alone, ids, params).outputs if o.prompt_logprobs)
    outputs = run(engine, ids, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=1,
                                              n=2)).outputs
    got = {o.index: o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None}
    assert sorted(got) == [0, 1]
    for i in (0, 1):
        assert len(got[i]) == len(ids) and got[i][0] is None
        assert [e.logprob for e in got[i][1:]] == pytest.approx([e.logprob for e in ref[1:]], abs=1e-5)
