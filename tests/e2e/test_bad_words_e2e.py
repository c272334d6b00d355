"""bad_words through every surface (shared server, demo model: a byte-level tokenizer, random
weights): a grammar keeps the output to a few letters, so a banned letter or letter pair is a
choice the model would otherwise make (the baseline shows it), and with bad_words it never
appears. OpenAI chat (vLLM's extra field), Triton gRPC (vLLM's sampling_parameters), the
client library."""

import json
import re

import openai
import pytest

from test_vllm_compat import grpc_responses, vllm_inputs

LETTERS = {"type": "array", "items": {"enum": ["a", "b", "c", "d"]}, "minItems": 12, "maxItems": 12}


@pytest.fixture(scope="module")
def client(e2e_server):
    return openai.OpenAI(base_url=e2e_server.openai_url, api_key="unused", max_retries=0, timeout=120)


def letters(client, **extra):
    r = client.chat.completions.create(
        model="tritonkv-demo", messages=[{"role": "user", "content": "letters"}], max_tokens=80, seed=4,
        temperature=1.0, response_format={"type": "json_schema", "json_schema": {"name": "l", "schema": LETTERS}},
        extra_body=extra)
    return json.loads(r.choices[0].message.content)


def test_openai_chat_bad_words(client):
    baseline = letters(client)
    banned = max("abcd", key=baseline.count)
    assert banned in baseline
    got = letters(client, bad_words=[banned])
    assert len(got) == 12 and banned not in got


def test_openai_bad_words_value_is_checked(client):
    with pytest.raises(openai.BadRequestError, match="bad_words") as info:
        client.chat.completions.create(model="tritonkv-demo", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=2, extra_body={"bad_words": [" "]})
    assert info.value.body["param"] == "bad_words"


def test_vllm_sampling_parameters_bad_words_pair(e2e_server):
    base = {"max_tokens": 40, "temperature": 1.0, "seed": 9, "guided_regex": "[ab]{30}"}

    def text(sampling):
        responses = grpc_responses(e2e_server.grpc_url, vllm_inputs(sampling, False, True))
        return "".join(r["text_output"].reshape(-1)[0].decode("utf-8") for r in responses)

    baseline = text(base)
    assert re.fullmatch("[ab]{30}", baseline) and "ab" in baseline
    got = text({**base, "bad_words": ["ab"]})
    # after an "a" the "b" is banned, so once an "a" comes only "a"s follow
    assert re.fullmatch("b*a*", got) and len(got) == 30


def test_client_library_bad_words(e2e_server):
    from tritonkv_client import Client

    with Client(e2e_server.grpc_url) as c:
        base = c.generate("x", max_tokens=24, temperature=1.0, seed=3, guided_regex="[abc]{20}").text
        banned = max("abc", key=base.count)
        got = c.generate("x", max_tokens=24, temperature=1.0, seed=3, guided_regex="[abc]{20}",
                         bad_words=[banned]).text
    assert banned in base and re.fullmatch("[abc]{20}", got) and banned not in got
