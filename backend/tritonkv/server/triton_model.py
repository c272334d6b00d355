"""TritonPythonModel: the thin adapter between Triton's Python backend and the engine.

``execute`` only parses and enqueues (decoupled model) and returns at once; the engine
thread streams the responses. No model logic lives here.

Admission never raises out of ``execute``: a client mistake is answered with its own error
(INVALID_ARG, HTTP 400), any other fault while admitting one request with an internal error
for that request alone, and once the engine thread has died (``Engine.failure``) every request
is answered at once (UNAVAILABLE) instead of hanging.

Heartbeat (``server/heartbeat.py``): the engine loop counts its iterations and the metrics
thread publishes the count and whether the engine failed, so the supervisor can tell a
stuck or dead engine from a busy one.
"""

from __future__ import annotations

import json
import logging
import threading

from tritonkv.config import EngineConfig
from tritonkv.engine.requests import RequestError
from tritonkv.server.fault_injection import fault_hook
from tritonkv.server.gauges import Gauges
from tritonkv.server.heartbeat import Heartbeat
from tritonkv.server.response_streamer import ResponseStreamer
from tritonkv.server.slot_release import SlotReleaser
from tritonkv.server.triton_request import BadRequest, Limits, ReplyChannel, parse_request

log = logging.getLogger("tritonkv")

METRICS_PERIOD_S = 0.5


def log_info_to_stderr() -> None:
    """The Python backend's stub configures no logging, so the engine's INFO lines (the KV
    pool, "KV capacity: ...") would be dropped; they go to stderr, which the server log holds."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("tritonkv %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def admission_limits(engine) -> Limits:
    """Size limits checked in ``execute`` before any work (see ``parse_request``)."""
    max_text_bytes = None
    if engine.tokenizer is not None:
        max_text_bytes = engine.tokenizer.max_text_bytes(engine.max_model_len)
        if max_text_bytes is None:
            log.warning("this tokenizer may drop text (normaliser / pre-tokenizer / unknown tokens): "
                        "text_input has no size bound before tokenising")
    return Limits(max_model_len=engine.max_model_len, max_text_bytes=max_text_bytes)


class TritonPythonModel:
    slots: SlotReleaser | None = None  # llm only: frees the sequence slots of refused STARTs

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        from tritonkv.engine.factory import build_engine

        self.pb_utils = pb_utils
        model_config = json.loads(args["model_config"])
        if not model_config.get("model_transaction_policy", {}).get("decoupled"):
            raise ValueError(f"model {args['model_name']!r} must set model_transaction_policy "
                             "{ decoupled: true } (tritonkv streams tokens)")
        self.stateless = "sequence_batching" not in model_config
        params = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
        config = EngineConfig.from_parameters(params)
        log_info_to_stderr()
        self.engine = build_engine(config, gpu_instance=args.get("model_instance_kind") == "GPU",
                                   device_id=int(args.get("model_instance_device_id", 0)))
        self.streamer = ResponseStreamer(config.stream_interval)
        self.loops = 0  # engine loop iterations (the heartbeat)
        self._fault = fault_hook()  # None unless a test asks for faults
        self.engine.after_emit = self._after_iteration
        self.engine.start_loop()
        self.limits = admission_limits(self.engine)
        self.slots = None if self.stateless else SlotReleaser(pb_utils, args["model_name"])
        self._next_stateless_id = 0
        labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
        self.gauges = Gauges(pb_utils, labels)
        self.heartbeat = Heartbeat(pb_utils, labels)
        self._stop = threading.Event()
        self._metrics_thread = threading.Thread(target=self._publish_metrics, daemon=True)
        self._metrics_thread.start()

    def _after_iteration(self) -> None:
        """Runs on the engine thread after every loop iteration: count it, send what the
        iteration produced."""
        self.loops += 1
        if self._fault is not None:
            self._fault()
        self.streamer.flush()

    def execute(self, requests):
        for request in requests:
            self._enqueue(request)
        return None

    def _enqueue(self, request) -> None:
        """Admit one request; whatever goes wrong is answered to this request alone."""
        try:
            sender = request.get_response_sender()
        except Exception:
            log.exception("request without a response sender; dropped")
            return
        try:
            if self.slots is not None:
                sender = self.slots.watch(request, sender, self.engine._live)
            self._admit(request, sender)
        except Exception as exc:
            log.exception("request could not be admitted")
            self._answer(sender, f"internal error while admitting the request: {type(exc).__name__}: {exc}",
                         "INTERNAL")

    def _answer(self, sender, message: str, code: str) -> None:
        try:
            ReplyChannel(self.pb_utils, sender, True).error(message, code)
        except Exception:  # e.g. the request was already answered, or the client is gone
            log.exception("could not answer a request with an error (%s)", message)

    def _admit(self, request, sender) -> None:
        pb_utils = self.pb_utils
        engine = self.engine
        if engine.failure is not None:
            self._answer(sender, f"this instance failed and serves no more requests ({engine.failure}); "
                                 "retry on another instance", "UNAVAILABLE")
            return
        try:
            parsed = parse_request(pb_utils, request, stateless=self.stateless,
                                   default_max_tokens=engine.config.default_max_tokens, limits=self.limits)
        except (BadRequest, RequestError) as exc:
            self._answer(sender, str(exc), "INVALID_ARG")
            return
        reply = self.streamer.channel(ReplyChannel(pb_utils, sender, parsed.stream))
        corr_id = parsed.corr_id
        if self.stateless:
            self._next_stateless_id += 1
            corr_id = ("stateless", self._next_stateless_id)
        extra_keys = () if parsed.cache_salt is None else (("cache_salt", parsed.cache_salt),)
        common = dict(start=parsed.start, end=parsed.end, is_cancelled=request.is_cancelled,
                      stateless=self.stateless, extra_keys=extra_keys)
        if parsed.close_only:
            engine.submit(corr_id, [], parsed.params, reply, close_only=True, **common)
            return
        try:
            ids = parsed.input_ids
            if ids is None:
                if parsed.text is None:
                    raise RequestError("no prompt: send text_input or input_ids (or END alone to close)")
                ids = engine.encode(parsed.text, first_turn=parsed.start)
            engine.validate(ids, parsed.params)
        except RequestError as exc:
            engine.submit(corr_id, [], parsed.params, reply, error=str(exc), **common)
            return
        engine.submit(corr_id, ids, parsed.params, reply, **common)

    def _publish_metrics(self) -> None:
        while not self._stop.wait(METRICS_PERIOD_S):
            try:
                self.heartbeat.publish(self.loops, self.engine.failure is not None)
                self.gauges.publish(self.engine)
            except Exception:
                logging.getLogger("tritonkv").exception("metrics update failed")

    def finalize(self):
        self._stop.set()
        self.engine.stop_loop()
        self.streamer.close()
        self.engine.close()
