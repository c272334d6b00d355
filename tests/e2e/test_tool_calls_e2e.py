"""Tool calls through the served API (shared server, demo model: random weights, a llama
family, so the llama3_json parser): with tool_choice "required" or a named function the
decoding is constrained, so every seeded sample is a call of an offered tool whose arguments
validate against its schema (checked by jsonschema, independently of the grammar library);
streamed, the openai SDK accumulates the same call."""

import json

import jsonschema
import openai
import pytest

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["c", "f"]},
                                            "alerts": {"type": "boolean"}},
           "required": ["city", "unit"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
         "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "clock", "description": "time now", "parameters": CLOCK}}]
SCHEMAS = {"get_weather": WEATHER, "clock": CLOCK}
MESSAGES = [{"role": "user", "content": "weather?"}]


@pytest.fixture(scope="module")
def client(e2e_server):
    return openai.OpenAI(base_url=e2e_server.openai_url, api_key="unused", max_retries=0, timeout=120)


def check_call(call):
    assert call.type == "function" and call.id
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", range(6))
def test_named_function_calls_validate(client, seed):
    r = client.chat.completions.create(model="tritonkv-demo", messages=MESSAGES, tools=TOOLS, max_tokens=80, seed=seed,
                                       temperature=1.0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    check_call(call)


@pytest.mark.parametrize("seed", range(6))
def test_required_calls_validate(client, seed):
    r = client.chat.completions.create(model="tritonkv-demo", messages=MESSAGES, tools=TOOLS, max_tokens=120,
                                       seed=seed, temperature=1.0, tool_choice="required", parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    check_call(call)


def test_streamed_required_call_accumulates_in_the_sdk(client):
    kw = dict(model="tritonkv-demo", messages=MESSAGES, tools=TOOLS, max_tokens=120, seed=11, temperature=1.0,
              tool_choice="required", parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    with client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    [call] = final.choices[0].message.tool_calls
    check_call(call)
    assert (call.function.name, call.function.arguments) == (whole.function.name, whole.function.arguments)


def test_auto_answers_and_the_server_keeps_serving(client):
    r = client.chat.completions.create(model="tritonkv-demo", messages=MESSAGES, tools=TOOLS, max_tokens=8, seed=1)
    message = r.choices[0].message
    for call in message.tool_calls or ():  # random weights: almost surely plain text
        check_call(call)
    assert message.tool_calls or message.content is not None


def test_tool_choice_naming_a_missing_function_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="not in 'tools'") as info:
        client.chat.completions.create(model="tritonkv-demo", messages=MESSAGES, tools=TOOLS, max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert info.value.body["param"] == "tool_choice"


def test_streamed_named_call_equals_the_whole_one(client):
    kw = dict(model="tritonkv-demo", messages=MESSAGES, tools=TOOLS, max_tokens=80, seed=12, temperature=1.0,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    with client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    check_call(call)
    assert (call.function.name, call.function.arguments) == ("get_weather", whole.function.arguments)
