"""What travels between frontends and their engine core (msgpack via msgspec).

Rules:
- Frontend -> core: ``Hello`` (attach, with the frontend's settings), then ``Submit`` /
  ``Abort``, and ``Bye`` when it leaves. Core -> frontend: ``Welcome`` or ``Refused``, then
  per engine step at most one ``Outputs`` (every output of that frontend's requests in the
  step), and ``Stats`` about once a second.
- ``TurnOutput`` and ``SamplingParams`` travel as the dataclasses they are: a field added to
  either travels without a change here.
- Nothing is ever unpickled: msgspec decodes only these types.
"""

from __future__ import annotations

import msgspec

from tritonkv.config import EngineConfig
from tritonkv.engine import requests as _requests
from tritonkv.engine.requests import SamplingParams, TurnOutput
from tritonkv.sampling.logprobs import TokenLogprob

# TurnOutput names TokenLogprob only for type checkers; msgspec resolves the annotation in
# engine.requests' namespace, so the class must be found there
_requests.TokenLogprob = TokenLogprob

CorrId = int | str


class Hello(msgspec.Struct, tag=True):
    frontend_id: str
    pid: int
    started: int  # the frontend's process start time (core/liveness.py)
    config: EngineConfig


class Welcome(msgspec.Struct, tag=True):
    core_pid: int
    core_started: int
    checkpoint: str  # the resolved checkpoint (its tokenizer is the frontend's)
    vocab_size: int
    max_model_len: int
    context_limit: int | None
    num_blocks: int
    kv_dtype: str  # torch dtype name of the KV storage, e.g. "float32", "int8"
    device: str  # "cpu" / "cuda"


class Refused(msgspec.Struct, tag=True):
    reason: str
    retry: bool = False  # the core is on its way out: start or attach again once it is gone


class Submit(msgspec.Struct, tag=True):
    request_id: int
    corr_id: CorrId
    prompt_ids: list[int]
    params: SamplingParams
    start: bool
    end: bool
    stateless: bool = False
    extra_keys: tuple[tuple[str, str], ...] = ()
    close_only: bool = False
    error: str | None = None


class Abort(msgspec.Struct, tag=True):
    request_id: int
    kept_tokens: int | None = None  # None: cancel; a count: a stop string ended it there
    index: int = 0  # kept_tokens: of this choice (n > 1)


class Bye(msgspec.Struct, tag=True):
    pass


class Outputs(msgspec.Struct, tag=True):
    items: list[tuple[int, TurnOutput]]  # (request id, output), in emit order


class Stats(msgspec.Struct, tag=True):
    stats: dict[str, int]
    loops: int  # engine loop iterations (the heartbeat)
    failure: str | None = None


ToCore = Hello | Submit | Abort | Bye
ToFrontend = Welcome | Refused | Outputs | Stats

encoder = msgspec.msgpack.Encoder()
core_decoder = msgspec.msgpack.Decoder(ToCore)
frontend_decoder = msgspec.msgpack.Decoder(ToFrontend)
