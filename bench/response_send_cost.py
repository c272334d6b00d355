"""What Triton's Python backend gives for decoupled responses sent from one thread vs several:
the measure behind a frontend with more than one sender thread (issue 23).

``ResponseSender.send`` in the stub releases the GIL and waits until the tritonserver process
has taken the response (python_backend's response_sender.cc: the stub posts an IPC message
and waits on ``is_stub_turn``), so one thread sends one response per round trip. Several
threads, each with its own requests (a request's responses from one thread only: two threads
on one sender fail with "response output count mismatch"), overlap those round trips.

A decoupled Python model answers each request with ``N`` one-element responses from a thread
of its own; the client (tritonclient gRPC, one stream) sends ``K`` requests of TOTAL / K
responses at once and times until every final response arrived. Responses per second, best
and median of ``--repeats``, per K:

    python bench/response_send_cost.py --out bench/results/response_send_cost_cpu.md

On the GPU machine (``source .gpu-carry/device_env.sh`` first: $TRITONSERVER / $TRITON_BACKENDS
name the carried server) the same command measures that host.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "backend"), os.path.join(ROOT, "bench")]

from md_table import publish, table  # noqa: E402

from tritonkv.server.install_backend import install_python_backend  # noqa: E402
from tritonkv.server.ports import free_port  # noqa: E402
from tritonkv.server.probes import http_ok  # noqa: E402
from tritonkv.server.process_tree import end_group  # noqa: E402
from tritonkv.server.tritonserver_env import server_env, tritonserver_binary  # noqa: E402

CONFIG = """name: "sender"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "N", data_type: TYPE_INT64, dims: [1] } ]
output [ { name: "OUT", data_type: TYPE_INT64, dims: [1] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""

MODEL = '''import threading
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy()[0])
            threading.Thread(target=self.send, args=(request.get_response_sender(), n), daemon=True).start()
        return None

    def send(self, sender, n):
        for i in range(n):
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([i], dtype=np.int64))]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''


def start_server(tmp: str, config: str = CONFIG, model: str = MODEL) -> tuple[subprocess.Popen, int]:
    """tritonserver with one Python model (its config.pbtxt names it) -> (process, gRPC port)."""
    name = config.split('"')[1]
    repo = os.path.join(tmp, "models", name)
    os.makedirs(os.path.join(repo, "1"))
    with open(os.path.join(repo, "config.pbtxt"), "w") as f:
        f.write(config)
    with open(os.path.join(repo, "1", "model.py"), "w") as f:
        f.write(model)
    backends = os.environ.get("TRITON_BACKENDS")
    if not backends:
        backends = os.path.join(tmp, "backends")
        install_python_backend(backends)
    http, grpc, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen([tritonserver_binary(), f"--model-repository={os.path.join(tmp, 'models')}",
                             f"--backend-directory={backends}", f"--http-port={http}", f"--grpc-port={grpc}",
                             f"--metrics-port={metrics}"], env=server_env(), stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(tmp, "server.log"), "w"), start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tritonserver exited ({proc.returncode}); log: {os.path.join(tmp, 'server.log')}")
        if http_ok(f"http://127.0.0.1:{http}/v2/health/ready", timeout_s=1):
            return proc, grpc
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("tritonserver not ready in 120 s")


@contextlib.contextmanager
def python_model_server(config: str = CONFIG, model: str = MODEL, prefix: str = "tritonkv-send-"):
    """``start_server`` in a temporary directory; yields the gRPC URL; stops the server after."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        proc, grpc = start_server(tmp, config, model)
        try:
            yield f"127.0.0.1:{grpc}"
        finally:
            proc.terminate()
            end_group(proc, time.monotonic() + 30)  # (its session: the stubs go too)


@contextlib.contextmanager
def grpc_stream(url: str):
    """A tritonclient gRPC stream: yields (client, queue of (result, error) per response)."""
    import tritonclient.grpc as g

    done: queue.SimpleQueue = queue.SimpleQueue()
    client = g.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: done.put((result, error)))
    try:
        yield client, done
    finally:
        client.stop_stream()


def measure(url: str, total: int, levels: list[int], repeats: int) -> dict[int, list[float]]:
    import numpy as np
    import tritonclient.grpc as g

    rates: dict[int, list[float]] = {k: [] for k in levels}
    with grpc_stream(url) as (client, done):
        for r in range(1 + repeats):  # round 0 warms up
            for k in levels:
                t0 = time.perf_counter()
                for j in range(k):
                    n = g.InferInput("N", [1], "INT64")
                    n.set_data_from_numpy(np.array([total // k], dtype=np.int64))
                    client.async_stream_infer("sender", [n], request_id=f"{r}-{k}-{j}", enable_empty_final_response=True)
                got = finals = 0
                while finals < k:
                    result, error = done.get(timeout=120)
                    if error is not None:
                        raise RuntimeError(str(error))
                    if result.get_response().parameters["triton_final_response"].bool_param:
                        finals += 1
                    else:
                        got += 1
                if r:
                    rates[k].append(got / (time.perf_counter() - t0))
    return rates


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--total", type=int, default=8000, help="responses per measurement")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    with python_model_server() as url:
        rates = measure(url, args.total, args.threads, args.repeats)
    one = statistics.median(rates[args.threads[0]])
    rows = [[k, f"{max(v):,.0f}", f"{statistics.median(v):,.0f}", f"{statistics.median(v) / one:.2f}",
             f"{1e6 / statistics.median(v):.0f}"] for k, v in rates.items()]
    lines = [f"# Decoupled responses per second by sending threads ({platform.node() and os.cpu_count()} cores, "
             f"{platform.processor() or platform.machine()})", "",
             f"`python bench/response_send_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"{args.total} one-element responses per measurement, {args.repeats} repeats after a warm-up; "
             "each thread sends the responses of its own request.", "",
             *table(["sending threads", "best responses/s", "median responses/s", f"median / {args.threads[0]} thread",
                     "us per response (median)"], rows, right=(0, 1, 2, 3, 4)), ""]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
