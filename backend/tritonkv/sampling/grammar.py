"""Structured output: a turn's grammar (a JSON schema, any JSON object, a regex or a choice
among strings) as a token bitmask on its logits, through xgrammar (bench/NOTES_sampling.md
says why that library).

Rules:
- A guided turn holds a ``GrammarState`` (its matcher) from admission to its end; the engine
  advances it with each token it accepts (``accept``) and drops it with the turn. A stop
  string that takes sampled tokens back ends the turn, so no rollback outlives a turn.
- Before sampling, the batch's guided rows get their next-token bitmask (filled on the host,
  one row each) and the logits of those rows only have the forbidden tokens set to -inf
  (``apply_masks``); rows without a grammar are untouched. Logprobs stay the raw model's.
- Steps with a guided row are not overlapped (engine.py): a mask needs the previous token.
- The grammar's end: once the matcher is terminated (its stop token, EOS, was accepted, or the
  grammar cannot continue) the turn ends with ``stop``.
- Grammars are compiled per tokenizer by one ``GrammarCompiler`` (xgrammar caches them).
"""

from __future__ import annotations

import json
import threading

import torch

from tritonkv.sampling.params import ANY_JSON_OBJECT, ParameterError, SamplingParams  # noqa: F401


def guided_kind(params: SamplingParams) -> tuple[str, object] | None:
    """(guided_json | guided_regex | guided_choice, its value) or None."""
    for name in ("guided_json", "guided_regex", "guided_choice"):
        value = getattr(params, name)
        if value is not None:
            return name, value
    return None


def tokenizer_info(xgr, tok, vocab_size: int, stop_token_ids: list[int]):
    """xgrammar's TokenizerInfo from the checkpoint's ``tokenizers`` object, as
    ``TokenizerInfo.from_huggingface`` builds it for a fast tokenizer (the vocabulary by id, the
    vocab type and prefix space detected from the serialised pipeline), without importing
    transformers' AutoTokenizer: in the Triton stub's environment (numpy < 2) that import chain
    can fail where ``tokenizers`` works (seen on the GPU image)."""
    encoded = [""] * vocab_size
    for token, idx in tok.get_vocab(with_added_tokens=True).items():
        if idx < vocab_size:
            encoded[idx] = token
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok.to_str())
    return xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=vocab_size, stop_token_ids=stop_token_ids,
                             add_prefix_space=meta["add_prefix_space"])


class GrammarCompiler:
    """Compiles a turn's grammar for one tokenizer (made on the first guided turn)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        """``tokenizer``: the engine's TextTokenizer (model/tokenizer.py), None without one."""
        if tokenizer is None:
            raise ParameterError("structured output needs the checkpoint's tokenizer (tokenizer.json), "
                                 "which this model lacks")
        try:
            import xgrammar as xgr
        except Exception as exc:  # noqa: BLE001 (a broken install raises more than ImportError)
            raise ParameterError("structured output (guided_json / guided_regex / guided_choice, response_format, "
                                 f"tool_choice) is unavailable on this server: xgrammar failed to import "
                                 f"({type(exc).__name__}: {exc})") from None
        self.info = tokenizer_info(xgr, tokenizer.backend, vocab_size, stop_token_ids)
        self.compiler = xgr.GrammarCompiler(self.info)
        self.vocab_size = vocab_size
        self._lock = threading.Lock()

    def open(self, params: SamplingParams) -> "GrammarState | None":
        guided = guided_kind(params)
        if guided is None:
            return None
        import xgrammar as xgr

        name, value = guided
        try:
            with self._lock:
                if name == "guided_json":
                    compiled = self.compiler.compile_json_schema(value, any_whitespace=False)
                elif name == "guided_regex":
                    compiled = self.compiler.compile_regex(value)
                else:
                    rule = " | ".join(json.dumps(c) for c in value)
                    compiled = self.compiler.compile_grammar(f"root ::= {rule}")
        except Exception as exc:  # the library's message says what in the grammar is wrong
            raise ParameterError(f"{name} could not be compiled: {exc}") from None
        return GrammarState(xgr.GrammarMatcher(compiled))


class GrammarState:
    """One turn's matcher."""

    def __init__(self, matcher):
        self.matcher = matcher

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; True when the grammar has ended (the turn stops)."""
        if not self.matcher.accept_token(token):
            return True  # cannot happen under the mask; end rather than run unconstrained
        return self.matcher.is_terminated()


def apply_masks(logits: torch.Tensor, states: list[GrammarState | None], vocab_size: int) -> torch.Tensor:
    """``logits`` [n, vocab] with each guided row's forbidden tokens at -inf (a new tensor when
    some row is guided, else ``logits`` itself)."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return logits
    import xgrammar as xgr

    mask = xgr.allocate_token_bitmask(len(states), vocab_size)
    for i in rows:
        states[i].matcher.fill_next_token_bitmask(mask, i)
    out = logits.clone()
    xgr.apply_token_bitmask_inplace(out, mask.to(out.device, non_blocking=True), vocab_size=vocab_size,
                                    indices=rows)
    return out
