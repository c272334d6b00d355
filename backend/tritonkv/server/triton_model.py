"""TritonPythonModel: a frontend of the engine core (core/). Every Triton instance of ``llm``
and ``llm_stateless`` is one; the model, the KV cache and the batch live in the core of its
device and pool name, which the first frontend starts and the others attach.

``execute`` only parses, tokenises, validates and sends (decoupled model) and returns at
once; the core client's I/O thread turns the core's token outputs into text and Triton
responses. No model logic lives here, and nothing here touches CUDA.

Admission never raises out of ``execute``: a client mistake is answered with its own error
(INVALID_ARG, HTTP 400), any other fault while admitting one request with an internal error
for that request alone; while no core serves the instance (it died), the next request starts
or attaches one, and if that fails, it is answered at once (UNAVAILABLE) instead of hanging.

Heartbeat (``server/heartbeat.py``): the core's loop count and whether this instance has no
working core, published with the core's stats (``server/gauges.py``) by the metrics thread.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import threading
import time

from tritonkv.config import EngineConfig
from tritonkv.core.client import CoreClient, CoreUnavailable
from tritonkv.core.startup_heap import freeze_startup_heap
from tritonkv.engine.output import merge_outputs
from tritonkv.engine.requests import RequestError
from tritonkv.server.first_token_stages import FirstTokenGauges, FirstTokenStages
from tritonkv.server.gauges import Gauges
from tritonkv.server.heartbeat import Heartbeat
from tritonkv.server.parent_watch import watch_stub_parent
from tritonkv.server.slot_release import SlotReleaser
from tritonkv.server.triton_choices import reply_channel
from tritonkv.server.triton_request import BadRequest, Limits, ReplyChannel, parse_request

log = logging.getLogger("tritonkv")

METRICS_PERIOD_S = 0.5


def log_info_to_stderr() -> None:
    """The Python backend's stub configures no logging, so the frontend's INFO lines would be
    dropped; they go to stderr, which the server log holds (the core logs on its own)."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("tritonkv %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def admission_limits(core) -> Limits:
    """Size limits checked in ``execute`` before any work (see ``parse_request``)."""
    max_text_bytes = None
    if core.tokenizer is not None:
        max_text_bytes = core.tokenizer.max_text_bytes(core.max_model_len)
        if max_text_bytes is None:
            log.warning("this tokenizer may drop text (normaliser / pre-tokenizer / unknown tokens): "
                        "text_input has no size bound before tokenising")
    return Limits(max_model_len=core.max_model_len, max_text_bytes=max_text_bytes)


class Reply:
    """One request's answer path after its ``TextStream``: ``stream_interval`` batching (after
    the first response, tokens go out k at a time; the final and errors at once), and a
    refused opening turn's error held until its sequence slot is released."""

    def __init__(self, channel: ReplyChannel, interval: int, release=None, taken: float = 0.0,
                 stages: FirstTokenStages | None = None):
        self.channel = channel
        self.interval = interval
        self.release = release  # corr-id-bound SlotReleaser.release, or None
        self.started = False
        self.waiting: list = []
        # when execute took the request; where its first response is timed (streamed requests
        # only: a request answered whole sends nothing before its end)
        self.taken, self.stages = taken, stages

    def __call__(self, out) -> None:
        if out.release_slot and out.finished and self.release is not None:
            self.release(lambda: self.channel(out))
            return
        self.waiting.append(out)
        if (out.error is None and not out.finished and self.started
                and sum(len(o.token_ids) for o in self.waiting) < self.interval):
            return
        waiting, self.waiting = self.waiting, []
        first = not self.started
        self.started = True
        for merged in merge_outputs(waiting):
            self.channel(merged)
        if first and self.stages is not None and self.channel.stream and waiting[0].first_token_times is not None:
            self.stages.add(self.taken, waiting[0].first_token_times, time.monotonic())


class TritonPythonModel:
    slots: SlotReleaser | None = None  # llm only: frees the sequence slots of refused STARTs
    first_token_stages: FirstTokenStages | None = None  # the instance's (server/first_token_stages.py)

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb_utils = pb_utils
        model_config = json.loads(args["model_config"])
        if not model_config.get("model_transaction_policy", {}).get("decoupled"):
            raise ValueError(f"model {args['model_name']!r} must set model_transaction_policy "
                             "{ decoupled: true } (tritonkv streams tokens)")
        self.stateless = "sequence_batching" not in model_config
        params = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
        self.config = EngineConfig.from_parameters(params)
        log_info_to_stderr()
        # a stub that dies by a fault (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL) writes every
        # thread's Python stack to stderr, the server log: Triton itself says nothing of it
        faulthandler.enable()
        watch_stub_parent()
        self.core = CoreClient(self.config, gpu_instance=args.get("model_instance_kind") == "GPU",
                               device_id=int(args.get("model_instance_device_id", 0)))
        self.core.connect()  # a refusal (e.g. another checkpoint on this pool) fails the load with its reason
        self.limits = admission_limits(self.core)
        self.slots = None if self.stateless else SlotReleaser(pb_utils, args["model_name"])
        self._next_stateless_id = 0
        labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
        self.gauges = Gauges(pb_utils, labels)
        self.first_token_stages = FirstTokenStages()
        self.first_token_gauges = FirstTokenGauges(pb_utils, labels)
        self.heartbeat = Heartbeat(pb_utils, labels)
        self._stop = threading.Event()
        self._metrics_thread = threading.Thread(target=self._publish_metrics, daemon=True)
        self._metrics_thread.start()
        freeze_startup_heap()

    def execute(self, requests):
        taken = time.monotonic()
        for request in requests:
            self._enqueue(request, taken)
        return None

    def _enqueue(self, request, taken: float = 0.0) -> None:
        """Admit one request; whatever goes wrong is answered to this request alone."""
        try:
            sender = request.get_response_sender()
        except Exception:
            log.exception("request without a response sender; dropped")
            return
        try:
            self._admit(request, sender, taken)
        except Exception as exc:
            log.exception("request could not be admitted")
            self._answer(sender, f"internal error while admitting the request: {type(exc).__name__}: {exc}",
                         "INTERNAL")

    def _answer(self, sender, message: str, code: str) -> None:
        try:
            ReplyChannel(self.pb_utils, sender, True).error(message, code)
        except Exception:  # e.g. the request was already answered, or the client is gone
            log.exception("could not answer a request with an error (%s)", message)

    def _admit(self, request, sender, taken: float) -> None:
        core = self.core
        if core.down is not None:
            try:
                core.connect()
                self.limits = admission_limits(core)
            except CoreUnavailable as exc:
                self._answer(sender, f"no engine core serves this instance: {exc}; retry", "UNAVAILABLE")
                return
        try:
            parsed = parse_request(self.pb_utils, request, stateless=self.stateless,
                                   default_max_tokens=self.config.default_max_tokens, limits=self.limits)
        except (BadRequest, RequestError) as exc:
            self._answer(sender, str(exc), "INVALID_ARG")
            return
        corr_id = parsed.corr_id
        release = None
        if self.stateless:
            self._next_stateless_id += 1
            corr_id = self._next_stateless_id
        elif self.slots is not None:
            release = lambda answer, cid=corr_id: self.slots.release(cid, answer)  # noqa: E731
        reply = Reply(reply_channel(self.pb_utils, sender, parsed.stream), self.config.stream_interval, release,
                      taken, self.first_token_stages)
        extra_keys = () if parsed.cache_salt is None else (("cache_salt", parsed.cache_salt),)
        common = dict(start=parsed.start, end=parsed.end, is_cancelled=request.is_cancelled,
                      stateless=self.stateless, extra_keys=extra_keys)
        if parsed.close_only:
            core.submit(corr_id, [], parsed.params, reply, close_only=True, **common)
            return
        try:
            ids = parsed.input_ids
            if ids is None:
                if parsed.text is None:
                    raise RequestError("no prompt: send text_input or input_ids (or END alone to close)")
                ids = core.encode(parsed.text, first_turn=parsed.start)
            core.validate(ids, parsed.params)
        except RequestError as exc:
            core.submit(corr_id, [], parsed.params, reply, error=str(exc), **common)
            return
        core.submit(corr_id, ids, parsed.params, reply, **common)

    def _publish_metrics(self) -> None:
        view = CoreStats(self.core)
        while not self._stop.wait(METRICS_PERIOD_S):
            try:
                self.heartbeat.publish(self.core.loops, self.core.down is not None or self.core.core_failure is not None)
                if self.core.down is None and self.core.stats:  # (the core's first stats came)
                    self.gauges.publish(view)
                self.first_token_gauges.publish(self.first_token_stages)
            except Exception:
                logging.getLogger("tritonkv").exception("metrics update failed")

    def finalize(self):
        self._stop.set()
        self.core.close()


class CoreStats:
    """What ``Gauges.publish`` reads, from the core's stats and its welcome (the gauges were
    written against the in-process Engine; this is that surface)."""

    def __init__(self, core: CoreClient):
        from types import SimpleNamespace

        from tritonkv.model.model_config import ModelConfig

        self._core = core
        w = core.welcome
        self.config = core.config
        self.model_config = ModelConfig.from_checkpoint(w.checkpoint)
        self.max_model_len = w.max_model_len
        self.pool = SimpleNamespace(num_blocks=w.num_blocks)
        self.device = SimpleNamespace(type=w.device)

    def stats(self) -> dict[str, int]:
        """The core's (pool-wide) stats; generated tokens are this instance's."""
        return {**self._core.stats, "generated_tokens": self._core.generated_tokens}

    def request_counts(self) -> tuple[int, int]:
        """(waiting, running) requests of the core (server/gauges.py)."""
        stats = self._core.stats
        return stats.get("requests_waiting", 0), stats.get("requests_running", 0)
