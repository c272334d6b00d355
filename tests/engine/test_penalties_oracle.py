"""Penalties, logit_bias, min_tokens, min_p and stop_token_ids in the engine equal HF
transformers' logits processors / ``generate`` on the same tiny checkpoints (CPU, fp32).
presence / frequency penalties have no HF processor: the oracle is a LogitsProcessor written
here from OpenAI's formula, run inside HF's ``generate``."""

import random

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                     SequenceBiasLogitsProcessor, TemperatureLogitsWarper,
                                                     TopKLogitsWarper, TopPLogitsWarper)

from engine_helpers import TEST_DEVICE, Collector, make_engine
from tiny_models import build_tiny_checkpoint
from tritonkv.sampling.params import SamplingParams

FAMILIES = ("llama", "qwen2_bias", "mistral_window")
EOS = 2


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    hf = build_tiny_checkpoint(request.param, path)
    return path, hf, make_engine(path)


def prompt(n, seed):
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 96) for _ in range(n - 1)]


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence / frequency penalties over the generated tokens (the oracle)."""

    def __init__(self, prompt_len, presence, frequency):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        out = input_ids[0, self.prompt_len:]
        counts = torch.bincount(out, minlength=scores.shape[-1]).to(scores.dtype)
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def run(engine, corr_id, ids, params, *, start=True, end=True):
    c = Collector()
    engine.submit(corr_id, ids, params, c, start=start, end=end)
    engine.run_until_idle()
    return c


def hf_generate(hf, ids, max_new, ignore_eos=False, **kw):
    """HF's greedy ``generate``; ``ignore_eos``: no EOS at all (runs to ``max_new``)."""
    hf.generation_config.eos_token_id = None if ignore_eos else EOS
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(ids):].tolist()


def test_repetition_penalty_bias_and_min_tokens_greedy_equal_hf_generate(family):
    path, hf, engine = family
    ids = prompt(15, 3)
    # EOS strongly favoured: without min_tokens the turn would end at once
    bias = {(EOS,): 5.0, (40,): -3.0, (41,): 5.0}
    params = SamplingParams(max_tokens=14, temperature=0.0, repetition_penalty=3.0, min_tokens=6,
                            logit_bias=tuple((k[0], v) for k, v in bias.items()))
    got = run(engine, "rep", ids, params)
    want = hf_generate(hf, ids, 14, repetition_penalty=3.0, min_new_tokens=6, sequence_bias=bias)
    assert got.token_ids == want
    assert len(want) >= 7 and want[-1] == EOS and EOS not in want[:6]
    assert got.final.finish_reason == "eos"
    # without the penalty the greedy reply differs: the penalty did something
    plain = hf_generate(hf, ids, 14, min_new_tokens=6, sequence_bias=bias)
    assert plain != want
    assert engine.runner.penalties.slots_in_use == 0


def test_repetition_penalty_covers_the_whole_conversation(family):
    path, hf, engine = family
    first, second = prompt(9, 4), prompt(6, 5)[1:]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, repetition_penalty=1.5)
    a = run(engine, "conv", first, params, end=False)
    assert a.token_ids == hf_generate(hf, first, 8, repetition_penalty=1.5, ignore_eos=True)
    b = run(engine, "conv", second, params, start=False, end=True)
    history = first + a.token_ids + second
    assert b.token_ids == hf_generate(hf, history, 8, repetition_penalty=1.5, ignore_eos=True)


def test_presence_and_frequency_penalties_greedy_equal_openai_formula_in_hf_generate(family):
    path, hf, engine = family
    ids = prompt(12, 6)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, presence_penalty=1.5,
                            frequency_penalty=0.7)
    got = run(engine, "pf", ids, params)
    oracle = LogitsProcessorList([OpenAIPenalties(len(ids), 1.5, 0.7)])
    want = hf_generate(hf, ids, 16, logits_processor=oracle, ignore_eos=True)
    assert got.token_ids == want
    plain = hf_generate(hf, ids, 16, ignore_eos=True)
    assert plain != want


def test_seeded_sampling_with_penalties_and_min_p_equals_hf_processors(family):
    """Each step: HF's processors over HF's logits of the whole context, then the engine's
    documented draw (argmax(probs / E), E ~ Exp(1) from the turn's seeded generator)."""
    path, hf, engine = family
    ids = prompt(10, 7)
    seed = 1234
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=seed,
                            ignore_eos=True, repetition_penalty=1.3, logit_bias=((17, 2.0),))
    got = run(engine, "seeded", ids, params)
    processors = LogitsProcessorList([
        SequenceBiasLogitsProcessor({(17,): 2.0}), RepetitionPenaltyLogitsProcessor(1.3),
        TemperatureLogitsWarper(0.8), TopKLogitsWarper(40), TopPLogitsWarper(0.95), MinPLogitsWarper(0.05)])
    gen = torch.Generator(device=TEST_DEVICE).manual_seed(seed)
    context, want = list(ids), []
    with torch.no_grad():
        for _ in range(12):
            logits = hf(torch.tensor([context])).logits[:, -1].float()
            scores = processors(torch.tensor([context]), logits)[0]
            noise = torch.empty(scores.shape, device=TEST_DEVICE).exponential_(generator=gen).cpu()
            token = int((torch.softmax(scores, -1) / noise).argmax())
            want.append(token)
            context.append(token)
    assert got.token_ids == want


def test_stop_token_ids_end_the_turn_after_the_token(family):
    path, hf, engine = family
    ids = prompt(11, 8)
    greedy = hf_generate(hf, ids, 12, ignore_eos=True)
    stop = next(t for i, t in enumerate(greedy) if i >= 2 and t not in greedy[:i])
    cut = greedy.index(stop) + 1
    got = run(engine, "stop", ids, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                  stop_token_ids=(stop,)))
    assert got.token_ids == greedy[:cut]
    assert got.final.finish_reason == "stop"


def test_penalised_and_plain_rows_in_one_batch_equal_each_alone(family):
    path, hf, engine = family
    prompts = [prompt(n, 20 + n) for n in (5, 13, 8)]
    settings = [SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, repetition_penalty=2.0),
                SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True),
                SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, frequency_penalty=2.0,
                               logit_bias=((9, 1.0),))]
    alone = [run(engine, f"alone{i}", p, s).token_ids for i, (p, s) in enumerate(zip(prompts, settings))]
    together = [Collector() for _ in prompts]
    for i, (p, s, c) in enumerate(zip(prompts, settings, together)):
        engine.submit(f"batch{i}", p, s, c, start=True, end=True)
    engine.run_until_idle()
    assert [c.token_ids for c in together] == alone
    assert alone[1] == hf_generate(hf, prompts[1], 9, ignore_eos=True)
    assert engine.runner.penalties.slots_in_use == 0
