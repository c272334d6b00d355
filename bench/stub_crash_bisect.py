"""Which part of the vLLM sample client's request ends the ``llm_stateless`` stub on a GPU.

On the lent H100 (2026-12-07, bench/results/gpu_check.md) the request of
test_vllm_compat's ``test_vllm_sample_client_request_one_reply_echoes_the_prompt`` (not streamed,
prompt echoed, settings also as request parameters, only ``text_output`` asked, top_p 0.95)
got no answer and its stub process was gone (Triton: "Stub process 'llm_stateless_0_0' is not
healthy"), every time, with nothing in the server log; on the CPU the same request is answered.
Each variant below drops one part of that request, on a server of its own (a dead stub is not
restarted), then sends a plain request; the server log after start-up is printed (a fault in
the stub leaves its Python stacks there: server/triton_model.py enables faulthandler). Variant G
times the refusal of an empty ``input_ids`` (7.9 s once on that GPU, 0.00 s on the CPU).

On the device (carry .gpu-carry):
  source .gpu-carry/device_env.sh; PYTHONPATH=$PWD/backend:$PWD/client $TRITONKV_TEST_PYTHON bench/stub_crash_bisect.py
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient

from tritonkv.server.launcher import launch

PROMPT = "Hello"
FULL = {"temperature": "0", "top_p": "0.95", "max_tokens": "8", "ignore_eos": "true"}  # samples/client.py's
NO_TOP_P = {k: v for k, v in FULL.items() if k != "top_p"}
PLAIN = {"max_tokens": "2", "temperature": "0"}

# name: (sampling_parameters, stream, exclude_input_in_output, request parameters, outputs asked)
VARIANTS = {
    "A the test's request": (FULL, False, False, FULL, ["text_output"]),
    "B every output": (FULL, False, False, FULL, None),
    "C no request parameters": (FULL, False, False, None, ["text_output"]),
    "D no echo": (FULL, False, True, FULL, ["text_output"]),
    "E no top_p": (NO_TOP_P, False, False, NO_TOP_P, ["text_output"]),
    "F request parameters alone": (FULL, False, None, FULL, None),
    "H only not streamed (one final response on the gRPC stream)": (PLAIN, False, None, None, None),
    "I the test's request, streamed, no echo": (FULL, True, True, FULL, ["text_output"]),
    "G HTTP empty input_ids, twice": None,
}


def vllm_inputs(sampling: dict, stream: bool, exclude: bool | None) -> list:
    tensors = []

    def add(name, arr, dtype):
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        tensors.append(t)

    add("text_input", np.array([PROMPT.encode()], dtype=np.object_), "BYTES")
    add("stream", np.array([stream], dtype=bool), "BOOL")
    add("sampling_parameters", np.array([json.dumps(sampling).encode()], dtype=np.object_), "BYTES")
    if exclude is not None:
        add("exclude_input_in_output", np.array([exclude], dtype=bool), "BOOL")
    return tensors


def grpc_call(url: str, tensors: list, params: dict | None = None, outputs: list | None = None,
              wait_s: float = 25) -> str:
    """One request on a gRPC stream: OK with its responses, ERROR, or TIMEOUT."""
    client = grpcclient.InferenceServerClient(url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        asked = [grpcclient.InferRequestedOutput(o) for o in outputs] if outputs else None
        client.async_stream_infer("llm_stateless", tensors, parameters=params, outputs=asked,
                                  enable_empty_final_response=True)
        got = []
        while True:
            try:
                result, error = answers.get(timeout=wait_s)
            except queue.Empty:
                return f"TIMEOUT after {len(got)} responses"
            if error is not None:
                return f"ERROR {error}"
            response = result.get_response()
            got.append({o.name: result.as_numpy(o.name).tolist() for o in response.outputs})
            if response.parameters["triton_final_response"].bool_param:
                return f"OK {got}"[:300]
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def http_empty_ids(url: str) -> str:
    t0 = time.monotonic()
    request = urllib.request.Request(f"http://{url}/v2/models/llm_stateless/generate",
                                     data=json.dumps({"input_ids": []}).encode())
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            body = reply.read()
    except urllib.error.HTTPError as e:
        body = e.read()
    except OSError as e:
        body = repr(e).encode()
    return f"{time.monotonic() - t0:.2f} s {body[:150]!r}"


def run_variant(name: str, variant, results: dict) -> None:
    server = launch(extra_params={"max_model_len": "4096", "kv_cache_memory_mb": "64",
                                  "pool_name": f"bisect-{os.getpid()}-{name[0]}"})
    try:
        if variant is None:
            first = f"first {http_empty_ids(server.http_url)}; second {http_empty_ids(server.http_url)}"
        else:
            sampling, stream, exclude, params, outputs = variant
            first = grpc_call(server.grpc_url, vllm_inputs(sampling, stream, exclude), params, outputs)
        after = grpc_call(server.grpc_url, vllm_inputs(PLAIN, True, True), wait_s=10)
        time.sleep(1)
        with open(os.path.join(server.workdir, "server.log"), errors="replace") as f:
            log = f.read()
        results[name] = (first, after, log[log.find("Started Metrics"):][-3000:])
    except Exception as exc:  # noqa: BLE001
        results[name] = (f"EXCEPTION {exc!r}", "", "")
    finally:
        server.stop()


def main() -> None:
    results: dict = {}
    threads = [threading.Thread(target=run_variant, args=(n, v, results)) for n, v in VARIANTS.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in VARIANTS:
        first, after, log = results.get(name, ("?", "?", ""))
        print(f"=== {name}\n request: {first}\n a plain request after it: {after[:120]}\n"
              f" server log after start-up:\n{log}\n")


if __name__ == "__main__":
    main()
