"""What Triton's Python backend charges for ``request.is_cancelled()``: one round trip from the
stub to the tritonserver process per call (python_backend pb_cancel.cc), the price of every
cancellation check a frontend makes (core/cancel_watch.py bounds how many it makes).

A decoupled Python model starts K threads per request, each asking its request
``is_cancelled`` N times, and answers with the microseconds per call each thread saw; the
server's other work is idle. Median of ``--repeats`` per K, and what asking every one of 64 /
256 open requests once costs one thread at that rate:

    python bench/is_cancelled_cost.py --out bench/results/is_cancelled_cost_cpu.md

On the GPU machine (``source .gpu-carry/device_env.sh`` first) the same command measures that host.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "backend"), os.path.join(ROOT, "bench")]

from md_table import publish, table  # noqa: E402
from response_send_cost import grpc_stream, python_model_server  # noqa: E402

CONFIG = """name: "asker"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "N", data_type: TYPE_INT64, dims: [1] }, { name: "K", data_type: TYPE_INT64, dims: [1] } ]
output [ { name: "US", data_type: TYPE_FP64, dims: [-1] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""

MODEL = '''import threading
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy()[0])
            k = int(pb_utils.get_input_tensor_by_name(request, "K").as_numpy()[0])
            threading.Thread(target=self.ask, args=(request, n, k), daemon=True).start()
        return None

    def ask(self, request, n, k):
        us = [0.0] * k

        def one(i):
            t = time.perf_counter()
            for _ in range(n):
                request.is_cancelled()
            us[i] = (time.perf_counter() - t) / n * 1e6

        threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out = pb_utils.Tensor("US", np.array(us, dtype=np.float64))
        request.get_response_sender().send(pb_utils.InferenceResponse([out]),
                                           flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''


def measure(url: str, calls: int, levels: list[int], repeats: int) -> dict[int, list[float]]:
    """K -> the median microseconds per call over K threads, one value per repeat."""
    import numpy as np
    import tritonclient.grpc as g

    us: dict[int, list[float]] = {k: [] for k in levels}
    with grpc_stream(url) as (client, done):
        for r in range(1 + repeats):  # round 0 warms up
            for k in levels:
                n, kk = g.InferInput("N", [1], "INT64"), g.InferInput("K", [1], "INT64")
                n.set_data_from_numpy(np.array([calls], dtype=np.int64))
                kk.set_data_from_numpy(np.array([k], dtype=np.int64))
                client.async_stream_infer("asker", [n, kk])
                result, error = done.get(timeout=120)
                if error is not None:
                    raise RuntimeError(str(error))
                if r:
                    us[k].append(statistics.median(result.as_numpy("US").tolist()))
    return us


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=4000, help="is_cancelled calls per thread")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    with python_model_server(CONFIG, MODEL, "tritonkv-cancel-") as url:
        us = measure(url, args.calls, args.threads, args.repeats)
    rows = []
    for k, v in us.items():
        med = statistics.median(v)
        rows.append([k, f"{min(v):.1f}", f"{med:.1f}", f"{k * 1e6 / med:,.0f}", f"{64 * med / 1e3:.1f}",
                     f"{256 * med / 1e3:.1f}"])
    lines = [f"# Triton's is_cancelled: one round trip per call ({os.cpu_count()} cores, "
             f"{platform.processor() or platform.machine()})", "",
             f"`python bench/is_cancelled_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"{args.calls} calls per thread, {args.repeats} repeats after a warm-up; every thread asks one open request.", "",
             *table(["asking threads", "best us per call", "median us per call", "calls/s (all threads)",
                     "ms to ask 64 requests (one thread)", "ms to ask 256"], rows, right=(0, 1, 2, 3, 4, 5)), ""]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
