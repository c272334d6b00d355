"""Structured output (sampling/grammar.py): 100 seeded samples against each of three JSON
schemas all parse and validate (jsonschema, independent of the grammar library); guided_choice
returns only the choices; guided_regex matches; rows without a grammar are untouched (their
tokens equal the same requests run without guided rows beside them). Demo checkpoint (its
byte-level tokenizer), CPU, batched."""

import json
import re

import jsonschema
import pytest

from engine_helpers import Collector, make_engine
from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint
from tritonkv.sampling.params import ParameterError, SamplingParams

SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "mode": {"enum": ["a", "bb", "ccc"]}},
     "required": ["ok", "mode"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 3}},
     "required": ["name"], "additionalProperties": False},
    {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 1, "maxItems": 3},
]
SAMPLES = 100


@pytest.fixture(scope="module")
def engine():
    return make_engine(ensure_demo_checkpoint(), max_num_seqs=128, num_blocks=2048)


def run_all(engine, requests):
    """``requests``: [(prompt ids, params)] submitted together; each turn's Collector."""
    out = []
    for i, (ids, params) in enumerate(requests):
        c = Collector()
        engine.submit(("so", i), ids, params, c, start=True, end=True)
        out.append(c)
    engine.run_until_idle()
    return out


def prompt(i):
    return [256] + list(f"answer {i}:".encode())


@pytest.mark.parametrize("schema", SCHEMAS, ids=["enum_bool", "short_string", "array"])
def test_seeded_samples_all_validate(engine, schema):
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=s, guided_json=json.dumps(schema))
              for s in range(SAMPLES)]
    results = run_all(engine, [(prompt(i), p) for i, p in enumerate(params)])
    for c in results:
        assert c.outputs[-1].error is None and c.outputs[-1].finish_reason in ("eos", "stop"), c.outputs[-1]
        jsonschema.validate(json.loads(c.text), schema)


def test_guided_choice_returns_only_the_choices(engine):
    choices = ("red", "green", "blue sky")
    results = run_all(engine, [(prompt(i), SamplingParams(max_tokens=20, temperature=20.0, seed=i,
                                                          guided_choice=choices)) for i in range(40)])
    texts = [c.text for c in results]
    assert set(texts) <= set(choices) and len(set(texts)) > 1  # seeded draws (flattened) reach several


def test_guided_regex_matches(engine):
    pattern = r"[a-c]{2}-[0-9]{1,3}"
    results = run_all(engine, [(prompt(i), SamplingParams(max_tokens=20, temperature=1.0, seed=i,
                                                          guided_regex=pattern)) for i in range(20)])
    assert all(re.fullmatch(pattern, c.text) for c in results), [c.text for c in results]


def test_rows_without_a_grammar_are_untouched(engine):
    plain = [(prompt(i), SamplingParams(max_tokens=12, temperature=1.0, seed=50 + i, ignore_eos=True))
             for i in range(3)]
    alone = [c.token_ids for c in run_all(engine, plain)]
    guided = [(prompt(9), SamplingParams(max_tokens=12, temperature=1.0, seed=1, guided_choice=("x", "y")))]
    mixed = run_all(engine, plain + guided)
    assert [c.token_ids for c in mixed[:3]] == alone and mixed[3].text in ("x", "y")


def test_bad_grammars_are_refused_naming_the_parameter(engine):
    from tritonkv.sampling.params import check_sampling, check_value

    with pytest.raises(ParameterError, match="guided_json"):
        check_value("guided_json", "{not json")
    with pytest.raises(ParameterError, match="at most one"):
        check_sampling(SamplingParams(max_tokens=4, guided_regex="a", guided_choice=("b",)))
    c = run_all(engine, [(prompt(0), SamplingParams(max_tokens=4, guided_regex="(unclosed"))])[0]
    assert c.outputs[-1].error is not None and "guided_regex" in c.outputs[-1].error


def test_a_broken_xgrammar_install_is_a_clear_refusal(monkeypatch):
    """xgrammar that fails to import (the GPU image's stub venv did) refuses the guided turn
    naming the library and its error, instead of an unexplained failure."""
    import sys

    from tritonkv.model.tokenizer import TextTokenizer
    from tritonkv.sampling.grammar import GrammarCompiler

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` raises ImportError
    with pytest.raises(ParameterError, match=r"xgrammar failed to import \(ModuleNotFoundError"):
        GrammarCompiler(TextTokenizer(ensure_demo_checkpoint()), 256, [2])
