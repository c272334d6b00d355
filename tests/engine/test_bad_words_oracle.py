"""bad_words in the engine equal HF transformers' ``NoBadWordsLogitsProcessor`` on the same
token sequences (CPU, fp32, tiny checkpoints with a local tokenizer), applied as vLLM applies
bad words: to the turn's generated tokens only (not the prompt). Greedy and seeded rows, each
with its own words (or none) in one batch."""

import json
import random

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import NoBadWordsLogitsProcessor, TemperatureLogitsWarper

from bad_words_helpers import tiny_tokenizer, token_text
from engine_helpers import TEST_DEVICE, Collector, make_engine
from tiny_models import build_tiny_checkpoint
from tritonkv.sampling.bad_words import bad_words_token_ids
from tritonkv.sampling.params import SamplingParams

CHAR_IDS = range(4, 93)  # single characters other than the space


@pytest.fixture(scope="module", params=("llama", "qwen2_bias"))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = build_tiny_checkpoint(request.param, str(path))
    tiny_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return hf, make_engine(str(path))


def encode(text):
    return tiny_tokenizer().encode(text, add_special_tokens=False).ids


def prompt(n, seed):
    rng = random.Random(seed)
    return [1] + [rng.choice(CHAR_IDS) for _ in range(n - 1)]


class OnOutput(LogitsProcessor):
    """An HF processor applied to the generated tokens only (vLLM's bad words see no prompt),
    behind one token that matches nothing (-1). vLLM bans a word's last token once the output
    ends with the word's other tokens, so a two-token word after the first output token;
    transformers 5.17 (the GPU image's) skips a word longer than the context it is given, one
    token too late for that; 5.24 does not. With the extra token both give vLLM's rule: the
    context is one longer, and a prefix reaching into it cannot match."""

    def __init__(self, prompt_len, inner):
        self.prompt_len, self.inner = prompt_len, inner

    def __call__(self, input_ids, scores):
        out = input_ids[:, self.prompt_len:]
        never = torch.full((out.shape[0], 1), -1, dtype=out.dtype, device=out.device)
        return self.inner(torch.cat([never, out], dim=1), scores)


def hf_processors(prompt_ids, words):
    if not words:
        return LogitsProcessorList()
    return LogitsProcessorList([OnOutput(len(prompt_ids), NoBadWordsLogitsProcessor(bad_words_token_ids(
        words, encode, 96)))])


def hf_greedy(hf, ids, max_new, words=()):
    kw = {"logits_processor": hf_processors(ids, words)} if words else {}
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(ids):].tolist()


def hf_seeded(hf, ids, max_new, words, temperature, seed):
    """HF's processors over HF's logits, then the engine's documented draw (argmax(probs / E),
    E ~ Exp(1) from the turn's seeded generator), as tests/engine/test_penalties_oracle.py."""
    processors = hf_processors(ids, words)
    processors.append(TemperatureLogitsWarper(temperature))
    gen = torch.Generator(device=TEST_DEVICE).manual_seed(seed)
    context, out = list(ids), []
    with torch.no_grad():
        for _ in range(max_new):
            scores = processors(torch.tensor([context]), hf(torch.tensor([context])).logits[:, -1].float())[0]
            noise = torch.empty(scores.shape, device=TEST_DEVICE).exponential_(generator=gen).cpu()
            out.append(int((torch.softmax(scores, -1) / noise).argmax()))
            context.append(out[-1])
    return out


def run_together(engine, requests):
    """Submit every (ids, params) at once (one batch), return each turn's token ids."""
    collectors = []
    for i, (ids, params) in enumerate(requests):
        c = Collector()
        engine.submit(f"bw{i}", ids, params, c, start=True, end=True)
        collectors.append(c)
    engine.run_until_idle()
    return [c.token_ids for c in collectors]


def greedy(n, words=()):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, bad_words=tuple(words))


def test_one_token_word_is_never_generated(family):
    hf, engine = family
    ids = prompt(12, 1)
    plain = hf_greedy(hf, ids, 16)
    word = token_text(next(t for t in plain if t in CHAR_IDS))
    [got] = run_together(engine, [(ids, greedy(16, [word]))])
    assert got == hf_greedy(hf, ids, 16, [word])
    assert got != plain and encode(word)[0] not in got


def test_multi_token_word_bans_its_last_token_after_its_prefix(family):
    hf, engine = family
    ids = prompt(10, 2)
    plain = hf_greedy(hf, ids, 20)
    at = next(i for i in range(len(plain) - 1) if plain[i] in CHAR_IDS and plain[i + 1] in CHAR_IDS
              and encode(token_text(plain[i]) + token_text(plain[i + 1])) == plain[i:i + 2])
    word = token_text(plain[at]) + token_text(plain[at + 1])
    [got] = run_together(engine, [(ids, greedy(20, [word]))])
    assert got == hf_greedy(hf, ids, 20, [word])
    assert got[:at + 1] == plain[:at + 1] and got[at + 1] != plain[at + 1]  # the ban fired there, not before


def test_a_prefix_in_the_prompt_does_not_count(family):
    hf, engine = family
    ids = prompt(9, 3)
    first = hf_greedy(hf, ids, 1)[0]
    if first not in CHAR_IDS:
        pytest.skip("the first greedy token is not a single character")
    word = token_text(ids[-1]) + token_text(first)
    if encode(word) != [ids[-1], first]:
        pytest.skip("the pair tokenises otherwise")
    [got] = run_together(engine, [(ids, greedy(6, [word]))])
    assert got[0] == first and got == hf_greedy(hf, ids, 6, [word])


def test_rows_of_one_batch_keep_their_own_words(family):
    hf, engine = family
    a, b, c = prompt(11, 4), prompt(7, 5), prompt(13, 6)
    plain_c = hf_greedy(hf, c, 12)
    words_a = [token_text(t) + token_text(u) for t, u in zip(hf_greedy(hf, a, 12), hf_greedy(hf, a, 12)[1:])
               if t in CHAR_IDS and u in CHAR_IDS][:3] + ["q", "Z"]
    words_c = [token_text(next(t for t in plain_c if t in CHAR_IDS))]
    seeded_a = SamplingParams(max_tokens=12, temperature=0.9, seed=77, ignore_eos=True, bad_words=tuple(words_a))
    seeded_b = SamplingParams(max_tokens=12, temperature=0.9, seed=78, ignore_eos=True)
    got_a, got_b, got_c = run_together(engine, [(a, seeded_a), (b, seeded_b), (c, greedy(12, words_c))])
    assert got_a == hf_seeded(hf, a, 12, tuple(words_a), 0.9, 77)
    assert got_b == hf_seeded(hf, b, 12, (), 0.9, 78)
    assert got_c == hf_greedy(hf, c, 12, words_c) and got_c != plain_c
    assert engine.runner.penalties.slots_in_use == 0


def test_without_a_tokenizer_bad_words_are_an_error_and_the_engine_serves_on(tmp_path):
    build_tiny_checkpoint("llama", str(tmp_path))
    engine = make_engine(str(tmp_path))
    c = Collector()
    engine.submit("x", prompt(5, 7), greedy(3, ["ab"]), c, start=True, end=True)
    engine.run_until_idle()
    assert c.final.finish_reason == "error" and "bad_words need the checkpoint's tokenizer" in c.final.error
    [got] = run_together(engine, [(prompt(5, 7), greedy(3))])
    assert len(got) == 3


def char_ngram(plain, n, skip=0):
    """The word of the first n consecutive single-character tokens of ``plain`` (after
    ``skip``) that tokenises back to them, and where it starts."""
    for i in range(skip, len(plain) - n + 1):
        run = plain[i:i + n]
        if all(t in CHAR_IDS for t in run) and encode("".join(map(token_text, run))) == run:
            return "".join(map(token_text, run)), i
    raise AssertionError("no such n-gram")


def test_longer_words_arriving_mid_turn_keep_the_running_rows_words(family):
    """A turn with a two-token word runs; a turn with a three-token word joins mid-way (the
    word tables widen while the first turn's words are live): both equal HF."""
    hf, engine = family
    a, b = prompt(8, 9), prompt(12, 10)
    word_a, at_a = char_ngram(hf_greedy(hf, a, 24), 2, skip=4)
    word_b, _ = char_ngram(hf_greedy(hf, b, 16), 3)
    first, second = Collector(), Collector()
    engine.submit("wa", a, greedy(24, [word_a]), first, start=True, end=True)
    for _ in range(3):
        engine.step()
    engine.submit("wb", b, greedy(16, [word_b, "Zq"]), second, start=True, end=True)
    engine.run_until_idle()
    assert first.token_ids == hf_greedy(hf, a, 24, [word_a]) != hf_greedy(hf, a, 24)
    assert second.token_ids == hf_greedy(hf, b, 16, [word_b, "Zq"]) != hf_greedy(hf, b, 16)
    assert engine.runner.penalties.slots_in_use == 0


def test_each_of_n_samples_keeps_the_bad_words(family):
    """n = 2 (engine/sample_group.py): sample i draws with seed s + i; each equals HF with the
    same words and that seed."""
    hf, engine = family
    ids = prompt(9, 11)
    plain = hf_greedy(hf, ids, 10)
    words = [char_ngram(plain, 2)[0], token_text(next(t for t in plain if t in CHAR_IDS))]
    c = Collector()
    params = SamplingParams(max_tokens=10, temperature=0.9, seed=40, ignore_eos=True, bad_words=tuple(words), n=2)
    engine.submit("bwn", ids, params, c, start=True, end=True, stateless=True)
    engine.run_until_idle()
    got = {}
    for out in c.outputs:
        got.setdefault(out.index, []).extend(out.token_ids)
    assert got == {i: hf_seeded(hf, ids, 10, tuple(words), 0.9, 40 + i) for i in range(2)}
