"""Log-probabilities of generated tokens: computed on the device for the rows that ask
(``SamplingParams.logprobs`` not None), brought back with the sampled ids, and handed to the
caller per token (``TokenLogprob``).

Rules:
- A log-probability is ``log_softmax`` of the model's logits for that position, before
  logit_bias, penalties, temperature or any filter (vLLM's default, "raw" logprobs), in fp32.
- ``rank`` is 1 + the number of tokens with a strictly higher log-probability (vLLM's rank).
- ``top`` holds the request's ``logprobs`` most likely tokens, best first (ties: lowest id);
  the chosen token is reported whether or not it is among them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LogprobBatch:
    """Device (or, after the copy, host) tensors for the rows that asked, in row order."""

    rows: list[int]  # indices among the sampled rows
    chosen: torch.Tensor  # float32 [m]
    rank: torch.Tensor  # int64 [m]
    top_ids: torch.Tensor  # int64 [m, k]
    top_values: torch.Tensor  # float32 [m, k]

    def to_host(self, pinned: bool) -> "LogprobBatch":
        """A copy queued to the host (pinned and non-blocking on CUDA: read after the step's
        event fired)."""

        def host(t):
            if not pinned:
                return t.cpu()
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return out.copy_(t, non_blocking=True)

        return LogprobBatch(self.rows, host(self.chosen), host(self.rank), host(self.top_ids), host(self.top_values))


def compute(logits: torch.Tensor, ids: torch.Tensor, rows: list[int], k: int) -> LogprobBatch:
    """``logits`` [n, vocab] (raw), ``ids`` [n] chosen; the rows ``rows`` with the top ``k``."""
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    lp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    chosen = lp.gather(1, ids.index_select(0, index)[:, None])[:, 0]
    rank = (lp > chosen[:, None]).sum(dim=-1) + 1
    if k > 0:
        values, order = torch.sort(lp, dim=-1, descending=True, stable=True)
        top_values, top_ids = values[:, :k], order[:, :k]
    else:
        top_values = lp.new_zeros((len(rows), 0))
        top_ids = torch.zeros((len(rows), 0), dtype=torch.int64, device=lp.device)
    return LogprobBatch(rows, chosen, rank, top_ids, top_values)


PROMPT_CHUNK = 256  # prompt positions whose logits exist at once (bounds the [positions, vocab] tensor)


def prompt_logprobs(logits_of, hidden: torch.Tensor, targets: list[int], k: int) -> list[tuple | None]:
    """Prompt logprobs of one row: ``hidden`` [n, d] its tokens' hidden states, ``targets``
    [n] the id each position's logits are scored against (-1: none wanted), ``logits_of``
    the model's head. Per position (chosen, rank, top ids, top values) on the host, or None."""
    wanted = [j for j, t in enumerate(targets) if t >= 0]
    out: list[tuple | None] = [None] * len(targets)
    for a in range(0, len(wanted), PROMPT_CHUNK):
        part = wanted[a:a + PROMPT_CHUNK]
        index = torch.tensor(part, dtype=torch.int64, device=hidden.device)
        logits = logits_of(hidden.index_select(0, index))
        ids = torch.tensor([targets[j] for j in part], dtype=torch.int64, device=hidden.device)
        batch = compute(logits, ids, list(range(len(part))), k).to_host(pinned=False)
        for j, row in zip(part, per_row(batch, len(part))):
            out[j] = row
    return out


def per_row(batch: LogprobBatch | None, num_rows: int) -> list[tuple | None]:
    """(chosen, rank, top ids, top values) per sampled row (None where not asked)."""
    out: list[tuple | None] = [None] * num_rows
    if batch is None:
        return out
    chosen, rank = batch.chosen.tolist(), batch.rank.tolist()
    ids, values = batch.top_ids.tolist(), batch.top_values.tolist()
    for j, i in enumerate(batch.rows):
        out[i] = (chosen[j], rank[j], ids[j], values[j])
    return out


@dataclass
class TokenLogprob:
    """One generated token's log-probability and the most likely tokens at its position."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]  # (token id, logprob), best first
    text: dict[int, str]  # decoded text of token_id and of each top token

    def as_vllm(self) -> dict:
        """vLLM's per-token dict (as Triton's vLLM backend sends it): token id -> logprob, rank,
        decoded_token; the chosen token first."""
        out = {str(self.token_id): {"logprob": self.logprob, "rank": self.rank,
                                    "decoded_token": self.text.get(self.token_id, "")}}
        for r, (t, v) in enumerate(self.top, start=1):
            if str(t) not in out:
                out[str(t)] = {"logprob": v, "rank": r, "decoded_token": self.text.get(t, "")}
        return out


def token_logprob(token: int, raw: tuple, k: int, decode) -> TokenLogprob:
    """A ``TokenLogprob`` from one row of ``per_row`` (``k``: this request's top count;
    ``decode(id) -> str`` or None)."""
    chosen, rank, ids, values = raw
    top = list(zip(ids[:k], values[:k]))
    wanted = {token, *(t for t, _ in top)}
    text = {t: decode(t) for t in wanted} if decode is not None else {}
    return TokenLogprob(token, chosen, rank, top, text)
