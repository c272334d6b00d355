"""Raw tritonclient calls used by the e2e tests (independent of client/)."""

from __future__ import annotations

import json
import queue
import re
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient


def inputs_for(text=None, ids=None, **settings):
    tensors = []

    def add(name, arr, dtype):
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        tensors.append(t)

    if text is not None:
        add("text_input", np.array([text.encode()], dtype=np.object_), "BYTES")
    if ids is not None:
        add("input_ids", np.array(ids, dtype=np.int32), "INT32")
    kinds = {"max_tokens": (np.int32, "INT32"), "temperature": (np.float32, "FP32"),
             "top_k": (np.int32, "INT32"), "top_p": (np.float32, "FP32"), "seed": (np.int64, "INT64"),
             "ignore_eos": (bool, "BOOL"), "stream": (bool, "BOOL")}
    for name, value in settings.items():
        if name == "stop":
            add("stop", np.array([s.encode() for s in value], dtype=np.object_), "BYTES")
        else:
            np_type, dtype = kinds[name]
            add(name, np.array([value], dtype=np_type), dtype)
    return tensors


class Turn:
    def __init__(self):
        self.ids, self.text, self.finish_reason, self.cached_tokens, self.error = [], "", None, None, None
        self.num_responses = 0


class StreamClient:
    """One gRPC bidirectional stream; ``turn`` sends a request and collects until final."""

    def __init__(self, url: str, model: str = "llm"):
        self.client = grpcclient.InferenceServerClient(url)
        self.model = model
        self.results: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))

    def turn(self, seq_id=0, start=False, end=False, timeout=120, parameters=None, **kw) -> Turn:
        return self.send(inputs_for(**kw), seq_id, start, end, timeout, parameters)

    def send(self, inputs, seq_id=0, start=False, end=False, timeout=120, parameters=None) -> Turn:
        """One request of ready-made ``inputs`` on the stream; collects until the final
        response or an error (the one loop every gRPC stream caller uses)."""
        args = dict(model_name=self.model, inputs=inputs, enable_empty_final_response=True)
        if seq_id:
            args.update(sequence_id=seq_id, sequence_start=start, sequence_end=end)
        if parameters:
            args["parameters"] = parameters
        self.client.async_stream_infer(**args)
        turn = Turn()
        while True:
            result, error = self.results.get(timeout=timeout)
            if error is not None:
                turn.error = str(error)
                return turn
            response = result.get_response()
            turn.num_responses += 1
            ids = result.as_numpy("output_ids")
            if ids is not None:
                turn.ids += ids.tolist()
                text = result.as_numpy("text_output")
                turn.text += "" if text is None else text[0].decode()
            if result.as_numpy("finish_reason") is not None:
                turn.finish_reason = result.as_numpy("finish_reason")[0].decode()
                turn.cached_tokens = int(result.as_numpy("cached_tokens")[0])
            if response.parameters["triton_final_response"].bool_param:
                return turn

    def close(self):
        self.client.stop_stream()
        self.client.close()


def http_generate(http_url: str, model: str, body: dict, stream: bool = False):
    endpoint = "generate_stream" if stream else "generate"
    req = urllib.request.Request(f"http://{http_url}/v2/models/{model}/{endpoint}",
                                 data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())
    if stream:
        return 200, [json.loads(m) for m in re.findall(r"^data: (.*)$", raw, flags=re.M)]
    return 200, json.loads(raw)


def metric_values(metrics_url: str, name: str) -> list[float]:
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    return [float(m) for m in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, flags=re.M)]


def http_post(http_url: str, model: str, data: bytes, stream: bool = False, timeout: float = 60):
    """POST raw bytes to /generate (or /generate_stream); returns (status, error message or
    None, decoded JSON events or body) without assuming the body is valid JSON."""
    endpoint = "generate_stream" if stream else "generate"
    req = urllib.request.Request(f"http://{http_url}/v2/models/{model}/{endpoint}", data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode("utf-8", "replace")
    events = re.findall(r"^data: (.*)$", raw, flags=re.M) if stream else [raw]
    parsed = []
    for event in events:
        try:
            parsed.append(json.loads(event))
        except ValueError:
            parsed.append({"error": event})
    errors = [p["error"] for p in parsed if isinstance(p, dict) and "error" in p]
    return status, (errors[0] if errors else None), parsed


def wait_for_pool_baseline(metrics_url: str, timeout: float = 10.0, hold: float = 1.2) -> bool:
    """Every instance reports no referenced KV block and no live sequence for ``hold`` seconds
    (metrics are published every 0.5 s, so one reading may predate the last request)."""
    import time

    deadline = time.monotonic() + timeout
    since = None
    while time.monotonic() < deadline:
        used = metric_values(metrics_url, "tritonkv_kv_blocks_used")
        live = metric_values(metrics_url, "tritonkv_live_sequences")
        if used and live and not any(used) and not any(live):
            since = since or time.monotonic()
            if time.monotonic() - since >= hold:
                return True
        else:
            since = None
        time.sleep(0.2)
    return False
