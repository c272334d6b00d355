"""A frontend without Triton, for the core's fault tests: attaches the core of a config given
as JSON, submits ``count`` greedy streams of ``max_tokens`` and prints ``streaming`` once each
has an output; then waits to be killed."""

import json
import sys
import threading

import msgspec

from tritonkv.config import EngineConfig
from tritonkv.core.client import CoreClient
from tritonkv.engine.requests import SamplingParams


def main():
    config = msgspec.json.decode(sys.argv[1].encode(), type=EngineConfig)
    prompt, count, max_tokens = json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    client = CoreClient(config)
    client.connect()
    started = threading.Semaphore(0)
    for i in range(count):
        seen = []

        def emit(out, seen=seen):
            if not seen:
                started.release()
            seen.append(out)
        client.submit(9000 + i, prompt + [i + 3], SamplingParams(max_tokens, temperature=0.0, ignore_eos=True), emit,
                      start=True, end=True)
    for _ in range(count):
        started.acquire()
    print("streaming", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
