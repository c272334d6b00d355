"""Exceptions raised by the client."""

from __future__ import annotations


class ServerError(RuntimeError):
    """The server answered a request with an error; ``str(e)`` is the server's own message.

    ``status`` is the HTTP status or gRPC status name when the transport gave one.
    """

    def __init__(self, message: str, *, model: str | None = None, status: str | int | None = None):
        super().__init__(message)
        self.message = message
        self.model = model
        self.status = status


class ProtocolError(RuntimeError):
    """The server's reply did not follow the llm / llm_stateless protocol (a client or server bug)."""
