"""Structured output through the served API (shared server, demo model, CPU): OpenAI chat
``response_format`` json_schema / json_object, the vLLM ``sampling_parameters`` key
``guided_choice`` (gRPC) and the client library's ``guided_regex``. Validity is checked by
jsonschema / json / re, independently of the grammar library."""

import json
import re

import jsonschema
import openai
import pytest

from test_vllm_compat import grpc_responses, vllm_inputs

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "mode": {"enum": ["a", "bb"]}},
          "required": ["ok", "mode"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(e2e_server):
    return openai.OpenAI(base_url=e2e_server.openai_url, api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("seed", range(4))
def test_chat_response_format_json_schema_validates(client, seed):
    r = client.chat.completions.create(
        model="tritonkv-demo", messages=[{"role": "user", "content": "give me JSON"}], max_tokens=80, seed=seed,
        temperature=1.0, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_chat_response_format_json_object_is_an_object(client):
    r = client.chat.completions.create(
        model="tritonkv-demo", messages=[{"role": "user", "content": "x"}], max_tokens=200, seed=3,
        temperature=0.7, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":  # an unbounded object may run past max_tokens
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")


def test_bad_response_format_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="tritonkv-demo", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=4, response_format={"type": "json_schema", "json_schema": {}})


def test_vllm_guided_choice(e2e_server):
    responses = grpc_responses(e2e_server.grpc_url, vllm_inputs(
        {"max_tokens": 10, "temperature": 1.0, "seed": 5, "guided_choice": ["yes", "no"]}, True, True))
    text = "".join(r["text_output"].reshape(-1)[0].decode("utf-8") for r in responses)
    assert text in ("yes", "no")


def test_client_guided_regex(e2e_server):
    from tritonkv_client import Client

    with Client(e2e_server.grpc_url) as c:
        r = c.generate("code:", max_tokens=12, temperature=1.0, seed=2, guided_regex=r"[A-Z]{3}[0-9]")
    assert re.fullmatch(r"[A-Z]{3}[0-9]", r.text)
