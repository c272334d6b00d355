"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

Rules: a client mistake is 400 and its message names the parameter (``param`` too); an unknown
model is 404; a server that cannot answer now is 503; anything else is 500.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OpenAIError(Exception):
    status: int
    message: str
    param: str | None = None
    type: str = "invalid_request_error"
    code: str | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param, "invalid_request_error", code)


def model_not_found(name: str, served: str) -> OpenAIError:
    return OpenAIError(404, f"The model {name!r} does not exist; this server serves {served!r}",
                       "model", "invalid_request_error", "model_not_found")


def unavailable(message: str) -> OpenAIError:
    return OpenAIError(503, message, None, "service_unavailable", None)


def internal(message: str) -> OpenAIError:
    return OpenAIError(500, message, None, "server_error", None)


# Errors the model answers inside the gRPC stream carry no status code (Triton's stream
# response has only a message). The model's own words say which kind it is: an admission or
# engine refusal is the client's (400), a failed or stopping instance is 503, and "internal
# error" is 500.
_UNAVAILABLE_WORDS = ("failed and serves no more", "shutting down", "unavailable", "not ready",
                      "no free sequence slot")


def from_model_error(message: str, prompt_param: str = "prompt") -> OpenAIError:
    lowered = message.lower()
    if "internal error" in lowered:
        return internal(message)
    if any(w in lowered for w in _UNAVAILABLE_WORDS):
        return unavailable(message)
    if "max_model_len" in message:
        return bad_request(message, prompt_param, "context_length_exceeded")
    return bad_request(message)
