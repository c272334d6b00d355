"""The chat CLI's turns rendered with the checkpoint's chat template, by the renderer the
OpenAI API uses (``tritonkv.openai_frontend.chat_template``), tokenised as that API does
(``add_special_tokens=False``: the template writes BOS and role markers itself).

Rule: the server keeps the conversation's KV, so each turn sends only what the template adds
after what the server already holds (the previous prompt and the reply it generated). When
the template renders the history differently from what was sent (a template that rewrites
earlier turns), the turn cannot extend the conversation: ``TurnIds.restart`` says to send the
whole rendering as a new conversation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class TurnIds:
    ids: list[int]
    restart: bool  # the server's conversation cannot be extended: start a new one with ``ids``


class TemplatedChat:
    def __init__(self, checkpoint: str, system: str | None = None):
        from tritonkv.model.tokenizer import TextTokenizer
        from tritonkv.openai_frontend.chat_template import ChatTemplate

        self.template = ChatTemplate.from_checkpoint(checkpoint)
        if self.template is None:
            raise ValueError(f"checkpoint {checkpoint!r} has no chat template (tokenizer_config.json "
                             "chat_template or chat_template.jinja); use --raw to send text as typed")
        self.tokenizer = TextTokenizer(checkpoint)
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.held = ""  # the rendered text the server's conversation holds

    def user_turn(self, text: str) -> TurnIds:
        self.messages.append({"role": "user", "content": text})
        full = self.template.render(self.messages, add_generation_prompt=True)
        extend = bool(self.held) and full.startswith(self.held)
        delta = full[len(self.held):] if extend else full
        restart = bool(self.held) and not extend
        self.held = full
        return TurnIds(self.tokenizer.encode(delta, add_special_tokens=False), restart)

    def assistant_reply(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})
        self.held += text


def served_checkpoint(grpc_url: str | None = None, http_url: str | None = None, model: str = "llm") -> str | None:
    """The checkpoint directory the server says it serves (Triton's model-config API), if that
    directory exists on this machine; else None."""
    try:
        if http_url:
            import tritonclient.http as httpclient

            config = httpclient.InferenceServerClient(http_url).get_model_config(model)
        else:
            import tritonclient.grpc as grpcclient

            config = grpcclient.InferenceServerClient(grpc_url).get_model_config(model, as_json=True)["config"]
        path = config["parameters"]["checkpoint"]["string_value"]
    except Exception:  # noqa: BLE001 - no config, no parameter: the caller says what to pass
        return None
    return path if path and os.path.isdir(path) else None
