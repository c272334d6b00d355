"""``bad_words`` as token id sequences, as vLLM's ``SamplingParams.update_from_tokenizer``
makes them (the device side is sampling/penalty_state.py).

Rules:
- Each word is tokenised (no special tokens) from ``word.lstrip()``, then from
  ``" " + word.lstrip()``; the second sequence is also banned when it has as many tokens as
  the first and starts with another token (the word in the middle of a text).
- A one-token sequence's token is banned at every step; a longer sequence's last token is
  banned at a step whose output (the turn's generated tokens, not the prompt) ends with the
  sequence's other tokens.
- A word the tokenizer turns into no tokens bans nothing; a checkpoint without a tokenizer
  cannot take bad_words (RequestError naming them).
"""

from __future__ import annotations

from collections.abc import Callable

from tritonkv.sampling.params import RequestError


def bad_words_token_ids(words: tuple[str, ...], encode: Callable[[str], list[int]] | None,
                        vocab_size: int) -> list[list[int]]:
    """The banned token sequences of ``words``; ``encode``: text -> ids without special tokens."""
    if not words:
        return []
    if encode is None:
        raise RequestError("bad_words need the checkpoint's tokenizer (tokenizer.json), which this model lacks")
    out: list[list[int]] = []
    for word in words:
        plain = encode(word.lstrip())
        if plain:
            out.append(plain)
        spaced = encode(" " + word.lstrip())
        if plain and spaced and len(spaced) == len(plain) and spaced[0] != plain[0]:
            out.append(spaced)
    bad = [t for ids in out for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"bad_words tokenise to token id {bad[0]}, outside the model's vocabulary [0, {vocab_size})")
    return out
