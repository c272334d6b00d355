"""Batched sampling: every row its own settings, one pass (engine/sampler.py)."""

import torch

from tritonkv.engine.requests import SamplingParams
from tritonkv.engine.sampler import sample_batch


def params(**kw):
    return SamplingParams(max_tokens=1, **kw)


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    out = sample_batch(logits, [params(temperature=0.0)] * 5, [None] * 5)
    assert out == logits.argmax(-1).tolist()


def test_mixed_batch_keeps_greedy_rows_exact_and_restricts_sampled_rows():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 64, generator=g)
    rows = [params(temperature=0.0), params(temperature=1.0, top_k=1), params(temperature=5.0, top_p=1e-6),
            params(temperature=1.0, top_k=3)]
    top3 = set(torch.topk(logits[3], 3).indices.tolist())
    for _ in range(20):
        out = sample_batch(logits, rows, [None] * 4)
        assert out[0] == int(logits[0].argmax())
        assert out[1] == int(logits[1].argmax())  # top_k 1 leaves only the best token
        assert out[2] == int(logits[2].argmax())  # a tiny top_p keeps one token
        assert out[3] in top3


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # probabilities 0.5, 0.3, 0.2: top_p 0.6 keeps the first two, never the third
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(1, 1)
    seen = {sample_batch(logits, [params(top_p=0.6)], [None])[0] for _ in range(200)}
    assert seen == {0, 1}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 4000
    logits = torch.log(probs).repeat(n, 1)
    out = torch.tensor(sample_batch(logits, [params()] * n, [None] * n))
    freq = torch.bincount(out, minlength=4).float() / n
    # 4 sigma of a binomial at n=4000 is under 0.031
    assert torch.allclose(freq, probs, atol=0.031), freq


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0]]).repeat(2000, 1)
    cold = torch.tensor(sample_batch(logits, [params(temperature=0.25)] * 2000, [None] * 2000))
    # p(token 0) at T=0.25 is 1 / (1 + e^-4) = 0.982
    assert abs((cold == 0).float().mean().item() - 0.982) < 0.02


def test_a_seed_reproduces_a_row_whatever_its_neighbours():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(2))
    rows = [params(), params(seed=7), params()]

    def draw():
        gens = [None, torch.Generator().manual_seed(7), None]
        return [sample_batch(logits, rows, gens)[1] for _ in range(1)][0]

    first = [draw() for _ in range(5)]
    assert len(set(first)) == 1
    g = torch.Generator().manual_seed(7)
    seq_a = [sample_batch(logits[1:2], [params(seed=7)], [g])[0] for _ in range(6)]
    g = torch.Generator().manual_seed(7)
    seq_b = [sample_batch(logits, rows, [None, g, None])[1] for _ in range(6)]
    assert seq_a == seq_b
