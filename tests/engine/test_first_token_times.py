"""The engine stamps a turn's first output with (arrival, scheduled, emitted): the times its
frontend splits TTFT into queue and prefill (server/first_token_stages.py)."""

import time

import pytest

from engine_helpers import Collector, greedy, make_engine
from tiny_models import build_tiny_checkpoint
from tritonkv.engine.output import merge_outputs
from tritonkv.engine.requests import TurnOutput


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    build_tiny_checkpoint("llama", path)
    return path


class Timed(Collector):
    def __call__(self, out):
        self.received = getattr(self, "received", time.monotonic())
        super().__call__(out)


def test_a_turn_that_waits_for_the_budget_is_stamped_after_the_first_turns_step(tiny):
    engine = make_engine(tiny, max_num_batched_tokens=8)  # one 8-token prompt per step
    a, b = Timed(), Timed()
    before = time.monotonic()
    engine.submit("a", list(range(1, 9)), greedy(3), a, start=True, end=True)
    engine.submit("b", list(range(11, 19)), greedy(3), b, start=True, end=True)
    engine.run_until_idle()
    assert a.token_ids and len(b.token_ids) == 3
    stamped = [o.first_token_times for o in a.outputs + b.outputs if o.first_token_times is not None]
    assert len(stamped) == 2  # each turn's first output only
    ta, tb = a.outputs[0].first_token_times, b.outputs[0].first_token_times
    for (arrival, scheduled, emitted), got in ((ta, a.received), (tb, b.received)):
        assert before <= arrival <= scheduled <= emitted <= got
    # b's prompt did not fit beside a's: its first step came after a's first token
    assert tb[1] >= ta[2]
    assert tb[1] - tb[0] > ta[1] - ta[0]


def test_an_error_answer_carries_no_times(tiny):
    engine = make_engine(tiny)
    bad = Collector()
    engine.submit("x", [], greedy(1), bad, start=False, end=True, error="bad input")
    engine.run_until_idle()
    assert bad.final.error == "bad input" and bad.final.first_token_times is None


def test_a_merged_output_keeps_its_first_parts_times():
    outs = [TurnOutput("a", [1], first_token_times=(1.0, 2.0, 3.0)), TurnOutput("b", [2]), TurnOutput("c", [3])]
    (merged,) = merge_outputs(outs)
    assert merged.token_ids == [1, 2, 3] and merged.first_token_times == (1.0, 2.0, 3.0)


def test_the_samples_of_one_prompt_carry_its_arrival_and_its_first_step(tiny):
    from tritonkv.sampling.params import SamplingParams

    # a 12-token prompt, 4 tokens a step: the parent computes the shared 8 over two steps, then
    # each sample its own last block in steps of their own
    engine = make_engine(tiny, max_num_batched_tokens=4)
    c = Collector()
    params = SamplingParams(max_tokens=2, temperature=1.0, seed=3, n=2, ignore_eos=True)
    engine.submit("n", list(range(1, 13)), params, c, start=True, end=True, stateless=True)
    engine.run_until_idle()
    stamped = {o.index: o.first_token_times for o in c.outputs if o.first_token_times is not None}
    assert set(stamped) == {0, 1}
    (a0, s0, e0), (a1, s1, e1) = stamped[0], stamped[1]
    # one request, one arrival; the shared prompt's first step is each sample's first
    assert a0 == a1 and s0 == s1 and a0 <= s0 <= min(e0, e1)
