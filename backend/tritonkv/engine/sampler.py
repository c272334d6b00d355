"""Next-token choice for a whole step's batch at once: greedy at temperature 0, else
temperature / top-k / top-p, each row with its own settings, in one pass on the logits'
device, with no host sync (the caller copies the chosen ids back once).

Rules:
- Sampling draws ``argmax(probs / E)`` with ``E ~ Exponential(1)`` per vocabulary entry
  (the exponential race, equal in law to drawing from ``probs``).
- top-k keeps the k highest logits (ranks after a stable descending sort); top-p then keeps
  the smallest prefix of that order whose probability reaches ``top_p`` (always >= 1 token).
- A temperature under ``GREEDY_BELOW`` (1e-5, as vLLM) is greedy: dividing by it would
  overflow the logits.
- A request's ``seed`` makes its draws reproducible: its rows take their noise from the turn's
  own generator (on the logits' device); other rows share the device's default generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tritonkv.engine.requests import SamplingParams

GREEDY_BELOW = 1e-5


@dataclass
class RowSettings:
    """Per-row settings on the logits' device (``[n]`` each); ``filtered``: some row uses
    top-k or top-p (host bool, decides whether the sort runs)."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_k: torch.Tensor  # int64; 0 = off
    top_p: torch.Tensor  # float32
    filtered: bool


def uses_filter(params: list[SamplingParams]) -> bool:
    """Some row restricts its choice (top-k or top-p): the sort must run."""
    return any(p.top_k > 0 or p.top_p < 1.0 for p in params)


def row_settings(params: list[SamplingParams], device) -> RowSettings:
    return RowSettings(
        torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
        torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
        torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
        uses_filter(params))


def sample_ids(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
               settings: RowSettings | None = None) -> torch.Tensor:
    """``logits`` ``[n, vocab]`` float32 -> chosen ids ``[n]`` int64 on the same device.
    ``settings`` may be omitted when every row is greedy."""
    greedy_ids = logits.argmax(dim=-1)
    if all(p.temperature < GREEDY_BELOW for p in params):
        return greedy_ids
    if settings is None:
        settings = row_settings(params, logits.device)
    greedy = settings.temperature < GREEDY_BELOW
    x = logits / torch.where(greedy, 1.0, settings.temperature)[:, None]
    if settings.filtered:
        x = _top_k_top_p(x, settings)
    probs = torch.softmax(x, dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for i, gen in enumerate(generators):
        if gen is not None and params[i].temperature >= GREEDY_BELOW:
            noise[i].exponential_(generator=gen)
    return torch.where(greedy, greedy_ids, (probs / noise).argmax(dim=-1))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
    """``sample_ids`` with the ids copied to the host."""
    if logits.shape[0] == 0:
        return []
    return sample_ids(logits, params, generators).tolist()


def _top_k_top_p(x: torch.Tensor, settings: RowSettings) -> torch.Tensor:
    vocab = x.shape[1]
    top_k = torch.where(settings.top_k > 0, settings.top_k, vocab)
    sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=x.device)[None, :]
    sorted_x = sorted_x.masked_fill(ranks >= top_k[:, None], float("-inf"))
    sorted_p = torch.softmax(sorted_x, dim=-1)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the better-ranked tokens
    sorted_x = sorted_x.masked_fill(before >= settings.top_p[:, None], float("-inf"))
    return torch.full_like(x, float("-inf")).scatter_(1, order, sorted_x)
