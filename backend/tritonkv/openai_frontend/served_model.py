"""The one model this frontend serves: its public name, tokenizer and chat template."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from tritonkv.model.onnx_files import checkpoint_directory
from tritonkv.model.tokenizer import TextTokenizer
from tritonkv.openai_frontend.chat_template import ChatTemplate, ChatTemplateError
from tritonkv.openai_frontend.errors import bad_request, model_not_found


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

    @classmethod
    def load(cls, checkpoint: str, name: str | None = None) -> "ServedModel":
        files = checkpoint_directory(checkpoint)  # an .onnx file's tokenizer lies beside it
        tokenizer = None
        if os.path.isfile(os.path.join(files, "tokenizer.json")):
            tokenizer = TextTokenizer(files)
        return cls(name or default_model_name(checkpoint), checkpoint, tokenizer, ChatTemplate.from_checkpoint(files))

    def check_name(self, requested: str) -> None:
        if requested != self.name:
            raise model_not_found(requested, self.name)

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """Messages rendered by the chat template and tokenised (the template writes BOS etc.)."""
        if self.template is None:
            raise bad_request(f"model {self.name!r} has no chat template (tokenizer_config.json has no "
                              "'chat_template'); use /v1/completions, or add a template to the checkpoint",
                              "messages", "chat_template_missing")
        if self.tokenizer is None:
            raise bad_request(f"model {self.name!r} has no tokenizer.json, so chat text cannot be tokenised",
                              "messages")
        try:
            text = self.template.render(messages, add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise bad_request(f"the chat template refused the messages: {exc}", "messages") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise bad_request("the chat template rendered these messages to an empty prompt", "messages")
        return ids

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "tritonkv"}
