"""Every contract derives its sampling parameters from tritonkv.sampling.params or is checked
against it here, so a parameter added there and missing elsewhere fails a test."""

import dataclasses
import re
from pathlib import Path

import pytest

from tritonkv.sampling.params import BY_NAME, PARAMETERS, SamplingParams, check_sampling
from tritonkv.server import vllm_contract
from tritonkv.server.triton_request import KNOWN_PARAMETERS, SETTINGS

ROOT = Path(__file__).resolve().parents[2]


def test_sampling_params_defaults_are_the_table_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    assert set(fields) == set(BY_NAME)
    for p in PARAMETERS:
        if p.name != "max_tokens":
            assert fields[p.name] == p.default, p.name
    check_sampling(SamplingParams(max_tokens=1))


def test_triton_parser_and_vllm_contract_know_every_parameter():
    assert set(BY_NAME) <= set(KNOWN_PARAMETERS)
    assert {p.name for p in PARAMETERS if p.kind in ("int", "float", "bool")} <= set(SETTINGS)
    assert {p.name for p in PARAMETERS if p.vllm} <= set(vllm_contract.VLLM_KEYS)


@pytest.mark.parametrize("model", ["llm", "llm_stateless"])
def test_model_configs_declare_each_tensor_parameter_with_its_datatype(model):
    text = (ROOT / "model_repository" / model / "config.pbtxt").read_text()
    declared = dict(re.findall(r'name: "(\w+)" data_type: TYPE_(\w+)', text))
    for p in PARAMETERS:
        if p.triton_dtype:
            want = "STRING" if p.triton_dtype == "BYTES" else p.triton_dtype
            assert declared.get(p.name) == want, p.name


def test_client_generation_params_are_the_server_parameters():
    from tritonkv_client import params as client_params

    names = {f.name for f in dataclasses.fields(client_params.GenerationParams)}
    assert names == set(BY_NAME)
    for name, (_, dtype) in client_params._SCALARS.items():
        assert BY_NAME[name].triton_dtype == dtype, name
    tensor_scalars = {p.name for p in PARAMETERS if p.triton_dtype and p.kind in ("int", "float", "bool")}
    assert set(client_params._SCALARS) == tensor_scalars


def test_openai_bodies_take_every_openai_parameter():
    from tritonkv.openai_frontend.schema import ChatBody, CompletionBody

    for body in (ChatBody, CompletionBody):
        assert {p.name for p in PARAMETERS if p.openai} <= set(body.model_fields)


def _table_row(doc: str, name: str) -> list[str] | None:
    row = next((line for line in doc.splitlines() if line.startswith(f"| `{name}`")), None)
    return None if row is None else [c.strip() for c in row.strip().strip("|").split("|")]


def _default_text(p) -> str:
    if p.default is None or p.default == ():
        return "(none" if p.name != "max_tokens" else "(the model's `default_max_tokens`)"
    if isinstance(p.default, bool):
        return f"({str(p.default).lower()})"
    return f"({int(p.default) if float(p.default).is_integer() else p.default}"


def test_docs_list_every_parameter_with_its_default_and_surfaces():
    """Both docs have a table row for every parameter of params.py (a new one cannot go
    undocumented); docs/client.md's row gives its default and says how the OpenAI API takes it."""
    client_doc = (ROOT / "docs" / "client.md").read_text()
    openai_doc = (ROOT / "docs" / "openai.md").read_text()
    for p in PARAMETERS:
        cells = _table_row(client_doc, p.name)
        assert cells is not None and cells[0].startswith(f"`{p.name}` ("), f"docs/client.md has no row for {p.name}"
        assert len(cells) == 4 and cells[3], f"docs/client.md: {p.name}'s row lacks its OpenAI column"
        assert _default_text(p) in cells[1], f"docs/client.md: {p.name}'s row does not give its default {p.default!r}"
        assert _table_row(openai_doc, p.name) is not None, f"docs/openai.md has no row for {p.name}"


@pytest.mark.parametrize("value", [[1, 2, 3], [[1]], "x", 5, [[1, 2, 3]]])
def test_malformed_logit_bias_is_a_parameter_error(value):
    from tritonkv.sampling.params import ParameterError, check_value

    with pytest.raises(ParameterError, match="logit_bias"):
        check_value("logit_bias", value)
