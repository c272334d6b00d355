"""The one definition of the sampling parameters: each one's name, type, range, default and
meaning. The Triton parser (server/triton_request.py), the vLLM contract
(server/vllm_contract.py), the OpenAI schema (openai_frontend/schema.py) and the client's
``GenerationParams`` are derived from ``PARAMETERS`` or checked against it (tests), so a new
parameter is added here and in the sampler that honours it.

Rules:
- A range is what the runner stores: integers fit int32 (``seed``: uint64), floats are finite
  float32; a value outside is refused naming the parameter and its range (``check_value``),
  before anything is converted to a fixed-width type.
- ``default`` is what a request that leaves the parameter out gets (``max_tokens``: None =
  the model's ``default_max_tokens``); ``neutral`` values change nothing.
- Order of the logits processing (engine/sampler.py): logit_bias, min_tokens (EOS and
  stop_token_ids masked), repetition_penalty, presence / frequency penalties, temperature,
  top_k, top_p, min_p; then greedy argmax or the seeded draw.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
MAX_SEED = UINT64_MAX
FLOAT32_MAX = 3.4028234663852886e38
MAX_STOP = 64  # stop strings per request
MAX_TOKEN_LIST = 1024  # entries of stop_token_ids / logit_bias per request
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a logit_bias value
MAX_LOGPROBS = 20  # most likely tokens returned per generated token
MAX_BAD_WORDS = 64  # bad_words per request
MAX_BAD_WORD_CHARS = 256  # characters of one bad word
MAX_SAMPLES = 64  # n / best_of: samples of one prompt


class RequestError(ValueError):
    """Bad input from a client: the message says what was wrong and what to do (re-exported by
    engine/requests.py)."""


class ParameterError(RequestError):
    """A sampling parameter's value is out of its range or of the wrong type; the message
    names the parameter."""


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: str  # int | float | bool | strings | words | token_ids | token_bias | json | regex | choices
    default: object
    meaning: str
    lo: float | None = None  # inclusive unless lo_open
    hi: float | None = None
    lo_open: bool = False
    triton_dtype: str | None = None  # the Triton input's datatype (None: request parameter only)
    vllm: bool = True  # a key of vLLM's SamplingParams
    openai: bool = True  # a field of the OpenAI request bodies

    def range_text(self) -> str:
        if self.lo is None:
            return ""
        low = "(" if self.lo_open else "["
        hi = {INT32_MAX: "2**31 - 1", UINT64_MAX: "2**64 - 1", FLOAT32_MAX: "3.4e38"}.get(self.hi, self.hi)
        return f"{low}{_num(self.lo)}, {_num(hi)}]"


def _num(x):
    return int(x) if isinstance(x, float) and x.is_integer() and abs(x) < 1e15 else x


PARAMETERS: tuple[Parameter, ...] = (
    Parameter("max_tokens", "int", None, "most tokens generated (None: the model's default_max_tokens)",
              1, INT32_MAX, triton_dtype="INT32"),
    Parameter("temperature", "float", 1.0, "divides the logits; 0 (or < 1e-5) is greedy", 0, FLOAT32_MAX,
              triton_dtype="FP32"),
    Parameter("top_k", "int", 0, "keep the k most likely tokens (0 = off; vLLM's -1 is read as 0)",
              0, INT32_MAX, triton_dtype="INT32"),
    Parameter("top_p", "float", 1.0, "keep the smallest set of most likely tokens whose probability reaches "
              "top_p", 0, 1, lo_open=True, triton_dtype="FP32"),
    Parameter("min_p", "float", 0.0, "drop tokens whose probability is below min_p times the most likely "
              "token's (after temperature)", 0, 1, triton_dtype="FP32"),
    Parameter("seed", "int", None, "makes the draws of this request reproducible", 0, UINT64_MAX,
              triton_dtype="INT64"),
    Parameter("repetition_penalty", "float", 1.0, "HF / vLLM: every token already in the prompt or the "
              "output has its logit divided by it (multiplied when negative); 1 = off", 0, FLOAT32_MAX,
              lo_open=True, triton_dtype="FP32"),
    Parameter("presence_penalty", "float", 0.0, "OpenAI: subtracted from the logit of every token the "
              "output already holds", -2, 2, triton_dtype="FP32"),
    Parameter("frequency_penalty", "float", 0.0, "OpenAI: subtracted once per earlier occurrence in the "
              "output from that token's logit", -2, 2, triton_dtype="FP32"),
    Parameter("min_tokens", "int", 0, "EOS and stop_token_ids are masked until this many tokens were "
              "generated (stop strings are not checked before)", 0, INT32_MAX, triton_dtype="INT32"),
    Parameter("stop", "strings", (), f"generation stops before any of these strings (at most {MAX_STOP})",
              triton_dtype="BYTES"),
    Parameter("stop_token_ids", "token_ids", (), "generation stops after any of these tokens "
              "(finish_reason stop; the token's text is not added)", triton_dtype="INT32"),
    Parameter("logit_bias", "token_bias", (), f"token id -> value in [-{LOGIT_BIAS_LIMIT:g}, "
              f"{LOGIT_BIAS_LIMIT:g}] added to its logit before anything else"),
    Parameter("ignore_eos", "bool", False, "keep generating after EOS", triton_dtype="BOOL"),
    Parameter("bad_words", "words", (), "vLLM: words never generated; each is tokenised with and without a "
              "leading space (sampling/bad_words.py); a one-token word is banned always, a longer one's last "
              f"token is banned right after the output ends with its other tokens (at most {MAX_BAD_WORDS} "
              "words)"),
    Parameter("logprobs", "int", None, "return each generated token's log-probability (of the model's "
              f"distribution, before any setting above) and this many of the most likely tokens' "
              f"(None: none; at most {MAX_LOGPROBS})", 0, MAX_LOGPROBS, openai=False),
    Parameter("prompt_logprobs", "int", None, "return each prompt token's log-probability given the tokens "
              "before it (the first token of a conversation has none) and this many of the most likely "
              f"tokens' at its position (None: none; at most {MAX_LOGPROBS}); such a request takes no "
              "prefix-cache hit (every prompt position is computed)", 0, MAX_LOGPROBS, openai=False),
    Parameter("n", "int", 1, "samples returned for the prompt (choices 0..n-1); they share the prompt's KV "
              "(one prefill); sample i with a seed s draws with seed s + i (as vLLM); stateless requests only",
              1, MAX_SAMPLES),
    Parameter("best_of", "int", None, "samples generated, of which the n with the highest cumulative logprob "
              "(the sum of the chosen tokens' logprobs) are returned, best first (vLLM v0); >= n, never "
              "streamed (None: n)", 1, MAX_SAMPLES),
    Parameter("guided_json", "json", None, "the output is JSON valid against this JSON schema (an object, or "
              "its JSON text); sampling/grammar.py", openai=False),
    Parameter("guided_regex", "regex", None, "the output matches this regular expression", openai=False),
    Parameter("guided_choice", "choices", None, "the output is exactly one of these strings", openai=False),
)
GUIDED = ("guided_json", "guided_regex", "guided_choice")  # at most one per request
MAX_GRAMMAR_CHARS = 64 << 10  # a schema's JSON text or a regex
ANY_JSON_OBJECT = '{"type": "object"}'  # OpenAI's response_format json_object, as guided_json
BY_NAME = {p.name: p for p in PARAMETERS}
# vLLM SamplingParams keys accepted only at the value that changes nothing
NEUTRAL_VALUES = {"include_stop_str_in_output": False}


@dataclass(frozen=True)
class SamplingParams:
    """One turn's sampling settings, checked (``check_sampling``) before the engine sees them.
    Defaults are ``PARAMETERS``' (a test keeps them equal)."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    bad_words: tuple[str, ...] = ()  # banned words (sampling/bad_words.py tokenises them)
    logit_bias: tuple[tuple[int, float], ...] = field(default=())  # (token id, bias), ids unique
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the top k
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's and the top k at its position
    guided_json: str | None = None  # a JSON schema's canonical JSON text (sampling/grammar.py)
    guided_regex: str | None = None
    guided_choice: tuple[str, ...] | None = None
    n: int = 1  # samples returned (engine/sample_group.py)
    best_of: int | None = None  # samples generated (None: n)

    @property
    def samples(self) -> int:
        """Sequences the request runs: best_of, else n."""
        return self.n if self.best_of is None else self.best_of

    @property
    def uses_penalties(self) -> bool:
        """Some setting needs the per-sequence token state on the device (engine/sampler.py)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.min_tokens > 0 or bool(self.logit_bias) or bool(self.bad_words))


def check_value(name: str, value, what: str | None = None):
    """``value`` (already of Python type int / float / bool / list) within ``name``'s range;
    returns it normalised (floats as float, token lists as tuples). Raises ParameterError
    naming ``what`` (default: the parameter's name)."""
    p = BY_NAME[name]
    what = what or name
    if p.kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParameterError(f"{what} must be a{'n integer' if p.kind == 'int' else ' number'}, got {value!r:.60}")
        if p.kind == "int" and isinstance(value, float):
            if not (math.isfinite(value) and value.is_integer()):
                raise ParameterError(f"{what} must be an integer, got {value!r}")
            value = int(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise ParameterError(f"{what} must be a finite number, got {value!r}")
        low_bad = value <= p.lo if p.lo_open else value < p.lo
        if low_bad or value > p.hi:
            raise ParameterError(f"{what} must be in {p.range_text()}, got {_short(value)}")
        return float(value) if p.kind == "float" else value
    if p.kind == "bool":
        if not isinstance(value, bool):
            raise ParameterError(f"{what} must be a boolean, got {value!r:.60}")
        return value
    if p.kind == "strings":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
            raise ParameterError(f"{what} must be a string or a list of strings")
        if len(value) > MAX_STOP:
            raise ParameterError(f"{what} holds {len(value)} strings; at most {MAX_STOP}")
        return tuple(s for s in value if s)
    if p.kind in ("json", "regex", "choices"):
        return _check_guided(p.kind, value, what)
    if p.kind == "words":
        return _check_words(value, what)
    if p.kind == "token_ids":
        if not isinstance(value, (list, tuple)):
            raise ParameterError(f"{what} must be a list of token ids, got {type(value).__name__}")
        if len(value) > MAX_TOKEN_LIST:
            raise ParameterError(f"{what} holds {len(value)} ids; at most {MAX_TOKEN_LIST}")
        return tuple(_token_id(t, f"{what}[{i}]") for i, t in enumerate(value))
    if p.kind == "token_bias":
        items = value.items() if isinstance(value, dict) else value
        if not isinstance(value, (dict, list, tuple)):
            raise ParameterError(f"{what} must be an object of token id -> bias, got {type(value).__name__}")
        items = list(items)
        if len(items) > MAX_TOKEN_LIST:
            raise ParameterError(f"{what} holds {len(items)} entries; at most {MAX_TOKEN_LIST}")
        out = {}
        for item in items:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise ParameterError(f"{what} must be an object of token id -> bias (or [id, bias] pairs)")
            key, bias = item
            token = _token_id(key, f"{what} key {str(key)[:40]!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias) \
                    or abs(bias) > LOGIT_BIAS_LIMIT:
                raise ParameterError(f"{what}[{token}] must be a number in [-{LOGIT_BIAS_LIMIT:g}, "
                                     f"{LOGIT_BIAS_LIMIT:g}], got {bias!r:.60}")
            out[token] = float(bias)
        return tuple(sorted(out.items()))
    raise AssertionError(p.kind)


def _check_guided(kind: str, value, what: str):
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ParameterError(f"{what} must be a JSON schema (an object or its JSON text): {exc}") from None
        if not isinstance(value, dict):
            raise ParameterError(f"{what} must be a JSON schema (an object), got {type(value).__name__}")
        text = json.dumps(value, sort_keys=True)
    elif kind == "regex":
        if not isinstance(value, str) or not value:
            raise ParameterError(f"{what} must be a non-empty string (a regular expression)")
        text = value
    else:
        if isinstance(value, str):
            try:
                value = json.loads(value)  # a request parameter carries the list as JSON text
            except ValueError:
                pass
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) and c for c in value):
            raise ParameterError(f"{what} must be a non-empty list of non-empty strings")
        if len(value) > MAX_TOKEN_LIST:
            raise ParameterError(f"{what} holds {len(value)} choices; at most {MAX_TOKEN_LIST}")
        return tuple(value)
    if len(text) > MAX_GRAMMAR_CHARS:
        raise ParameterError(f"{what} is {len(text)} characters long; at most {MAX_GRAMMAR_CHARS}")
    return text


def _check_words(value, what: str) -> tuple[str, ...]:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)  # a request parameter carries the list as JSON text
        except ValueError:
            pass
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) for w in value):
        raise ParameterError(f"{what} must be a list of strings")
    if len(value) > MAX_BAD_WORDS:
        raise ParameterError(f"{what} holds {len(value)} words; at most {MAX_BAD_WORDS}")
    for i, word in enumerate(value):
        if not word.strip():
            raise ParameterError(f"{what}[{i}] is blank; a bad word needs a character other than whitespace")
        if len(word) > MAX_BAD_WORD_CHARS:
            raise ParameterError(f"{what}[{i}] is {len(word)} characters long; at most {MAX_BAD_WORD_CHARS}")
    return tuple(value)


def _token_id(value, what: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("+").isdigit() and len(value) < 12:
        value = int(value)  # JSON object keys are strings (OpenAI's logit_bias)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT32_MAX:
        raise ParameterError(f"{what} must be a token id (an integer in [0, 2**31 - 1]), got {value!r:.60}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


def check_sampling(params: SamplingParams) -> None:
    """Refuse values the sampler cannot honour, naming the parameter (ParameterError)."""
    for p in PARAMETERS:
        value = getattr(params, p.name)
        if value is None and p.default is None:
            continue
        if p.kind == "token_bias":
            value = list(value)
        check_value(p.name, value)
    guided = [name for name in GUIDED if getattr(params, name) is not None]
    if len(guided) > 1:
        raise ParameterError(f"send at most one of {', '.join(GUIDED)}; got {' and '.join(guided)}")
    if params.best_of is not None and params.best_of < params.n:
        raise ParameterError(f"best_of ({params.best_of}) must be >= n ({params.n})")
    if params.min_tokens > params.max_tokens:
        raise ParameterError(f"min_tokens ({params.min_tokens}) must be <= max_tokens ({params.max_tokens})")


def check_samples(params: SamplingParams, stream: bool, one_shot: bool) -> None:
    """n / best_of where they have a meaning: best_of > 1 is never streamed (the best samples
    are known once all ended, as vLLM), and n / best_of > 1 only on one-shot requests (a
    conversation can continue only one sample)."""
    if stream and (params.best_of or 1) > 1:
        raise ParameterError(f"best_of ({params.best_of}) > 1 cannot be streamed: the best samples are known "
                             "only once every sample ended; send stream false")
    if not one_shot and params.samples > 1:
        raise ParameterError(f"n / best_of > 1 (got n {params.n}, best_of {params.best_of}) is for one-shot "
                             "requests (llm_stateless): a conversation can continue only one sample")


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """Token ids named by the settings lie in the vocabulary."""
    for name, ids in (("stop_token_ids", params.stop_token_ids),
                      ("logit_bias", [t for t, _ in params.logit_bias])):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise ParameterError(f"{name} names token id {bad[0]}, outside the vocabulary [0, {vocab_size})")
