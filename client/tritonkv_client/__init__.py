"""Python client for tritonkv (Triton Inference Server, models ``llm`` and ``llm_stateless``).

- ``Client`` (gRPC, sync): ``generate`` / ``generate_stream`` one-shot, ``conversation()``;
- ``AsyncClient`` / ``AsyncHttpClient`` (asyncio);
- ``HttpClient``: HTTP ``generate`` / ``generate_stream``;
- every reply ends as a ``GenerationResult`` (tokens, TTFT, inter-token times, cached tokens,
  finish reason); server errors raise ``ServerError`` carrying the server's message.
"""

from tritonkv_client._common import new_sequence_id
from tritonkv_client.errors import ProtocolError, ServerError
from tritonkv_client.grpc_client import Client, Conversation, TurnStream
from tritonkv_client.http_client import HttpClient, HttpStream
from tritonkv_client.params import GenerationParams
from tritonkv_client.result import GenerationResult, TokenDelta

__all__ = ["Client", "Conversation", "TurnStream", "HttpClient", "HttpStream", "GenerationParams",
           "GenerationResult", "TokenDelta", "ServerError", "ProtocolError", "new_sequence_id",
           "AsyncClient", "AsyncConversation", "AsyncHttpClient"]


def __getattr__(name):  # the asyncio clients import grpc.aio only when asked for
    if name in ("AsyncClient", "AsyncConversation", "AsyncHttpClient", "AsyncTurnStream"):
        from tritonkv_client import aio

        return getattr(aio, name)
    raise AttributeError(name)
