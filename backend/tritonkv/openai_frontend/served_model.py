"""The one model this frontend serves: its public name, tokenizer, chat template and prompt
size limit.

Size rule: a prompt whose text (a completion's prompt, or the message texts of a chat) is
over ``max_prompt_bytes`` UTF-8 bytes cannot fit ``max_model_len`` tokens and is refused
before it is templated or tokenised (``TextTokenizer.max_text_bytes``; for a tokenizer that
gives no such bound, ``FALLBACK_BYTES_PER_TOKEN`` bytes per token). ``max_model_len`` is the
frontend's ``--max-model-len``, else the checkpoint's ``max_position_embeddings`` (the engine
never serves more).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from tritonkv.model.model_config import ModelConfig
from tritonkv.model.onnx_files import checkpoint_directory
from tritonkv.model.tokenizer import TextTokenizer
from tritonkv.openai_frontend.chat_template import ChatTemplate, ChatTemplateError
from tritonkv.openai_frontend.errors import bad_request, model_not_found
from tritonkv.openai_frontend.tool_parsers import FAMILY_PARSERS


FALLBACK_BYTES_PER_TOKEN = 64


def family_tool_parser(files: str) -> str | None:
    """The tool call parser of the checkpoint's family (config.json ``model_type``), or None."""
    try:
        with open(os.path.join(files, "config.json")) as f:
            return FAMILY_PARSERS.get(json.load(f).get("model_type"))
    except (OSError, ValueError, AttributeError):
        return None


def default_model_name(checkpoint: str | None) -> str:
    """The checkpoint directory's name; "tritonkv-demo" for the generated demo model."""
    if not checkpoint:
        return "tritonkv-demo"
    from tritonkv.model.demo_checkpoint import default_demo_dir

    path = os.path.abspath(checkpoint).rstrip(os.sep)
    if path == os.path.abspath(default_demo_dir()):
        return "tritonkv-demo"
    return os.path.basename(path) or "tritonkv-model"


@dataclass
class ServedModel:
    name: str
    checkpoint: str
    tokenizer: TextTokenizer | None
    template: ChatTemplate | None
    created: int = field(default_factory=lambda: int(time.time()))
    max_model_len: int | None = None
    max_prompt_bytes: int | None = None
    tool_parser: str | None = None  # tool_parsers.PARSERS key: --tool-call-parser, else the family's

    @classmethod
    def load(cls, checkpoint: str, name: str | None = None, max_model_len: int | None = None,
             tool_parser: str | None = None) -> "ServedModel":
        files = checkpoint_directory(checkpoint)  # an .onnx file's tokenizer lies beside it
        tokenizer = None
        if os.path.isfile(os.path.join(files, "tokenizer.json")):
            tokenizer = TextTokenizer(files)
        if not max_model_len:
            try:
                max_model_len = ModelConfig.from_checkpoint(files).max_position_embeddings
            except Exception:  # noqa: BLE001 - no readable config.json: no size limit beyond the body's
                max_model_len = None
        max_bytes = None
        if max_model_len and tokenizer is not None:
            max_bytes = tokenizer.max_text_bytes(max_model_len) or max_model_len * FALLBACK_BYTES_PER_TOKEN
        return cls(name or default_model_name(checkpoint), checkpoint, tokenizer, ChatTemplate.from_checkpoint(files),
                   max_model_len=max_model_len, max_prompt_bytes=max_bytes,
                   tool_parser=tool_parser or family_tool_parser(files))

    def check_prompt_size(self, texts: list[str], param: str) -> None:
        """Refuse (400) prompt texts that cannot fit ``max_model_len`` tokens, on their bytes."""
        if self.max_prompt_bytes is None:
            return
        size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        if size > self.max_prompt_bytes:
            raise bad_request(f"{param!r} holds {size} bytes of text: more than this model's {self.max_model_len} "
                              f"tokens (max_model_len) can hold with this tokenizer (at most {self.max_prompt_bytes} "
                              "bytes)", param, "context_length_exceeded")

    def check_name(self, requested: str) -> None:
        if requested != self.name:
            raise model_not_found(requested, self.name)

    def chat_prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Messages rendered by the chat template and tokenised (the template writes BOS etc.);
        called on a worker thread (app.py)."""
        if self.template is None:
            raise bad_request(f"model {self.name!r} has no chat template (tokenizer_config.json has no "
                              "'chat_template'); use /v1/completions, or add a template to the checkpoint",
                              "messages", "chat_template_missing")
        if self.tokenizer is None:
            raise bad_request(f"model {self.name!r} has no tokenizer.json, so chat text cannot be tokenised",
                              "messages")
        try:
            text = self.template.render(messages, add_generation_prompt=True, tools=tools or None)
        except ChatTemplateError as exc:
            raise bad_request(f"the chat template refused the messages: {exc}", "messages") from None
        # encode_batch lets go of the GIL while it works (encode holds it: seconds for a large
        # prompt, during which no other request of this process would move)
        ids = self.tokenizer._tok.encode_batch([text], add_special_tokens=False)[0].ids
        if not ids:
            raise bad_request("the chat template rendered these messages to an empty prompt", "messages")
        return ids

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "tritonkv"}
