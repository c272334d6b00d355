"""Tool calls in chat completions: the request's ``tools`` / ``tool_choice`` checked, the
decoding constraint they imply, and the generated text read back as OpenAI ``tool_calls``.

Rules (as vLLM's OpenAI server, OpenAI's shapes):
- ``tools`` is a list of ``{"type": "function", "function": {"name", "description"?,
  "parameters"?}}``; a name is 1-64 of ``[a-zA-Z0-9_-]`` and unique; ``parameters`` is a JSON
  schema (an object schema; absent: ``{"type": "object"}``). Anything else is a 400 naming the
  field (``tools[i].function.name`` ...).
- ``tool_choice``: "none" (plain text; the template still sees the tools), "auto" (the
  model's text is parsed by the served model's tool call parser: a call when it matches,
  else plain content), "required" (decoding constrained to a JSON array of one or more
  ``{"name", "parameters"}`` objects, each valid against its tool's schema; one item only
  with ``parallel_tool_calls`` false), or ``{"type": "function", "function": {"name"}}``
  (decoding constrained to that tool's parameters schema: the text is the arguments, always
  answered as that function's call, as OpenAI and vLLM do, even when max_tokens cut it).
  Default: "auto" with tools, "none" without. A choice naming a function not in ``tools``,
  or any choice but "none" without tools, is a 400 naming ``tool_choice``; "auto" on a model
  without a parser is a 400 that says how to pick one (``--tool-call-parser``).
- A constrained choice cannot be combined with ``response_format`` (both are grammars).
- A call whose name is not one of the request's tools is not a call: the text is content.
- finish_reason: "tool_calls" when "auto" or "required" produced calls; a named choice keeps
  "stop" (OpenAI's behaviour for a forced function) or "length"; a "required" text that does
  not parse (cut by max_tokens) is returned as content with its own finish_reason.
- Streamed (``ToolStream``): a named choice's arguments stream as they come (the first chunk
  carries the call's id, type and name); "auto" holds back the text that may still be a call
  (``tool_parsers.held_from``) and "required" holds all, and their calls come whole in the
  last chunk.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

import jsonschema

from tritonkv.openai_frontend.errors import bad_request
from tritonkv.openai_frontend.tool_parsers import PARSERS, ParsedCall, held_from, parsed_call

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ANY_OBJECT = {"type": "object"}
MAX_TOOLS = 128


@dataclass
class ToolRequest:
    """A chat request's tools, checked; ``choice``: auto | required | named."""

    schemas: dict[str, dict]  # function name -> its parameters schema
    choice: str
    name: str | None  # the named function (choice "named")
    parallel: bool
    parser: str | None  # tool_parsers.PARSERS key (choice "auto")

    def guided_json(self) -> dict | None:
        """The JSON schema decoding is constrained to (None for "auto")."""
        if self.choice == "named":
            return self.schemas[self.name]
        if self.choice != "required":
            return None
        items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, schema in self.schemas.items()]
        array = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not self.parallel:
            array["maxItems"] = 1
        return array

    def read(self, text: str) -> tuple[str | None, list[dict] | None]:
        """(content, tool_calls) of a whole generated text; tool_calls None when it holds none."""
        if self.choice == "named":
            return None, openai_calls([ParsedCall(self.name, text)])
        if self.choice == "required":
            calls = _required_calls(text)
            return (None, openai_calls(calls)) if calls else (text, None)
        content, calls = PARSERS[self.parser](text)
        if not calls or any(c.name not in self.schemas for c in calls):
            return text, None
        return content, openai_calls(calls)

    def finish_reason(self, reason: str | None, calls: list[dict] | None) -> str | None:
        if calls and self.choice != "named" and reason == "stop":
            return "tool_calls"
        return reason


def _required_calls(text: str) -> list[ParsedCall] | None:
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not items:
        return None
    calls = [parsed_call(item, ("parameters",)) for item in items]
    return None if None in calls else calls


def openai_calls(calls: list[ParsedCall]) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def tool_request(tools, tool_choice, parallel_tool_calls: bool | None, parser: str | None) -> ToolRequest | None:
    """The checked tools of a chat request, or None when the answer is plain text (no tools,
    or tool_choice "none"). Raises OpenAIError 400 naming the field."""
    schemas = _check_tools(tools) if tools else {}
    choice, name = _check_choice(tool_choice, schemas)
    if choice == "none":
        return None
    if choice == "auto" and parser is None:
        raise bad_request("tool_choice 'auto' needs a tool call parser, and this model's family has none: start the "
                          f"frontend with --tool-call-parser ({' | '.join(PARSERS)}), or send tool_choice 'required' "
                          "or a named function", "tool_choice")
    return ToolRequest(schemas, choice, name, parallel_tool_calls is not False, parser)


def _check_tools(tools) -> dict[str, dict]:
    if not isinstance(tools, list):
        raise bad_request("'tools' must be a list of {'type': 'function', 'function': {...}}", "tools")
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"'tools' holds {len(tools)} tools; at most {MAX_TOOLS}", "tools")
    schemas = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request(f"{where}.type must be 'function'", "tools")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise bad_request(f"{where}.function must be an object with a 'name'", "tools")
        unknown = sorted(set(fn) - {"name", "description", "parameters", "strict"})
        if unknown:
            raise bad_request(f"{where}.function holds unrecognized fields: {', '.join(unknown)}", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise bad_request(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r:.70}",
                              "tools")
        if name in schemas:
            raise bad_request(f"{where}.function.name {name!r} names a function twice", "tools")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise bad_request(f"{where}.function.description must be a string", "tools")
        schemas[name] = _check_parameters(fn.get("parameters"), f"{where}.function.parameters")
    return schemas


def _check_parameters(schema, where: str) -> dict:
    if schema is None:
        return dict(ANY_OBJECT)
    if not isinstance(schema, dict):
        raise bad_request(f"{where} must be a JSON schema (an object), got {type(schema).__name__}", "tools")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise bad_request(f"{where} is not a valid JSON schema: {exc.message}", "tools") from None
    if schema.get("type", "object") != "object":
        raise bad_request(f"{where} must describe an object (type 'object'), got type {schema.get('type')!r}", "tools")
    return schema


def _check_choice(choice, schemas: dict) -> tuple[str, str | None]:
    if choice is None:
        return ("auto" if schemas else "none"), None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', "
                              f"'function': {{'name': ...}}}}, got {choice!r:.40}", "tool_choice")
        if choice != "none" and not schemas:
            raise bad_request(f"tool_choice {choice!r} needs 'tools'", "tool_choice")
        return choice, None
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(fn, dict):
        raise bad_request("tool_choice must be a string or {'type': 'function', 'function': {'name': ...}}",
                          "tool_choice")
    if not isinstance(name, str):
        raise bad_request("tool_choice.function.name must be a string", "tool_choice")
    if name not in schemas:
        offered = ", ".join(schemas) or "none"
        raise bad_request(f"tool_choice names function {name!r:.70}, which is not in 'tools' (offered: {offered})",
                          "tool_choice")
    return "named", name


class ToolStream:
    """A streamed answer's text, split into what can be sent now (content, or a named call's
    arguments) and text held back because it may be a call. At the end the held text is read:
    its calls, or it goes out as content."""

    def __init__(self, request: ToolRequest):
        self.request = request
        self.text = ""
        self.sent = 0
        self.named_call: dict | None = None  # a named choice's call, once its first chunk went out

    def feed(self, piece: str) -> tuple[str, list[dict] | None]:
        """(content that can be sent now, ``delta.tool_calls`` entries or None)."""
        self.text += piece
        if self.request.choice == "named":
            if self.named_call is None:
                [self.named_call] = openai_calls([ParsedCall(self.request.name, "")])
                return "", [{"index": 0, **self.named_call, "function": {"name": self.request.name,
                                                                           "arguments": piece}}]
            return "", ([{"index": 0, "function": {"arguments": piece}}] if piece else None)
        if self.request.choice != "auto":
            return "", None
        upto = max(self.sent, held_from(self.request.parser, self.text))
        out, self.sent = self.text[self.sent:upto], upto
        return out, None

    def finish(self) -> tuple[str, list[dict] | None, list[dict] | None]:
        """(content still to send, ``delta.tool_calls`` entries still to send, every call or
        None) once the answer ended."""
        if self.request.choice == "named":
            return "", None, [self.named_call]
        _content, calls = self.request.read(self.text)
        if calls is None:
            return self.text[self.sent:], None, None
        # content before the calls (hermes) was sent already
        return "", [{"index": i, **call} for i, call in enumerate(calls)], calls
