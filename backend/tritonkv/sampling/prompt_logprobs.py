"""Prompt logprobs of a turn (``SamplingParams.prompt_logprobs``): which token each computed
position is scored against, and the per-token results kept on the turn until its first output.

Rules:
- Position p of a prefill chunk scores token p + 1 where that is a prompt token of the running
  turn; a conversation's first token has none (nothing comes before it). A later turn's first
  prompt token is scored given the conversation.
- Results are keyed by token index, so a recompute (preemption) reports each token once.
- They are handed out once, with the turn's first output token (a tuple: one entry per prompt
  token of the turn, None where there is none).
- A request asking takes no prefix-cache hit for its first turn (engine/conversations.py keys
  its blocks apart), so every position is computed.
"""

from __future__ import annotations

from tritonkv.sampling.logprobs import token_logprob


def prompt_span(seq) -> tuple[int, int]:
    """Token indices [first, end) of the running turn's prompt in ``seq.token_ids``."""
    turn = seq.turn
    end = len(seq.token_ids) - len(turn.output_ids)
    return end - len(turn.prompt_ids), end


def targets(seq, start: int, num_tokens: int) -> list[int] | None:
    """Per computed token of the chunk [start, start + num_tokens): the id its logits score, or
    -1; None when the turn asks none or none is wanted in this chunk."""
    if seq.turn.params.prompt_logprobs is None:
        return None
    first, end = prompt_span(seq)
    out = [seq.token_ids[p + 1] if first <= p + 1 < end else -1 for p in range(start, start + num_tokens)]
    return out if any(t >= 0 for t in out) else None


def record(seq, start: int, raw: list[tuple | None] | None, decode) -> None:
    """The runner's per-position results (``logprobs.prompt_logprobs``) of the chunk at ``start``
    (None: the row computed none)."""
    turn = seq.turn
    if raw is None:
        return
    for j, entry in enumerate(raw):
        q = start + j + 1
        if entry is not None and q not in turn.prompt_logprobs:
            turn.prompt_logprobs[q] = token_logprob(seq.token_ids[q], entry, turn.params.prompt_logprobs, decode)


def take(seq) -> tuple | None:
    """The turn's prompt logprobs, on its first output token only (else None)."""
    turn = seq.turn
    if turn.params.prompt_logprobs is None or len(turn.output_ids) != 1:
        return None
    first, end = prompt_span(seq)
    return tuple(turn.prompt_logprobs.get(q) for q in range(first, end))
