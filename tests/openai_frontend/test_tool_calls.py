"""Tool calls in chat completions with a recording bridge in place of Triton: the chat
templates render the tools as transformers renders them, the model's text is read back as
OpenAI ``tool_calls`` (whole and streamed, as the openai SDK accumulates them), the
constraint sent for "required" / a named function is the schema the calls must satisfy, and
bad tools are 400s naming the field."""

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from transformers import PreTrainedTokenizerFast

from test_app import RecordingBridge, post
from tool_templates import LLAMA31, QWEN25
from tritonkv.model.demo_checkpoint import BOS, EOS, byte_level_tokenizer
from tritonkv.openai_frontend.app import create_app
from tritonkv.openai_frontend.chat_template import ChatTemplate
from tritonkv.openai_frontend.served_model import ServedModel
from tritonkv.openai_frontend.tool_parsers import parse_hermes, parse_llama3_json
from tritonkv.openai_frontend.triton_bridge import Delta

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]


def checkpoint(tmp_path, template, model_type):
    byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS,
                                                                "chat_template": template}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(tmp_path)


def conversation(arguments):
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                  "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
            {"role": "user", "content": "And tomorrow?"}]


@pytest.mark.parametrize("template", [LLAMA31, QWEN25], ids=["llama3.1", "qwen2.5"])
def test_templates_render_tools_as_transformers(tmp_path, template):
    ckpt = checkpoint(tmp_path, template, "llama")
    hf = PreTrainedTokenizerFast(tokenizer_file=f"{ckpt}/tokenizer.json", bos_token=BOS, eos_token=EOS)
    args = {"city": "Paris", "unit": "c"}
    # transformers is given the arguments as an object; the OpenAI request carries JSON text
    expected = hf.apply_chat_template(conversation(args), tools=TOOLS, chat_template=template, tokenize=False,
                                      add_generation_prompt=True)
    ours = ChatTemplate.from_checkpoint(ckpt).render(conversation(json.dumps(args)), tools=TOOLS)
    assert ours == expected
    assert '"get_weather"' in ours and '"city": "Paris"' in ours  # the tools and the call were rendered
    no_tools = hf.apply_chat_template(USER, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate.from_checkpoint(ckpt).render(USER) == no_tools


@pytest.mark.parametrize("text,content,calls", [
    ('{"name": "f", "parameters": {"a": 1}}', None, [("f", {"a": 1})]),
    ('<|python_tag|>{"name": "f", "arguments": {}}; {"name": "g", "parameters": {"b": "x"}}', None,
     [("f", {}), ("g", {"b": "x"})]),
    (' \n{"name": "f", "parameters": {"a": [1, 2]}}\n', None, [("f", {"a": [1, 2]})]),
    ('Hello {"name": "f", "parameters": {}}', 'Hello {"name": "f", "parameters": {}}', None),
    ('{"name": "f", "parameters": {"a": 1', '{"name": "f", "parameters": {"a": 1', None),
    ('{"nom": "f"}', '{"nom": "f"}', None),
])
def test_llama3_json_parser(text, content, calls):
    got_content, got = parse_llama3_json(text)
    assert got_content == content
    assert (None if got is None else [(c.name, json.loads(c.arguments)) for c in got]) == calls


@pytest.mark.parametrize("text,content,calls", [
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', None, [("f", {"a": 1})]),
    ('Let me look.\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>{"name": "g", '
     '"arguments": {"b": 2}}', 'Let me look.\n', [("f", {}), ("g", {"b": 2})]),
    ('plain text', 'plain text', None),
    ('<tool_call>{"name": "f", "arguments": </tool_call>', '<tool_call>{"name": "f", "arguments": </tool_call>', None),
])
def test_hermes_parser(text, content, calls):
    got_content, got = parse_hermes(text)
    assert got_content == content
    assert (None if got is None else [(c.name, json.loads(c.arguments)) for c in got]) == calls


def deltas_of(text, pieces=3):
    """The text in ``pieces`` deltas (the last carries finish_reason stop)."""
    step = max(1, len(text) // pieces)
    parts = [text[i:i + step] for i in range(0, len(text), step)]
    out = [Delta(p, 1, [0]) for p in parts[:-1]]
    return out + [Delta(parts[-1], 1, [0], "eos", prompt_tokens=5)]


def chat(tmp_path, template, model_type, text, body, pieces=3):
    bridge = RecordingBridge(deltas_of(text, pieces))
    app = create_app(ServedModel.load(checkpoint(tmp_path, template, model_type), "m"), bridge)
    return post(app, "/v1/chat/completions", {"model": "m", "messages": USER, "tools": TOOLS, **body}), bridge


def only_call(message):
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    return call["function"]["name"], json.loads(call["function"]["arguments"])


@pytest.mark.parametrize("template,model_type,text", [
    (LLAMA31, "llama", '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    (QWEN25, "qwen2", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
])
def test_auto_reads_the_familys_calls(tmp_path, template, model_type, text):
    r, bridge = chat(tmp_path, template, model_type, text, {})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert only_call(choice["message"]) == ("get_weather", {"city": "Paris"})
    gen = bridge.sent[0]
    assert "guided_json" not in gen.sampling  # auto does not constrain decoding
    assert "get_weather" in bytes(byte_level_tokenizer().decode(gen.input_ids), "utf-8").decode()


def test_auto_plain_text_and_unknown_functions_stay_content(tmp_path):
    r, _ = chat(tmp_path, LLAMA31, "llama", "It is sunny.", {"tool_choice": "auto"})
    choice = r.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("It is sunny.", "stop")
    assert "tool_calls" not in choice["message"]
    text = '{"name": "rm_rf", "parameters": {}}'
    choice = chat(tmp_path, LLAMA31, "llama", text, {})[0].json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (text, "stop")


def test_named_choice_constrains_to_the_tools_schema(tmp_path):
    text = '{"city": "Oslo", "unit": "f"}'
    r, bridge = chat(tmp_path, QWEN25, "qwen2", text,
                     {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    choice = r.json()["choices"][0]
    assert only_call(choice["message"]) == ("get_weather", {"city": "Oslo", "unit": "f"})
    assert choice["finish_reason"] == "stop"  # OpenAI's answer to a forced function
    assert json.loads(bridge.sent[0].sampling["guided_json"]) == WEATHER


def test_required_constraint_accepts_exactly_calls_of_the_offered_tools(tmp_path):
    text = '[{"name": "get_weather", "parameters": {"city": "Rome"}}, {"name": "now", "parameters": {}}]'
    r, bridge = chat(tmp_path, LLAMA31, "llama", text, {"tool_choice": "required"})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in choice["message"]["tool_calls"]] \
        == [("get_weather", {"city": "Rome"}), ("now", {})]
    schema = json.loads(bridge.sent[0].sampling["guided_json"])
    jsonschema.validate(json.loads(text), schema)
    for bad in ([], [{"name": "rm", "parameters": {}}], [{"name": "get_weather", "parameters": {"town": "x"}}],
                [{"name": "get_weather", "parameters": {"city": "Rome", "unit": "k"}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    _, bridge = chat(tmp_path, LLAMA31, "llama", text, {"tool_choice": "required", "parallel_tool_calls": False})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(text), json.loads(bridge.sent[0].sampling["guided_json"]))


def test_a_cut_constrained_answer_keeps_its_finish_reason(tmp_path):
    """A forced function is answered as its call even when cut (OpenAI, vLLM); a cut
    "required" array cannot be read and is content."""
    bridge = RecordingBridge([Delta('{"city": "Par', 4, [0] * 4, "length", prompt_tokens=5)])
    app = create_app(ServedModel.load(checkpoint(tmp_path, LLAMA31, "llama"), "m"), bridge)
    body = {"model": "m", "messages": USER, "tools": TOOLS, "max_tokens": 4}
    r = post(app, "/v1/chat/completions", {**body, "tool_choice": {"type": "function", "function": {"name": "now"}}})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert (call["function"]["name"], call["function"]["arguments"]) == ("now", '{"city": "Par')
    choice = post(app, "/v1/chat/completions", {**body, "tool_choice": "required"}).json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ('{"city": "Par', "length")
    assert "tool_calls" not in choice["message"]


def sdk_stream(tmp_path, template, model_type, text, **kw):
    """The streamed answer as the openai SDK accumulates it (its stream helper)."""
    bridge = RecordingBridge(deltas_of(text, pieces=len(text)))
    app = create_app(ServedModel.load(checkpoint(tmp_path, template, model_type), "m"), bridge)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/v1") as http:
            client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="x", http_client=http, max_retries=0)
            async with client.chat.completions.stream(model="m", messages=USER, tools=TOOLS, **kw) as stream:
                chunks = [event.chunk async for event in stream if event.type == "chunk"]
                return await stream.get_final_completion(), chunks

    return asyncio.run(run())


@pytest.mark.parametrize("template,model_type,text,content", [
    (LLAMA31, "llama", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', None),
    (QWEN25, "qwen2", 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
                      '</tool_call>', "Checking."),
])
def test_streamed_calls_accumulate_in_the_openai_sdk(tmp_path, template, model_type, text, content):
    final, chunks = sdk_stream(tmp_path, template, model_type, text)
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert (choice.message.content or None) == content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "<tool_call>" not in streamed and "python_tag" not in streamed and "{" not in streamed


def test_streamed_plain_text_in_auto_is_sent_as_it_comes(tmp_path):
    text = "Sunny <tool and warm."
    final, chunks = sdk_stream(tmp_path, QWEN25, "qwen2", text)
    assert final.choices[0].message.content == text and not final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "stop"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 5  # not all held to the end


def test_streamed_named_call_sends_its_arguments_as_they_come(tmp_path):
    text = '{"city": "Oslo", "unit": "f"}'
    final, chunks = sdk_stream(tmp_path, QWEN25, "qwen2", text,
                               tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = final.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", text)
    assert final.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(pieces) == len(text)  # one delta per generated piece
    assert pieces[0][0].id == call.id and pieces[0][0].function.name == "get_weather"
    assert all(p[0].id is None and p[0].function.name is None for p in pieces[1:])


def test_streamed_required_call(tmp_path):
    text = '[{"name": "now", "parameters": {}}]'
    final, _ = sdk_stream(tmp_path, LLAMA31, "llama", text, tool_choice="required")
    [call] = final.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("now", {})


@pytest.mark.parametrize("body,param,words", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "tools[0].type"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "names a function twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]}, "tools",
     "tools[0].function.parameters is not a valid JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools",
     "must describe an object"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice",
     "'missing', which is not in 'tools'"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice must be"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "not both"),
])
def test_bad_tools_are_400s_naming_the_field(tmp_path, body, param, words):
    bridge = RecordingBridge(deltas_of("x"))
    app = create_app(ServedModel.load(checkpoint(tmp_path, LLAMA31, "llama"), "m"), bridge)
    r = post(app, "/v1/chat/completions", {"model": "m", "messages": USER, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"]
    assert bridge.sent == []


def test_auto_without_a_parser_says_how_to_pick_one(tmp_path):
    bridge = RecordingBridge(deltas_of("x"))
    app = create_app(ServedModel.load(checkpoint(tmp_path, LLAMA31, "gpt2"), "m"), bridge)
    r = post(app, "/v1/chat/completions", {"model": "m", "messages": USER, "tools": TOOLS})
    assert r.status_code == 400 and "--tool-call-parser" in r.json()["error"]["message"]
    app = create_app(ServedModel.load(checkpoint(tmp_path, LLAMA31, "gpt2"), "m", tool_parser="hermes"), bridge)
    r = post(app, "/v1/chat/completions", {"model": "m", "messages": USER, "tools": TOOLS})
    assert r.status_code == 200


def test_each_of_n_choices_reads_its_own_calls(tmp_path):
    """n = 2: choice 0 writes a call, choice 1 plain text; whole and streamed (SDK)."""
    call = '{"name": "now", "parameters": {}}'
    deltas = [Delta(call[:9], 1, [0], index=0), Delta("Hi ", 1, [0], index=1), Delta(call[9:], 1, [0], "eos", index=0),
              Delta("there", 1, [0], "eos", prompt_tokens=5, index=1, last=True)]
    app = create_app(ServedModel.load(checkpoint(tmp_path, LLAMA31, "llama"), "m"), RecordingBridge(deltas))
    r = post(app, "/v1/chat/completions", {"model": "m", "messages": USER, "tools": TOOLS, "n": 2})
    first, second = r.json()["choices"]
    assert first["finish_reason"] == "tool_calls" and only_call(first["message"]) == ("now", {})
    assert (second["message"]["content"], second["finish_reason"]) == ("Hi there", "stop")

    async def stream():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/v1") as http:
            client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="x", http_client=http, max_retries=0)
            async with client.chat.completions.stream(model="m", messages=USER, tools=TOOLS, n=2) as s:
                return await s.get_final_completion()

    final = asyncio.run(stream())
    assert [c.finish_reason for c in final.choices] == ["tool_calls", "stop"]
    assert final.choices[0].message.tool_calls[0].function.name == "now" and not final.choices[1].message.tool_calls
    assert final.choices[1].message.content == "Hi there"
