"""Next-token choice for a whole step's batch at once: greedy at temperature 0, else
temperature / top-k / top-p, each row with its own settings, in one pass on the logits'
device and one device-to-host copy of the chosen ids.

Rules:
- Sampling draws ``argmax(probs / E)`` with ``E ~ Exponential(1)`` per vocabulary entry
  (the exponential race, equal in law to drawing from ``probs``).
- top-k keeps the k highest logits (ranks after a stable descending sort); top-p then keeps
  the smallest prefix of that order whose probability reaches ``top_p`` (always >= 1 token).
- A request's ``seed`` makes its draws reproducible: its rows take their noise from the turn's
  own generator (on the logits' device); other rows share the engine's generator.
"""

from __future__ import annotations

import torch

from tritonkv.engine.requests import SamplingParams


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
    """``logits`` ``[n, vocab]`` float32, one row per entry of ``params``/``generators``."""
    n, vocab = logits.shape
    if n == 0:
        return []
    greedy_ids = logits.argmax(dim=-1)
    if all(p.temperature == 0.0 for p in params):
        return greedy_ids.tolist()
    dev = logits.device
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params],
                         dtype=torch.float32, device=dev)
    x = logits / temps[:, None]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        x = _top_k_top_p(x, params)
    probs = torch.softmax(x, dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for i, gen in enumerate(generators):
        if gen is not None and params[i].temperature > 0:
            noise[i].exponential_(generator=gen)
    sampled = (probs / noise).argmax(dim=-1)
    greedy = torch.tensor([p.temperature == 0.0 for p in params], device=dev)
    return torch.where(greedy, greedy_ids, sampled).tolist()


def _top_k_top_p(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    n, vocab = x.shape
    dev = x.device
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
    sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=dev)[None, :]
    sorted_x = sorted_x.masked_fill(ranks >= top_k[:, None], float("-inf"))
    sorted_p = torch.softmax(sorted_x, dim=-1)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the better-ranked tokens
    sorted_x = sorted_x.masked_fill(before >= top_p[:, None], float("-inf"))
    return torch.full_like(x, float("-inf")).scatter_(1, order, sorted_x)
