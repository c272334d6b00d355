"""Next-token choice for a whole step's batch at once: greedy at temperature 0, else
temperature / top-k / top-p / min-p, each row with its own settings, in one pass on the logits'
device, with no host sync (the caller copies the chosen ids back once).

Rules:
- Order (HF's logits processors, then vLLM's penalties): logit_bias is added; a repeated
  token's logit is divided by repetition_penalty (multiplied when negative; HF / vLLM, over
  the turn's context and output); frequency_penalty * count + presence_penalty * (count > 0)
  is subtracted (OpenAI, over the output); EOS and stop_token_ids are masked while fewer than
  min_tokens were generated; then temperature, top-k, top-p, min-p; then argmax (greedy rows)
  or the draw. The penalties work on the rows that have a ``PenaltyState`` only (one gather,
  one scatter, no per-row device work), and the draw is recorded into their state in place.
- Sampling draws ``argmax(probs / E)`` with ``E ~ Exponential(1)`` per vocabulary entry
  (the exponential race, equal in law to drawing from ``probs``).
- top-k keeps the k highest logits (ranks after a stable descending sort); top-p then keeps
  the smallest prefix of that order whose probability reaches ``top_p`` (always >= 1 token);
  min-p drops tokens whose probability (after the above) is below ``min_p`` times the best one's.
- A temperature under ``GREEDY_BELOW`` (1e-5, as vLLM) is greedy: dividing by it would
  overflow the logits.
- A request's ``seed`` makes its draws reproducible: its rows take their noise from the turn's
  own generator (on the logits' device); other rows share the device's default generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tritonkv.sampling.params import SamplingParams
from tritonkv.sampling.penalty_state import PenaltyState, PenaltyTable

GREEDY_BELOW = 1e-5


@dataclass
class PenaltyRows:
    """The rows of a batch that hold a ``PenaltyState`` (device tensors ``[m]``)."""

    table: PenaltyTable
    rows: torch.Tensor  # int64: row index in the batch
    slots: torch.Tensor  # int64: the row's slot in ``table``
    repetition: torch.Tensor  # float32
    presence: torch.Tensor  # float32
    frequency: torch.Tensor  # float32
    min_tokens: torch.Tensor  # int32


@dataclass
class RowSettings:
    """Per-row settings on the logits' device (``[n]`` each); ``filtered``: some row uses
    top-k or top-p (host bool, decides whether the sort runs); ``min_p``: None when no row uses
    it."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_k: torch.Tensor  # int64; 0 = off
    top_p: torch.Tensor  # float32
    filtered: bool
    min_p: torch.Tensor | None = None  # float32
    penalties: PenaltyRows | None = None


def uses_filter(params: list[SamplingParams]) -> bool:
    """Some row restricts its choice (top-k or top-p): the sort must run."""
    return any(p.top_k > 0 or p.top_p < 1.0 for p in params)


def uses_min_p(params: list[SamplingParams]) -> bool:
    return any(p.min_p > 0.0 and p.temperature >= GREEDY_BELOW for p in params)


def penalty_rows(params: list[SamplingParams], states: list[PenaltyState | None], device) -> PenaltyRows | None:
    """``PenaltyRows`` built from host lists (the runner fills pinned buffers instead)."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return None

    def t(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    return PenaltyRows(states[rows[0]].table, t(rows, torch.int64), t([states[i].slot for i in rows], torch.int64),
                       t([params[i].repetition_penalty for i in rows], torch.float32),
                       t([params[i].presence_penalty for i in rows], torch.float32),
                       t([params[i].frequency_penalty for i in rows], torch.float32),
                       t([params[i].min_tokens for i in rows], torch.int32))


def row_settings(params: list[SamplingParams], device, states: list[PenaltyState | None] | None = None) -> RowSettings:
    return RowSettings(
        torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
        torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
        torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
        uses_filter(params),
        torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device) if uses_min_p(params) else None,
        penalty_rows(params, states, device) if states else None)


def apply_penalties(logits: torch.Tensor, pen: PenaltyRows) -> torch.Tensor:
    """``logits`` with logit_bias, the penalties and the min_tokens mask applied to the rows of
    ``pen`` (a new tensor; the others rows unchanged)."""
    table, slots = pen.table, pen.slots
    x = logits.index_select(0, pen.rows) + table.bias.index_select(0, slots)
    counts = table.counts.index_select(0, slots)
    seen = table.seen.index_select(0, slots) | (counts > 0)
    rep = pen.repetition[:, None]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - pen.frequency[:, None] * counts - pen.presence[:, None] * (counts > 0)
    early = (table.out_len.index_select(0, slots) < pen.min_tokens)[:, None]
    x = x.masked_fill(early & table.stops.index_select(0, slots), float("-inf"))
    x = table.ban_words_(x, slots)  # bad_words of more than one token (sampling/penalty_state.py)
    return logits.index_copy(0, pen.rows, x)


def sample_ids(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
               settings: RowSettings | None = None,
               states: list[PenaltyState | None] | None = None) -> torch.Tensor:
    """``logits`` ``[n, vocab]`` float32 -> chosen ids ``[n]`` int64 on the same device.
    ``settings`` may be omitted (built from ``params`` and ``states``: each row's
    ``PenaltyState`` or None)."""
    if settings is None and (states and any(s is not None for s in states)
                             or any(p.temperature >= GREEDY_BELOW for p in params)):
        settings = row_settings(params, logits.device, states)
    pen = settings.penalties if settings is not None else None
    if pen is not None:
        logits = apply_penalties(logits, pen)
    ids = _choose(logits, params, generators, settings)
    if pen is not None:
        pen.table.record(pen.slots, ids.index_select(0, pen.rows))
    return ids


def _choose(logits, params, generators, settings) -> torch.Tensor:
    greedy_ids = logits.argmax(dim=-1)
    if all(p.temperature < GREEDY_BELOW for p in params):
        return greedy_ids
    greedy = settings.temperature < GREEDY_BELOW
    x = logits / torch.where(greedy, 1.0, settings.temperature)[:, None]
    if settings.filtered:
        x = _top_k_top_p(x, settings)
    if settings.min_p is not None:
        x = _min_p(x, settings.min_p)
    probs = torch.softmax(x, dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for i, gen in enumerate(generators):
        if gen is not None and params[i].temperature >= GREEDY_BELOW:
            noise[i].exponential_(generator=gen)
    return torch.where(greedy, greedy_ids, (probs / noise).argmax(dim=-1))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None],
                 states: list[PenaltyState | None] | None = None) -> list[int]:
    """``sample_ids`` with the ids copied to the host."""
    if logits.shape[0] == 0:
        return []
    return sample_ids(logits, params, generators, states=states).tolist()


def _min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(x, dim=-1)
    return x.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))


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
