"""Logprobs survive the response path: coalesced outputs keep one entry per token."""

from tritonkv.engine.requests import TurnOutput
from tritonkv.sampling.logprobs import TokenLogprob
from tritonkv.engine.output import merge_outputs


def entry(t, v):
    return TokenLogprob(t, v, 1, [], {})


def test_coalesced_outputs_keep_each_tokens_logprob():
    outs = [TurnOutput("a", [1], logprobs=[entry(1, -0.1)]), TurnOutput("b", [2], logprobs=[entry(2, -0.2)]),
            TurnOutput("c", [3], True, "length", logprobs=[entry(3, -0.3)])]
    (merged,) = merge_outputs(outs)
    assert merged.token_ids == [1, 2, 3] and [e.logprob for e in merged.logprobs] == [-0.1, -0.2, -0.3]
    (plain,) = merge_outputs([TurnOutput("a", [1]), TurnOutput("b", [2], True, "length")])
    assert plain.logprobs is None
